"""``python -m backpack_nb.hub export RUN/best.pt OUT_DIR [--overwrite]``: a trained run as
a Hugging Face folder (see :mod:`backpack_nb.hub.export`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..loading import load_model
from ..errors import UserError, command
from .export import export
from .layout import EXPORT_FILES
from ..model_source import is_pretrained
from .replace import check_out_dir


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backpack_nb.hub",
                                     description="Hugging Face interop for backpack-nb runs.")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write a run's model as a Hugging Face folder")
    ex.add_argument("model_path", help="the run's ckpt.pt or best.pt")
    ex.add_argument("out_dir", help="the folder to write (new or empty)")
    ex.add_argument("--overwrite", action="store_true",
                    help="replace an OUT_DIR that holds an earlier export (nothing but "
                         f"{', '.join(EXPORT_FILES)}); any other folder is refused")
    args = parser.parse_args(argv)
    if is_pretrained(args.model_path):
        raise UserError(f"{args.model_path} is already a Hugging Face model; export takes a "
                        "run's ckpt.pt or best.pt")
    check_out_dir(args.out_dir, args.overwrite)  # before loading anything
    model, tok, state = load_model(args.model_path)
    out = export(model, tok, state, args.out_dir, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
