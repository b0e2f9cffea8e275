"""Hugging Face models in (backpack_nb.hub): the released Backpack's layout, checked against
what the official code computes on ../shared/backpack-gpt2-tiny, GPT-2's own layout, the
GPT-2 tokenizer from a snapshot's files, the Hub path through a local cache, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backpack_nb import hub
from backpack_nb.errors import UserError
from backpack_nb.models import ModelConfig, build_model
from backpack_nb.tokenizer import get_encoding, gpt2_style_encoding
from conftest import ROOT
from hub_fixtures import TEXT, TINY, as_gpt2_folder, write_small_gpt2_bpe


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return torch.load(TINY / "expected_outputs.pt", weights_only=True)


@pytest.fixture
def tiny_copy(tmp_path) -> Path:
    folder = tmp_path / "backpack-gpt2-tiny"
    shutil.copytree(TINY, folder)
    return folder


def _outputs(model, idx):
    with torch.no_grad():
        return (model(idx, all_logits=True)[0], model.contextualization(idx),
                model.sense_vectors(idx))


def test_the_released_layout_reproduces_the_official_outputs(expected):
    model, tok, info = hub.load_pretrained(TINY, tokenizer=False)
    assert info["model_type"] == "backpack" and tok is None
    assert model.config.scale_attn_by_inverse_layer_idx and model.config.bias
    logits, alpha, senses = _outputs(model, expected["input_ids"])
    for got, name in ((logits, "logits"), (alpha, "contextualization"), (senses, "senses")):
        assert got.shape == expected[name].shape
        assert (got - expected[name]).abs().max() <= 1e-5, name
    # the option matters: the same weights without it give other logits
    model.transformer.h[1].attn.scale = None
    assert (_outputs(model, expected["input_ids"])[0] - expected["logits"]).abs().max() > 1e-4


def test_every_tensor_of_the_file_is_used_exactly_once():
    weights = hub.read_weights(TINY)
    model, _, _ = hub.load_pretrained(TINY, tokenizer=False)
    sources = hub.weight_sources(model, set(weights))
    used = [name for names in sources.values() for name in names]
    assert "<missing>" not in used
    assert len(used) == len(set(used))  # no tensor feeds two parameters
    assert set(used) == set(weights)  # and every tensor feeds one
    assert sources["wte.weight"] == ["backpack.word_embeddings.weight",
                                     "backpack.gpt2_model.wte.weight", "lm_head.weight"]
    assert len(sources) == len(model.state_dict())


@pytest.mark.parametrize("edit,words", [
    (lambda w: w.update({"lm_head.weight": w["lm_head.weight"] + 1}),
     "lm_head.weight should be the same tensor as backpack.word_embeddings.weight"),
    (lambda w: w.pop("backpack.sense_network.final_mlp.c_proj.bias"),
     "missing backpack.sense_network.final_mlp.c_proj.bias"),
    (lambda w: w.update({"backpack.extra.weight": torch.zeros(2)}), "unexpected backpack.extra.weight"),
    (lambda w: w.update({"backpack.gpt2_model.h.0.mlp.c_fc.weight": torch.zeros(64, 128)}),
     "backpack.gpt2_model.h.0.mlp.c_fc.weight has shape (64, 128), the config needs (256, 64)"),
])
def test_weights_that_do_not_fit_are_one_error(tiny_copy, edit, words):
    weights = torch.load(tiny_copy / "pytorch_model.bin", weights_only=True)
    edit(weights)
    torch.save(weights, tiny_copy / "pytorch_model.bin")
    with pytest.raises(UserError, match="do not fit its config.json") as exc:
        hub.load_pretrained(tiny_copy, tokenizer=False)
    assert words in str(exc.value)


def test_old_causal_mask_buffers_are_ignored(tiny_copy, expected):
    weights = torch.load(tiny_copy / "pytorch_model.bin", weights_only=True)
    for i in range(2):
        weights[f"backpack.gpt2_model.h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
        weights[f"backpack.gpt2_model.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(weights, tiny_copy / "pytorch_model.bin")
    model, _, _ = hub.load_pretrained(tiny_copy, tokenizer=False)
    assert (_outputs(model, expected["input_ids"])[0] - expected["logits"]).abs().max() <= 1e-5


def test_safetensors_weights(tiny_copy, expected):
    from safetensors.torch import save_file

    weights = torch.load(tiny_copy / "pytorch_model.bin", weights_only=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, tiny_copy / "model.safetensors")
    (tiny_copy / "pytorch_model.bin").unlink()
    model, _, _ = hub.load_pretrained(tiny_copy, tokenizer=False)
    assert (_outputs(model, expected["input_ids"])[0] - expected["logits"]).abs().max() <= 1e-5


@pytest.mark.parametrize("change,words", [
    ({"architectures": ["BertForMaskedLM"]}, "is none of BackpackGPT2LMHeadModel, GPT2LMHeadModel"),
    ({"activation_function": "relu"}, "activation_function 'relu'"),
    ({"n_inner": 100}, "n_inner 100"),
    ({"add_cross_attention": True}, "add_cross_attention"),
    ({"n_head": 5}, "n_embd (64) must be divisible by n_head (5)"),
])
def test_configs_this_project_cannot_express_are_refused_by_name(tiny_copy, change, words):
    config = json.loads((tiny_copy / "config.json").read_text())
    (tiny_copy / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match="config.json") as exc:
        hub.load_pretrained(tiny_copy, tokenizer=False)
    assert words in str(exc.value)


def test_folders_that_are_not_pretrained_models(tmp_path, tiny_copy):
    with pytest.raises(UserError, match="no such folder"):
        hub.load_pretrained(tmp_path / "nothing")
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"x")
    with pytest.raises(UserError, match=r"no config.json; it is a run folder: pass .*best.pt"):
        hub.load_pretrained(run)
    (tiny_copy / "pytorch_model.bin").unlink()
    with pytest.raises(UserError, match="has config.json but no weights"):
        hub.load_pretrained(tiny_copy)
    assert hub.is_pretrained(TINY) and hub.is_pretrained("hf:stanfordnlp/backpack-gpt2")
    assert not hub.is_pretrained(run)


class _NotATensor:
    pass


def test_a_pickle_that_is_not_a_plain_state_dict_is_refused(tiny_copy):
    torch.save({"wte.weight": _NotATensor()}, tiny_copy / "pytorch_model.bin")
    with pytest.raises(UserError, match="could run code"):
        hub.load_pretrained(tiny_copy, tokenizer=False)
    torch.save([torch.zeros(2)], tiny_copy / "pytorch_model.bin")
    with pytest.raises(UserError, match="not a plain state dict"):
        hub.load_pretrained(tiny_copy, tokenizer=False)


# --- GPT-2's own layout (GPT2LMHeadModel, e.g. hf:gpt2) --------------------------------------


@pytest.mark.parametrize("bare", [True, False])
def test_gpt2_layout_loads_as_the_transformer(tmp_path, bare):
    torch.manual_seed(3)
    config = ModelConfig(vocab_size=90, block_size=16, n_layer=2, n_head=2, n_embd=16,
                         n_senses=1, bias=True, dropout=0.0)
    original = build_model("transformer", config).eval()
    for p in original.parameters():  # no zero biases or symmetric weights to hide behind
        p.data.add_(0.05 * torch.randn_like(p))
    as_gpt2_folder(original, tmp_path / "gpt2", bare=bare)
    model, _, info = hub.load_pretrained(tmp_path / "gpt2", tokenizer=False)
    assert info["model_type"] == "transformer"
    idx = torch.randint(0, 90, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(idx, all_logits=True)[0], original(idx, all_logits=True)[0])


# --- the GPT-2 tokenizer from a snapshot's vocab.json + merges.txt ----------------------------


def test_gpt2_tokenizer_from_a_snapshot(tiny_copy):
    write_small_gpt2_bpe(tiny_copy, TEXT, n_merges=63)  # 256 + 63 + 1 = the fixture's 320
    model, tok, _ = hub.load_pretrained(tiny_copy)
    assert tok.vocab_size == 320 == model.config.vocab_size and tok.eot_id == 319
    for text in ("The Commission", "Parlement européen", "¿qué? \x00 日本"):
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode(" the Parliament")
    assert len(ids) < len(" the Parliament".encode())  # merges are used
    assert hub.read_config(tiny_copy)["eos_token_id"] == tok.eot_id
    enc = get_encoding(f"gpt2:{tiny_copy}")
    assert enc.n_vocab == 320 and enc.decode(enc.encode("vote du")) == "vote du"


def test_gpt2_tokenizer_problems_are_clear(tmp_path, tiny_copy):
    with pytest.raises(UserError, match="has no vocab.json or merges.txt"):
        gpt2_style_encoding("gpt2", tmp_path)
    write_small_gpt2_bpe(tmp_path, TEXT, n_merges=10)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    first, second = [k for k, v in sorted(vocab.items(), key=lambda kv: kv[1])][256:258]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # ids out of the merges' order
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(UserError, match="could not read the GPT-2 BPE"):
        gpt2_style_encoding("gpt2", tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        hub.load_pretrained(tiny_copy, encoding="gpt2:/nowhere/gpt2.tiktoken")


# --- hf:<repo id>: the Hub path, with a local cache standing in for the Hub ---------------------


_LOAD_FROM_CACHE = """
import sys
from backpack_nb.errors import UserError
from backpack_nb.hub import load_pretrained
try:
    model, tok, info = load_pretrained(sys.argv[1], tokenizer=False)
