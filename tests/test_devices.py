"""The one device rule (backpack_nb.devices), as every front door applies it: without CUDA,
``cuda`` falls back to the CPU with one warning (refused with --strict_device); float16 on a
CPU runs in float32; a name that is no device is one clear error."""

from __future__ import annotations

import shutil

import pytest
import torch

from backpack_nb.devices import autocast_dtype, resolve_device
from backpack_nb.errors import UserError

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback without CUDA")


def test_cpu_asks_nothing():
    assert resolve_device("cpu", "float32") == (torch.device("cpu"), "float32", [])
    assert resolve_device("cpu", "bfloat16")[1:] == ("bfloat16", [])


def test_float16_on_a_cpu_becomes_float32_with_one_warning():
    device, dtype, notes = resolve_device("cpu", "float16", task="evaluation")
    assert (device.type, dtype) == ("cpu", "float32")
    assert notes == ["--dtype float16 is for GPUs: on the CPU evaluation runs in float32; pass "
                     "--dtype float32 (or bfloat16) to silence this"]
    assert autocast_dtype(dtype) is None and autocast_dtype("bfloat16") is torch.bfloat16


@NO_CUDA
@pytest.mark.parametrize("asked", ["cuda", "cuda:1", "mps"])
def test_missing_accelerator_falls_back_or_is_refused(asked):
    device, dtype, notes = resolve_device(asked, "float32", task="sampling")
    assert device.type == "cpu" and dtype == "float32" and len(notes) == 1
    assert "sampling on the CPU instead" in notes[0]
    with pytest.raises(UserError, match="--strict_device forbids falling back"):
        resolve_device(asked, "float32", strict=True)


@pytest.mark.parametrize("device,dtype,words", [
    ("foo", "float32", "'foo' is not one of cpu, cuda, cuda:N, mps"),
    ("cuda:x", "float32", "is not one of cpu, cuda"),
    ("cpu", "half", "dtype: 'half' is not one of float32, bfloat16, float16"),
])
def test_bad_names_are_one_clear_error(device, dtype, words):
    with pytest.raises(UserError, match=words):
        resolve_device(device, dtype)


@NO_CUDA
def test_sample_py_falls_back_to_the_cpu(tiny_backpack_run, capsys):
    from backpack_nb.sampling import main

    ckpt = tiny_backpack_run["out_dir"] / "best.pt"
    assert main(["--model_path", str(ckpt), "--device", "cuda", "--num_samples", "1",
                 "--max_new_tokens", "4"]) == 0
    out = capsys.readouterr()
    assert out.out.count("---------- sample") == 1
    assert out.err.count("warning:") == 1 and "CUDA is not available" in out.err
    with pytest.raises(SystemExit) as exc:
        main(["--model_path", str(ckpt), "--device", "cuda", "--strict_device"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("error: --device cuda: CUDA is not available")


@NO_CUDA
def test_evaluate_float16_on_the_cpu_runs_in_float32(tiny_backpack_run, prepared_europarl,
                                                      tmp_path, caplog):
    """evaluate.py used to turn float16 on a CPU into bfloat16; it now follows the one rule
    and gives the float32 numbers."""
    from backpack_nb.evaluation import evaluate_checkpoint

    ckpt = tmp_path / "best.pt"
    shutil.copy(tiny_backpack_run["out_dir"] / "best.pt", ckpt)
    kw = dict(data_dir=str(prepared_europarl), splits=["val"], max_tokens=300, progress=False)
    fp32 = evaluate_checkpoint(ckpt, dtype="float32", **kw)["splits"]["val"]["all"]
    with caplog.at_level("WARNING", logger="backpack_nb"):
        fp16 = evaluate_checkpoint(ckpt, device="cuda", dtype="float16", **kw)["splits"]["val"]["all"]
    assert fp16["bits_per_byte"] == fp32["bits_per_byte"]
    assert sum("falls back" in r.getMessage() or "CPU" in r.getMessage() for r in caplog.records) == 2
