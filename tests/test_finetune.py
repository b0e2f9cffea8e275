"""Fine-tuning a pretrained model with train.py (backpack_nb.finetune): the tiny model of the
released kind (../shared/backpack-gpt2-tiny) trained on Europarl in its own ids, its loss
falling; its shape replacing the params file's; a conflicting shape flag refused; the run
resumed like any other; a dataset in other ids refused naming both."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from backpack_nb import data, hub
from backpack_nb.checkpoint import read_checkpoint
from backpack_nb.errors import UserError
from backpack_nb.finetune import inherit_shape
from backpack_nb.models import ModelConfig, build_model
from backpack_nb.params import load_params
from hub_fixtures import TEXT, TINY, as_gpt2_folder, write_small_gpt2_bpe
from train import main as train_main

STEPS = 40
SLOW_FIXTURES = {"gpt2_data", "finetuned"}  # prepare data, fine-tune (conftest marks their tests)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A copy of the tiny model with a 320-token GPT-2-format BPE beside it (its vocabulary)."""
    folder = tmp_path_factory.mktemp("pretrained") / "backpack-gpt2-tiny"
    shutil.copytree(TINY, folder)
    write_small_gpt2_bpe(folder, TEXT, n_merges=63)
    return folder


@pytest.fixture(scope="module")
def gpt2_data(pretrained, europarl_source, tmp_path_factory) -> Path:
    """Europarl en+fr in the model's own ids (no compaction)."""
    cfg = data.PrepareConfig(langs=("en", "fr"), block_size=64,
                             encoding=f"gpt2:{pretrained}", full_vocab=True)
    return data.prepare(europarl_source, tmp_path_factory.mktemp("data") / "ep_gpt2", cfg,
                        progress=False)


def _args(pretrained: Path, data_dir: Path, out_dir: Path, *more: str) -> list[str]:
    return ["--config", "tiny_backpack", "--init_from", str(pretrained), "--data_dir",
            str(data_dir), "--out_dir", str(out_dir), "--device", "cpu", "--max_iters",
            str(STEPS), "--eval_interval", "10", "--eval_iters", "4", "--batch_size", "8",
            "--learning_rate", "1e-3", "--min_lr", "1e-4", "--warmup_iters", "5",
            "--lr_decay_iters", str(STEPS), "--log_interval", "10", *more]


@pytest.fixture(scope="module")
def finetuned(pretrained, gpt2_data, tmp_path_factory) -> dict:
    """The tiny model fine-tuned for STEPS steps by train.py, and what it printed."""
    out_dir = tmp_path_factory.mktemp("runs") / "ft"
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:  # capsys is per test; this fixture is shared
        mp.setattr(sys, "stderr", err)
        rc = train_main(_args(pretrained, gpt2_data, out_dir))
    return {"rc": rc, "out_dir": out_dir, "stderr": err.getvalue()}


def test_the_tiny_released_model_fine_tunes_and_its_loss_falls(finetuned, pretrained):
    assert finetuned["rc"] == 0, finetuned["stderr"]
    log = json.loads((finetuned["out_dir"] / "training_log.json").read_text())
    iters, val = log["iterations"], log["val_loss"]
    assert iters[0] == 0 and iters[-1] == STEPS
    model, _, _ = hub.load_pretrained(pretrained, tokenizer=False)
    state = read_checkpoint(finetuned["out_dir"] / "ckpt.pt")
    assert val[-1] < val[0] - 0.3, val
    assert log["train_loss"][-1] < log["train_loss"][0] - 0.3, log["train_loss"]
    # the weights started from the pretrained ones: they moved little, and a fresh
    # initialisation of the same shape is far from them
    ours = state["model"]["wte.weight"]
    theirs = model.state_dict()["wte.weight"]
    assert ours.shape == theirs.shape == (320, 64)
    assert (ours - theirs).norm() / theirs.norm() < 0.5
    assert state["model_config"]["vocab_size"] == 320 and state["model_config"]["bias"] is True
    assert state["model_config"]["scale_attn_by_inverse_layer_idx"] is True
    assert state["history"]["pretrained"] == str(pretrained)
    assert state["config"]["n_layer"] == 2 and state["config"]["n_embd"] == 64
    print("fine-tune val losses:", [round(v, 4) for v in val])


def test_the_pretrained_shape_replaces_the_params_files_with_a_warning(finetuned):
    err = finetuned["stderr"]
    assert "the pretrained model" in err and "fixes the model and its ids:" in err, err
    for change in ("n_embd 128 -> 64", "bias False -> True",
                   "scale_attn_by_inverse_layer_idx False -> True", "encoding cl100k_base -> gpt2"):
        assert change in err, err
    assert "Traceback" not in err


