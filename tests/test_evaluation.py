"""Evaluation: bits per byte against a direct computation, eval.json, the seed's evaluate
command verbatim, mismatches, and sample.py."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backpack_nb import dataset
from backpack_nb import data, evaluation
from backpack_nb.loading import load_model
from backpack_nb.errors import UserError
from backpack_nb.evaluation import windows

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_ckpts(tiny_backpack_run, tiny_transformer_run, tmp_path_factory) -> dict[str, Path]:
    """Copies of the session's tiny checkpoints laid out as the seed's run folders, so the
    tests may write eval.json beside them."""
    root = tmp_path_factory.mktemp("evalruns")
    out = {}
    for name, run in (("backpack", tiny_backpack_run), ("transformer", tiny_transformer_run)):
        folder = root / "out" / f"{name}_full"
        folder.mkdir(parents=True)
        for f in ("ckpt.pt", "best.pt"):
            shutil.copy(run["out_dir"] / f, folder / f)
        out[name] = folder / "ckpt.pt"
    return out


def _direct_scores(model, tok, tokens: np.ndarray) -> tuple[float, int, int]:
    """(nats, scored tokens, bytes) with plain full logits, window by window."""
    nats, count = 0.0, 0
    for start, length, first in windows(len(tokens), model.config.block_size):
        x = torch.from_numpy(tokens[start : start + length].astype(np.int64))[None]
        y = torch.from_numpy(tokens[start + 1 : start + length + 1].astype(np.int64))
        logits, _ = model(x, all_logits=True)
        nats += F.cross_entropy(logits[0, first:].double(), y[first:], reduction="sum").item()
        count += length - first
    special = set(tok.special_ids.values())
    nbytes = sum(len(tok.token_bytes(t)) for t in tokens[1:].tolist() if t not in special)
    return nats, count, nbytes


@pytest.mark.parametrize("model_type", ["backpack", "transformer"])
def test_bits_per_byte_equals_direct_computation(model_type, tiny_ckpts, prepared_europarl):
    model, tok, _ = load_model(tiny_ckpts[model_type])
    cap = 700  # several windows per language, not a multiple of block_size
    result = evaluation.evaluate_model(model, tok, prepared_europarl, splits=["val"], max_tokens=cap, progress=False)
    meta = dataset.load_meta(prepared_europarl)
    pooled = [0.0, 0, 0]
    for lang in meta["langs"]:
        tokens = np.array(dataset.load_tokens(prepared_europarl, "val", lang)[:cap])
        nats, count, nbytes = _direct_scores(model, tok, tokens)
        # the byte count is the text's: decoding the scored tokens without separators
        text = tok.decode_bytes([t for t in tokens[1:].tolist() if t != tok.eot_id])
        assert nbytes == len(text)
        got = result["val"][lang]
        assert got["tokens"] == count == cap - 1
        assert got["bytes"] == nbytes
        assert got["loss"] == pytest.approx(nats / count, rel=1e-5)
        assert got["ppl"] == pytest.approx(math.exp(nats / count), rel=1e-5)
        assert got["bits_per_byte"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)
        lo, hi = got["bpb_ci95"]
        assert lo <= got["bits_per_byte"] <= hi and lo < hi
        pooled = [pooled[0] + nats, pooled[1] + count, pooled[2] + nbytes]
    assert result["val"]["all"]["bits_per_byte"] == pytest.approx(pooled[0] / math.log(2) / pooled[2], rel=1e-5)
    assert result["val"]["all"]["tokens"] == pooled[1]
    # a trained model beats the uniform distribution
    assert result["val"]["all"]["loss"] < math.log(tok.vocab_size) - 1.0


def test_stride_scores_every_token_once(tiny_ckpts, prepared_europarl):
    model, tok, _ = load_model(tiny_ckpts["transformer"])
    tokens = np.array(dataset.load_tokens(prepared_europarl, "val", "en")[:500])
    lengths = evaluation.token_byte_lengths(tok)
    plain = evaluation.score_tokens(model, tokens, lengths, block_size=64, progress=False)
    sliding = evaluation.score_tokens(model, tokens, lengths, block_size=64, stride=16, progress=False)
    assert plain.tokens.sum() == sliding.tokens.sum() == 499
    assert plain.bytes.sum() == sliding.bytes.sum()
    assert len(sliding.nats) > len(plain.nats)
    # more context per scored token: the sliding evaluation is not worse by much, and differs
    assert sliding.nats.sum() != pytest.approx(plain.nats.sum(), rel=1e-9)
    with pytest.raises(ValueError):
        windows(100, 64, 65)


@pytest.mark.parametrize(
    "model_type,config", [("backpack", "train_europarl_scratch"), ("transformer", "train_europarl_transformer_baseline")]
)
def test_seed_evaluate_command_verbatim(model_type, config, tiny_ckpts):
    """`python evaluate.py --model_path out/X/ckpt.pt --config <seed config> --model_type X`
    on a tiny checkpoint: the shape comes from the checkpoint, the data from the config."""
    ckpt = tiny_ckpts[model_type]  # out/<model>_full/ckpt.pt in a temporary folder
    proc = subprocess.run(
        [sys.executable, "evaluate.py", "--model_path", str(ckpt), "--config", config, "--model_type", model_type],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "bits/byte" in proc.stdout and "val   en" in proc.stdout and "test  fr" in proc.stdout
    result = json.loads((ckpt.parent / "eval.json").read_text())
    assert result["model_type"] == model_type and result["checkpoint"] == str(ckpt)
    for split in ("val", "test"):
        assert set(result["splits"][split]) == {"all", "en", "fr"}
        for r in result["splits"][split].values():
            assert set(r) >= {"loss", "ppl", "bits_per_byte", "bpb_ci95", "tokens", "bytes"}
            assert 0 < r["bits_per_byte"] < 10
    meta = dataset.load_meta(result["data_dir"])
    # the full split is evaluated: every token but the first of each language file
    assert result["splits"]["val"]["en"]["tokens"] == meta["splits"]["val"]["langs"]["en"]["tokens"] - 1


def test_eval_json_keeps_other_sections(tiny_ckpts, prepared_europarl, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    shutil.copy(tiny_ckpts["transformer"], ckpt)
    (tmp_path / "eval.json").write_text(json.dumps({"checkpoint": str(ckpt), "lexsim": {"kept": True}}))
    evaluation.evaluate_checkpoint(ckpt, data_dir=str(prepared_europarl), splits=["val"], max_tokens=200, progress=False)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["lexsim"] == {"kept": True} and "val" in saved["splits"]


def test_best_pt_evaluates(tiny_ckpts, prepared_europarl, tmp_path):
    out = tmp_path / "e.json"
    r = evaluation.evaluate_checkpoint(tiny_ckpts["backpack"].with_name("best.pt"), data_dir=str(prepared_europarl),
                                       splits=["test"], max_tokens=150, out=out, progress=False)
    assert json.loads(out.read_text())["splits"]["test"]["all"]["tokens"] == r["splits"]["test"]["all"]["tokens"] == 2 * 149


def test_wrong_model_type_exits_2(tiny_ckpts, capsys):
    before = tiny_ckpts["backpack"].read_bytes()
    with pytest.raises(SystemExit) as exc:
        evaluation.main(["--model_path", str(tiny_ckpts["backpack"]), "--model_type", "transformer"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "--model_type backpack" in err and "Traceback" not in err
    assert tiny_ckpts["backpack"].read_bytes() == before


def test_other_vocabulary_exits_2(tiny_ckpts, europarl_source, tmp_path, capsys):
    other = data.prepare(europarl_source, tmp_path / "aligned", data.PrepareConfig(form="aligned", block_size=64), progress=False)
    with pytest.raises(SystemExit) as exc:
        evaluation.main(["--model_path", str(tiny_ckpts["transformer"]), "--data_dir", str(other)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "another tokenizer or vocabulary" in err and str(other) in err


def test_missing_checkpoint_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        evaluation.main(["--model_path", str(tmp_path / "nope.pt")])
    assert exc.value.code == 2
    assert "does not exist" in capsys.readouterr().err



def test_damaged_held_out_file_exits_2(tiny_ckpts, prepared_europarl, tmp_path, capsys):
    """A val_<lang>.bin of the right size with an id beyond the vocabulary: one error naming
    the file and the fix, not an index error from the embedding."""
    damaged = tmp_path / "damaged"
    shutil.copytree(prepared_europarl, damaged)
    meta = dataset.load_meta(damaged)
    ids = np.fromfile(damaged / "val_fr.bin", dtype=meta["dtype"])
    ids[7] = meta["vocab_size"] + 3
    ids.tofile(damaged / "val_fr.bin")
    with pytest.raises(SystemExit) as exc:
        evaluation.main(["--model_path", str(tiny_ckpts["backpack"]), "--data_dir", str(damaged),
                         "--max_tokens", "100", "--out", str(tmp_path / "eval.json")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "val_fr.bin holds token id" in err and "--overwrite" in err and "Traceback" not in err
    assert not (tmp_path / "eval.json").exists()

def test_sample_py(tiny_ckpts):
    cmd = [sys.executable, "sample.py", "--model_path", str(tiny_ckpts["backpack"]), "--start", "The Commission",
           "--num_samples", "2", "--max_new_tokens", "12", "--seed", "7"]
    a = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    b = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout  # deterministic per seed
    assert a.stdout.count("---------- sample") == 2
    assert a.stdout.count("The Commission") == 2


# --- a checkpoint with a NaN weight; the splits offered; a long prompt ----------------------------


# A micro Backpack run (block 16, d 8) committed as a fixture: no training needed.
LEGACY_RUN = ROOT / "tests" / "fixtures" / "legacy_f3defa5"


def _nan_run(tmp_path) -> tuple[Path, bytes]:
    """A copy of a Backpack run with a good eval.json beside it, whose ckpt.pt has one NaN
    weight (best.pt stays good). Returns the run folder and the eval.json's bytes."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(LEGACY_RUN / "best.pt", run / "best.pt")
    state = torch.load(LEGACY_RUN / "ckpt.pt", weights_only=True)
    name = sorted(state["model"])[3]
    state["model"][name].view(-1)[5] = float("nan")
    torch.save(state, run / "ckpt.pt")
    good = json.dumps({"checkpoint": str(run / "ckpt.pt"), "splits": {"val": {}}}).encode()
    (run / "eval.json").write_bytes(good)
    return run, good


