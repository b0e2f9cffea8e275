"""The README's main job (``make demo``): the tiny pipeline for both models on the Europarl
sample, CPU by default, in a few minutes.

For ``tiny_transformer`` then ``tiny_backpack`` (``params/tiny_*.yaml``) it runs the batch
pipeline of :mod:`backpack_nb.reports`: train (01; resumed, or left as it is when finished,
if the run exists), evaluate (03; the Backpack's report shows the Transformer beside it),
senses (04, Backpack only). Europarl comes from ``EUROPARL_SOURCE``, else the official
archives. It ends by printing where the reports are.
"""

from __future__ import annotations

import sys
import time

from . import data, dataset, paths
from .errors import UserError, exit_on_user_error
from .params import load_params
from .reports import NotebookFailed, NotebookInterrupted, pipeline

RUNS = ("tiny_transformer", "tiny_backpack")


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    reports = []
    try:
        for name in RUNS:
            cfg = load_params(name)
            print(f"== {name}: {cfg.model_type}, {cfg.max_iters} iterations -> {cfg.out_dir}", flush=True)
            # The Backpack's evaluation report draws the Transformer's curves and bars beside it.
            extra = {"compare_with": ["out/tiny_transformer"]} if cfg.model_type == "backpack" else {}
            reports += pipeline(name, extra)
        meta = dataset.load_meta(load_params(RUNS[0]).data_dir)
        print(f"\ndataset {dataset.resolve_data_dir(load_params(RUNS[0]).data_dir)} (source: {meta['source']})")
        print(data.format_stats(meta))
    except UserError as exc:
        exit_on_user_error(exc)
    except NotebookFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if exc.user_error else 1
    except NotebookInterrupted as exc:  # Ctrl-C: one line saying what was kept, no traceback
        print(f"interrupted: {exc}", file=sys.stderr)
        return 130
    print(f"\ndemo done in {time.perf_counter() - t0:.0f} s; reports (open in a browser):")
    for r in reports:
        print(f"  {r.html or r.ipynb}")
    print(f"run folders: {paths.project_root() / 'out'}/tiny_transformer, .../tiny_backpack")
    return 0


if __name__ == "__main__":
    sys.exit(main())
