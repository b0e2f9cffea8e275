"""Evaluate a checkpoint (the seed's front door).

    python evaluate.py --model_path out/backpack_full/ckpt.pt --config train_europarl_scratch --model_type backpack

Loss, perplexity and bits per byte on val and test, overall and per language, with bootstrap
95% intervals; writes eval.json beside the checkpoint. ``--help`` lists the options.
"""

import sys

from backpack_nb.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
