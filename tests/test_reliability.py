"""Fault tests: training killed with SIGKILL at random moments (mid-save too), stopped by
SIGTERM/SIGINT, fed damaged, foreign or malicious checkpoints, a full disk, damaged data,
NaN losses and bad command lines. docs/reliability.md states the guarantees and the figures
these tests measure; pytest prints them at the end of any run that includes this file.

The crash tests run train.py's ``main`` in processes forked from one "zygote" interpreter that
has already imported torch and backpack_nb: each launch then starts in about a second rather
than five, so two dozen kills fit in CI. A forked child is an ordinary process: SIGKILL ends
it as abruptly as any other. Every child runs with one thread, like the reference runs it is
compared with, so the comparisons can be bit-exact.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import pickle
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from backpack_nb import dataset
from backpack_nb import runfiles
from backpack_nb import checkpoint as ck
from backpack_nb import data as data_mod
from backpack_nb import evaluation
from backpack_nb import training
from backpack_nb.errors import UserError
from conftest import FIGURES as ALL_FIGURES
from conftest import ROOT, tiny_config

sys.path.insert(0, str(ROOT))
from train import main as train_main  # noqa: E402  (the front door, called in-process)

COMPARED = ("iterations", "train_loss", "val_loss", "lr", "tokens_seen", "top_activating_words")
# A small model, frequent checkpoints: block 32, batch 4, a save every 5 steps.
SMALL = ["--block_size", "32", "--batch_size", "4", "--n_embd", "32", "--n_head", "2",
         "--n_layer", "1", "--max_iters", "60", "--eval_interval", "20", "--eval_iters", "2",
         "--checkpoint_interval", "5", "--log_interval", "5"]
SMALL_MAX_ITERS = 60
PAUSE_S = 0.1  # BACKPACK_NB_TEST_SLOW_SAVE: each .pt write pauses twice this long
KILLS, KILLS_PER_RUN = 24, 6
LAUNCH_TIMEOUT_S = 120
SPOT_NOTICE_S = 30.0  # what a preempted spot VM gives a process between SIGTERM and the end

# What the tests below measure; conftest's pytest_terminal_summary prints it after the run.
FIGURES: dict[str, object] = ALL_FIGURES.setdefault("reliability figures", {})


# --- the zygote: fast, forked launches of train.py's main ------------------------------------

_ZYGOTE = r'''
import json, os, sys
sys.path.insert(0, sys.argv[1])
import torch  # noqa: F401  (imported once, before any fork)
import train
import backpack_nb.training  # noqa: F401

# Warm up with one throwaway step: the lazy imports (torch._dynamo, behind the optimizer), the
# tokenizer's encoding and the CPU's peak FLOP/s are then loaded once, here, not per child.
# Single-threaded (OMP_NUM_THREADS=1), so no thread pool is running when the children fork.
with open(sys.argv[3], "w") as log:
    stdout, stderr, sys.stdout, sys.stderr = sys.stdout, sys.stderr, log, log
    try:
        train.main(json.loads(sys.argv[2]))
    finally:
        sys.stdout, sys.stderr = stdout, stderr


def child(req):
    fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.update(req.get("env", {}))
    if req.get("fsize"):
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], resource.RLIM_INFINITY))
    code = 1
    try:
        code = train.main(req["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        print(f"zygote-child: exit {code}", flush=True)
        sys.stderr.flush()
        os._exit(code or 0)


for line in sys.stdin:
    req = json.loads(line)
    if "wait" in req:
        _, status = os.waitpid(req["wait"], 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        child(req)
    print(json.dumps({"pid": pid}), flush=True)
'''


class Zygote:
    """A Python process that imported torch and train.py once and forks a child per launch.
    Children write stdout and stderr to a log file; the test polls it, signals the child by
    its pid and asks the zygote for its exit status."""

    def __init__(self, folder: Path):
        script = folder / "zygote.py"
        script.write_text(_ZYGOTE)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONUNBUFFERED": "1"}
        env.pop(runfiles.SLOW_SAVE_ENV, None)
        warm = _small_argv("backpack", folder / "warm-up", "--max_iters", "1")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(ROOT), json.dumps(warm), str(folder / "warm.log")],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            bufsize=1)
        self.count = 0

    def _ask(self, req: dict, timeout: float) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"the zygote did not answer {req} within {timeout} s")
        return json.loads(self.proc.stdout.readline())

    def launch(self, argv: list[str], log: Path, *, slow_save: float = 0.0,
               fsize: int | None = None) -> int:
        self.count += 1
        env = {runfiles.SLOW_SAVE_ENV: str(slow_save)} if slow_save else {}
        # The first answer waits for the warm-up.
        return self._ask({"argv": argv, "log": str(log), "env": env, "fsize": fsize},
                         timeout=300 if self.count == 1 else 60)["pid"]

    def wait(self, pid: int, timeout: float = LAUNCH_TIMEOUT_S) -> int:
        """The child's exit status (negative: killed by that signal)."""
        try:
            return self._ask({"wait": pid}, timeout)["status"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            raise

    def run(self, argv: list[str], log: Path, **kw) -> tuple[int, str]:
        status = self.wait(self.launch(argv, log, **kw))
        return status, log.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory, prepared_europarl):
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()
    FIGURES["zygote launches"] = z.count