def _exit2(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\nerror") == 0 and "Traceback" not in err
    return err


def test_a_nan_weight_is_one_clear_error_everywhere(tmp_path, capsys):
    """evaluate.py (exit 0 with NaN bits per byte, replacing the good eval.json), sample.py
    (text without a word) and hub export (exported it) all refuse the checkpoint, naming the
    tensor and the run's other checkpoints; the folder is left as it was."""
    from backpack_nb.hub.__main__ import main as hub_main
    from backpack_nb.sampling import main as sample_main

    run, good = _nan_run(tmp_path)
    before = sorted(p.name for p in run.iterdir())
    state = torch.load(run / "ckpt.pt", weights_only=True)
    bad = next(k for k, t in state["model"].items() if not torch.isfinite(t).all())
    want = (f"checkpoint {run / 'ckpt.pt'} is damaged: its weights hold non-finite values "
            f"(1 NaN value(s) in {bad}); train.py does not save them")
    with pytest.raises(UserError, match=re.escape(want)):
        load_model(run / "ckpt.pt")
    for main, argv in ((evaluation.main, ["--model_path", str(run / "ckpt.pt"), "--max_tokens",
                                          "200", "--device", "cpu"]),
                       (sample_main, ["--model_path", str(run / "ckpt.pt"), "--device", "cpu"]),
                       (hub_main, ["export", str(run / "ckpt.pt"), str(tmp_path / "export")])):
        err = _exit2(main, argv, capsys)
        assert want in err and "use another checkpoint of the run (best.pt beside it)" in err
        assert "learning_rate" not in err
    assert (run / "eval.json").read_bytes() == good
    assert sorted(p.name for p in run.iterdir()) == before
    assert not (tmp_path / "export").exists()


def test_non_finite_scores_never_replace_eval_json(prepared_europarl, tmp_path, monkeypatch):
    """Finite weights can still overflow (float16 on a GPU): a NaN score is an error, and
    the eval.json already there stays."""
    run, good = _nan_run(tmp_path)
    monkeypatch.setattr(evaluation, "_token_nll",
                        lambda model, x, y: torch.full(y.shape, float("nan")))
    with pytest.raises(UserError, match=r"the loss is NaN or infinite on val all, val en"):
        evaluation.evaluate_checkpoint(run / "best.pt", data_dir=str(prepared_europarl),
                                       splits=["val"], max_tokens=200, progress=False,
                                       out=run / "eval.json")
    assert (run / "eval.json").read_bytes() == good


@pytest.mark.parametrize("splits", ["train", "val,train", "train,test"])
def test_the_train_split_is_refused_before_any_work(splits, tmp_path, monkeypatch, capsys):
    """--splits train was listed in --help and always refused after loading (val,train scored
    val, then failed): it is not offered, and refused before the checkpoint is read."""
    def never(*args, **kwargs):
        raise AssertionError("nothing may be loaded or scored")

    monkeypatch.setattr(evaluation, "load_model", never)
    monkeypatch.setattr(evaluation, "score_tokens", never)
    out = tmp_path / "eval.json"
    err = _exit2(evaluation.main, ["--model_path", str(LEGACY_RUN / "best.pt"), "--splits",
                                   splits, "--out", str(out)], capsys)
    assert "--splits: train is not evaluated" in err and "training_log.json" in err
    assert not out.exists()
    with pytest.raises(UserError, match="splits: train is not evaluated"):
        evaluation.evaluate_checkpoint(LEGACY_RUN / "best.pt", splits=splits.split(","),
                                       out=out, progress=False)
    with pytest.raises(SystemExit):
        evaluation.main(["--help"])
    splits_help = capsys.readouterr().out.split("--splits SPLITS")[-1].split("  --")[0]
    assert "val, test" in splits_help and not re.search(r"\btrain\b", splits_help)


def test_a_prompt_longer_than_the_block_is_said_to_be_cut(capsys):
    """A --start of 100,000 characters conditioned the samples through its last block_size
    tokens without a word: a warning line says how many tokens were kept of how many."""
    from backpack_nb.sampling import main as sample_main

    model, tok, _ = load_model(LEGACY_RUN / "best.pt")
    start = ("The Commission has adopted the report. " * 2600)[:100_000]
    n = len(tok.encode(start))
    block = model.config.block_size
    assert n > block
    assert sample_main(["--model_path", str(LEGACY_RUN / "best.pt"), "--start", start,
                        "--num_samples", "1", "--max_new_tokens", "2", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("warning: the prompt")]
    assert len(lines) == 1, err
    assert f"kept {block:,} of {n:,}" in lines[0]
    # a prompt that fits says nothing
    assert sample_main(["--model_path", str(LEGACY_RUN / "best.pt"), "--start", "The vote",
                        "--num_samples", "1", "--max_new_tokens", "2", "--device", "cpu"]) == 0
    assert "warning" not in capsys.readouterr().err
