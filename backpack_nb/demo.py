"""The README's main job (``make demo``): the tiny pipeline for both models on the Europarl
sample, CPU by default, in a few minutes.

For ``tiny_transformer`` then ``tiny_backpack`` (``params/tiny_*.yaml``) it runs the batch
pipeline of :mod:`backpack_nb.reports`: train (01; resumed, or left as it is when finished,
if the run exists), evaluate (03; the Backpack's report shows the Transformer beside it),
senses (04, Backpack only), steering (06, at a tiny size; the Transformer's shows the
projection baseline). Europarl comes from ``EUROPARL_SOURCE``, else the official
archives. It ends by printing where the reports are. ``-p KEY VALUE`` changes a setting of
both runs (``-p max_iters 50`` for a quicker look; the tests shrink the demo this way).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Sequence

from . import data, dataset, paths
from .errors import UserError, command, exit_interrupted
from .params import TrainConfig, load_params
from .reports import NotebookFailed, NotebookInterrupted, parse_value, pipeline
from .spelling import runner_spelling

RUNS = ("tiny_transformer", "tiny_backpack")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m backpack_nb.demo",
        description="Train, evaluate and read a tiny Transformer and a tiny Backpack "
                    "(params/tiny_*.yaml) as reports in outputs/ (what `make demo` runs).")
    ap.add_argument("-p", "--parameter", dest="parameters", nargs=2, action="append", default=[],
                    metavar=("KEY", "VALUE"),
                    help="change a setting of both runs (repeatable), as `reports pipeline -p` does")
    ap.add_argument("-q", "--quiet", action="store_true", help="no line per notebook cell")
    return ap


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {key: parse_value(value) for key, value in args.parameters}
    train_overrides = {k: v for k, v in overrides.items() if k in TrainConfig.keys()}
    t0 = time.perf_counter()
    reports = []
    try:
        for name in RUNS:
            cfg = load_params(name, train_overrides)
            print(f"== {name}: {cfg.model_type}, {cfg.max_iters} iterations -> {cfg.out_dir}", flush=True)
            # The Backpack's evaluation report draws the Transformer's curves and bars beside it.
            extra = {"compare_with": ["out/tiny_transformer"]} if cfg.model_type == "backpack" else {}
            reports += pipeline(name, {**extra, **overrides}, progress=not args.quiet)
        meta = dataset.load_meta(cfg.data_dir)
        print(f"\ndataset {dataset.resolve_data_dir(cfg.data_dir)} (source: {meta['source']})")
        print(data.format_stats(meta))
    except UserError as exc:  # settings are given as the runner takes them (-p KEY VALUE)
        raise UserError(runner_spelling(str(exc))) from None
    except NotebookFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if exc.user_error else 1
    except NotebookInterrupted as exc:  # Ctrl-C: one line saying what was kept
        exit_interrupted(str(exc))
    print(f"\ndemo done in {time.perf_counter() - t0:.0f} s; reports (open in a browser):")
    for r in reports:
        print(f"  {r.html or r.ipynb}")
    print(f"run folders: {paths.project_root() / 'out'}/tiny_transformer, .../tiny_backpack")
    return 0


if __name__ == "__main__":
    sys.exit(main())