def _small_argv(model_type: str, out: Path, *extra: str, resume: bool = False) -> list[str]:
    return ["--config", f"tiny_{model_type}", "--data_dir", "europarl_sample",
            "--out_dir", str(out), *SMALL, "--init_from", "resume" if resume else "scratch",
            *extra]


@pytest.fixture(scope="module")
def references(zygote, tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted run of the small config per model type (no slow-save hook)."""
    root = tmp_path_factory.mktemp("references")
    out = {}
    for model_type in ("backpack", "transformer"):
        out[model_type] = root / model_type
        status, log = zygote.run(_small_argv(model_type, out[model_type]),
                                 root / f"{model_type}.log")
        assert status == 0, log[-3000:]
    return out


# --- comparing runs and folders ----------------------------------------------------------------


def _log(out_dir: Path) -> dict:
    return json.loads((out_dir / "training_log.json").read_text("utf-8"))


def _tensors_equal(a, b, where: str) -> None:
    """Nested dicts/lists of tensors and plain values are identical (bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            _tensors_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _tensors_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


def _assert_same_run(got: Path, ref: Path) -> None:
    """Same training log, and the same weights, optimizer, sampler and RNG state in ckpt.pt,
    the same weights in best.pt, as the uninterrupted reference."""
    g, r = _log(got), _log(ref)
    for key in COMPARED:
        assert g[key] == r[key], key
    a, b = ck.read_checkpoint(got / ck.CKPT_NAME), ck.read_checkpoint(ref / ck.CKPT_NAME)
    for key in ("iter_num", "model", "optimizer", "scaler", "schedule", "sampler",
                "best_val_loss"):
        _tensors_equal(a[key], b[key], key)
    for key in COMPARED:  # the log inside the checkpoint too (elapsed_s differs, of course)
        assert a["training_log"][key] == b["training_log"][key], key
    # Python's own RNG is reseeded in every new process (and after a fork) and training never
    # draws from it; torch's and numpy's must match.
    for ra, rb in zip(a["rng"], b["rng"]):
        _tensors_equal({k: v for k, v in ra.items() if k != "python"},
                       {k: v for k, v in rb.items() if k != "python"}, "rng")
    a, b = ck.read_checkpoint(got / ck.BEST_NAME), ck.read_checkpoint(ref / ck.BEST_NAME)
    _tensors_equal(a["model"], b["model"], "best.model")
    assert a["iter_num"] == b["iter_num"]


def _tree_hash(*folders: Path) -> dict[str, str]:
    """sha256 of every file under the folders (hidden ones too); a folder that does not exist
    hashes as absent."""
    out = {}
    for folder in folders:
        if not folder.exists():
            out[str(folder)] = "absent"
            continue
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _one_error(err: str) -> str:
    """stderr holds one readable error (``error: ...``, argparse's ``prog: error: ...`` after
    its usage line) and no traceback; returns it."""
    assert "Traceback" not in err, err
    assert len(re.findall(r"(^|: )error: ", err, flags=re.M)) == 1, err
    return err


# --- kill -9 at random moments ------------------------------------------------------------------


_SAVED = re.compile(r"saved ckpt\.pt(?: and best\.pt)? at iteration (\d+)")


def _where_killed(log: str) -> str | None:
    """Where the slow-save markers say the kill landed: inside a write ("part-written", or
    "before the rename"), or None when no save was in progress."""
    marks = [line for line in log.splitlines() if line.startswith("slow-save: ")]
    if not marks or marks[-1].endswith(" in place"):
        return None
    name = marks[-1].split()[1]
    return f"{name} {'before the rename' if 'before the rename' in marks[-1] else 'part-written'}"


def _check_after_kill(out: Path, log: str) -> int | None:
    """Nothing partial is visible: each checkpoint reads with weights_only, the log parses,
    and ckpt.pt is at least as new as the last save the run reported. Returns the iteration
    a resume must continue from (None: no checkpoint yet)."""
    for name in (ck.CKPT_NAME, ck.PREV_NAME, ck.BEST_NAME):
        if (out / name).exists():
            ck.read_checkpoint(out / name)
    if (out / "training_log.json").exists():
        _log(out)
    saved = [int(m) for m in _SAVED.findall(log)]
    if not (out / ck.CKPT_NAME).exists():
        assert not saved and not (out / ck.PREV_NAME).exists(), log[-2000:]
        return None
    it = ck.read_checkpoint(out / ck.CKPT_NAME)["iter_num"]
    assert not saved or it >= saved[-1], (it, saved)
    return it


def test_kill_9_at_random_moments_resumes_bit_exactly(zygote, references, tmp_path):
    """24 kills over runs of the small config (Backpack and Transformer by turns, up to 6
    kills each; a run that finishes before its next kill hands over to a new one). Each kill
    lands at a random time up to 1 s into training (the run's own timing), or at a random
    instant inside the 1st-5th write of a .pt file, paused by the slow-save hook. After each
    kill the folder holds only complete files; the next launch resumes from ckpt.pt (never a
    fallback, never a partial file); each finished run equals the uninterrupted one."""
    rng = random.Random(20240607)
    kills, mid_save, where, modes, resumed_from_scratch = 0, 0, {}, {}, 0
    t_start = time.perf_counter()
    runs = 0
    while kills < KILLS and runs < 12:  # a run that finishes early hands over to a new one
        run, model_type = runs, ("backpack", "transformer")[runs % 2]
        runs += 1
        out = tmp_path / f"run{run}"
        expected: int | None = None
        launches = 0
        while True:
            final = launches == KILLS_PER_RUN or kills == KILLS
            resume = expected is not None
            logf = tmp_path / f"run{run}-{launches}.log"
            mode = rng.choice(["timer", "in-save"])
            # A timer kill lands where the run's own timing puts it (the hook only marks the
            # saves, pausing 1 ms); an in-save kill waits for a paused write.
            pid = zygote.launch(_small_argv(model_type, out, resume=resume), logf,
                                slow_save=PAUSE_S if mode == "in-save" else 0.001)
            launches += 1
            t0 = time.monotonic()
            after = rng.uniform(0.0, 1.0)  # timer: seconds after the first evaluation line
            nth_pause, delay = rng.randint(1, 5), rng.uniform(0.0, PAUSE_S)
            deadline = None
            killed = False
            while not final:
                text = logf.read_text() if logf.exists() else ""
                if "zygote-child: exit" in text:
                    break  # finished before its kill came
                if deadline is None and ("eval " in text or "resumed at" in text):
                    deadline = time.monotonic() + after
                if mode == "timer" and deadline and time.monotonic() >= deadline:
                    killed = True
                elif mode == "in-save" and text.count(", pausing ") >= nth_pause:
                    time.sleep(delay)
                    killed = True
                if killed:
                    os.kill(pid, signal.SIGKILL)
                    break
                assert time.monotonic() - t0 < LAUNCH_TIMEOUT_S, text[-2000:]
                time.sleep(0.005)
            status = zygote.wait(pid)
            log = logf.read_text()
            assert "Traceback" not in log, log[-3000:]
            if resume and "resumed at iteration" in log:
                assert f"resumed at iteration {expected} from ckpt.pt" in log, log[-3000:]
                assert "warning:" not in log, log[-3000:]
            if not killed or status == 0:
                assert status == 0, log[-3000:]
                break
            assert status == -signal.SIGKILL
            kills += 1
            modes[mode] = modes.get(mode, 0) + 1
            spot = _where_killed(log)
            if spot:
                mid_save += 1
                where[spot] = where.get(spot, 0) + 1
                where[f"{mode} kills mid-save"] = where.get(f"{mode} kills mid-save", 0) + 1
            expected = _check_after_kill(out, log)
            resumed_from_scratch += expected is None
        _assert_same_run(out, references[model_type])
        assert not list(out.glob(".*.tmp")), list(out.iterdir())  # stale temps cleaned up
    FIGURES["kill -9"] = {"kills": kills, "survived": kills, "mid_save": mid_save,
                          "where": where, "modes": modes, "runs": runs,
                          "no_checkpoint_yet": resumed_from_scratch,
                          "seconds": round(time.perf_counter() - t_start, 1)}
    assert kills == KILLS and mid_save >= 5, FIGURES["kill -9"]


# --- SIGTERM / SIGINT --------------------------------------------------------------------------


def _interrupt(zygote: Zygote, argv: list[str], logf: Path, sig: int, after_iters: int,
               extra_delay: float) -> tuple[int, str, float]:
    """Launch, wait for the progress line of ``after_iters``, wait ``extra_delay`` more, send
    ``sig``; return (status, log, seconds from the signal to the exit)."""
    pid = zygote.launch(argv, logf)
    t0 = time.monotonic()
    while True:
        text = logf.read_text() if logf.exists() else ""
        m = [int(x) for x in re.findall(r"^iter (\d+)/", text, flags=re.M)]
        if m and m[-1] >= after_iters:
            break
        assert "zygote-child: exit" not in text, text[-3000:]
        assert time.monotonic() - t0 < LAUNCH_TIMEOUT_S, text[-3000:]
        time.sleep(0.005)
    time.sleep(extra_delay)
    t_sig = time.monotonic()
    os.kill(pid, sig)
    while "zygote-child: exit" not in (logf.read_text()):
        assert time.monotonic() - t_sig < LAUNCH_TIMEOUT_S
        time.sleep(0.002)
    took = time.monotonic() - t_sig
    return zygote.wait(pid), logf.read_text(), took


@pytest.mark.parametrize("sig,model_type", [(signal.SIGINT, "backpack"),
                                            (signal.SIGTERM, "transformer")])
def test_signal_saves_at_the_current_step_quickly_and_resumes_bit_exactly(
        sig, model_type, zygote, references, tmp_path):
    """Twice interrupted (at random moments after iterations 7 and 33), each time saving at
    the step it was in and exiting 128 + signal within the spot-VM notice; the resumed run
    equals the uninterrupted one."""
    rng = random.Random(int(sig))
    out = tmp_path / "run"
    bounds = []
    for k, after in enumerate((7, 33)):
        argv = _small_argv(model_type, out, "--log_interval", "1", resume=k > 0)
        status, log, took = _interrupt(zygote, argv, tmp_path / f"{k}.log", sig, after,
                                       rng.uniform(0, 0.05))
        assert status == 128 + sig, log[-3000:]
        name = signal.Signals(sig).name
        assert f"received {name}" in log and "Traceback" not in log
        m = re.search(r"stopped at iteration (\d+) \(" + name + r"\)", log)
        assert m, log[-3000:]
        it = int(m.group(1))
        printed = [int(x) for x in re.findall(r"^iter (\d+)/", log, flags=re.M)]
        assert it == printed[-1]  # saved at the step it was in: nothing lost
        assert ck.read_checkpoint(out / ck.CKPT_NAME)["iter_num"] == it
        assert json.loads((out / "run.json").read_text())["stopped_by"] == name
        assert took < SPOT_NOTICE_S
        bounds.append(took)
    status, log = zygote.run(_small_argv(model_type, out, resume=True), tmp_path / "end.log")
    assert status == 0, log[-3000:]
    _assert_same_run(out, references[model_type])
    FIGURES[f"{signal.Signals(sig).name} small {model_type}: signal to exit (s)"] = [
        round(b, 3) for b in bounds]


def test_signal_bound_for_the_tiny_preset(zygote, tmp_path):
    """The tiny preset as shipped (block 64, batch 8, d 128): SIGTERM mid-run, time to exit."""
    out = tmp_path / "tiny"
    argv = ["--config", "tiny_backpack", "--data_dir", "europarl_sample", "--out_dir",
            str(out), "--log_interval", "1", "--eval_interval", "1000"]
    status, log, took = _interrupt(zygote, argv, tmp_path / "tiny.log", signal.SIGTERM, 3, 0.01)
    assert status == 128 + signal.SIGTERM, log[-3000:]
    assert took < SPOT_NOTICE_S
    save = re.search(r"saved ckpt\.pt at iteration \d+ \([\d.]+ MiB, ([\d.]+) s\)", log)
    FIGURES["SIGTERM tiny_backpack preset: signal to exit (s)"] = round(took, 3)
    FIGURES["SIGTERM tiny_backpack preset: save (s)"] = float(save.group(1))


def test_second_signal_during_the_save_aborts_and_keeps_the_last_checkpoint(
        zygote, references, tmp_path):
    """SIGTERM, then a second SIGTERM while the stop's save is paused mid-write: the process
    exits at once (143, one error line), the partial file is removed and ckpt.pt is still the
    last complete checkpoint."""
    out = tmp_path / "run"
    shutil.copytree(references["transformer"], out)
    before = _tree_hash(out)
    logf = tmp_path / "abort.log"
    pid = zygote.launch(_small_argv("transformer", out, "--max_iters", "1000",
                                    "--checkpoint_interval", "1000", "--eval_interval", "1000",
                                    resume=True), logf, slow_save=2.0)
    t0 = time.monotonic()
    sent = False
    while True:
        text = logf.read_text() if logf.exists() else ""
        if not sent and re.search(r"^iter 6\d/", text, flags=re.M):
            os.kill(pid, signal.SIGTERM)
            sent = True
        if "ckpt.pt part-written" in text:
            os.kill(pid, signal.SIGTERM)
            break
        assert "zygote-child: exit" not in text and time.monotonic() - t0 < LAUNCH_TIMEOUT_S
        time.sleep(0.005)
    status = zygote.wait(pid)
    log = logf.read_text()
    assert status == 128 + signal.SIGTERM, log[-3000:]
    assert "error: aborted by SIGTERM without saving" in log and "Traceback" not in log
    after = _tree_hash(out)
    for name in (ck.CKPT_NAME, ck.PREV_NAME, ck.BEST_NAME):
        assert after[str(out / name)] == before[str(out / name)], name
    assert not list(out.glob(".*.tmp"))


# --- corrupted, foreign and malicious checkpoints -------------------------------------------------


class _Evil:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _other_vocabulary(state: dict) -> dict:
    """The checkpoint as if trained on another dataset: 10 fewer tokens, another meta hash."""
    state = dict(state)
    v = state["model_config"]["vocab_size"] - 10
    state["model"] = {k: (t[:v] if t.shape[:1] == (v + 10,) else t)
                      for k, t in state["model"].items()}
    state["model_config"] = {**state["model_config"], "vocab_size": v}
    state["data"] = {**state["data"], "meta_hash": "0" * 64}
    return state


def _corrupt(kind: str, path: Path, refs: dict[str, Path], marker: Path) -> str:
    """Make ``path`` (a copy of a backpack ckpt) bad in one way; returns words the error
    message must contain."""
    good = path.read_bytes()
    state = ck.read_checkpoint(path)
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
        return "is unreadable"
    if kind == "empty":
        path.write_bytes(b"")
        return "is unreadable"
    if kind == "random bytes":
        path.write_bytes(random.Random(1).randbytes(len(good)))
        return "is unreadable"
    if kind == "other model type":
        shutil.copy(refs["transformer"] / ck.CKPT_NAME, path)
        return "model_type: checkpoint has 'transformer', this run has 'backpack'"
    if kind == "other vocabulary":
        torch.save(_other_vocabulary(state), path)
        return "vocab_size: checkpoint has"
    if kind == "missing optimizer":
        del state["optimizer"]
        torch.save(state, path)
        return "is incomplete: missing optimizer"
    if kind == "missing a weight":
        state["model"].pop(sorted(state["model"])[0])
        torch.save(state, path)
        return "does not fit this run's model: missing"
    if kind == "NaN weight":  # a bit flip: the resume used it and advised a lower lr
        name = sorted(state["model"])[1]
        state["model"][name].view(-1)[0] = float("nan")
        torch.save(state, path)
        return f"is damaged: its weights hold non-finite values (1 NaN value(s) in {name})"
    if kind == "best.pt copied":
        shutil.copy(refs["backpack"] / ck.BEST_NAME, path)
        return "looks like a best.pt"
    if kind == "malicious (zip)":
        torch.save({"model": _Evil(marker)}, path)
        return "refused to load it, since unpickling it could run code"
    if kind == "malicious (legacy pickle)":
        path.write_bytes(pickle.dumps({"model": _Evil(marker)}, protocol=2))
        return "refused to load it, since unpickling it could run code"
    raise ValueError(kind)


CORRUPTIONS = ["truncated", "empty", "random bytes", "other model type", "other vocabulary",
               "missing optimizer", "missing a weight", "NaN weight", "best.pt copied",
               "malicious (zip)", "malicious (legacy pickle)"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_bad_checkpoint_falls_back_to_the_previous_one_or_exits_2(kind, references, tmp_path,
                                                                  capsys):
    out = tmp_path / "run"
    shutil.copytree(references["backpack"], out)
    marker = tmp_path / "code-ran"
    prev_iter = ck.read_checkpoint(out / ck.PREV_NAME)["iter_num"]
    words = _corrupt(kind, out / ck.CKPT_NAME, references, marker)
    argv = _small_argv("backpack", out, "--max_iters", str(prev_iter + 1), resume=True)

    # ckpt.prev.pt is good: a warning naming ckpt.pt and its problem, then resume from it.
    capsys.readouterr()
    assert train_main(argv) == 0
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    warning = [line for line in cap.err.splitlines() if line.startswith("warning: ")]
    assert warning and str(out / ck.CKPT_NAME) in warning[0] and words in cap.err, cap.err
    assert "learning_rate" not in cap.err  # damaged, not a diverged run
    assert f"resumed at iteration {prev_iter} from ckpt.prev.pt" in cap.out
    assert ck.read_checkpoint(out / ck.CKPT_NAME)["iter_num"] == prev_iter + 1

    # Both bad: exit 2, one message naming each file and its problem, nothing touched.
    shutil.rmtree(out)
    shutil.copytree(references["backpack"], out)
    _corrupt(kind, out / ck.CKPT_NAME, references, marker)
    _corrupt(kind, out / ck.PREV_NAME, references, marker)
    before = _tree_hash(out)
    with pytest.raises(SystemExit) as exc:
        train_main(argv)
    assert exc.value.code == 2
    err = _one_error(capsys.readouterr().err)
    assert str(out / ck.CKPT_NAME) in err and words in err, err
    assert "learning_rate" not in err
    assert _tree_hash(out) == before
    assert not marker.exists()  # the malicious pickles never ran


def test_malicious_checkpoint_is_refused_by_evaluate_and_the_loader(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "ckpt.pt"
    torch.save({"model": _Evil(marker)}, evil)
    with pytest.raises(UserError, match="refused to load it"):
        ck.read_checkpoint(evil)
    with pytest.raises(SystemExit) as exc:
        evaluation.main(["--model_path", str(evil), "--device", "cpu"])
    assert exc.value.code == 2
    assert "could run code" in _one_error(capsys.readouterr().err)
    # The payload is real: an unrestricted load runs it. (This is what weights_only prevents.)
    assert not marker.exists()
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "ran"


# --- disk full, unwritable folder ---------------------------------------------------------------


def test_disk_full_gives_a_clear_error_and_keeps_the_checkpoints(zygote, references, tmp_path):
    """RLIMIT_FSIZE below the checkpoint's size: the first save fails with one error line,
    the checkpoints and the log are byte-identical, no temporary file is left."""
    out = tmp_path / "run"
    shutil.copytree(references["backpack"], out)
    size = (out / ck.CKPT_NAME).stat().st_size
    keep = [out / n for n in (ck.CKPT_NAME, ck.PREV_NAME, ck.BEST_NAME, "training_log.json")]
    before = {p: p.read_bytes() for p in keep}
    status, log = zygote.run(_small_argv("backpack", out, "--max_iters", "70", resume=True),
                             tmp_path / "full.log", fsize=size // 2)
    assert status == 2, log[-3000:]
    assert "Traceback" not in log
    assert f"error: could not write {out / ck.CKPT_NAME} (File too large); the existing " \
           "ckpt.pt is untouched" in log
    assert {p: p.read_bytes() for p in keep} == before
    assert not list(out.glob(".*.tmp"))


def test_unwritable_out_dir_gives_a_clear_error_and_changes_nothing(references, tmp_path,
                                                                   capsys, monkeypatch):
    """As root (CI containers) chmod does not stop writes, so the refusal is simulated where
    every write starts: creating the temporary file."""
    out = tmp_path / "run"
    shutil.copytree(references["transformer"], out)
    before = _tree_hash(out)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(runfiles.tempfile, "mkstemp", refuse)
    with pytest.raises(SystemExit) as exc:
        train_main(_small_argv("transformer", out, "--max_iters", "70", resume=True))
    assert exc.value.code == 2
    err = _one_error(capsys.readouterr().err)
    assert f"could not write {out / 'run.json'} (Permission denied)" in err
    assert f"Fix the permissions of {out}" in err
    assert _tree_hash(out) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_out_dir(references, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(references["transformer"], out)
    before = _tree_hash(out)
    out.chmod(0o555)
    try:
        with pytest.raises(SystemExit) as exc:
            train_main(_small_argv("transformer", out, "--max_iters", "70", resume=True))
    finally:
        out.chmod(0o755)
    assert exc.value.code == 2
    assert "Permission denied" in _one_error(capsys.readouterr().err)
    assert _tree_hash(out) == before


# --- data faults ----------------------------------------------------------------------------


def _edit_meta(folder: Path, edit) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    edit(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


DATA_FAULTS = {
    "truncated train.bin": (
        lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:-1000]),
        "train.bin does not match meta.json"),
    "meta.json token count": (
        lambda d: _edit_meta(d, lambda m: m["splits"]["train"].update(
            tokens=m["splits"]["train"]["tokens"] + 7)),
        "train.bin does not match meta.json"),
    "meta.json dtype": (
        lambda d: _edit_meta(d, lambda m: m.update(dtype="uint32")),
        "does not match meta.json"),
    "garbage train.bin of the right size": (
        lambda d: (d / "train.bin").write_bytes(b"\xff" * (d / "train.bin").stat().st_size),
        "outside the vocabulary"),
    "damaged meta.json": (
        lambda d: (d / "meta.json").write_text((d / "meta.json").read_text()[:500]),
        "meta.json is damaged"),
    "meta.json without base_ids": (
        lambda d: _edit_meta(d, lambda m: m.pop("base_ids")),
        "lacks base_ids"),
}


@pytest.mark.parametrize("fault", list(DATA_FAULTS))
def test_data_faults_are_caught_before_training(fault, prepared_europarl, tmp_path, capsys):
    damage, words = DATA_FAULTS[fault]
    data_dir = tmp_path / "data"
    shutil.copytree(prepared_europarl, data_dir)
    damage(data_dir)
    out = tmp_path / "run"
    before = _tree_hash(data_dir, out)
    with pytest.raises(SystemExit) as exc:
        train_main(["--config", "tiny_backpack", "--data_dir", str(data_dir), "--out_dir",
                    str(out), *SMALL])
    assert exc.value.code == 2
    err = _one_error(capsys.readouterr().err)
    assert words in err and "--overwrite" in err, err
    assert _tree_hash(data_dir, out) == before  # nothing prepared over it, no run folder


def test_resume_on_a_changed_dataset_is_refused(references, prepared_europarl, tmp_path,
                                                 capsys):
    """Same files, meta.json edited (another seed): the meta hash in the checkpoint differs."""
    data_dir = tmp_path / "data"
    shutil.copytree(prepared_europarl, data_dir)
    _edit_meta(data_dir, lambda m: m["config"].update(seed=7))
    out = tmp_path / "run"
    shutil.copytree(references["backpack"], out)
    before = _tree_hash(data_dir, out)
    with pytest.raises(SystemExit) as exc:
        train_main(_small_argv("backpack", out, "--data_dir", str(data_dir), resume=True))
    assert exc.value.code == 2
    err = _one_error(capsys.readouterr().err)
    assert "dataset: checkpoint was trained on" in err and "meta hash" in err
    assert _tree_hash(data_dir, out) == before


# --- NaN / Inf loss ----------------------------------------------------------------------------


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_loss_stops_before_saving(poison, prepared_europarl, tmp_path, capsys,
                                             monkeypatch):
    """From training step 13 on the model's loss is NaN (or inf): the run stops at the next
    check (before the save due at 15) with one error line; the checkpoint of step 10 and the
    log are untouched and hold only finite numbers."""
    build = training.loop.build_model
    calls = {"n": 0}

    def poisoned_build(*args, **kwargs):
        model = build(*args, **kwargs)
        forward = model.forward

        def poisoned(*a, **k):
            logits, loss = forward(*a, **k)
            if model.training:
                calls["n"] += 1
                if calls["n"] >= 13:
                    loss = loss * poison
            return logits, loss

        model.forward = poisoned
        return model

    monkeypatch.setattr(training.loop, "build_model", poisoned_build)
    out = tmp_path / "run"
    argv = _small_argv("backpack", out, "--eval_interval", "10", "--log_interval", "100")
    with pytest.raises(SystemExit) as exc:
        train_main(argv)
    assert exc.value.code == 2
    err = _one_error(capsys.readouterr().err)
    assert "training loss became NaN or infinite (3 micro-batch(es) between iteration 10 " \
           "and 15)" in err
    assert f"{out / ck.CKPT_NAME} (iteration 10) is intact" in err and "--learning_rate" in err
    state = ck.read_checkpoint(out / ck.CKPT_NAME)
    assert state["iter_num"] == 10
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert all(torch.isfinite(torch.tensor(v)).all() for v in _log(out)["train_loss"])
    assert _log(out)["iterations"] == [0, 10]


def test_non_finite_weights_are_never_saved(prepared_europarl, tmp_path, monkeypatch):
    """Belt and braces: weights that went non-finite without a non-finite loss (here set by
    hand) are caught by the check in save()."""
    original = training.Trainer.train_step

    def step(self):
        loss = original(self)
        if self.progress.iter_num == 7:
            with torch.no_grad():
                next(self.raw_model.parameters()).view(-1)[0] = float("nan")
        return loss

    monkeypatch.setattr(training.Trainer, "train_step", step)
    monkeypatch.setattr(training.Trainer, "_check_finite", lambda self: None)  # loss check off
    out = tmp_path / "run"
    cfg = tiny_config("transformer", out, **{k[2:]: v for k, v in zip(SMALL[::2], SMALL[1::2])})
    with pytest.raises(training.TrainingDiverged, match="weights hold NaN"):
        training.train(cfg)
    assert ck.read_checkpoint(out / ck.CKPT_NAME)["iter_num"] == 5


# --- bad inputs: exit 2, one message, every existing file byte-identical ----------------------


def _bad_inputs(run: Path, other_vocab_data: Path, garbage: Path) -> list[tuple]:
    """(front door, argv, words the message must contain). ``run`` is a finished backpack
    run of the small config."""
    tiny = ["--config", "tiny_backpack", "--data_dir", "europarl_sample", "--out_dir", str(run)]
    resume = [*tiny, *SMALL, "--init_from", "resume"]
    ckpt = str(run / ck.CKPT_NAME)
    return [
        ("train", [*tiny, "--model_type", "gpt"], "model_type: 'gpt' is not one of"),
        ("train", ["--config", "tiny_backpak", "--out_dir", str(run)],
         "Did you mean 'tiny_backpack'?"),
        ("train", [*tiny, "--batch_size", "four"], "--batch_size: expected an integer"),
        ("train", [*tiny, "--max_iters", "-5"], "--max_iters: must be >= 1, got -5"),
        ("train", [*tiny, "--learning_rate", "0"], "learning_rate: must be > 0"),
        ("train", [*tiny, "--dropout", "1.5"], "dropout"),
        ("train", [*tiny, "--device", "tpu"], "device: 'tpu' is not one of"),
        ("train", [*tiny, "--languages", "en,xx"], "languages: xx not in Europarl"),
        ("train", [*tiny, "--n_head", "3"], "n_head"),
        ("train", [*tiny, "--max_itres", "5"], "did you mean --max_iters?"),
        ("train", [*resume, "--block_size", "64"],
         "block_size: checkpoint has 32, this run has 64"),
        ("train", [*resume, "--model_type", "transformer"],
         "model_type: checkpoint has 'backpack', this run has 'transformer'"),
        ("train", [*resume, "--data_dir", str(other_vocab_data)],
         "does not match this run's model shape or data"),
        ("train", [*tiny, *SMALL], "already holds a run"),
        ("train", [*tiny, "--out_dir", str(run / "no_run_here"), "--init_from", "resume"],
         "neither ckpt.pt nor ckpt.prev.pt"),
        ("train", [*tiny, "--out_dir", str(run.parent / "new_run"), "--data_dir",
                   str(run / "no_data"), "--data_source", str(run / "no_europarl")],
         "no_europarl"),
        ("evaluate", ["--model_path", str(run / "missing.pt")], "missing.pt does not exist"),
        ("evaluate", ["--model_path", ckpt, "--model_type", "transformer"],
         "--model_type transformer does not match checkpoint"),
        ("evaluate", ["--model_path", ckpt, "--model_type", "gpt"], "invalid choice: 'gpt'"),
        ("evaluate", ["--model_path", ckpt, "--data_dir", str(other_vocab_data)],
         "another tokenizer or vocabulary"),
        ("evaluate", ["--model_path", ckpt, "--data_dir", str(run / "no_data")],
         "is not a prepared dataset"),
        ("evaluate", ["--model_path", ckpt, "--splits", "val,dev"], "unknown split(s) dev"),
        ("evaluate", ["--model_path", str(garbage)], "is unreadable"),
        ("evaluate", ["--model_path", ckpt, "--config", "no_such_config"],
         "config 'no_such_config' not found"),
        ("data", ["prepare", "--source", str(run / "no_europarl"), "--out",
                  str(run / "new_data")], "no_europarl"),
        ("data", ["prepare", "--langs", "en,xx", "--out", str(run / "new_data")], "xx"),
        ("data", ["prepare", "--form", "parallel", "--out", str(run / "new_data")],
         "invalid choice: 'parallel'"),
        ("data", ["prepare", "--val_fraction", "1.5", "--out", str(run / "new_data")],
         "val_fraction"),
        ("data", ["prepare", "--out", str(other_vocab_data)], "--overwrite"),
        ("data", ["stats", str(run / "no_data")], "is not a prepared dataset"),
        ("reports", ["run", "no_such_notebook"], "notebook 'no_such_notebook' not found"),
        ("reports", ["pipeline", "-f", "no_such_config"], "config 'no_such_config' not found"),
        ("reports", ["pipeline", "-f", "tiny_backpack", "-p", "lerning_rate", "1"],
         "did you mean 'learning_rate'?"),
        ("reports", ["pipeline", "-f", "tiny_backpack", "-p", "max_iters", "-5"],
         "-p max_iters: must be >= 1, got -5"),  # the runner's own spelling (issue 17)
        ("reports", ["run", "train", "-f", "tiny_backpack", "-p", "model_type", "gpt"],
         "'gpt' is not one of backpack, transformer"),
        ("reports", ["compare", "-f", "tiny_backpack", "--seeds", "a,b"],
         "--seeds: expected comma-separated integers"),
        ("reports", ["pipeline"], "the following arguments are required: -f"),
    ]


# Bad inputs that used to end in a traceback (docs/reliability.md listed them as known gaps);
# all are refused now, with exit status 2 and one message.
FORMER_GAPS = ["evaluate --stride 100", "evaluate --batch_size 0", "evaluate --stride 0",
               "evaluate --max_tokens -5", "reports render missing.ipynb"]


def _front_door(name: str):
    from backpack_nb import reports

    return {"train": train_main, "evaluate": evaluation.main, "data": data_mod.main,
            "reports": reports.main}[name]


@pytest.fixture(scope="module")
def bad_input_world(references, prepared_europarl, tmp_path_factory):
    """A finished backpack run, the sample prepared with another seed (another split, so
    another compact vocabulary and meta hash) and a garbage .pt file."""
    root = tmp_path_factory.mktemp("bad_inputs")
    run = root / "run"
    shutil.copytree(references["backpack"], run)
    other = data_mod.prepare(os.environ["EUROPARL_SOURCE"], root / "other_vocab",
                             data_mod.PrepareConfig(langs=("en", "fr"), form="raw",
                                                    block_size=64, seed=7), progress=False)
    assert dataset.load_meta(other)["base_ids"] != dataset.load_meta(prepared_europarl)[
        "base_ids"]
    garbage = root / "garbage.pt"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    return run, other, garbage


def test_bad_inputs_exit_2_with_one_message_and_touch_nothing(bad_input_world,
                                                              prepared_europarl, capsys):
    run, other, garbage = bad_input_world
    cases = _bad_inputs(run, other, garbage)
    from backpack_nb.paths import outputs_root

    watched = (run.parent, prepared_europarl, outputs_root())
    handled = 0
    for door, argv, words in cases:
        before = _tree_hash(*watched)
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            _front_door(door)(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2, (door, argv, err)
        _one_error(err)
        assert words in err, (door, argv, err)
        assert _tree_hash(*watched) == before, (door, argv)
        handled += 1
    FIGURES["bad inputs handled"] = f"{handled}/{len(cases)}"
    assert handled >= 15


@pytest.mark.parametrize("case", FORMER_GAPS)
def test_former_gaps_exit_2(case, bad_input_world, capsys, tmp_path):
    run, _, _ = bad_input_world
    door, *argv = case.split()
    if door == "evaluate":
        argv = ["--model_path", str(run / ck.CKPT_NAME), "--device", "cpu", "--max_tokens",
                "200", "--out", str(tmp_path / "eval.json"), *argv]
    else:
        argv = [argv[0], str(run / argv[1])]
    before = _tree_hash(run)
    with pytest.raises(SystemExit) as exc:
        _front_door(door)(argv)
    assert exc.value.code == 2
    _one_error(capsys.readouterr().err)
    assert _tree_hash(run) == before
