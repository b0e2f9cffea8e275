"""Live curves (the ``logger`` key): TensorBoard event files read back with TensorBoard's own
reader, an offline W&B run read back from its run file, resumed runs that continue the same
curves, fresh curves after ``--overwrite``, and exit status 2 when a package is missing."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from backpack_nb.errors import UserError
from backpack_nb.params import TrainConfig
from backpack_nb.training import loggers, train
from conftest import ROOT, tiny_config

sys.path.insert(0, str(ROOT))
from train import main  # noqa: E402  (the front door, called in-process)

# Small enough for seconds: 8 iterations, an evaluation every 4, a log line every 2.
SMALL = dict(n_layer=1, batch_size=2, eval_iters=1, max_iters=8, eval_interval=4,
             log_interval=2, checkpoint_interval=4)
STEP_TAGS = ("train/loss", "train/lr", "perf/tokens_per_s", "perf/mfu")
EVAL_TAGS = ("eval/train_loss", "eval/val_loss")


def _log(out_dir: Path) -> dict:
    return json.loads((out_dir / "training_log.json").read_text("utf-8"))


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve as TensorBoard shows it: (step, value) per point."""
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# --- TensorBoard ---------------------------------------------------------------------------------


def test_tensorboard_curves_resume_and_overwrite(prepared_europarl, tmp_path):
    out = tmp_path / "tb"
    cfg = tiny_config("backpack", out, logger="tensorboard", **SMALL)
    train(cfg)
    curves = _scalars(out / loggers.TENSORBOARD_DIR)
    assert set(curves) == {*STEP_TAGS, *EVAL_TAGS}
    for tag in STEP_TAGS:
        assert [step for step, _ in curves[tag]] == [2, 4, 6, 8]
    log = _log(out)
    for tag, key in (("eval/train_loss", "train_loss"), ("eval/val_loss", "val_loss")):
        assert [step for step, _ in curves[tag]] == log["iterations"] == [0, 4, 8]
        assert [v for _, v in curves[tag]] == pytest.approx(log[key], rel=1e-6)  # float32
    assert [v for _, v in curves["train/lr"]] == pytest.approx(
        [cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1) for it in (1, 3, 5, 7)])
    assert all(0 < v < 10 for _, v in curves["perf/mfu"])

    # A crash after the checkpoint at 4: the steps after it are logged again on resume, and
    # TensorBoard shows each iteration once, with the values of the run that went on.
    (out / "ckpt.pt").unlink()
    train(cfg.replace(init_from="resume"))
    again = _scalars(out / loggers.TENSORBOARD_DIR)
    assert len(list((out / loggers.TENSORBOARD_DIR).iterdir())) == 2  # one file per session
    for tag in STEP_TAGS + EVAL_TAGS:
        assert [step for step, _ in again[tag]] == [step for step, _ in curves[tag]]
    for tag in ("train/loss", "train/lr", *EVAL_TAGS):  # CPU resumes are bit-exact
        assert again[tag] == curves[tag]

    # --overwrite: a new run, new curves
    train(cfg.replace(overwrite=True, max_iters=2))
    fresh = _scalars(out / loggers.TENSORBOARD_DIR)
    assert [step for step, _ in fresh["train/loss"]] == [2]
    assert [step for step, _ in fresh["eval/val_loss"]] == [0, 2]


def test_only_rank_0_logs(tmp_path):
    cfg = TrainConfig(logger="tensorboard", out_dir=str(tmp_path))
    quiet = loggers.open_logger(cfg, tmp_path, master=False, iteration=0, resumed=False)
    assert type(quiet) is loggers.NoLogger and not any(tmp_path.iterdir())
    assert type(loggers.open_logger(TrainConfig(), tmp_path, master=True, iteration=0,
                                    resumed=False)) is loggers.NoLogger  # logger: none


# --- Weights & Biases ----------------------------------------------------------------------------


