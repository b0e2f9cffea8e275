"""Checkpoint files: atomic, weights_only-loadable, previous one kept, clear errors."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch

from backpack_nb import runfiles
from backpack_nb import checkpoint as ck
from backpack_nb.errors import UserError
from backpack_nb.models import ModelConfig, build_model
from backpack_nb.training.rng import rng_state, set_rng_state


def _training_like_state() -> dict:
    """What the trainer stores: model, AdamW with moments, GradScaler, RNGs, plain values."""
    torch.manual_seed(0)
    model = build_model("backpack", ModelConfig(vocab_size=50, block_size=8, n_layer=1,
                                                n_head=2, n_embd=16, n_senses=4))
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-3)
    _, loss = model(torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8)))
    loss.backward()
    opt.step()
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    return {"model": model.state_dict(), "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(), "rng": [rng_state()], "iter_num": 7,
            "best_val_loss": float("inf"), "training_log": {"iterations": [0, 5], "words": [
                {"probe": " vote", "top": ["a", "\\xe7"]}]}, "best_iter": None}


def test_round_trip_loads_with_weights_only(tmp_path):
    state = _training_like_state()
    path = ck.save_checkpoint(state, tmp_path)
    assert path == tmp_path / ck.CKPT_NAME
    loaded = torch.load(path, weights_only=True, map_location="cpu")
    assert loaded["iter_num"] == 7 and loaded["training_log"] == state["training_log"]
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    assert loaded["scaler"]["scale"] == state["scaler"]["scale"]
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    # No temporary files are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.CKPT_NAME]
    assert (path.stat().st_mode & 0o777) != 0o600  # not mkstemp's private mode


def test_previous_checkpoint_is_kept(tmp_path):
    ck.save_checkpoint({"model": {}, "iter_num": 1}, tmp_path)
    ck.save_checkpoint({"model": {}, "iter_num": 2}, tmp_path)
    assert ck.read_checkpoint(tmp_path / ck.CKPT_NAME)["iter_num"] == 2
    assert ck.read_checkpoint(tmp_path / ck.PREV_NAME)["iter_num"] == 1
    ck.save_checkpoint({"model": {}, "iter_num": 3}, tmp_path, ck.BEST_NAME)
    assert ck.read_checkpoint(tmp_path / ck.PREV_NAME)["iter_num"] == 1  # best.pt has no prev
    assert ck.existing_checkpoints(tmp_path) == [tmp_path / ck.CKPT_NAME, tmp_path / ck.PREV_NAME]


def test_failed_write_leaves_the_old_file(tmp_path):
    ck.save_checkpoint({"model": {}, "iter_num": 1}, tmp_path)

    def explode(f):
        f.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        runfiles.atomic_write(tmp_path / ck.CKPT_NAME, explode)
    assert ck.read_checkpoint(tmp_path / ck.CKPT_NAME)["iter_num"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.CKPT_NAME]


def test_falls_back_to_previous_with_a_warning(tmp_path, caplog):
    ck.save_checkpoint({"model": {}, "iter_num": 1}, tmp_path)
    ck.save_checkpoint({"model": {}, "iter_num": 2}, tmp_path)
    good = (tmp_path / ck.CKPT_NAME).read_bytes()
    (tmp_path / ck.CKPT_NAME).write_bytes(good[: len(good) // 2])  # truncated by a crash
    with caplog.at_level(logging.WARNING):
        state, path = ck.load_checkpoint(tmp_path)
    assert path.name == ck.PREV_NAME and state["iter_num"] == 1
    assert "ckpt.pt is unreadable" in caplog.text and "ckpt.prev.pt" in caplog.text

    (tmp_path / ck.CKPT_NAME).unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        state, path = ck.load_checkpoint(tmp_path)
    assert path.name == ck.PREV_NAME and "does not exist" in caplog.text


def test_clear_errors(tmp_path):
    with pytest.raises(UserError, match="neither ckpt.pt nor ckpt.prev.pt.*--init_from scratch"):
        ck.load_checkpoint(tmp_path)
    (tmp_path / ck.CKPT_NAME).write_bytes(b"PK\x03\x04 not a zip file")
    with pytest.raises(UserError, match=r"ckpt.pt is unreadable .*truncated"):
        ck.load_checkpoint(tmp_path)
    torch.save([1, 2, 3], tmp_path / "other.pt")
    with pytest.raises(UserError, match="other.pt holds no model weights"):
        ck.read_checkpoint(tmp_path / "other.pt")
    with pytest.raises(UserError, match="missing.pt does not exist"):
        ck.read_checkpoint(tmp_path / "missing.pt")


def test_wrapper_prefixes_are_stripped():
    sd = {"_orig_mod.wte.weight": 1, "module._orig_mod.h.0.w": 2, "module.x": 3, "ln.b": 4}
    assert ck.clean_state_dict(sd) == {"wte.weight": 1, "h.0.w": 2, "x": 3, "ln.b": 4}


def test_rng_state_round_trip_through_a_file(tmp_path):
    random.random(), np.random.rand(), torch.rand(1), np.random.randn()  # numpy gauss cached
    ck.save_checkpoint({"model": {}, "rng": rng_state()}, tmp_path)
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
                np.random.randn(), torch.rand(3).tolist())
    state = ck.read_checkpoint(tmp_path / ck.CKPT_NAME)  # weights_only=True inside
    set_rng_state(state["rng"])
    again = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
             np.random.randn(), torch.rand(3).tolist())
    assert again == expected


def test_write_json_is_atomic_and_readable(tmp_path):
    import json

    runfiles.write_json(tmp_path / "a" / "log.json", {"x": [1.5, "é"]})
    assert json.loads((tmp_path / "a" / "log.json").read_text("utf-8")) == {"x": [1.5, "é"]}


def test_download_renames_only_a_complete_file(tmp_path):
    """runfiles.download (Europarl archives, Multi-SimLex): the file appears under its name
    only when complete; a failure leaves no partial file and says what the caller says."""
    import functools
    import http.server
    import threading

    served = tmp_path / "served"
    served.mkdir()
    (served / "a.bin").write_bytes(b"x" * 3_000_000)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        got = runfiles.download(f"{base}/a.bin", tmp_path / "out" / "a.bin", lambda e: "never")
        assert got.read_bytes() == b"x" * 3_000_000
        with pytest.raises(UserError, match=r"^no b\.bin: HTTP Error 404"):
            runfiles.download(f"{base}/b.bin", tmp_path / "out" / "b.bin",
                              lambda e: f"no b.bin: {e}", bar="download b.bin")
    finally:
        server.shutdown()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.bin"]


def test_check_finite_names_the_first_bad_tensor(tmp_path):
    """A NaN or infinite weight (or AdamW moment) is a damaged checkpoint: one UserError
    naming the file, the tensor and how many values, once per load."""
    state = _training_like_state()
    ck.check_finite(state["model"], tmp_path / "ckpt.pt")  # a trained model's: finite
    ck.check_finite(ck.optimizer_tensors(state["optimizer"]), tmp_path / "ckpt.pt")
    name = sorted(state["model"])[2]
    state["model"][name].view(-1)[:3] = float("inf")
    with pytest.raises(UserError, match=rf"ckpt.pt is damaged: its weights hold non-finite "
                                        rf"values \(3 infinite value\(s\) in {name}\)"):
        ck.check_finite(state["model"], tmp_path / "ckpt.pt")
    other = sorted(state["model"])[4]
    state["model"][other].view(-1)[0] = float("nan")
    with pytest.raises(UserError, match=rf"in {name}, and 1 more tensor\(s\)"):
        ck.check_finite(state["model"], tmp_path / "ckpt.pt", fix="use best.pt")
    moments = ck.optimizer_tensors(state["optimizer"])
    key = next(k for k in moments if k.endswith("exp_avg"))
    moments[key].view(-1)[0] = float("nan")
    with pytest.raises(UserError, match=rf"its optimizer moments hold non-finite values "
                                        rf"\(1 NaN value\(s\) in {key}\)"):
        ck.check_finite(moments, tmp_path / "ckpt.pt", "optimizer moments")


def test_resume_hint_only_where_a_checkpoint_exists(tmp_path):
    assert "nothing to resume" in ck.resume_hint(tmp_path)
    assert "--init_from resume" not in ck.resume_hint(tmp_path)
    ck.save_checkpoint({"model": {}, "iter_num": 1}, tmp_path)
    assert ck.resume_hint(tmp_path) == (f"checkpoint in {tmp_path / ck.CKPT_NAME}; continue "
                                        "with --init_from resume")
