"""Live curves: a run's metrics sent, as they come, to TensorBoard or Weights & Biases (the
``logger`` key), besides ``training_log.json``.

Rank 0 logs, at the iteration each value belongs to: ``train/loss``, ``train/lr``,
``perf/tokens_per_s`` and ``perf/mfu`` every ``log_interval``; ``eval/train_loss`` and
``eval/val_loss`` at every evaluation.

- ``tensorboard``: event files in ``out_dir/tensorboard/``. A resumed run appends to them and
  hides what an interrupted session logged after its last checkpoint (``purge_step``), so
  every iteration appears once.
- ``wandb``: a W&B run whose id is kept in ``out_dir/wandb_run.json``, so a resumed run
  continues the same W&B run; its local files go to ``out_dir/wandb/``. ``WANDB_MODE=offline``
  logs without an account (``wandb sync`` uploads later); ``WANDB_PROJECT`` names the project.
  Offline, wandb cannot resume a run (it records each session as a new run with the same id,
  ``resumed`` false, its step counter from 0): there W&B's step is the iteration, so a resumed
  session's steps continue the run's, and a resume says what offline W&B cannot do.

A run started from scratch (``--overwrite`` included) starts fresh curves. The packages are
optional extras (``pip install -e '.[tensorboard]'``, ``'.[wandb]'``); asking for a logger
whose package is missing is a UserError before anything is written.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import string
import sys
from pathlib import Path
from typing import Any

from backpack_nb.errors import UserError
from backpack_nb.params import LOGGERS, TrainConfig
from backpack_nb.runfiles import read_json, write_json

TENSORBOARD_DIR = "tensorboard"
WANDB_RUN_FILE = "wandb_run.json"
WANDB_PROJECT = "backpack-nb"  # unless WANDB_PROJECT says otherwise
# The package each logger imports (also the name of its extra in pyproject.toml).
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
assert set(PACKAGES) | {"none"} == set(LOGGERS)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
        return False


def require(logger: str) -> None:
    """Raise a UserError naming the extra to install when ``logger``'s package is missing."""
    package = PACKAGES.get(logger)
    if package and not _installed(package):
        raise UserError(f"logger {logger} needs the {package} package, which is not installed: "
                        f"pip install -e '.[{logger}]' (or --logger none)")


def clear(out_dir: Path) -> None:
    """Forget the curves of an earlier run in ``out_dir`` (a run starting from scratch): its
    TensorBoard events and its W&B run id. The local W&B files stay: an offline run there may
    not be synced yet."""
    shutil.rmtree(out_dir / TENSORBOARD_DIR, ignore_errors=True)
    (out_dir / WANDB_RUN_FILE).unlink(missing_ok=True)


class NoLogger:
    """``logger: none``, and every rank but 0."""

    def log(self, step: int, metrics: dict[str, float | None]) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


class HeldLogger(NoLogger):
    """Holds what is logged until the run's logger can open: a run that replaces an earlier
    one leaves that run's curves alone until its first save, then replays these into its own."""

    def __init__(self) -> None:
        self.held: list[tuple[int, dict[str, float | None]]] = []

    def log(self, step: int, metrics: dict[str, float | None]) -> None:
        self.held.append((step, dict(metrics)))

    def replay(self, into: NoLogger) -> NoLogger:
        for step, metrics in self.held:
            into.log(step, metrics)
        return into


class TensorBoardLogger(NoLogger):
    def __init__(self, log_dir: Path, resume_step: int | None):
        # optional heavy dependency (the tensorboard extra): imported only when asked for
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events an interrupted session wrote after the checkpoint we resume
        # from (steps >= purge_step) are hidden, and logged again by this session.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_step,
                                    flush_secs=10)

    def log(self, step: int, metrics: dict[str, float | None]) -> None:
        for tag, value in metrics.items():
            if value is not None:
                self.writer.add_scalar(tag, value, global_step=step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbLogger(NoLogger):
    def __init__(self, cfg: TrainConfig, out_dir: Path, resumed: bool = False):
        # optional heavy dependency (the wandb extra): imported only when asked for
        import wandb

        id_file = out_dir / WANDB_RUN_FILE
        try:
            known = read_json(id_file)
        except (OSError, ValueError):  # unreadable: a new W&B run rather than no run
            known = {}
        run_id = known.get("id") or _new_run_id()
        project = known.get("project") or os.environ.get("WANDB_PROJECT") or WANDB_PROJECT
        try:
            self.run = wandb.init(
                project=project, name=cfg.run_name, id=run_id, resume="allow",
                dir=str(out_dir), config=cfg.to_dict(),
                # stdout stays ours: the progress bar and log lines go where they always go
                settings=wandb.Settings(console="off"))
        except Exception as exc:  # wandb raises many types (no key, no network, bad project)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"logger wandb could not start a W&B run ({first}); log in with "
                            "`wandb login` (or set WANDB_API_KEY), or log offline with "
                            "WANDB_MODE=offline and upload later with `wandb sync`") from None
        write_json(id_file, {"id": run_id, "project": project})
        # Iterations are the x axis: a resumed run re-logs the steps after its checkpoint,
        # which W&B's own step counter would drop as going backwards.
        self.run.define_metric("iteration")
        self.run.define_metric("*", step_metric="iteration")
        # Offline, wandb ignores resume: each session is a new run with the same id whose own
        # step would restart at 0. The iteration, given as the step, continues instead (no
        # server is there to drop a re-logged iteration; online, W&B resumes the run and
        # keeps its own counter).
        self.step_is_iteration = bool(self.run.offline)
        if resumed and self.run.offline:
            print(f"warning: W&B offline mode cannot resume run {run_id}: wandb records this "
                  "session as a new offline run with the same id (resumed: false); its steps "
                  "continue from the iteration. Syncing it may replace the earlier sessions' "
                  "history on the server: resume online (WANDB_MODE=online) to keep one W&B "
                  "run", file=sys.stderr, flush=True)

    def log(self, step: int, metrics: dict[str, float | None]) -> None:
        values = {k: v for k, v in metrics.items() if v is not None}
        if self.step_is_iteration:
            self.run.log({"iteration": step, **values}, step=step)
        else:
            self.run.log({"iteration": step, **values})

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _new_run_id() -> str:
    # secrets, not random: opening a logger must not move any RNG a resume restores
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def open_logger(cfg: TrainConfig, out_dir: Path, *, master: bool, iteration: int,
                resumed: bool) -> NoLogger:
    """The run's logger (rank 0 only; the others get one that does nothing). ``iteration``:
    where this session starts; ``resumed``: whether it continues a checkpoint."""
    if not master or cfg.logger == "none":
        return NoLogger()
    require(cfg.logger)
    if cfg.logger == "tensorboard":
        return TensorBoardLogger(out_dir / TENSORBOARD_DIR, iteration + 1 if resumed else None)
    return WandbLogger(cfg, out_dir, resumed)


def step_metrics(loss: float, lr: float, tokens_per_s: float,
                 mfu: float | None) -> dict[str, Any]:
    """What is logged every ``log_interval``."""
    return {"train/loss": loss, "train/lr": lr, "perf/tokens_per_s": tokens_per_s,
            "perf/mfu": mfu}


def eval_metrics(train_loss: float, val_loss: float) -> dict[str, Any]:
    """What is logged at every evaluation."""
    return {"eval/train_loss": train_loss, "eval/val_loss": val_loss}
