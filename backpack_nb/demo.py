"""The README's main job: a tiny run on the Europarl sample, CPU by default.

For now it prepares the data (from ``EUROPARL_SOURCE``, else the official archives) and
prints its statistics; training, resuming, evaluating and the report join as they land.
"""

from __future__ import annotations

import sys

from . import data, paths
from .errors import UserError, exit_on_user_error


def main() -> int:
    try:
        out = paths.data_root() / "europarl_demo"
        if not (out / "meta.json").exists():
            print(f"preparing Europarl en+fr into {out}")
            data.prepare(None, out, data.PrepareConfig(langs=("en", "fr"), form="raw"))
        meta = data.load_meta(out)
        print(f"dataset {out} (source: {meta['source']})")
        print(data.format_stats(meta))
    except UserError as exc:
        exit_on_user_error(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
