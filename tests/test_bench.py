"""The benchmarks (the benchmarks/ package): they run in their tiny modes and their outputs
have the right structure and pass sanity checks. No timing assertions (this machine is shared)."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
import yaml

from backpack_nb.models import ModelConfig, build_model
from backpack_nb.models.flops import train_flops
from backpack_nb.paramfile import read_params_file
from benchmarks import common, memory, speed
from benchmarks import data as data_bench
from benchmarks.nanogpt import NanoGPT

SLOW_FIXTURES = {"memory_output"}  # the seed configuration's accounting: about a minute
TINY_SHAPE = dict(block_size=16, batch_size=2, n_layer=2, n_head=2, n_embd=16, n_senses=4,
                  dropout=0.0)


@pytest.mark.slow  # training steps of 9 variants
def test_tiny_speed_run_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "speed.json"
    speed.main(["--tiny", "--json", str(out), "--only", "backpack", "transformer", "nanogpt",
                "backpack/plain", "transformer/plain", "backpack/per-position-senses",
                "backpack-table/dense", "backpack-table/sparse", "transformer/checkpointed"])
    text = capsys.readouterr().out
    assert "Backpack / Transformer step time" in text and "FLOP floor" in text
    assert "Transformer / nanoGPT-style step time" in text and "MFU" in text
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert len(rows) == 9
    for r in rows.values():
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and len(r["ms_all"]) == 2
        assert 0 < r["mfu"] < 2
        assert r["peak_mib"] is None and r["syncs_per_step"] is None  # measured on CUDA
    assert rows["backpack/plain"]["time_vs_base"] > 0
    q = result["ratios"]
    assert q["backpack_over_transformer"] > 0 and q["transformer_over_nanogpt"] > 0
    assert q["over_floor"] == pytest.approx(q["backpack_over_transformer"] / q["flop_floor"],
                                            abs=1e-3)
    # useful FLOPs: the same for the three ways of training a Transformer; the Backpack's
    # floor is above 1; a variant doing redundant work is credited useful FLOPs only
    assert rows["transformer"]["useful_gflop"] == rows["nanogpt"]["useful_gflop"]
    assert q["flop_floor"] > 1
    assert rows["backpack/per-position-senses"]["useful_gflop"] == rows["backpack"]["useful_gflop"]
    assert result["peak_gflops"] > 0


def test_train_flops_counts_matmul_weights_causal_attention_and_distinct_senses():
    cfg = ModelConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=8, n_senses=2)
    gpt, bp = build_model("transformer", cfg), build_model("backpack", cfg)
    B, T, d, L = 3, 16, 8, 2
    f = train_flops(gpt, B, T, distinct_tokens=10)
    assert f["blocks"] == 6 * B * T * L * 12 * d * d  # no biases: 12 d^2 matmul weights
    assert f["attention"] == 6 * L * B * T * T * d  # half of 12 L T d a token
    assert f["head"] == 6 * B * T * 100 * d
    g = train_flops(bp, B, T, distinct_tokens=10)
    sense_weights = 8 * d * d + 4 * d * d + 4 * d * 2 * d  # FF_1, then FF_2 to k*d
    assert g["sense_network"] == 6 * 10 * sense_weights
    doubled = train_flops(bp, B, T, distinct_tokens=20)
    assert doubled["sense_network"] == 2 * g["sense_network"]
    assert g["mixing"] == 3 * B * T * T * d * (1 + 2)
    assert g["total"] == pytest.approx(sum(v for k, v in g.items() if k != "total"))


def test_training_mfu_uses_the_benchmarks_flop_count(tiny_backpack_run):
    """The training loop's flops_per_token is train_flops at the run's distinct-token rate,
    which mean_distinct_tokens measures on the training data."""
    from backpack_nb.models.flops import mean_distinct_tokens
    from backpack_nb.training import flops_per_token

    repeated = np.array([1, 2, 3] * 100)
    assert mean_distinct_tokens(repeated, batch_size=4, block_size=10) == 3
    assert mean_distinct_tokens(np.arange(1000), batch_size=2, block_size=8) == 16
    info = json.loads((tiny_backpack_run["out_dir"] / "run.json").read_text())
    cfg = tiny_backpack_run["config"]
    U = info["distinct_tokens_per_batch"]
    assert 1 < U < cfg.batch_size * cfg.block_size  # real text repeats tokens
    model = build_model("backpack", ModelConfig.from_dict(info["model_config"]))
    step = train_flops(model, cfg.batch_size, cfg.block_size, U)
    assert info["flops_per_token"] == pytest.approx(step["total"] / (cfg.batch_size * cfg.block_size))
    assert flops_per_token(model, cfg, U) == pytest.approx(info["flops_per_token"])
    assert info["compiled"] is False


def test_nanogpt_baseline_has_the_transformers_parameters_and_initial_loss():
    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16)
    torch.manual_seed(0)
    nano, gpt = NanoGPT(cfg), build_model("transformer", cfg)
    assert sum(p.numel() for p in nano.parameters()) == gpt.num_parameters(by_part=False)
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    _, loss = nano(x, y)
    assert abs(loss.item() - math.log(64)) < 0.1


def test_the_benchmarks_measure_the_shape_of_the_seeds_params_file():
    seed = read_params_file("train_europarl_scratch")
    shape = {k: seed[k] for k in ("n_layer", "n_head", "n_embd", "n_senses", "bias")}
    reference, gpu = speed.preset("reference"), speed.preset("seed")
    assert {k: getattr(reference.model_config(), k) for k in shape} == shape
    assert (gpu.params["batch_size"], gpu.params["block_size"], gpu.params["dropout"],
            gpu.dtype) == (seed["batch_size"], seed["block_size"], seed["dropout"], seed["dtype"])
    assert [c.params for c in memory.memory_cases(seed, [97])] == [seed] * 7


@pytest.mark.slow
def test_memory_traces_the_shape_of_the_params_file_it_is_given(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"model_type": "backpack", **TINY_SHAPE, "dtype": "float32"}))
    out = tmp_path / "memory.json"
    memory.main(["--config", str(path), "--vocab", "97", "--distinct", "20", "--json", str(out)])
    cases = json.loads(out.read_text())["cases"]
    assert len(cases) == 7 and {c["distinct_tokens"] for c in cases} == {20}
    for c in cases:
        assert {k: c["case"][k] for k in TINY_SHAPE} == TINY_SHAPE
        assert c["case"]["dtype"] == "float32" and c["case"]["vocab_size"] == 97
    assert "VERDICT backpack: FITS" in capsys.readouterr().out


@pytest.mark.slow
def test_live_memory_on_fake_tensors_equals_the_same_step_on_real_ones():
    params = {**common.seed_params(), **TINY_SHAPE}
    case = memory.MemoryCase("backpack", vocab_size=97, params=params, dtype="float32",
                             attention="cpu", chunk_rows=8, distinct_tokens=20)
    real = memory.trace_memory(case, real=True)
    fake = memory.trace_memory(memory.MemoryCase(
        "backpack", vocab_size=97, params=params, dtype="float32", attention="cpu",
        chunk_rows=8, distinct_tokens=real["distinct_tokens"]))
    assert real["parts"] == fake["parts"]
    assert real["peak_bytes"] == fake["peak_bytes"] > 0
    assert real["phase_peaks"] == fake["phase_peaks"]


@pytest.fixture(scope="module")
def memory_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "memory.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        memory.main(["--config", "train_europarl_scratch", "--json", str(out)])
    return buf.getvalue(), json.loads(out.read_text())


def test_memory_accounting_parts_and_verdicts(memory_output):
    text, result = memory_output
    verdicts = [line for line in text.splitlines() if "VERDICT" in line]
    assert len(verdicts) == 2
    assert {v.split(":")[0] for v in verdicts} == {"VERDICT backpack", "VERDICT transformer"}
    for v in verdicts:
        assert v.split(": ", 1)[1].startswith(("FITS (", "DOES NOT FIT ("))
    cases = result["cases"]
    assert {c["case"]["vocab_size"] for c in cases} == {50_257, 100_277}
    for c in cases:
        # weights: fp32 master weights, 4 bytes a parameter (the tied E once)
        assert c["parts"]["weights"] == 4 * c["params"]
        assert c["peak_bytes"] == sum(c["parts"].values())
        assert c["case"]["batch_size"] == 32 and c["case"]["block_size"] == 512
    by = {(c["label"], c["case"]["vocab_size"]): c for c in cases}
    for model in ("transformer", "backpack"):
        for V in (50_257, 100_277):
            chunked = by[model, V]["parts"]["logits"]
            full = by[f"{model}/full-logits", V]["parts"]["logits"]
            assert chunked < full / 10
    # the table's moments are dense even with SparseAdam; its gradient is not
    dense, sparse = by["backpack/table+AdamW", 100_277], by["backpack/table+SparseAdam", 100_277]
    assert dense["parts"]["optimizer state"] == pytest.approx(sparse["parts"]["optimizer state"])
    assert sparse["phase_peaks"]["optimizer"] < dense["phase_peaks"]["optimizer"]
    # activation checkpointing stores less
    ck = by["backpack/checkpointed", 100_277]["parts"]["activations"]
    assert ck < by["backpack", 100_277]["parts"]["activations"]


def test_data_section_times_prepare_against_bare_encode(europarl_source, tmp_path):
    result = data_bench.run_data(europarl_source, copies=1, repeats=1, log=lambda *_: None)
    assert result["mib"] > 1 and result["documents"] > 10
    assert result["prepare_s"] > 0 and result["encode_s"] > 0
    assert result["rate_ratio"] == pytest.approx(result["encode_s"] / result["prepare_s"],
                                                 rel=0.01)
    assert "prepare rate / bare encode rate" in data_bench.format_data(result)


@pytest.mark.slow  # training steps
def test_speed_runs_under_autocast_as_train_py_does(tmp_path, capsys):
    """--dtype: the steps run under autocast (float16 with a gradient scaler, on CUDA only);
    the dry run of the GPU measurement on this CPU, in bfloat16."""
    out = tmp_path / "speed.json"
    speed.main(["--tiny", "--dtype", "bfloat16", "--json", str(out), "--only", "backpack",
                "transformer", "nanogpt"])
    text = capsys.readouterr().out
    assert "bfloat16" in text and "MFU (useful FLOPs / measured fp32 matmul peak" in text
    result = json.loads(out.read_text())
    assert result["setup"]["dtype"] == "bfloat16"
    assert result["mfu_peak_of"] == "measured fp32 matmul peak"
    assert all(r["ms_per_step"] > 0 and 0 < r["mfu"] < 2 for r in result["rows"])
    with pytest.raises(SystemExit) as exc:
        speed.main(["--tiny", "--dtype", "float16"])
    assert exc.value.code == 2 and "CUDA only" in capsys.readouterr().err
    setup, _ = speed.setup_and_variants(speed.parser().parse_args(
        ["--seed-config", "--dtype", "bfloat16", "--quick"]))  # float16 is refused here
    assert (setup.params["batch_size"], setup.vocab_size, setup.dtype) == (32, 13_034, "bfloat16")


def test_bad_variant_name_is_a_user_error(capsys):
    with pytest.raises(SystemExit) as exc:
        speed.main(["--tiny", "--only", "nonsense"])
    assert exc.value.code == 2
    assert "unknown variant" in capsys.readouterr().err


def test_english_only_batches_repeat_more_than_mixed_ones(europarl_source, monkeypatch):
    """--data europarl-en: windows of the English sample alone, its own compact vocabulary;
    one language repeats more, so a batch holds fewer distinct tokens than en+fr batches."""
    monkeypatch.setenv("EUROPARL_SOURCE", str(europarl_source))
    en, v_en = common.europarl_batches(4, 256, 4, langs=("en",))
    both, v_both = common.europarl_batches(4, 256, 4)
    assert [tuple(b.shape) for b in en] == [(4, 257)] * 4 and v_en < v_both
    assert int(max(b.max() for b in en)) < v_en
    distinct = [sum(len(torch.unique(b[:, :-1])) for b in bs) / 4 for bs in (en, both)]
    assert distinct[0] < distinct[1]
