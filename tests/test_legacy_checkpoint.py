"""A run written by the code before the restructuring (main at f3defa5, a micro Backpack on
the session's Europarl sample) still loads, evaluates and resumes, to the same numbers that
code computed (tests/fixtures/legacy_f3defa5/expected.json)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import tiny_config

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_f3defa5"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text(encoding="utf-8"))


@pytest.fixture
def legacy_run(tmp_path) -> Path:
    out = tmp_path / "legacy"
    shutil.copytree(FIXTURE, out)
    return out


def test_legacy_best_pt_loads_and_evaluates_to_the_same_numbers(legacy_run, prepared_europarl):
    from backpack_nb.evaluation import evaluate_checkpoint

    result = evaluate_checkpoint(legacy_run / "best.pt", data_dir=str(prepared_europarl),
                                 splits=["val"], max_tokens=2000, progress=False)
    expected = EXPECTED["eval_val_max_tokens_2000"]
    assert set(result["splits"]["val"]) == set(expected)
    for lang, want in expected.items():
        got = result["splits"]["val"][lang]
        assert (got["tokens"], got["bytes"]) == (want["tokens"], want["bytes"])
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-9)
        assert got["bits_per_byte"] == pytest.approx(want["bits_per_byte"], abs=1e-9)
        assert got["bpb_ci95"] == pytest.approx(want["bpb_ci95"], abs=1e-9)


def test_legacy_ckpt_pt_resumes_bit_exactly(legacy_run, prepared_europarl):
    from backpack_nb.training import train

    saved = json.loads((legacy_run / "run.json").read_text(encoding="utf-8"))["config"]
    shape = {k: saved[k] for k in ("block_size", "n_layer", "n_head", "n_embd", "n_senses",
                                   "batch_size", "lr_decay_iters", "warmup_iters",
                                   "eval_interval", "eval_iters", "checkpoint_interval",
                                   "log_interval", "probe_words", "run_name")}
    cfg = tiny_config("backpack", legacy_run, init_from="resume", max_iters=30, **shape)
    result = train(cfg)
    log = json.loads((legacy_run / "training_log.json").read_text(encoding="utf-8"))
    want = EXPECTED["resume_to_30"]
    assert result["iter_num"] == 30
    assert log["iterations"] == want["iterations"]
    assert log["train_loss"] == want["train_loss"]  # bit-exact on the CPU
    assert log["val_loss"] == want["val_loss"]
    assert result["best_val_loss"] == want["best_val_loss"]


def test_legacy_checkpoint_loads_as_a_model(legacy_run):
    from backpack_nb.loading import load_model

    model, tok, state = load_model(legacy_run / "best.pt")
    assert state["model_type"] == "backpack"
    assert model.config.n_embd == 8 and model.config.n_senses == 2
    assert tok.vocab_size == model.config.vocab_size
