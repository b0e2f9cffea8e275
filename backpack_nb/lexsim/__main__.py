"""``python -m backpack_nb.lexsim``: score a checkpoint on Multi-SimLex and add the result
as the ``lexsim`` section of its eval.json (``evaluate.py --lexsim`` does the same after the
bits-per-byte evaluation)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..errors import UserError, command
from .scoring import DEFAULT_MIN_COUNT, write_lexsim
from .tables import format_table

# Fewer resamples than this leave a 95% percentile interval resting on a handful of draws
# (below 40, its ends are the smallest and largest draw).
MIN_BOOT = 100


def _check_args(args: argparse.Namespace) -> None:
    """Every bad value in one UserError, before Multi-SimLex or the checkpoint is read."""
    problems = []
    if args.n_boot < MIN_BOOT:
        problems.append(f"--n_boot must be >= {MIN_BOOT} (the resamples behind each 95% "
                        f"interval; default 1000), got {args.n_boot}")
    if args.min_count < 1:
        problems.append(f"--min_count must be >= 1, got {args.min_count}")
    if problems:
        raise UserError("; ".join(problems))


@command
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backpack_nb.lexsim",
                                 description="Multi-SimLex word similarity of a checkpoint (adds a lexsim section to eval.json).")
    ap.add_argument("--model_path", required=True, help="ckpt.pt or best.pt")
    ap.add_argument("--multisimlex", default=None, metavar="PATH",
                    help="folder with scores.csv and translation.csv (default: MULTISIMLEX_SOURCE, else data/multisimlex, fetched once)")
    ap.add_argument("--data_dir", default=None, help="dataset whose train.bin decides coverage (default: the checkpoint's)")
    ap.add_argument("--min_count", type=int, default=DEFAULT_MIN_COUNT, help="a pair is covered when both words occur this often in train.bin")
    ap.add_argument("--n_boot", type=int, default=1000,
                    help=f"bootstrap resamples behind each 95%% interval (>= {MIN_BOOT})")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None,
                    help="eval.json to update (default: beside the checkpoint; a relative path is "
                         "taken from the project root); an existing file is replaced only if it "
                         "is an evaluation")
    args = ap.parse_args(argv)
    _check_args(args)
    result = write_lexsim(args.model_path, args.multisimlex, data_dir=args.data_dir, out=args.out,
                          device=args.device, min_count=args.min_count, n_boot=args.n_boot,
                          flag_prefix="--")
    print(format_table(result))
    print(f"wrote the lexsim section of {result['path']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
