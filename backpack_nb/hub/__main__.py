"""``python -m backpack_nb.hub export RUN/best.pt OUT_DIR [--overwrite]``: a trained run as
a Hugging Face folder (see :mod:`backpack_nb.hub.export`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..checkpoint import load_model
from ..errors import UserError, exit_on_user_error
from .export import check_out_dir, export
from .load import is_pretrained


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backpack_nb.hub",
                                     description="Hugging Face interop for backpack-nb runs.")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write a run's model as a Hugging Face folder")
    ex.add_argument("model_path", help="the run's ckpt.pt or best.pt")
    ex.add_argument("out_dir", help="the folder to write (new or empty)")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    try:
        if is_pretrained(args.model_path):
            raise UserError(f"{args.model_path} is already a Hugging Face model; export takes a "
                            "run's ckpt.pt or best.pt")
        check_out_dir(args.out_dir, args.overwrite)  # before loading anything
        model, tok, state = load_model(args.model_path)
        out = export(model, tok, state, args.out_dir, overwrite=args.overwrite)
    except UserError as exc:
        exit_on_user_error(exc)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