except UserError as exc:
    print("error:", exc)
    sys.exit(2)
print(info["model_type"], info["folder"])
"""


@pytest.mark.slow  # two fresh interpreters load a model
def test_a_hub_id_reads_the_hub_cache_offline(tmp_path):
    """The real huggingface_hub code, offline, over a cache laid out as the Hub client writes
    it (models--owner--name/refs/main -> snapshots/<commit>/)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--stanfordnlp--backpack-gpt2"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "pytorch_model.bin"):
        shutil.copy(TINY / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run([sys.executable, "-c", _LOAD_FROM_CACHE, "hf:stanfordnlp/backpack-gpt2"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.split() == ["backpack", str(snapshot)]
    missing = subprocess.run([sys.executable, "-c", _LOAD_FROM_CACHE, "hf:nobody/nothing"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "could not get hf:nobody/nothing" in missing.stdout
    assert "hf download nobody/nothing --local-dir DIR" in missing.stdout


# --- export: runs out, in the layouts the field reads ------------------------------------------


def _export_main(argv):
    from backpack_nb.hub.__main__ import main

    return main(argv)


def test_an_exported_transformer_loads_in_transformers(tiny_transformer_run, tmp_path):
    """A run trained without biases exports as a plain GPT2LMHeadModel (zero biases) that
    transformers loads as it is, with the same logits."""
    transformers = pytest.importorskip("transformers")
    from backpack_nb.loading import load_model

    ckpt = tiny_transformer_run["out_dir"] / "best.pt"
    assert _export_main(["export", str(ckpt), str(tmp_path / "gpt")]) == 0
    ours, tok, _ = load_model(ckpt)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt").eval()
    idx = torch.randint(0, ours.config.vocab_size, (2, ours.config.block_size),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (theirs(idx).logits - ours(idx, all_logits=True)[0]).abs().max().item()
    print(f"exported Transformer vs transformers: max |logit difference| {diff:.2e}")
    assert diff <= 1e-5
    saved = json.loads((tmp_path / "gpt" / "backpack_nb_tokenizer.json").read_text())
    assert saved["base_ids"] == tok.base_ids.tolist()
    assert "base_ids" in (tmp_path / "gpt" / "README.md").read_text()


def test_an_exported_backpack_has_the_released_layout(tiny_copy, tmp_path):
    """The fixture's shape exported: the official key names and shapes (aliases stored once),
    and it loads back through load_pretrained with identical logits."""
    from safetensors.torch import load_file

    write_small_gpt2_bpe(tiny_copy, TEXT, n_merges=63)
    model, tok, _ = hub.load_pretrained(tiny_copy)
    state = {"model_type": "backpack", "iter_num": 0, "config": {"run_name": "tiny"}}
    out = hub.export(model, tok, state, tmp_path / "exported")
    official = hub.read_weights(TINY)
    written = load_file(out / "model.safetensors")
    assert set(written) <= set(official)
    assert set(official) - set(written) == {"backpack.gpt2_model.wte.weight", "lm_head.weight",
                                            "backpack.gpt2_model.wpe.weight"}
    assert all(written[k].shape == official[k].shape for k in written)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BackpackGPT2LMHeadModel"]
    assert config["auto_map"]["AutoModelForCausalLM"] == (
        "stanfordnlp/backpack-gpt2--modeling_backpack_gpt2.BackpackGPT2LMHeadModel")
    fixture_config = json.loads((TINY / "config.json").read_text())
    assert {k: config[k] for k in ("n_embd", "n_layer", "n_head", "num_senses", "n_positions",
                                   "vocab_size", "scale_attn_by_inverse_layer_idx")} == \
        {k: fixture_config[k] for k in ("n_embd", "n_layer", "n_head", "num_senses",
                                        "n_positions", "vocab_size",
                                        "scale_attn_by_inverse_layer_idx")}
    again, _, _ = hub.load_pretrained(out, tokenizer=False)
    idx = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(again(idx, all_logits=True)[0], model(idx, all_logits=True)[0])


def test_a_trained_backpack_exports_and_loads_back(tiny_backpack_run, tmp_path):
    from backpack_nb.loading import load_model

    ckpt = tiny_backpack_run["out_dir"] / "best.pt"
    assert _export_main(["export", str(ckpt), str(tmp_path / "bp")]) == 0
    ours, _, _ = load_model(ckpt)
    back, _, info = hub.load_pretrained(tmp_path / "bp", tokenizer=False)
    assert info["model_type"] == "backpack" and back.config.bias  # zero biases added
    idx = torch.randint(0, ours.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(back(idx, all_logits=True)[0], ours(idx, all_logits=True)[0],
                              atol=1e-6, rtol=0)


def test_export_bad_input_is_exit_2_and_writes_nothing(tiny_backpack_run, tmp_path, capsys):
    ckpt = tiny_backpack_run["out_dir"] / "best.pt"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    cases = [
        (["export", str(ckpt), str(busy)], "holds keep.txt, which no export writes"),
        (["export", str(ckpt), str(busy), "--overwrite"], "holds keep.txt, which no export writes"),
        (["export", str(text), str(tmp_path / "a")], "notes.pt"),
        (["export", str(TINY), str(tmp_path / "b")], "is already a Hugging Face model"),
    ]
    for argv, words in cases:
        with pytest.raises(SystemExit) as exc:
            _export_main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and words in err and "Traceback" not in err, err
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- everywhere a checkpoint goes, a pretrained model goes -------------------------------------


def test_evaluate_and_sample_take_a_pretrained_folder(tiny_copy, europarl_source, tmp_path,
                                                      capsys):
    """The released layout (the tiny fixture with a 320-token GPT-2 BPE) evaluated on a
    full-vocabulary Europarl dataset of that encoding, and sampled from, by the same commands
    as a run."""
    from backpack_nb import data
    from backpack_nb.loading import load_model
    from backpack_nb.evaluation import evaluate_checkpoint
    from backpack_nb.sampling import main as sample_main

    write_small_gpt2_bpe(tiny_copy, TEXT, n_merges=63)
    ddir = data.prepare(europarl_source, tmp_path / "ep_gpt2",
                        data.PrepareConfig(langs=("en",), block_size=64,
                                           encoding=f"gpt2:{tiny_copy}", full_vocab=True),
                        progress=False)
    model, tok, state = load_model(tiny_copy)
    assert state["pretrained"] == str(tiny_copy) and state["model_type"] == "backpack"
    result = evaluate_checkpoint(tiny_copy, data_dir=str(ddir), splits=["val"], max_tokens=400,
                                 out=tmp_path / "eval.json", progress=False)
    bpb = result["splits"]["val"]["all"]["bits_per_byte"]
    assert 0 < bpb < 20 and result["model_type"] == "backpack"
    assert sample_main(["--model_path", str(tiny_copy), "--device", "cpu", "--num_samples", "1",
                        "--max_new_tokens", "5", "--start", "The Commission"]) == 0
    assert capsys.readouterr().out.count("---------- sample") == 1
    with pytest.raises(UserError, match="--model_type transformer does not match"):
        load_model(tiny_copy, model_type="transformer")
