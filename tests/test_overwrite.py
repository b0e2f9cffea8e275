"""``--overwrite`` changes nothing in ``out_dir`` until the new run's first save: a new run
whose model fails to build, or one killed (SIGKILL) before its first save, leaves the earlier
run byte for byte, and ``--init_from resume`` then continues it bit-exactly. The first save
replaces the earlier ``ckpt.pt`` and removes its ``ckpt.prev.pt`` and ``best.pt`` instead of
keeping them."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backpack_nb import checkpoint as ck
from backpack_nb.training import train
from conftest import ROOT, tiny_config

pytestmark = pytest.mark.slow  # every test trains

SMALL = dict(max_iters=20, eval_interval=5, eval_iters=2, checkpoint_interval=5, log_interval=5,
             n_layer=1, n_embd=32, n_head=2, block_size=32, batch_size=4)
COMPARED = ("iterations", "train_loss", "val_loss", "lr", "tokens_seen", "top_activating_words")


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) -> the SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _log(out_dir: Path) -> dict:
    return json.loads((out_dir / "training_log.json").read_text("utf-8"))


@pytest.fixture(scope="module")
def reference(prepared_europarl, tmp_path_factory) -> dict:
    """An uninterrupted run of 20 iterations: the log a resumed run must equal."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(tiny_config("backpack", out, **SMALL))
    return _log(out)


def _earlier_run(out: Path) -> dict[str, str]:
    """A run stopped at iteration 10 (ckpt.pt, ckpt.prev.pt, best.pt, its log and run.json),
    resumable; returns its snapshot."""
    result = train(tiny_config("backpack", out, stop_after=10, **SMALL))
    assert result["iter_num"] == 10
    assert {ck.CKPT_NAME, ck.PREV_NAME, ck.BEST_NAME, "training_log.json", "run.json"} <= {
        p.name for p in out.iterdir()}
    return _snapshot(out)


def _resume_equals(out: Path, reference: dict) -> None:
    result = train(tiny_config("backpack", out, init_from="resume", **SMALL))
    assert result["stopped"] is None and result["iter_num"] == 20
    got = _log(out)
    for key in COMPARED:
        assert got[key] == reference[key], key  # bit-exact on the CPU


def test_an_overwrite_whose_model_fails_to_build_changes_nothing(reference, tmp_path,
                                                                  monkeypatch):
    out = tmp_path / "run"
    before = _earlier_run(out)

    def broken(*args, **kwargs):
        raise RuntimeError("the builder broke")

    monkeypatch.setattr("backpack_nb.training.loop.build_model", broken)
    with pytest.raises(RuntimeError, match="the builder broke"):
        train(tiny_config("backpack", out, overwrite=True, seed=7, **SMALL))
    assert _snapshot(out) == before
    monkeypatch.undo()
    _resume_equals(out, reference)


_KILLED_BEFORE_FIRST_SAVE = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from backpack_nb.training import loop
from backpack_nb.params import load_params
import json

def killed(self, *, best=False):  # the moment the first save would begin
    os.kill(os.getpid(), signal.SIGKILL)

loop.Trainer.save = killed
cfg = load_params("tiny_backpack", json.loads(sys.argv[2]))
loop.train(cfg)
"""


def test_an_overwrite_killed_before_its_first_save_changes_nothing(reference, tmp_path):
    """The new run evaluates iteration 0 and trains five steps (its log, its curves and its
    run.json would have been written by then before), then is killed as its first save
    begins."""
    out = tmp_path / "run"
    before = _earlier_run(out)
    overrides = {"data_dir": "europarl_sample", "out_dir": str(out), "overwrite": True,
                 "seed": 7, **SMALL}
    proc = subprocess.run([sys.executable, "-c", _KILLED_BEFORE_FIRST_SAVE, str(ROOT),
                           json.dumps(overrides)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert "eval 0" in proc.stdout + proc.stderr  # it got as far as its first evaluation
    assert _snapshot(out) == before
    _resume_equals(out, reference)


def test_the_first_save_replaces_the_earlier_run_without_keeping_it(reference, tmp_path):
    """After the new run's first save no file of the earlier run is left: ckpt.prev.pt is
    not the earlier ckpt.pt, best.pt, the log and run.json are the new run's, or gone."""
    out = tmp_path / "run"
    before = _earlier_run(out)
    # stopped at 5 before its evaluation there: a ckpt.pt, no best.pt of its own
    small = {**SMALL, "overwrite": True, "seed": 7}
    assert train(tiny_config("backpack", out, stop_after=5, **small))["iter_num"] == 5
    after = _snapshot(out)
    assert ck.PREV_NAME not in after and ck.BEST_NAME not in after
    for name in (ck.CKPT_NAME, "training_log.json", "run.json"):
        assert after[name] != before[name], name
    assert _log(out)["iterations"] == [0]
    assert json.loads((out / "run.json").read_text())["config"]["seed"] == 7

    # finished at 5 with an evaluation there: its ckpt.pt and best.pt, nothing older
    before = _earlier_run(tmp_path / "again")
    out = tmp_path / "again"
    assert train(tiny_config("backpack", out, **{**small, "max_iters": 5}))["iter_num"] == 5
    after = _snapshot(out)
    assert ck.PREV_NAME not in after
    for name in (ck.CKPT_NAME, ck.BEST_NAME, "training_log.json", "run.json"):
        assert after[name] != before[name], name
    assert ck.read_checkpoint(out / ck.BEST_NAME)["iter_num"] == 5
    assert _log(out)["iterations"] == [0, 5]
