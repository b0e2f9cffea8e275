"""The training loop: :func:`train` and the :class:`Trainer` that holds one run's state.

:meth:`Trainer.run` reads as the loop it is: at each iteration it asks whether to evaluate
and whether to save, takes one optimizer step and meters it. Its helpers own the rest: the
checkpoint's contents (:mod:`backpack_nb.checkpoint`), batches, the schedule, throughput and
the progress bar, training_log.json and run.json (:mod:`.records`).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from backpack_nb import checkpoint as ckpt_io
from backpack_nb import dataset, finetune, senses
from backpack_nb.errors import UserError
from backpack_nb.models import ModelConfig, build_model
from backpack_nb.models.flops import mean_distinct_tokens
from backpack_nb.optim import make_optimizer
from backpack_nb.params import TrainConfig
from backpack_nb.paths import resolve_in_root
from backpack_nb.runfiles import run_lock, write_json
from backpack_nb.spelling import setting

from . import loggers
from .batches import BatchSampler
from .estimate import EvaluationAbandoned, estimate_loss
from .meters import Progress, Throughput, flops_per_token, run_peak_flops
from .records import (LOG_NAME, RUN_NAME, append_evaluation, device_name, earlier_throughput,
                      git_commit, new_training_log, now, versions)
from .runtime import Runtime, StopRequest, setup_runtime
from .rng import rng_state, set_rng_state
from .schedule import WarmupCosineSchedule
from .setup import RunData, check_out_dir, prepare_run_data
from .step import optimizer_step

EvalCallback = Callable[[dict], Any]


class TrainingDiverged(UserError):
    """The loss or the weights became NaN or infinite; nothing was saved after that."""


def train(cfg: TrainConfig, *, callback: EvalCallback | None = None,
          typed: Collection[str] = ()) -> dict[str, Any]:
    """Train (or resume) the run described by ``cfg``. ``callback(record)`` is called on rank 0
    after each evaluation with the eval record (iteration, train_loss, val_loss, lr,
    tokens_seen, elapsed_s, best_val_loss, improved, top_activating_words), e.g. for a live
    plot. ``typed``: the keys typed on a command line (a fine-tune's model fixes the shape; a
    typed key that disagrees is an error). Returns a summary dict; raises UserError for bad
    input and never calls sys.exit."""
    loggers.require(cfg.logger)  # a missing package is bad input: before anything is written
    cfg, origin = finetune.inherit_shape(cfg, typed)  # a fine-tune: its weights fix the shape
    rt = setup_runtime(cfg)
    stop = StopRequest()
    try:
        stop.install()
        # one trainer at a time in a run folder (rank 0 writes, so rank 0 holds it)
        with run_lock(resolve_in_root(cfg.out_dir), enabled=rt.master):
            replacing = check_out_dir(cfg)
            run_data = prepare_run_data(cfg, rt, origin)
            trainer = Trainer(cfg, rt, run_data, origin=origin, replacing=replacing,
                              callback=callback)
            result = trainer.run(stop)
            stop.settle()
            if rt.ddp:
                # Leave together: a rank that tears gloo down while its peer is still writing
                # the final checkpoint can abort ("terminate called without an active
                # exception").
                dist.barrier()
        return result
    finally:
        stop.restore()
        if rt.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def _all_finite(model: torch.nn.Module) -> bool:
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


class Trainer:
    """One run: data, model, optimizer, scaler, schedule, sampler, log and RNGs. Its
    :meth:`state_dict` is the checkpoint and :meth:`load_state_dict` resumes from one."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, run_data: RunData, *,
                 origin: finetune.Origin | None = None, replacing: bool = False,
                 callback: EvalCallback | None = None):
        """``cfg`` with its final shape (:func:`backpack_nb.finetune.inherit_shape`), the
        prepared data (:func:`.setup.prepare_run_data`); ``replacing``: a new run over an
        earlier one in ``out_dir``, which its first save replaces (:meth:`save`)."""
        self.cfg, self.rt, self.callback, self.origin = cfg, rt, callback, origin
        self.out_dir = resolve_in_root(cfg.out_dir)
        self.data_dir, self.meta, self.data_hash = run_data.folder, run_data.meta, run_data.meta_hash
        self.tok, self.splits = run_data.tok, run_data.splits
        # Until its first save, a run that replaces another changes nothing in out_dir: its
        # training log and run.json wait, its curves are held back (written at that save).
        self.replacing = replacing  # check_out_dir: never for a resume
        if cfg.init_from != "resume" and not self.replacing and rt.master:
            loggers.clear(self.out_dir)  # a new run draws new curves

        torch.manual_seed(cfg.seed + rt.rank)  # same weights (DDP syncs them), own dropout
        if self.origin is not None and self.origin.folder is not None:  # starts from it
            self.raw_model = finetune.pretrained_model(self.origin, cfg.dropout).to(rt.device)
            self.model_config = self.raw_model.config
        else:  # a pretrained model's vocabulary may exceed its data's (50,264 > 50,257)
            vocab = self.origin.vocab_size if self.origin else self.tok.vocab_size
            self.model_config = ModelConfig.from_params(cfg.to_dict(), vocab)
            self.raw_model = build_model(cfg.model_type, self.model_config).to(rt.device)
        self.optimizer = make_optimizer(
            self.raw_model, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
            weight_decay=cfg.weight_decay, sparse_table=cfg.sparse_table)
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == "float16")
        self.schedule = WarmupCosineSchedule(cfg)
        self.sampler = BatchSampler(
            self.splits["train"], block_size=cfg.block_size, batch_size=cfg.batch_size,
            seed=cfg.seed, device=rt.device, rank=rt.rank, world_size=rt.world_size)
        self.log = new_training_log()
        self.progress = ckpt_io.Progress()
        self.history = {"started_at": now(), "resumed_at": [],
                        "pretrained": self.origin.source if self.origin else None}
        self.probe_words: list[str] = list(cfg.probe_words)

        self.raw_model.set_activation_checkpointing(cfg.activation_checkpointing)
        self.raw_model.fused_loss = cfg.fused_loss
        # the Transformer has no senses: there is nothing to find ahead for it
        self.distinct_on_host = cfg.distinct_on_host and cfg.model_type == "backpack"
        self.model: torch.nn.Module = self.raw_model
        self.compiled = cfg.compile if cfg.compile is not None else rt.device.type == "cuda"
        if self.compiled:
            self.model = torch.compile(self.raw_model)
        self.eval_model = self.model  # evaluation skips DDP's gradient hooks
        if rt.ddp:
            self.model = DDP(self.model,
                             device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)

        self.tokens_per_iter = (cfg.batch_size * cfg.block_size
                                * cfg.gradient_accumulation_steps * rt.world_size)
        # the sense network's share depends on how many distinct tokens a batch holds
        self.distinct_tokens = mean_distinct_tokens(self.splits["train"], cfg.batch_size,
                                                    cfg.block_size)
        self.flops_per_token = flops_per_token(self.raw_model, cfg, self.distinct_tokens)
        self.peak_flops, self.peak_flops_of = run_peak_flops(rt)
        self.throughput = Throughput(self.tokens_per_iter, self.flops_per_token, self.peak_flops)
        self.display = Progress(False, cfg.max_iters, 0, cfg.run_name)  # shown once run() starts
        self.logger: loggers.NoLogger = loggers.NoLogger()  # opened once run() starts
        self._compiled_for: set[str] = set()  # what torch.compile has compiled this session
        self.stop = StopRequest()  # run() gets the installed one
        self._evaluating = False

        # Non-finite losses since the last check, counted on the device (no sync per step).
        self._nonfinite = torch.zeros((), dtype=torch.int32, device=rt.device)
        self._checked_iter = 0
        self.last_saved = -1  # the iteration of the last checkpoint (-1: none this session)
        self._t_run, self._elapsed_base = time.perf_counter(), 0.0
        self.resumed_from: Path | None = None
        # What earlier sessions measured, kept by a resumed session that trains no step.
        self.earlier_throughput = (earlier_throughput(self.out_dir)
                                   if cfg.init_from == "resume" else {})
        if cfg.init_from == "resume":  # last: it restores the RNGs
            _, self.resumed_from = ckpt_io.load_checkpoint(self.out_dir, accept=self._resume)
            self.history["resumed_at"].append(now())
            self.last_saved = self.progress.iter_num
        if cfg.model_type == "backpack" and not self.probe_words:
            val_by_lang = {lang: dataset.load_tokens(self.data_dir, "val", lang)
                           for lang in self.meta["langs"]}
            self.probe_words = senses.frequent_content_words(
                self.splits["train"], self.tok, val_by_lang, cfg.probe_words_per_language)

    # -- the loop ------------------------------------------------------------------------------

    def run(self, stop: StopRequest) -> dict[str, Any]:
        """Train to ``max_iters`` (or until stopped) and return a summary."""
        cfg, prog = self.cfg, self.progress
        self.stop, stop.plan = stop, self._stop_plan
        run_info = self._start()
        stopped: str | None = None
        self.throughput.begin()
        try:
            while True:
                it = prog.iter_num
                lr = self.schedule.step_to(it, self.optimizer)
                done = it >= cfg.max_iters
                stopped = None if done else self._stop_reason()  # `done` agrees on all ranks
                evaluate = self._evaluation_due(it, done, stopped)
                save = self._save_due(it, done, stopped)
                t_pause = time.perf_counter()  # evaluating and saving are not training time
                if evaluate or save:
                    self._check_finite()
                try:
                    if evaluate and self.evaluate(lr) and it > 0:
                        self.save(best=True)
                except EvaluationAbandoned as exc:  # a stop: the resume evaluates it again
                    stopped = exc.reason
                    save = self._save_due(it, done, stopped)
                if save and it != self.last_saved:
                    self.save()
                if done or stopped:
                    break
                self.throughput.pause(time.perf_counter() - t_pause)

                with self._compiling("training"):
                    loss = self.train_step()
                self.throughput.add_step()
                it = prog.iter_num
                log_now = it % cfg.log_interval == 0 or it == cfg.max_iters
                if log_now:
                    loss_value = loss.item() * cfg.gradient_accumulation_steps  # syncs the GPU
                    self._check_finite()
                    tok_s, mfu = self.throughput.end_window()
                    self.display.update(it, f"loss {loss_value:.4f} | lr {lr:.2e} | "
                                        f"{tok_s:,.0f} tok/s | mfu "
                                        f"{f'{100 * mfu:.1f}%' if mfu else '-'}")
                    self.logger.log(it, loggers.step_metrics(loss_value, lr, tok_s, mfu))
        except BaseException:
            self.logger.close(failed=True)
            raise
        finally:
            self.display.close()
        self.logger.close()
        return self._finish(run_info, stopped)

    @contextlib.contextmanager
    def _compiling(self, what: str) -> Iterator[None]:
        """Say so when torch.compile compiles the model (the first evaluation and the first
        training step of a session), and how long it took: a minute or so on a CPU, with no
        sign of life otherwise."""
        if not self.compiled or what in self._compiled_for:
            yield
            return
        self._compiled_for.add(what)
        self.display.line(f"compiling the model for {what} (torch.compile, once per session: "
                          "it can take a minute)")
        t0 = time.perf_counter()
        yield
        first = "step" if what == "training" else "evaluation"
        self.display.line(f"compiled for {what}: the first {first} took "
                          f"{time.perf_counter() - t0:.1f} s, compilation included")

    def _evaluation_due(self, it: int, done: bool, stopped: str | None) -> bool:
        # A stop saves at once and leaves a due evaluation to the resume, which runs it
        # (evaluation never touches the training RNGs, so the run stays bit-exact).
        return (not stopped and (it % self.cfg.eval_interval == 0 or done)
                and it != self.progress.last_eval_iter)

    def _save_due(self, it: int, done: bool, stopped: str | None) -> bool:
        return it > 0 and it != self.last_saved and bool(
            done or stopped or it % self.cfg.checkpoint_interval == 0)

    def _start(self) -> dict[str, Any]:
        """Open the session: run.json says "running", the progress bar and its first lines."""
        cfg, rt, prog = self.cfg, self.rt, self.progress
        run_info = self._run_info()
        stale: list[Path] = []
        if rt.master:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            stale = ckpt_io.remove_stale_temps(self.out_dir)  # left by a crash mid-save
        self._session_info = run_info
        if self.replacing and rt.master:  # opened at the first save, which replaces the old run
            self.logger = loggers.HeldLogger()
        else:
            # before run.json says "running": a logger that cannot start is the user's to fix
            self.logger = loggers.open_logger(cfg, self.out_dir, master=rt.master,
                                              iteration=prog.iter_num,
                                              resumed=self.resumed_from is not None)
            if rt.master:
                write_json(self.out_dir / RUN_NAME, {**run_info, "status": "running"})
        self.display = Progress(rt.master, cfg.max_iters, prog.iter_num, cfg.run_name)
        if stale:
            self.display.line(f"removed {len(stale)} temporary file(s) left by an interrupted "
                              f"save: {', '.join(p.name for p in stale)}")
        params = run_info["parameters"]
        parts = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in params.items() if k != "total")
        self.display.line(
            f"{cfg.model_type}: {params['total'] / 1e6:.2f}M parameters ({parts}); vocab "
            f"{self.model_config.vocab_size:,}; {rt.device} {rt.dtype}{' compiled' if self.compiled else ''}"
            f"{', activation checkpointing' if cfg.activation_checkpointing else ''}"
            f"; {rt.world_size} process(es); {self.tokens_per_iter:,} tokens/iteration")
        if finetune.starts_from_pretrained(cfg):
            self.display.line(f"starting from the weights of {cfg.init_from}")
        if self.resumed_from is not None:
            self.display.line(f"resumed at iteration {prog.iter_num} from "
                              f"{self.resumed_from.name} (best val loss "
                              f"{prog.best_val_loss:.4f})")
        if prog.iter_num >= cfg.max_iters:
            self.display.line(f"iteration {prog.iter_num} already reaches max_iters "
                              f"{cfg.max_iters}: nothing to train (raise {setting('max_iters')} to continue)")
        self.model.train()
        self._t_run, self._elapsed_base = time.perf_counter(), prog.elapsed_s
        return run_info

    def _finish(self, run_info: dict[str, Any], stopped: str | None) -> dict[str, Any]:
        """Close the session: the summary, and run.json with how it ended and how fast."""
        rt, prog = self.rt, self.progress
        prog.elapsed_s = self._elapsed()
        tok_s, mfu = self.throughput.summary()
        if tok_s is None:  # no step this session
            tok_s = self.earlier_throughput.get("tokens_per_s")
            mfu = self.earlier_throughput.get("mfu")
        result = {
            "out_dir": str(self.out_dir), "iter_num": prog.iter_num,
            "best_val_loss": prog.best_val_loss, "best_iter": prog.best_iter,
            "stopped": stopped, "tokens_seen": prog.tokens_seen,
            "tokens_per_s": tok_s, "mfu": mfu, "device": str(rt.device), "dtype": rt.dtype,
            "world_size": rt.world_size, "parameters": run_info["parameters"],
            "warnings": list(rt.warnings), "training_log": self.log,
        }
        if rt.master and self.replacing:  # saved nothing: the earlier run is as it was
            print(f"{self.out_dir} still holds the earlier run, unchanged: this run stopped "
                  "before its first save", flush=True)
        elif rt.master:
            write_json(self.out_dir / RUN_NAME, {
                **run_info, "status": "interrupted" if stopped else "finished",
                "stopped_by": stopped, "ended_at": now(), "iterations": prog.iter_num,
                "tokens_seen": prog.tokens_seen, "tokens_per_s": tok_s, "mfu": mfu})
            if stopped:
                print(f"stopped at iteration {prog.iter_num} ({stopped}); "
                      + ckpt_io.resume_hint(self.out_dir), flush=True)
        return result

    def train_step(self) -> torch.Tensor:
        """One optimizer step over gradient_accumulation_steps micro-batches (:func:`.step.
        optimizer_step`); returns the last micro-batch's loss (scaled down by the accumulation)."""
        loss, nonfinite = optimizer_step(
            self.model, self.optimizer, self.scaler, self._next_batch,
            accum=self.cfg.gradient_accumulation_steps, grad_clip=self.cfg.grad_clip,
            autocast=self.rt.autocast, ddp=self.rt.ddp, params=self.raw_model.parameters)
        self._nonfinite += nonfinite
        self.progress.iter_num += 1
        self.progress.tokens_seen += self.tokens_per_iter
        return loss

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        if self.distinct_on_host:
            x, y, distinct = self.sampler.next_batch_with_distinct()
            return x, y, {"distinct": distinct}
        x, y = self.sampler.next_batch()
        return x, y, {}

    # -- evaluation ------------------------------------------------------------------------------

    def evaluate(self, lr: float) -> bool:
        """Evaluate at the current iteration: append to the log, write training_log.json and
        call the callback. Returns whether the val loss improved (the caller saves best.pt)."""
        it = self.progress.iter_num
        self._evaluating = True
        try:
            with self._compiling("evaluation"):
                # a signal abandons it; stop_after does not (it stops between steps)
                losses = estimate_loss(self.eval_model, self.splits, self.cfg, self.rt,
                                       lambda: self.stop.reason(self.rt))
        finally:
            self._evaluating = False
        self.progress.last_eval_iter = it
        self.progress.elapsed_s = self._elapsed()
        improved = losses["val"] < self.progress.best_val_loss
        if improved:
            self.progress.best_val_loss, self.progress.best_iter = losses["val"], it
        entry = {"iterations": it, "train_loss": losses["train"], "val_loss": losses["val"],
                 "lr": lr, "tokens_seen": self.progress.tokens_seen,
                 "elapsed_s": round(self.progress.elapsed_s, 3)}
        append_evaluation(self.log, entry)
        if self.rt.master:
            words = None
            if self.cfg.model_type == "backpack":
                words = senses.probe_records(self.raw_model, self.tok, self.probe_words,
                                             self.cfg.sense_top_k)
                self.log["top_activating_words"].append({"iteration": it, "words": words})
            if not self.replacing:  # else written at the first save
                write_json(self.out_dir / LOG_NAME, self.log)
            self.logger.log(it, loggers.eval_metrics(losses["train"], losses["val"]))
            self.display.line(f"eval {it}: train loss {losses['train']:.4f}, val loss "
                              f"{losses['val']:.4f}{' (best)' if improved else ''}")
            if self.callback is not None:
                record = {"iteration": it, **{k: v for k, v in entry.items() if k != "iterations"}}
                self.callback({**record, "best_val_loss": self.progress.best_val_loss,
                               "improved": improved, "top_activating_words": words})
        return improved

    # -- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint (:data:`backpack_nb.checkpoint.TRAINING_STATE`): tensors and plain
        Python values only (weights_only-loadable). Collective under DDP (every rank's RNG
        state is gathered)."""
        rng = [rng_state()]
        if self.rt.ddp:  # ranks differ (per-rank dropout seeds): keep all of them
            rng = [None] * self.rt.world_size
            dist.all_gather_object(rng, rng_state())
        return ckpt_io.training_state(
            model_type=self.cfg.model_type,
            model=self.raw_model.state_dict(),  # the bare model: no _orig_mod./module.
            model_config=self.model_config.to_dict(),
            config=self.cfg.to_dict(),
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict(),
            schedule=self.schedule.state_dict(),
            sampler=self.sampler.state_dict(),
            rng=rng,
            iter_num=self.progress.iter_num,
            best_val_loss=self.progress.best_val_loss,
            progress=self.progress.to_dict(),
            training_log=self.log,
            probe_words=list(self.probe_words),
            tokenizer=self.tok.state_dict(),
            data={"data_dir": str(self.data_dir), "meta_hash": self.data_hash,
                  "langs": list(self.meta["langs"]), "encoding": self.meta["encoding"]},
            history=self.history,
        )

    def _resume(self, state: dict[str, Any], path: Path) -> None:
        """Continue from ``state`` if it fits this run; otherwise a UserError naming ``path``
        and the problem (load_checkpoint then tries ckpt.prev.pt, which, if it fits, replaces
        everything this call may have loaded)."""
        ckpt_io.check_layout(state, path)
        ckpt_io.check_resumable(state, path, self.cfg.to_dict(), self.data_hash,
                                self.model_config.vocab_size)
        ckpt_io.check_weights_fit(state["model"], self.raw_model, path)
        # damaged, not diverged: falls back to ckpt.prev.pt (train would stop on a NaN loss)
        ckpt_io.check_finite(ckpt_io.clean_state_dict(state["model"]), path)
        ckpt_io.check_finite(ckpt_io.optimizer_tensors(state["optimizer"]), path,
                             "optimizer moments")
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise UserError(f"checkpoint {path} is damaged ({type(exc).__name__}: {first}); "
                            "it cannot be resumed") from None
        self._checked_iter = self.progress.iter_num

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint made by :meth:`state_dict` (already checked to match).
        The config stays this run's own: schedule keys may have changed."""
        self.raw_model.load_state_dict(ckpt_io.clean_state_dict(state["model"]))
        self.optimizer.load_state_dict(state["optimizer"])  # moves the moments to the device
        self.scaler.load_state_dict(state["scaler"])
        self.schedule.load_state_dict(state["schedule"])
        self.sampler.load_state_dict(state["sampler"])
        self.log = state["training_log"]
        self.progress = ckpt_io.Progress.from_dict(state["progress"])
        self.history = {**state["history"], "resumed_at": list(state["history"]["resumed_at"])}
        self.probe_words = list(self.cfg.probe_words) or list(state["probe_words"])
        saved_world = state["sampler"]["world_size"]
        if saved_world != self.rt.world_size:
            self.rt.warn(f"resuming a {saved_world}-process run with {self.rt.world_size} "
                         "processes: training continues, but not bit-exactly")
        if self.rt.rank < len(state["rng"]):
            set_rng_state(state["rng"][self.rt.rank])

    def save(self, *, best: bool = False) -> None:
        """ckpt.pt (previous kept as ckpt.prev.pt) and, for a new best, best.pt (weights and
        what evaluation needs, no optimizer). Rank 0 writes; all ranks must call it."""
        t0 = time.perf_counter()
        if not _all_finite(self.raw_model):  # every rank: the weights are the same on all
            raise TrainingDiverged(self._diverged("the weights hold NaN or infinite values"))
        state = self.state_dict()
        self.last_saved = self.progress.iter_num
        if not self.rt.master:
            return
        if self.replacing:
            path = self._replace_earlier_run(state, best)
        else:
            if best:
                # best.pt before ckpt.pt: a crash between the two resumes from the older
                # ckpt.pt, which replays this evaluation and writes the same best.pt again. The
                # other order could leave a best.pt older than the best_iter ckpt.pt records.
                ckpt_io.save_checkpoint(ckpt_io.best_state(state), self.out_dir,
                                        ckpt_io.BEST_NAME)
            path = ckpt_io.save_checkpoint(state, self.out_dir)
        self.display.line(
            f"saved {path.name}{' and best.pt' if best else ''} at iteration "
            f"{self.progress.iter_num} ({path.stat().st_size / 2**20:.1f} MiB, "
            f"{time.perf_counter() - t0:.2f} s)")

    def _replace_earlier_run(self, state: dict[str, Any], best: bool) -> Path:
        """The first save of a run over an earlier one (``overwrite``): the earlier run's other
        files go first, so that none of them is ever taken for one of this run's (a crash
        before the new ckpt.pt is in place leaves the earlier ckpt.pt, still resumable), then
        the new ckpt.pt replaces the old one without being kept as ckpt.prev.pt; then this
        run's best.pt, training log, run.json and the curves held so far."""
        for name in (ckpt_io.PREV_NAME, ckpt_io.BEST_NAME, LOG_NAME, RUN_NAME):
            (self.out_dir / name).unlink(missing_ok=True)
        loggers.clear(self.out_dir)
        path = ckpt_io.save_checkpoint(state, self.out_dir, keep_previous=False)
        if best:
            ckpt_io.save_checkpoint(ckpt_io.best_state(state), self.out_dir, ckpt_io.BEST_NAME)
        self.replacing = False
        write_json(self.out_dir / LOG_NAME, self.log)
        write_json(self.out_dir / RUN_NAME, {**self._session_info, "status": "running"})
        held = self.logger
        self.logger = loggers.open_logger(self.cfg, self.out_dir, master=True, iteration=0,
                                          resumed=False)
        if isinstance(held, loggers.HeldLogger):
            held.replay(self.logger)
        return path

    # -- guards ----------------------------------------------------------------------------------

    def _check_finite(self) -> None:
        """Raise TrainingDiverged if a loss since the last check was NaN or infinite (one
        sync; called before evaluating, saving and printing a loss). In float16 the gradient
        scaler has skipped those steps: warn and go on."""
        count = self._nonfinite
        if self.rt.ddp:  # all ranks decide together, or the others would hang
            count = count.clone()
            dist.all_reduce(count)
        n = int(count.item())
        it = self.progress.iter_num
        if n and not self.scaler.is_enabled():
            raise TrainingDiverged(self._diverged(
                f"the training loss became NaN or infinite ({n} micro-batch(es) between "
                f"iteration {self._checked_iter} and {it})"))
        if n:
            self.rt.warn(f"{n} micro-batch(es) between iteration {self._checked_iter} and {it} "
                         "had a non-finite float16 loss; the gradient scaler skipped those "
                         f"steps (scale now {self.scaler.get_scale():g})")
            self._nonfinite.zero_()
        self._checked_iter = it

    def _diverged(self, what: str) -> str:
        ckpt = self.out_dir / ckpt_io.CKPT_NAME
        kept = (f"{ckpt} (iteration {self.last_saved}) is intact" if self.last_saved > 0
                and ckpt.exists() else "no checkpoint was written")
        return (f"{what}; stopped without evaluating or saving, so {kept}. Lower "
                f"{setting('learning_rate')} (now {self.cfg.learning_rate:g}), raise "
                f"{setting('warmup_iters')} or set {setting('grad_clip')} (now "
                f"{self.cfg.grad_clip:g}), or train in float32, then continue with "
                f"{setting('init_from', 'resume')}")

    def _stop_reason(self) -> str | None:
        stop_after = self.cfg.stop_after
        return self.stop.reason(self.rt, stop_after=stop_after is not None
                                and self.progress.iter_num >= stop_after)

    def _stop_plan(self) -> str:
        """What a first SIGINT/SIGTERM does now, for the line the signal handler prints."""
        again = "send it again to stop at once"
        if not self._evaluating:
            return f"finishing this step, saving, then stopping ({again}, without saving)"
        it = self.progress.iter_num
        if it == self.last_saved:
            then = f"stopping ({ckpt_io.CKPT_NAME} already holds iteration {it})"
        elif it == 0:
            then = "stopping (no step trained yet: there is nothing to save)"
        else:
            then = "saving, then stopping"
        return (f"abandoning the evaluation of iteration {it} (a resume runs it again), {then}"
                f"; {again}")

    def _elapsed(self) -> float:
        return self._elapsed_base + time.perf_counter() - self._t_run

    def _run_info(self) -> dict[str, Any]:
        """run.json: what ran, on what, from which code and data."""
        cfg, rt = self.cfg, self.rt
        return {
            "run_name": cfg.run_name, "model_type": cfg.model_type,
            "config": cfg.to_dict(), "model_config": self.model_config.to_dict(),
            "parameters": self.raw_model.num_parameters(by_part=True),
            "git": git_commit() if rt.master else None,
            "versions": versions(rt.device),
            "device": {"requested": cfg.device, "used": str(rt.device),
                       "name": device_name(rt.device),
                       "dtype_requested": cfg.dtype, "dtype_used": rt.dtype,
                       "world_size": rt.world_size,
                       "backend": dist.get_backend() if rt.ddp else None},
            "dataset": {"data_dir": str(self.data_dir), "meta_hash": self.data_hash,
                        "vocab_size": self.tok.vocab_size, "langs": self.meta["langs"],
                        "encoding": self.meta["encoding"],
                        "tokens": {k: len(v) for k, v in self.splits.items()}},
            "effective_batch": {"sequences": self.tokens_per_iter // cfg.block_size,
                                "tokens": self.tokens_per_iter},
            "probe_words": self.probe_words,
            "compiled": self.compiled, "distinct_tokens_per_batch": self.distinct_tokens,
            "flops_per_token": self.flops_per_token, "peak_flops": self.peak_flops,
            "peak_flops_of": self.peak_flops_of,
            **self.history, "warnings": rt.warnings,
        }