def test_a_fine_tune_resumes_with_the_params_file_it_started_from(finetuned, pretrained,
                                                                 gpt2_data, tmp_path, capsys):
    out_dir = tmp_path / "ft"
    shutil.copytree(finetuned["out_dir"], out_dir)
    args = ["--config", "tiny_backpack", "--init_from", "resume", "--data_dir", str(gpt2_data),
            "--out_dir", str(out_dir), "--device", "cpu", "--max_iters", str(STEPS + 10),
            "--eval_interval", "10", "--eval_iters", "4", "--batch_size", "8",
            "--learning_rate", "1e-3", "--min_lr", "1e-4", "--warmup_iters", "5",
            "--lr_decay_iters", str(STEPS + 10), "--log_interval", "10"]
    assert train_main(args) == 0
    err = capsys.readouterr().err
    assert f"ckpt.pt (from {pretrained}) fixes the model and its ids" in err, err
    assert "n_embd 128 -> 64" in err, err
    state = read_checkpoint(out_dir / "ckpt.pt")
    assert state["iter_num"] == STEPS + 10 and state["history"]["pretrained"] == str(pretrained)
    assert len(state["history"]["resumed_at"]) == 1
    # a shape flag that disagrees with the checkpoint is refused
    with pytest.raises(SystemExit) as exc:
        train_main(args + ["--n_layer", "4"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--n_layer 4 conflicts with checkpoint" in err, err


def test_a_shape_flag_that_conflicts_with_the_pretrained_model_is_an_error(pretrained,
                                                                           gpt2_data, tmp_path,
                                                                           capsys):
    with pytest.raises(SystemExit) as exc:
        train_main(_args(pretrained, gpt2_data, tmp_path / "x", "--n_embd", "128",
                         "--model_type", "transformer"))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert ("--n_embd 128, --model_type transformer conflicts with the pretrained model" in err
            or "--model_type transformer, --n_embd 128 conflicts with the pretrained model"
            in err), err
    assert "n_embd 64" in err and "model_type backpack" in err
    assert not (tmp_path / "x").exists()
    # typed values that agree with the model are fine
    cfg = load_params("tiny_backpack", {"init_from": str(pretrained), "n_embd": "64"})
    cfg, origin = inherit_shape(cfg, typed={"n_embd", "init_from"})
    assert cfg.n_embd == 64 and cfg.n_layer == 2 and origin.vocab_size == 320


def test_a_dataset_in_other_ids_is_refused_naming_both(pretrained, prepared_europarl, tmp_path,
                                                      capsys):
    """The session's compact cl100k dataset cannot feed GPT-2's ids."""
    with pytest.raises(SystemExit) as exc:
        train_main(_args(pretrained, prepared_europarl, tmp_path / "x"))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert str(prepared_europarl) in err and "cl100k_base, a compact vocabulary" in err, err
    assert "the pretrained model" in err and "a vocabulary of 320" in err
    assert "--encoding gpt2 --full_vocab" in err
    assert not (tmp_path / "x").exists()


def test_init_from_names_a_pretrained_model_or_says_what_it_takes(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(b"")
    for spec in ("gpt2", str(run), str(tmp_path / "missing")):
        with pytest.raises(UserError, match="hf:<repo id> or a folder holding a Hugging Face"):
            load_params("tiny_backpack", {"init_from": spec})
    assert load_params("tiny_backpack", {"init_from": "hf:stanfordnlp/backpack-gpt2"})
    assert load_params("finetune_backpack_gpt2").init_from == "hf:stanfordnlp/backpack-gpt2"


def test_the_gpt2_layout_fine_tunes_as_the_transformer(pretrained, gpt2_data, tmp_path):
    """GPT-2's own layout (GPT2LMHeadModel) starts a Transformer run."""

    torch.manual_seed(0)
    gpt = build_model("transformer", ModelConfig(vocab_size=320, block_size=64, n_layer=2,
                                                 n_head=4, n_embd=64, bias=True))
    folder = tmp_path / "gpt2-tiny"
    as_gpt2_folder(gpt, folder, bare=False)
    out_dir = tmp_path / "run"
    assert train_main(_args(folder, gpt2_data, out_dir, "--model_type", "transformer",
                            "--max_iters", "10", "--lr_decay_iters", "10")) == 0
    state = read_checkpoint(out_dir / "ckpt.pt")
    assert state["model_type"] == "transformer" and state["iter_num"] == 10
    assert state["model_config"]["n_embd"] == 64


def test_a_fine_tuned_run_exports_and_loads_back(finetuned, tmp_path):
    """The fine-tune's checkpoint (biases, scale_attn_by_inverse_layer_idx) leaves in the
    released layout and comes back with the same logits."""
    from backpack_nb.loading import load_model
    from backpack_nb.hub.__main__ import main as hub_main

    out = tmp_path / "exported"
    assert hub_main(["export", str(finetuned["out_dir"] / "best.pt"), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["scale_attn_by_inverse_layer_idx"] is True and config["vocab_size"] == 320
    ours, _, _ = load_model(finetuned["out_dir"] / "best.pt")
    back, _, _ = hub.load_pretrained(out, tokenizer=False)
    idx = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(idx, all_logits=True)[0], back(idx, all_logits=True)[0]
    assert (a - b).abs().max() < 1e-5
