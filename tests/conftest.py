"""Shared test set-up: temporary data/outputs roots, the Europarl sample, one prepared
dataset per test session (later fixtures add tiny trained checkpoints the same way)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Before anything imports backpack_nb: every test writes under one temporary folder, never
# into the checkout's data/ or outputs/ (../shared is read-only in CI).
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="backpack_nb_tests_"))
os.environ["BACKPACK_NB_DATA"] = str(_SESSION_TMP / "data")
os.environ["BACKPACK_NB_OUTPUTS"] = str(_SESSION_TMP / "outputs")
# One torch.compile cache for the whole session (and across runs on one machine).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "torchinductor"))
os.environ.setdefault("EUROPARL_SOURCE", str(ROOT.parent / "shared" / "europarl"))
os.environ.setdefault("MULTISIMLEX_SOURCE", str(ROOT.parent / "shared" / "multisimlex"))


# The session fixtures that prepare data or train (below). A test that uses one, directly or
# through another fixture, is marked slow here, so the fast tier (make test-fast, -m "not slow")
# never waits for them. A test module names its own such fixtures in a SLOW_FIXTURES of its
# own; a test that trains, prepares, compiles or runs a notebook inline is marked slow itself.
SLOW_FIXTURES = frozenset({"europarl_source", "prepared_europarl", "tiny_backpack_run",
                           "tiny_transformer_run"})


@pytest.hookimpl(tryfirst=True)  # before -m selects on the markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        slow = SLOW_FIXTURES.union(getattr(getattr(item, "module", None), "SLOW_FIXTURES", ()))
        if slow.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# Figures that tests measure for the docs, by title (docs/reliability.md quotes those of
# tests/test_reliability.py): printed once, after the run, by pytest_terminal_summary.
FIGURES: dict[str, dict[str, object]] = {}


def pytest_terminal_summary(terminalreporter):
    for title, figures in FIGURES.items():
        if figures:
            terminalreporter.write_sep("-", title)
            terminalreporter.write_line(json.dumps(figures, indent=2))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _SESSION_TMP


@pytest.fixture(scope="session")
def europarl_source() -> Path:
    """The read-only Europarl sample (raw day files and aligned pairs)."""
    path = Path(os.environ["EUROPARL_SOURCE"])
    if not (path / "raw" / "txt" / "en").is_dir():
        pytest.fail(f"the Europarl sample is not at {path}; set EUROPARL_SOURCE to ../shared/europarl")
    return path


PREPARED_BLOCK_SIZE = 64


@pytest.fixture(scope="session")
def prepared_europarl(europarl_source) -> Path:
    """The raw en+fr sample prepared once per session (block_size 64 floors)."""
    from backpack_nb import data

    cfg = data.PrepareConfig(langs=("en", "fr"), form="raw", block_size=PREPARED_BLOCK_SIZE)
    return data.prepare(europarl_source, _SESSION_TMP / "data" / "europarl_sample", cfg, progress=False)


# ---- training fixtures ----

TINY_RUN_DIR = _SESSION_TMP / "runs"


def tiny_config(model_type: str, out_dir: Path, **overrides):
    """The tiny preset of ``model_type`` (params/tiny_<model_type>.yaml) pointed at the
    session's prepared Europarl sample and a folder of its own."""
    from backpack_nb.params import load_params

    return load_params(f"tiny_{model_type}",
                       {"data_dir": "europarl_sample", "out_dir": str(out_dir), **overrides})


_tiny_runs: dict[str, dict] = {}


def _tiny_run(model_type: str, prepared: Path) -> dict:
    """Train the tiny preset of ``model_type`` once per session: ``out_dir`` (ckpt.pt,
    best.pt, training_log.json, run.json), ``result`` (train()'s summary), ``records`` (what
    the callback got), ``config``, ``wall_s``. Tests must not write into ``out_dir``."""
    if model_type not in _tiny_runs:
        import time

        from backpack_nb.training import train

        cfg = tiny_config(model_type, TINY_RUN_DIR / f"tiny_{model_type}")
        records: list[dict] = []
        t0 = time.perf_counter()
        result = train(cfg, callback=records.append)
        _tiny_runs[model_type] = {"out_dir": Path(result["out_dir"]), "result": result,
                                  "records": records, "config": cfg,
                                  "wall_s": time.perf_counter() - t0}
    return _tiny_runs[model_type]


@pytest.fixture(scope="session")
def tiny_backpack_run(prepared_europarl) -> dict:
    """A tiny Backpack trained on the Europarl sample (see _tiny_run)."""
    return _tiny_run("backpack", prepared_europarl)


@pytest.fixture(scope="session")
def tiny_transformer_run(prepared_europarl) -> dict:
    """A tiny Transformer trained on the Europarl sample (see _tiny_run)."""
    return _tiny_run("transformer", prepared_europarl)
