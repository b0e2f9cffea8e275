"""Print text samples from a checkpoint (nanoGPT-like flags).

    python sample.py --model_path out/backpack_full/ckpt.pt --start "The Commission" --num_samples 3
"""

import sys

from backpack_nb.sampling import main

if __name__ == "__main__":
    sys.exit(main())