def _wandb_records(path: Path):
    """The records of a W&B run file (``run-ID.wandb``): LevelDB's log format (32 KiB blocks
    of chunks with a 7-byte header: CRC, length, type) after a 7-byte file header."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, parts = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or its last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def _wandb_sessions(out: Path, *, private: bool = False) -> list[tuple[str, list[dict]]]:
    """(run id, logged rows) for each offline session under out/wandb, oldest first; with
    ``private``, each row keeps W&B's own keys (``_step``...) and the run record's ``resumed``
    comes as a first row ``{"resumed": ...}``."""
    sessions = []
    # by when each session last wrote: the folder names carry a time to the second only, and
    # two short sessions in one second would sort by their random ids
    for run_file in sorted(out.glob("wandb/offline-run-*/run-*.wandb"),
                           key=lambda f: f.stat().st_mtime_ns):
        run_id, rows = None, []
        for record in _wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
                if private:
                    rows.append({"resumed": record.run.resumed})
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                       for i in record.history.item}
                rows.append({k: v for k, v in row.items() if private or not k.startswith("_")})
        sessions.append((run_id, rows))
    return sessions


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # not in ~
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)


def test_wandb_offline_run_resumes_the_same_run(prepared_europarl, tmp_path, wandb_offline,
                                                capsys):
    """Offline, wandb cannot resume (it records the second session as a new run with the same
    id, resumed false): W&B's step is the iteration, so the resumed session's steps continue
    the first session's instead of restarting at 0 (on main at f768900 they did), and the
    resume says what offline W&B cannot do."""
    out = tmp_path / "wb"
    cfg = tiny_config("transformer", out, logger="wandb", stop_after=4, **SMALL)
    train(cfg)
    assert "cannot resume" not in capsys.readouterr().err  # a first session resumes nothing
    run_id = json.loads((out / loggers.WANDB_RUN_FILE).read_text())["id"]
    train(cfg.replace(init_from="resume", stop_after=None))
    err = capsys.readouterr().err
    assert f"warning: W&B offline mode cannot resume run {run_id}" in err, err
    assert "resume online (WANDB_MODE=online)" in err
    assert json.loads((out / loggers.WANDB_RUN_FILE).read_text()) == {
        "id": run_id, "project": loggers.WANDB_PROJECT}
    (first_id, first), (second_id, second) = _wandb_sessions(out, private=True)
    assert first_id == second_id == run_id  # one W&B run id, continued
    # what wandb records offline (docs/training.md says so): the second session is not resumed
    assert first[0] == second[0] == {"resumed": False}
    first, second = first[1:], second[1:]
    # W&B's step is the iteration: the second session continues where the first stopped
    assert [r["_step"] for r in first] == [r["iteration"] for r in first] == [0, 2, 4]
    assert [r["_step"] for r in second] == [r["iteration"] for r in second] == [4, 6, 8]
    log = _log(out)
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in first + second]
    steps = [r for r in rows if "train/loss" in r]
    evals = [r for r in rows if "eval/val_loss" in r]
    assert [r["iteration"] for r in steps] == [2, 4, 6, 8]
    assert all(set(r) - set(EVAL_TAGS) == {"iteration", *STEP_TAGS} for r in steps)
    assert [r["iteration"] for r in evals] == log["iterations"] == [0, 4, 8]
    assert [r["eval/val_loss"] for r in evals] == log["val_loss"]  # float64, exactly

    train(cfg.replace(overwrite=True, stop_after=None, max_iters=2))
    new_id = json.loads((out / loggers.WANDB_RUN_FILE).read_text())["id"]
    assert new_id != run_id and _wandb_sessions(out)[-1][0] == new_id


def test_wandb_that_cannot_start_is_a_user_error(prepared_europarl, tmp_path, wandb_offline,
                                                 monkeypatch):
    import wandb

    def no_key(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", no_key)
    out = tmp_path / "nokey"
    with pytest.raises(UserError, match=r"could not start a W&B run \(api_key not configured "
                                        r"\(no-tty\)\); log in with `wandb login`"):
        train(tiny_config("transformer", out, logger="wandb", **SMALL))
    assert not (out / "run.json").exists() and not (out / loggers.WANDB_RUN_FILE).exists()


# --- bad input -----------------------------------------------------------------------------------


def _argv(out: Path, *extra: str) -> list[str]:
    return ["--config", "tiny_transformer", "--data_dir", "europarl_sample", "--out_dir",
            str(out), *extra]


@pytest.mark.parametrize("logger", ["tensorboard", "wandb"])
def test_a_missing_package_is_exit_2_naming_the_extra(logger, prepared_europarl, tmp_path, capsys,
                                                      monkeypatch):  # the data is checked first
    monkeypatch.setitem(sys.modules, logger, None)  # `import tensorboard` fails
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(_argv(out, "--logger", logger))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"error: logger {logger} needs the {logger} package, which is not "
                   f"installed: pip install -e '.[{logger}]' (or --logger none)\n")
    assert not out.exists()  # nothing written


def test_an_unknown_logger_is_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(_argv(tmp_path / "run", "--logger", "mlflow"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "logger: 'mlflow' is not one of none, tensorboard, wandb" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_extras_name_the_packages():
    """pip install -e '.[NAME]' in the message works: pyproject.toml has each extra, and the
    test extra has both (the tests above read what they write)."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for logger, package in loggers.PACKAGES.items():
        assert any(req.startswith(package) for req in extras[logger])
        assert any(req.startswith(package) for req in extras["test"])
