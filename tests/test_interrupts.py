"""Ctrl-C wherever a user may press it: during an evaluation inside training (abandoned within
seconds, run again on resume), a second Ctrl-C (a resume hint only where a checkpoint exists),
and in sample.py and evaluate.py (one line, exit status 130, nothing written)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backpack_nb import checkpoint as ck
from backpack_nb import evaluation, sampling
from backpack_nb.errors import INTERRUPTED_STATUS
from backpack_nb.training import Aborted, estimate, train
from conftest import ROOT, tiny_config

sys.path.insert(0, str(ROOT))
import train as train_front_door  # noqa: E402  (the front door, called in-process)

# From SIGINT to exit during an evaluation of a tiny model: the rest of one batch, run.json,
# the interpreter's exit. Generous: the test machine is shared (load average 3-10).
STOP_BOUND_S = 15.0
# A micro Backpack run (block 16, d 8) committed as a fixture: no training needed.
LEGACY_RUN = ROOT / "tests" / "fixtures" / "legacy_f3defa5"
COMPARED = ("iterations", "train_loss", "val_loss", "lr", "tokens_seen", "top_activating_words")


def _argv(out_dir: Path, *extra: str) -> list[str]:
    return ["--config", "tiny_backpack", "--data_dir", "europarl_sample",
            "--out_dir", str(out_dir), *extra]


def _log(out_dir: Path) -> dict:
    return json.loads((out_dir / "training_log.json").read_text("utf-8"))


# --- Ctrl-C during an evaluation inside training ----------------------------------------------


@pytest.mark.slow
def test_ctrl_c_in_the_first_evaluation_stops_within_seconds(prepared_europarl, tmp_path):
    """train.py with --eval_iters 100000 (the first evaluation alone would take many minutes
    here): SIGINT a second into it stops the process within seconds, exit status 130, with
    no resume hint, since no checkpoint exists (before: ignored until the evaluation ended,
    then "continue with --init_from resume")."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "train.py", *_argv(out, "--eval_iters", "100000")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        for line in proc.stdout:  # the model's line: the loop and its first evaluation begin
            if " parameters (" in line:
                break
        time.sleep(1.0)  # well inside the evaluation, which lasts minutes
        assert proc.poll() is None
        t_sig = time.monotonic()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
        took = time.monotonic() - t_sig
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert took < STOP_BOUND_S, took
    assert "Traceback" not in stderr
    assert ("received SIGINT: abandoning the evaluation of iteration 0 (a resume runs it "
            "again), stopping (no step trained yet: there is nothing to save)") in stderr
    assert "stopped at iteration 0 (SIGINT); no checkpoint was written yet, so there is " \
           "nothing to resume" in stdout
    assert "--init_from resume" not in stdout + stderr
    assert not ck.existing_checkpoints(out)
    assert json.loads((out / "run.json").read_text())["stopped_by"] == "SIGINT"
    print(f"\nSIGINT during the first evaluation: {took:.2f} s to exit")


@pytest.mark.slow
def test_an_abandoned_evaluation_is_saved_past_and_rerun_on_resume(prepared_europarl,
                                                                   tmp_path, monkeypatch):
    """A real SIGINT (to this process, through train()'s handler) in the middle of the
    evaluation at iteration 10: the evaluation is dropped, ckpt.pt is saved at 10, and the
    resume evaluates iteration 10 first; the whole log equals an uninterrupted run's."""
    small = dict(max_iters=20, eval_interval=10, eval_iters=6, checkpoint_interval=100,
                 log_interval=5, n_layer=1, n_embd=32, n_head=2, block_size=32, batch_size=4)
    reference = train(tiny_config("backpack", tmp_path / "ref", **small))
    assert reference["stopped"] is None

    real = estimate.estimate_loss
    calls = []

    def estimate_with_a_signal(model, splits, cfg, rt, stop_reason):
        calls.append(len(calls))
        batches = []

        def reason():
            batches.append(1)
            if len(calls) == 2 and len(batches) == 3:  # the second evaluation, mid-split
                os.kill(os.getpid(), signal.SIGINT)
            return stop_reason()

        return real(model, splits, cfg, rt, reason)

    monkeypatch.setattr("backpack_nb.training.loop.estimate_loss", estimate_with_a_signal)
    out = tmp_path / "run"
    stopped = train(tiny_config("backpack", out, **small))
    assert stopped["stopped"] == "SIGINT" and stopped["iter_num"] == 10
    assert _log(out)["iterations"] == [0]  # the evaluation of 10 was dropped, not half-kept
    assert ck.read_checkpoint(out / ck.CKPT_NAME)["iter_num"] == 10
    monkeypatch.setattr("backpack_nb.training.loop.estimate_loss", real)
    resumed = train(tiny_config("backpack", out, init_from="resume", **small))
    assert resumed["stopped"] is None
    got, want = _log(out), _log(tmp_path / "ref")
    assert got["iterations"] == [0, 10, 20]
    for key in COMPARED:
        assert got[key] == want[key], key  # bit-exact on the CPU


def test_second_ctrl_c_hints_a_resume_only_where_a_checkpoint_exists(prepared_europarl,
                                                                     tmp_path, monkeypatch,
                                                                     capsys):
    """A second Ctrl-C aborts at once (training.Aborted). Before any checkpoint: start again,
    no resume hint (before: "continue with --init_from resume", which then fails); with one:
    the resume hint."""
    def abort(cfg, **kw):
        raise Aborted(signal.SIGINT)

    monkeypatch.setattr("backpack_nb.training.train", abort)
    out = tmp_path / "run"
    assert train_front_door.main(_argv(out)) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: aborted by SIGINT")
    assert "nothing to resume" in err and "--init_from resume" not in err

    out.mkdir()
    ck.save_checkpoint({"model": {}, "iter_num": 5}, out)
    assert train_front_door.main(_argv(out, "--init_from", "resume")) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "checkpoints already written are complete: continue with --init_from resume" in err


# --- Ctrl-C in sample.py and evaluate.py ---------------------------------------------------------


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _expect_130(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == INTERRUPTED_STATUS == 130
    err = capsys.readouterr().err
    assert err.startswith("error: interrupted (Ctrl-C)") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_ctrl_c_in_sample_py_is_one_line_and_130(monkeypatch, capsys):
    monkeypatch.setattr(sampling, "sample_text", _interrupt)  # Ctrl-C while generating
    _expect_130(sampling.main, ["--model_path", str(LEGACY_RUN / "best.pt"),
                                "--max_new_tokens", "2", "--device", "cpu"], capsys)


def test_ctrl_c_in_evaluate_py_is_one_line_130_and_writes_nothing(prepared_europarl, tmp_path,
                                                                  monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(LEGACY_RUN / "best.pt", run / "best.pt")
    (run / "eval.json").write_text('{"checkpoint": "x", "splits": {}}')
    before = (run / "eval.json").read_bytes()
    monkeypatch.setattr(evaluation, "score_tokens", _interrupt)  # Ctrl-C while scoring
    _expect_130(evaluation.main, ["--model_path", str(run / "best.pt"), "--data_dir",
                                  str(prepared_europarl), "--splits", "val", "--max_tokens",
                                  "200", "--device", "cpu"], capsys)
    assert (run / "eval.json").read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "eval.json"]
