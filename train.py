"""Train a Backpack language model or its Transformer baseline (the seed's front door).

    python train.py --model_type backpack --config train_europarl_scratch \\
        --out_dir out/backpack_full --data_dir europarl --init_from scratch \\
        --device cuda --dtype float16 --compile

Any key of params/<config>.yaml can be overridden as ``--key value`` (booleans also as
``--flag`` / ``--no-flag``); ``--help`` lists them all. Under ``torchrun --nproc_per_node N``
the same command trains with DDP. Exit status: 0 when training finished, 2 for a bad input
(one ``error:`` line naming the fix; also a full disk or a diverged, NaN loss), 128 + signal
number when stopped by SIGINT/SIGTERM (after saving a checkpoint; a second signal aborts
without saving the current step).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Sequence

from backpack_nb.errors import command


class _StderrLines(logging.Handler):
    """``warning: <message>`` on whatever sys.stderr is now (not the one at set-up time, so
    in-process callers that swap stderr, such as tests, still see the lines)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{record.levelname.lower()}: {record.getMessage()}", file=sys.stderr, flush=True)


def _setup_logging() -> None:
    logger = logging.getLogger("backpack_nb")
    if not any(isinstance(h, _StderrLines) for h in logger.handlers):
        logger.addHandler(_StderrLines())
    # Under torchrun only rank 0 speaks; the others would repeat every warning.
    logger.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.ERROR)


@command
def main(argv: Sequence[str] | None = None) -> int:
    _setup_logging()
    cfg = None
    try:
        from backpack_nb.dataset import train_config
        from backpack_nb.params import typed_keys
        from backpack_nb.training import train

        cfg = train_config(argv)
        # a pretrained model (or the checkpoint of a fine-tune) fixes the shape: a key typed
        # here that disagrees is an error
        result = train(cfg, typed=typed_keys(argv))
    except KeyboardInterrupt as exc:  # a second signal, or Ctrl-C before training started
        signum = int(getattr(exc, "signum", signal.SIGINT))
        print(f"error: aborted by {signal.Signals(signum).name}{_after_abort(cfg)}",
              file=sys.stderr, flush=True)
        return 128 + signum
    stopped = result["stopped"]
    if stopped in ("SIGINT", "SIGTERM", "peer"):  # "peer": another rank got the signal
        return 128 + int(getattr(signal, stopped if stopped != "peer" else "SIGTERM"))
    return 0


def _after_abort(cfg) -> str:
    """What an abort left: a resume hint only where there is a checkpoint to resume."""
    if cfg is None:
        return " before training started; nothing was written"
    from backpack_nb.checkpoint import existing_checkpoints  # loaded already, by training
    from backpack_nb.paths import resolve_in_root

    if existing_checkpoints(resolve_in_root(cfg.out_dir)):
        return (" without saving the current step; the checkpoints already written are "
                "complete: continue with --init_from resume")
    return (" before the first checkpoint was written, so there is nothing to resume: run "
            "the same command again to start over")


if __name__ == "__main__":
    sys.exit(main())
