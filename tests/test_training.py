"""The training loop end to end on the Europarl sample: tiny models learn, interrupted runs
resume bit-exactly, compiled runs save clean checkpoints, DDP runs under torchrun, signals
stop cleanly, and every bad input ends in exit status 2 with a message naming the fix."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from backpack_nb import checkpoint as ck
from backpack_nb import dataset, runfiles, senses
from backpack_nb.errors import UserError
from backpack_nb.models import ModelConfig, build_model
from backpack_nb.params import TrainConfig
from backpack_nb.training import BatchSampler, Runtime, WarmupCosineSchedule, train
from backpack_nb.training import meters
from conftest import ROOT, tiny_config

sys.path.insert(0, str(ROOT))
from train import main  # noqa: E402  (the front door, called in-process)

# The tiny presets must beat a uniform guess (ln V) by at least this many nats.
MARGIN_NATS = 2.0
COMPARED = ("iterations", "train_loss", "val_loss", "lr", "tokens_seen", "top_activating_words")
HAS_CUDA = torch.cuda.is_available()


def _log(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / "training_log.json").read_text("utf-8"))


def _exit2(argv: list[str], capsys) -> str:
    """Run train.py's main in-process, expect exit status 2, return its error line(s)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def _tiny_argv(model_type: str, out_dir: Path, *extra: str) -> list[str]:
    return ["--config", f"tiny_{model_type}", "--data_dir", "europarl_sample",
            "--out_dir", str(out_dir), *extra]


# --- units ---------------------------------------------------------------------------------


def test_schedule_warmup_cosine_floor():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    s = WarmupCosineSchedule(cfg)
    assert s.lr(0) == pytest.approx(1 / 11) and s.lr(9) == pytest.approx(10 / 11)
    assert s.lr(10) == pytest.approx(1.0) and s.lr(60) == pytest.approx(0.55)
    assert s.lr(110) == pytest.approx(0.1) and s.lr(10_000) == pytest.approx(0.1)


def test_sampler_is_deterministic_resumable_and_sliced_per_rank():
    tokens = np.arange(1000, dtype=np.uint16)
    kw = dict(block_size=8, batch_size=3, seed=5, device=torch.device("cpu"))
    a = BatchSampler(tokens, **kw)
    a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(3)]
    b = BatchSampler(tokens, **{**kw, "seed": 99})
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, [b.next_batch() for _ in range(3)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert torch.equal(x1[:, 1:], y1[:, :-1]) and x1.dtype == torch.int64
    # Two ranks of a 2-process job together draw the single process's batch of 6.
    whole = BatchSampler(tokens, **{**kw, "batch_size": 6}).next_batch()[0]
    parts = [BatchSampler(tokens, **kw, rank=r, world_size=2).next_batch()[0] for r in (0, 1)]
    assert torch.equal(torch.cat(parts), whole)
    with pytest.raises(UserError, match="too few for block_size 8"):
        BatchSampler(tokens[:9], **kw, name="val")


def test_mfu_peak_is_each_gpu_once_and_a_shared_cpu_machine_once(monkeypatch):
    """MFU's denominator is the hardware the run shares. At f3defa5 every rank used its own
    peak (one GPU; on a CPU, a matmul on the one thread torchrun gives each rank) while the
    numerator held the tokens of all ranks: "mfu 108.4%" with two CPU processes."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    gpu = torch.device("cuda", 0)
    for world, dtype, expected in ((1, "bfloat16", 989e12), (2, "bfloat16", 2 * 989e12),
                                   (8, "float32", 8 * 989e12 / 2)):
        peak, what = meters.run_peak_flops(Runtime(gpu, dtype, world_size=world,
                                                   local_world_size=min(world, 8)))
        assert peak == expected and what.startswith(f"{world} x NVIDIA H100")

    # A fake CPU whose cores peak at 50 GFLOP/s each; the ranks' one thread each (torchrun's
    # OMP_NUM_THREADS=1) must not shrink the machine's peak.
    monkeypatch.setattr(meters, "_core_peak", [])
    monkeypatch.setattr(meters, "_measure_core_peak", lambda: 50e9)
    machine = 50e9 * meters.machine_cores()
    sent = []

    def broadcast(box: list, src: int) -> None:  # as gloo would: rank 0's value everywhere
        sent.append(box[0])
        box[0] = machine

    monkeypatch.setattr(meters.dist, "broadcast_object_list", broadcast)
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert meters.run_peak_flops(Runtime(cpu, "float32"))[0] == machine
        two_ranks = meters.run_peak_flops(Runtime(cpu, "float32", world_size=2,
                                                  local_world_size=2))
        assert two_ranks[0] == machine and two_ranks[1].startswith("1 machine(s)")
        two_machines = meters.run_peak_flops(Runtime(cpu, "float32", rank=2, world_size=4,
                                                     local_world_size=2))
        assert two_machines[0] == 2 * machine
        assert sent == [machine, None]  # rank 0 measured and told the others; rank 2 did not
    finally:
        torch.set_num_threads(threads)
    # the same tokens/s over the shared peak: 2 ranks each at the single process's speed
    single = meters.Throughput(512, 1e6, machine).mfu(40_000)
    assert meters.Throughput(1024, 1e6, machine).mfu(80_000) == pytest.approx(2 * single)


def test_sense_words_and_default_probe_words(prepared_europarl):
    tok = dataset.load_tokenizer(prepared_europarl)
    torch.manual_seed(0)
    model = build_model("backpack", ModelConfig(vocab_size=tok.vocab_size, block_size=16,
                                                n_layer=1, n_head=2, n_embd=16, n_senses=4,
                                                dropout=0.1))
    model.train()
    rows = senses.sense_words(model, tok, "vote", top=5)
    assert model.training  # put back in the mode it was in
    assert [r["sense"] for r in rows] == [0, 1, 2, 3] and rows[0]["token"] == " vote"
    assert all(len(r["top"]) == 5 and len(r["bottom"]) == 5 for r in rows)
    assert rows == senses.sense_words(model, tok, " vote", top=5)  # eval mode: deterministic
    words = senses.frequent_content_words(
        dataset.load_tokens(prepared_europarl, "train"), tok,
        {l: dataset.load_tokens(prepared_europarl, "val", l) for l in ("en", "fr")}, 3)
    assert len(words) == 6 and all(w.isalpha() and len(w) >= 4 for w in words)
    assert "Commission" in words[:3]  # English first, then French


# --- tiny models learn ------------------------------------------------------------------------


@pytest.mark.slow  # the session's tiny runs, through getfixturevalue
@pytest.mark.parametrize("model_type", ["backpack", "transformer"])
def test_tiny_model_learns(model_type, request):
    run = request.getfixturevalue(f"tiny_{model_type}_run")
    out, result = run["out_dir"], run["result"]
    log = _log(out)
    vocab = json.loads((out / "run.json").read_text())["dataset"]["vocab_size"]
    ln_v = math.log(vocab)
    assert log["val_loss"][0] == pytest.approx(ln_v, abs=0.1)  # a fresh model is uniform
    assert log["val_loss"][-1] < ln_v - MARGIN_NATS, (log["val_loss"], ln_v)
    assert log["iterations"] == [0, 50, 100, 150, 200]
    assert log["tokens_seen"] == [i * 8 * 64 for i in log["iterations"]]
    assert all(len(log[k]) == 5 for k in ("train_loss", "lr", "elapsed_s"))
    assert [r["iteration"] for r in run["records"]] == log["iterations"]  # callback per eval
    assert result["stopped"] is None and result["iter_num"] == 200
    print(f"{model_type}: val {log['val_loss'][-1]:.3f} vs ln V {ln_v:.3f}, "
          f"{result['tokens_per_s']:.0f} tok/s, {run['wall_s']:.1f} s")

    words = log["top_activating_words"]
    if model_type == "backpack":
        assert [w["iteration"] for w in words] == log["iterations"]
        entry = words[-1]["words"][0]
        assert entry["probe"].startswith(" ") and entry["sense"] == 0
        assert len(entry["top"]) == 10 and len(entry["bottom"]) == 10
        assert {e["sense"] for e in words[-1]["words"]} == set(range(4))
    else:
        assert words == []

    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["config"]["model_type"] == model_type
    assert info["dataset"]["meta_hash"] and info["versions"]["torch"] == torch.__version__
    assert info["effective_batch"] == {"sequences": 8, "tokens": 512}

    state = torch.load(out / "ckpt.pt", weights_only=True, map_location="cpu")
    assert state["iter_num"] == 200 and state["training_log"] == log
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in state["model"])
    best = torch.load(out / "best.pt", weights_only=True, map_location="cpu")
    assert best["best_val_loss"] == min(log["val_loss"]) and "optimizer" not in best
    model = build_model(best["model_type"], ModelConfig.from_dict(best["model_config"]))
    model.load_state_dict(best["model"])


# --- bit-exact resume -------------------------------------------------------------------------


def test_backpack_resume_is_bit_exact_from_the_previous_checkpoint(tiny_backpack_run, tmp_path,
                                                                   capsys):
    """Interrupted at 120 (after the checkpoint at 100); then ckpt.pt is damaged, so the
    resume falls back to ckpt.prev.pt (iteration 100) and replays 100-120."""
    out = tmp_path / "bp"
    assert main(_tiny_argv("backpack", out, "--stop_after", "120")) == 0
    assert ck.read_checkpoint(out / "ckpt.pt")["iter_num"] == 120
    assert ck.read_checkpoint(out / "ckpt.prev.pt")["iter_num"] == 100
    data = (out / "ckpt.pt").read_bytes()
    (out / "ckpt.pt").write_bytes(data[: len(data) // 3])
    capsys.readouterr()
    assert main(_tiny_argv("backpack", out, "--init_from", "resume")) == 0
    captured = capsys.readouterr()
    assert "warning: checkpoint" in captured.err and "ckpt.prev.pt" in captured.err
    assert "resumed at iteration 100" in captured.out
    ref, got = _log(tiny_backpack_run["out_dir"]), _log(out)
    for key in COMPARED:
        assert got[key] == ref[key], key
    assert len(json.loads((out / "run.json").read_text())["resumed_at"]) == 1


def test_transformer_finished_run_continues_bit_exactly(tiny_transformer_run, tmp_path):
    """A run finished at max_iters 100, resumed with --max_iters 200, logs what one run to 200
    logs (the schedule decays over lr_decay_iters, so max_iters may change on resume)."""
    cfg = tiny_config("transformer", tmp_path / "tr", max_iters=100)
    first = train(cfg)
    assert first["stopped"] is None and first["iter_num"] == 100
    second = train(cfg.replace(init_from="resume", max_iters=200))
    assert second["iter_num"] == 200
    ref, got = _log(tiny_transformer_run["out_dir"]), _log(tmp_path / "tr")
    for key in COMPARED:
        assert got[key] == ref[key], key
    # Nothing left to do: a resume at max_iters returns at once, without a new save, and
    # run.json keeps the throughput measured when it trained.
    before = (tmp_path / "tr" / "ckpt.pt").stat().st_mtime_ns
    rate = json.loads((tmp_path / "tr" / "run.json").read_text())["tokens_per_s"]
    assert rate and rate > 0
    assert train(cfg.replace(init_from="resume", max_iters=200))["iter_num"] == 200
    assert (tmp_path / "tr" / "ckpt.pt").stat().st_mtime_ns == before
    assert json.loads((tmp_path / "tr" / "run.json").read_text())["tokens_per_s"] == rate


def test_a_second_trainer_on_a_busy_run_folder_exits_2(prepared_europarl, tmp_path, capsys):
    """While a trainer holds a run folder, another one (resume or --overwrite) stops with
    one message and changes nothing; a run that fails on bad input leaves no folder."""
    out = tmp_path / "busy"
    small = dict(max_iters=2, eval_interval=2, eval_iters=1, checkpoint_interval=100)
    train(tiny_config("transformer", out, **small))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with runfiles.run_lock(out):  # as the running trainer holds it
        for extra in (["--init_from", "resume", "--max_iters", "4"], ["--overwrite"]):
            err = _exit2(_tiny_argv("transformer", out, *extra), capsys)
            assert "in use by another training run (run 'tiny_transformer'" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert train(tiny_config("transformer", out, init_from="resume", **{**small, "max_iters": 4}))[
        "iter_num"] == 4  # free again
    fresh = tmp_path / "new" / "run"
    _exit2(_tiny_argv("transformer", fresh, "--init_from", "resume"), capsys)
    assert not (tmp_path / "new").exists()


# --- torch.compile ------------------------------------------------------------------------------


def test_compiled_run_saves_clean_checkpoints_and_resumes(prepared_europarl, tmp_path, capsys,
                                                          monkeypatch):
    """Also: compiling says so, and how long it took, in a log file and in a terminal (at
    f3defa5 a CPU spent about 48 s before the first line with no word)."""
    small = dict(n_layer=1, max_iters=3, eval_interval=2, eval_iters=1, batch_size=2,
                 checkpoint_interval=2, compile=True)
    cfg = tiny_config("backpack", tmp_path / "c", **small)
    assert train(cfg)["iter_num"] == 3
    lines = capsys.readouterr().out.splitlines()  # output to a file: plain lines
    for what, first in (("evaluation", "evaluation"), ("training", "step")):
        start = lines.index(f"compiling the model for {what} (torch.compile, once per session: "
                            "it can take a minute)")
        assert re.fullmatch(rf"compiled for {what}: the first {first} took \d+\.\d s, "
                            "compilation included", lines[start + 1])
        if what == "evaluation":  # said before the silence, not after it
            assert start < [ln.startswith("eval 0: ") for ln in lines].index(True)
    state = torch.load(tmp_path / "c" / "ckpt.pt", weights_only=True, map_location="cpu")
    assert not any("_orig_mod" in k for k in state["model"])
    model = build_model("backpack", ModelConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])  # strict: every key matches a bare model
    monkeypatch.setattr(meters, "show_bars", lambda enabled=True: enabled)  # a terminal
    resumed = train(cfg.replace(init_from="resume", max_iters=5))
    assert resumed["iter_num"] == 5 and _log(tmp_path / "c")["iterations"] == [0, 2, 3, 4, 5]
    out, err = capsys.readouterr()
    assert "5/5 [" in err  # the bar was drawn
    assert "compiling the model for training" in out and "compiled for training: " in out


def test_auto_compile_is_off_on_cpu_and_activation_checkpointing_changes_nothing(
        prepared_europarl, tmp_path, monkeypatch):
    """``compile: auto`` (None) compiles on CUDA only; ``activation_checkpointing`` recomputes
    the blocks in backward (checkpoint is really called) and the run's log is the same."""
    import backpack_nb.models.layers as layers

    small = dict(n_layer=2, max_iters=4, eval_interval=2, eval_iters=1, batch_size=2,
                 checkpoint_interval=100)
    plain = train(tiny_config("backpack", tmp_path / "plain", **small))
    compiled, recomputed = [], []
    monkeypatch.setattr(torch, "compile", lambda *a, **k: compiled.append(1) or a[0])
    real_checkpoint = layers.checkpoint
    monkeypatch.setattr(layers, "checkpoint",
                        lambda *a, **k: recomputed.append(1) or real_checkpoint(*a, **k))
    cfg = tiny_config("backpack", tmp_path / "ac", compile="auto", activation_checkpointing=True,
                      **small)
    assert cfg.compile is None
    result = train(cfg)
    assert not compiled  # auto on the CPU: not compiled
    assert len(recomputed) == 4 * 2  # every block of every training step
    assert result["iter_num"] == plain["iter_num"] == 4
    a, b = _log(tmp_path / "plain"), _log(tmp_path / "ac")
    assert [a[k] for k in ("train_loss", "val_loss")] == [b[k] for k in ("train_loss", "val_loss")]


def test_speed_levers_fused_loss_and_distinct_on_host_keep_the_run(prepared_europarl, tmp_path):
    """``fused_loss`` and ``distinct_on_host`` change how a step is computed, not what: with
    dropout 0 the run's losses equal the plain run's (float32, CPU), and the host really
    supplies the distinct tokens (the model never looks for them itself)."""
    from backpack_nb.models import BackpackLM

    small = dict(n_layer=2, max_iters=4, eval_interval=2, eval_iters=1, batch_size=2,
                 checkpoint_interval=100, dropout=0.0)
    found_on_device = {"plain": 0, "levers": 0}
    real = BackpackLM._distinct_tokens
    run = "plain"

    def counted(self, idx):
        found_on_device[run] += 1
        return real(self, idx)

    BackpackLM._distinct_tokens = counted
    try:
        plain = _log(train(tiny_config("backpack", tmp_path / "plain", **small))["out_dir"])
        run = "levers"
        levers = train(tiny_config("backpack", tmp_path / "levers", fused_loss=True,
                                   distinct_on_host=True, **small))
    finally:
        BackpackLM._distinct_tokens = real
    # evaluation and the sense probes still find them on the device; the 4 steps do not
    assert found_on_device["plain"] - found_on_device["levers"] == 4
    fast = _log(levers["out_dir"])
    for key in ("train_loss", "val_loss"):
        np.testing.assert_allclose(fast[key], plain[key], rtol=0, atol=2e-5)
    assert plain["train_loss"][-1] < plain["train_loss"][0]


def test_sampler_sends_the_same_batches_with_their_distinct_tokens():
    tokens = np.arange(5000, dtype=np.uint16) % 97
    kw = dict(block_size=16, batch_size=3, seed=5, device=torch.device("cpu"))
    plain, ahead = BatchSampler(tokens, **kw), BatchSampler(tokens, **kw)
    for _ in range(3):
        x, y = plain.next_batch()
        x2, y2, (types, where) = ahead.next_batch_with_distinct()
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.equal(types[where], x) and len(types) % 64 == 0


# --- several processes ------------------------------------------------------------------------------


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_ddp_two_processes_gloo(prepared_europarl, tmp_path):
    """Two CPU processes: the global batch, rank 0 alone writing (files, progress, live
    curves), and MFU over the one machine's peak (at f3defa5, one rank's: over 100%)."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "train.py", *_tiny_argv("transformer", out, "--max_iters", "6",
                                        "--eval_interval", "3", "--eval_iters", "2",
                                        "--checkpoint_interval", "3", "--log_interval", "3",
                                        "--logger", "tensorboard")]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = _log(out)
    assert log["iterations"] == [0, 3, 6]
    assert log["tokens_seen"] == [0, 3 * 2 * 8 * 64, 6 * 2 * 8 * 64]  # both ranks' tokens
    info = json.loads((out / "run.json").read_text())
    assert info["device"]["world_size"] == 2 and info["device"]["backend"] == "gloo"
    assert info["effective_batch"]["sequences"] == 16
    assert proc.stdout.count("eval 6:") == 1  # rank 0 alone reports
    assert sorted(p.name for p in out.iterdir()) == [
        "best.pt", "ckpt.prev.pt", "ckpt.pt", "run.json", "tensorboard", "training_log.json"]
    assert len(list((out / "tensorboard").iterdir())) == 1  # rank 0 alone logs curves
    # MFU: the tokens of both ranks over the peak of the machine they share, all its cores
    # (torchrun gives each rank one thread)
    assert info["peak_flops_of"] == (f"1 machine(s) of {meters.machine_cores()} CPU cores, "
                                     "one core's float32 matmul peak measured")
    assert info["mfu"] == pytest.approx(info["flops_per_token"] * info["tokens_per_s"]
                                        / info["peak_flops"])
    state = ck.read_checkpoint(out / "ckpt.pt")
    assert len(state["rng"]) == 2 and state["sampler"]["world_size"] == 2


def test_sigterm_finishes_the_step_saves_and_resumes(prepared_europarl, tmp_path):
    out = tmp_path / "sig"
    cmd = [sys.executable, "train.py", *_tiny_argv("transformer", out, "--max_iters", "100000",
                                                   "--eval_interval", "100000",
                                                   "--log_interval", "1")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("iter 3/"):
                proc.send_signal(signal.SIGTERM)
                break
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "received SIGTERM" in stderr and "Traceback" not in stderr
    assert "continue with --init_from resume" in stdout
    it = ck.read_checkpoint(out / "ckpt.pt")["iter_num"]
    assert it >= 3
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and info["stopped_by"] == "SIGTERM"
    assert main(_tiny_argv("transformer", out, "--init_from", "resume",
                           "--max_iters", str(it + 2), "--eval_interval", "100000")) == 0
    assert ck.read_checkpoint(out / "ckpt.pt")["iter_num"] == it + 2


# --- the seed's command and bad inputs ------------------------------------------------------------


SEED_FLAGS = ["--model_type", "backpack", "--config", "train_europarl_scratch",
              "--data_dir", "europarl", "--device", "cuda", "--dtype", "float16"]
# Appended to the seed's command to keep it quick: the seed's shape, 2 steps of 2 sequences.
QUICK = ["--max_iters", "2", "--eval_iters", "1", "--batch_size", "2"]


@pytest.mark.slow  # prepares the seed's dataset and trains
@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU fallback")
def test_seed_command_falls_back_to_cpu_then_resumes(tmp_path, capsys):
    out = str(tmp_path / "backpack_full")
    assert main([*SEED_FLAGS, "--out_dir", out, "--init_from", "scratch", *QUICK]) == 0
    err = capsys.readouterr().err
    assert err.count("CUDA is not available") == 1 and err.count("float16 is for GPUs") == 1
    assert _log(out)["iterations"] == [0, 2]
    assert main([*SEED_FLAGS, "--out_dir", out, "--init_from", "resume", *QUICK[2:],
                 "--max_iters", "3"]) == 0
    assert _log(out)["iterations"] == [0, 2, 3]
    capsys.readouterr()
    err = _exit2([*SEED_FLAGS, "--out_dir", str(tmp_path / "s"), "--strict_device"], capsys)
    assert "--strict_device forbids falling back; pass --device cpu" in err


def test_resume_without_checkpoint(prepared_europarl, tmp_path, capsys):  # data, then the run
    err = _exit2(_tiny_argv("backpack", tmp_path / "none", "--init_from", "resume"), capsys)
    assert "neither ckpt.pt nor ckpt.prev.pt" in err and "--init_from scratch" in err


@pytest.mark.parametrize("existing", ["ckpt.pt", "ckpt.prev.pt"])
def test_scratch_refuses_to_overwrite(existing, tiny_transformer_run, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(tiny_transformer_run["out_dir"] / "ckpt.pt", out / existing)
    err = _exit2(_tiny_argv("transformer", out), capsys)
    assert existing in err and "--init_from resume" in err and "--overwrite" in err
    assert (out / existing).exists()
    # --overwrite replaces the old run (here with a 1-step run: its own ckpt.pt, no old one).
    assert main(_tiny_argv("transformer", out, "--overwrite", "--max_iters", "1",
                           "--eval_iters", "1")) == 0
    assert ck.read_checkpoint(out / "ckpt.pt")["iter_num"] == 1
    assert not (out / "ckpt.prev.pt").exists() and _log(out)["iterations"] == [0, 1]


def test_resume_with_another_model_shape(tiny_backpack_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(tiny_backpack_run["out_dir"], out)
    err = _exit2(_tiny_argv("backpack", out, "--init_from", "resume", "--n_layer", "3",
                            "--n_senses", "8", "--max_iters", "300"), capsys)
    assert "n_layer: checkpoint has 2, this run has 3" in err
    assert "n_senses: checkpoint has 4, this run has 8" in err
    err = _exit2(_tiny_argv("transformer", out, "--init_from", "resume"), capsys)
    assert "model_type: checkpoint has 'backpack', this run has 'transformer'" in err


def test_resume_from_unreadable_checkpoint(prepared_europarl, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"garbage")
    err = _exit2(_tiny_argv("backpack", out, "--init_from", "resume"), capsys)
    assert str(out / "ckpt.pt") in err and "unreadable" in err


@pytest.mark.parametrize("argv,expected", [
    (["--config", "no_such_config"], "config 'no_such_config' not found"),
    (["--config", "tiny_backpack", "--lerning_rate", "1"], "did you mean --learning_rate?"),
    (["--config", "tiny_backpack", "--dtype", "fp16"], "--dtype: 'fp16' is not one of"),
    (["--config", "tiny_backpack", "--compile", "maybe"], "--compile: expected true, false or auto"),
    (["--config", "tiny_backpack", "--init_from", "gpt2"], "--init_from: 'gpt2' is not one of"),
    (["--config", "tiny_backpack", "--n_senses", "5"], "n_embd (128) must be divisible by n_senses (5)"),
])
def test_bad_command_lines(argv, expected, capsys):
    assert expected in _exit2(argv, capsys)


def test_bad_yaml_keys_are_listed(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_type: backpack\nbatch_sise: 4\nmax_iters: many\n")
    err = _exit2(["--config", str(bad)], capsys)
    assert "2 problems" in err and "'batch_sise' (did you mean 'batch_size'?)" in err
    assert "max_iters: expected an integer" in err and "valid keys:" in err


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_float16_on_cuda_uses_a_gradient_scaler(prepared_europarl, tmp_path):
    cfg = tiny_config("backpack", tmp_path / "gpu", device="cuda", dtype="float16",
                      max_iters=4, eval_interval=2, eval_iters=1)
    result = train(cfg)
    assert result["dtype"] == "float16" and result["device"].startswith("cuda")
    state = ck.read_checkpoint(tmp_path / "gpu" / "ckpt.pt")
    assert state["scaler"]["scale"] > 0 and "cuda" in state["rng"][0]


def test_sparse_table_backpack_trains_and_resumes_bit_exactly(prepared_europarl, tmp_path):
    table = dict(sense_source="table", sparse_table=True, max_iters=12, eval_interval=4,
                 eval_iters=2, checkpoint_interval=4)
    ref = train(tiny_config("backpack", tmp_path / "ref", **table))
    cfg = tiny_config("backpack", tmp_path / "cut", **table, stop_after=6)
    assert train(cfg)["stopped"] == "stop_after"
    train(cfg.replace(init_from="resume", stop_after=None))
    got = _log(tmp_path / "cut")
    for key in COMPARED:
        assert got[key] == ref["training_log"][key], key
    assert got["val_loss"][-1] < got["val_loss"][0]
    state = ck.read_checkpoint(tmp_path / "cut" / "ckpt.pt")
    assert set(state["optimizer"]) == {"dense", "sparse"}
    with pytest.raises(UserError, match="sparse_table: checkpoint has True, this run has False"):
        train(cfg.replace(init_from="resume", sparse_table=False, max_iters=20))
