"""What the notebooks show: a run folder read back, and its results as text, tables and figures.

The notebooks stay thin by calling these helpers: a notebook's TrainConfig from its parameters,
the live loss plot and the log of a training run, where an interrupted run restarts, the
evaluation of several run folders side by side (summary and settings tables, Multi-SimLex), and
the text of the sense tables. The Backpack-vs-Transformer statistics and the written findings
live in :mod:`backpack_nb.comparison`; running the notebooks as reports in
:mod:`backpack_nb.reports`.
"""

from __future__ import annotations

import html as html_mod
import io
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import lexsim, paths
from .checkpoint import existing_checkpoints, read_checkpoint
from .errors import UserError
from .evaluation import evaluate_checkpoint
from .paramfile import BASE_KEY
from .params import TrainConfig, load_params
from .runfiles import read_json
from .senses import token_label

# --- a notebook's parameters -----------------------------------------------------------------


def config_from_notebook(namespace: Mapping[str, Any]) -> TrainConfig:
    """A notebook's TrainConfig: ``params_file`` (a params name or path; papermill -f or the
    reports runner inject it) laid under every TrainConfig key the notebook defines, except
    those left at None ("from the file"). ``papermill -f`` of a preset that builds on another
    injects that one's name as ``base``, which then lies under the injected keys instead."""
    overrides = {k: namespace[k] for k in TrainConfig.keys()
                 if k in namespace and namespace[k] is not None}
    params_file = namespace.get("params_file")
    base = namespace.get(BASE_KEY)
    if isinstance(base, str) and base:
        # papermill -f of a derived preset injected its own keys and the preset it builds on
        params_file = base
    if params_file:
        return load_params(params_file, overrides)
    return TrainConfig.from_dict(overrides, source="notebook parameters")


# --- a training run --------------------------------------------------------------------------


class LiveLossPlot:
    """A :func:`backpack_nb.training.train` callback that redraws the train/val loss after
    every evaluation, in place in a notebook (one figure, updated)."""

    def __init__(self, title: str = "loss", previous: Mapping | None = None):
        # matplotlib is imported here, not at the top: importing backpack_nb.results (and so
        # the reports runner, which reads run.json through it) must not pull in matplotlib.
        from matplotlib.figure import Figure

        # A pyplot-free Figure: the inline backend would otherwise show it again at cell end.
        self.fig = Figure(figsize=(7, 3.8), layout="constrained")
        self.ax = self.fig.add_subplot()
        self.title = title
        self.previous = previous  # an earlier log (a resumed run's history), drawn grey
        self.records: list[dict] = []
        self.handle = None

    def __call__(self, record: Mapping) -> None:
        # IPython exists only where a notebook runs; training from a script never calls this.
        from IPython.display import Image, display

        self.records.append(dict(record))
        ax = self.ax
        ax.clear()
        its = [r["iteration"] for r in self.records]
        ax.plot(its, [r["train_loss"] for r in self.records], "--", color="C0", label="train")
        ax.plot(its, [r["val_loss"] for r in self.records], "-o", ms=3, color="C1", label="val")
        if self.previous and self.previous.get("iterations"):
            prev_its = self.previous["iterations"]
            ax.plot(prev_its, self.previous["val_loss"], "-", color="0.6", label="val (before)")
            ax.axvline(prev_its[-1], color="0.4", ls=":", lw=1)
        last = self.records[-1]
        ax.set_title(f"{self.title}: iteration {last['iteration']}, val {last['val_loss']:.3f}")
        ax.set_xlabel("iteration")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        # As a PNG: a bare Figure only renders once pyplot has set up the inline backend.
        buf = io.BytesIO()
        self.fig.savefig(buf, format="png", dpi=100)
        image = Image(data=buf.getvalue(), format="png")
        if self.handle is None:
            self.handle = display(image, display_id=True)
        else:
            self.handle.update(image)


def log_table(training_log: Mapping, last: int | None = None) -> str:
    """The evaluation rows of a training log as aligned text."""
    keys = ("iterations", "train_loss", "val_loss", "lr", "tokens_seen", "elapsed_s")
    rows = list(zip(*(training_log.get(k, []) for k in keys)))
    if last:
        rows = rows[-last:]
    lines = [f"{'iter':>7}{'train':>9}{'val':>9}{'lr':>10}{'tokens':>12}{'time s':>9}"]
    for it, tr, va, lr, tokens, t in rows:
        lines.append(f"{it:>7}{tr:>9.4f}{va:>9.4f}{lr:>10.2e}{tokens:>12,}{t:>9.1f}")
    return "\n".join(lines)


def format_train_summary(result: Mapping) -> str:
    """The end of a training run in a few lines (what train() returned)."""
    p = result.get("parameters", {})
    tok_s = result.get("tokens_per_s")
    lines = [
        f"{result['out_dir']}: iteration {result['iter_num']}"
        + (f", stopped ({result['stopped']})" if result.get("stopped") else ", finished"),
        f"parameters {_fmt_params(p.get('total'))} ("
        + ", ".join(f"{k} {_fmt_params(v)}" for k, v in p.items() if k != "total") + ")",
        f"best val loss {result['best_val_loss']:.4f} at iteration {result['best_iter']}; "
        f"{result['tokens_seen']:,} tokens seen"
        + (f"; {tok_s:,.0f} tokens/s" if tok_s else "") + f" on {result['device']} {result['dtype']}",
    ]
    lines += [f"warning: {w}" for w in result.get("warnings", [])]
    return "\n".join(lines)


def resume_summary(out_dir: str | Path) -> dict:
    """What happened to the run in ``out_dir`` and where it restarts: run.json's status,
    the checkpoint's iteration and schedule position, the last evaluation."""
    out_dir = paths.resolve_in_root(out_dir)
    run_info = read_json(out_dir / "run.json")
    found = existing_checkpoints(out_dir)
    if not found:
        raise UserError(f"{out_dir} holds no checkpoint (ckpt.pt or ckpt.prev.pt) to resume; "
                        "train it first (01_train) or point out_dir at an interrupted run")
    state = read_checkpoint(found[0])
    cfg = state.get("config", {})
    log = state.get("training_log", {})
    return {
        "out_dir": str(out_dir), "checkpoint": str(found[0]),
        "previous_checkpoint": str(found[1]) if len(found) > 1 else None,
        "status": run_info.get("status", "unknown"), "stopped_by": run_info.get("stopped_by"),
        "iter_num": int(state.get("iter_num", 0)), "max_iters": cfg.get("max_iters"),
        "best_val_loss": state.get("best_val_loss"), "saved_at": state.get("saved_at"),
        "resumed_before": len(state.get("history", {}).get("resumed_at", [])),
        "tokens_seen": state.get("progress", {}).get("tokens_seen"),
        "last_eval": {k: (log.get(k) or [None])[-1] for k in ("iterations", "train_loss", "val_loss")},
        "training_log": log, "model_type": state.get("model_type"),
    }


def format_resume_summary(s: Mapping) -> str:
    """A :func:`resume_summary` in a few lines."""
    stop = f" ({s['stopped_by']})" if s.get("stopped_by") else ""
    lines = [
        f"run in {s['out_dir']}: {s['model_type']}, status {s['status']}{stop}",
        f"checkpoint {s['checkpoint']} saved {s['saved_at']} at iteration {s['iter_num']} of {s['max_iters']}",
        f"  (previous good checkpoint: {s['previous_checkpoint'] or 'none'}; resumed {s['resumed_before']} time(s) before)",
        f"last evaluation: iteration {s['last_eval']['iterations']}, train {s['last_eval']['train_loss']:.4f}, "
        f"val {s['last_eval']['val_loss']:.4f}; best val {s['best_val_loss']:.4f}"
        if s["last_eval"]["iterations"] is not None else "no evaluation logged yet",
        f"resuming restarts at iteration {s['iter_num']} with the saved weights, optimizer moments, "
        "schedule position, data sampler and RNG states: the next steps are the ones an "
        "uninterrupted run would have taken",
    ]
    return "\n".join(lines)


def resume_figure(before: Mapping, after: Mapping, resumed_at: int, title: str = ""):
    """Loss curve across an interruption: the log before (grey) and after resuming, with a
    line at the restart."""
    # matplotlib stays out of `import backpack_nb.results` (see LiveLossPlot).
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8), constrained_layout=True)
    ax.plot(after["iterations"], after["train_loss"], "--", color="C0", label="train")
    ax.plot(after["iterations"], after["val_loss"], "-o", ms=3, color="C1", label="val")
    if before.get("iterations"):
        ax.plot(before["iterations"], before["val_loss"], "o", ms=6, mfc="none", color="0.5",
                label="val logged before the interruption")
    ax.axvline(resumed_at, color="k", ls=":", lw=1)
    ax.annotate(f"resumed at {resumed_at}", (resumed_at, ax.get_ylim()[1]), xytext=(4, -12),
                textcoords="offset points", fontsize=8)
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "loss across the interruption")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# --- run folders and their evaluation --------------------------------------------------------


def run_folder(out_dir: str | Path) -> dict:
    """What a run folder says about itself: run.json, training_log.json, eval.json (each {}
    when missing) and the checkpoint to evaluate (best.pt, else ckpt.pt)."""
    out_dir = paths.resolve_in_root(out_dir)
    ckpt = next((out_dir / n for n in ("best.pt", "ckpt.pt") if (out_dir / n).is_file()), None)
    if ckpt is None:
        raise UserError(f"{out_dir} holds no best.pt or ckpt.pt; train it first "
                        "(python -m backpack_nb.reports run 01_train -f params/NAME.yaml)")
    return {"out_dir": out_dir, "checkpoint": ckpt, "run": read_json(out_dir / "run.json"),
            "log": read_json(out_dir / "training_log.json"), "eval": read_json(out_dir / "eval.json")}


def runs_to_evaluate(runs: Mapping[str, str] | Sequence[str] | None = None, *, run_name: str = "",
                     out_dir: str = "", compare_with: Sequence[str] | None = None) -> dict[str, str]:
    """label -> run folder: ``runs`` as given (a dict, or a list labelled by each folder's
    run name), else ``{run_name: out_dir}`` plus the ``compare_with`` folders that exist
    (the missing ones are named and skipped)."""
    def label_of(folder: str) -> str:
        info = read_json(paths.resolve_in_root(folder) / "run.json")
        return info.get("run_name") or Path(folder).name

    if runs:
        if isinstance(runs, Mapping):
            return {str(k): str(v) for k, v in runs.items()}
        return {label_of(f): str(f) for f in runs}
    if not out_dir:
        raise UserError("give runs (a list of run folders) or out_dir")
    out = {run_name or label_of(out_dir): str(out_dir)}
    for folder in compare_with or []:
        if paths.resolve_in_root(folder).is_dir() and paths.resolve_in_root(folder) != paths.resolve_in_root(out_dir):
            out[label_of(folder)] = str(folder)
        elif not paths.resolve_in_root(folder).is_dir():
            print(f"(skipping {folder}: no such run folder)")
    return out


def evaluate_runs(runs: Mapping[str, str | Path], *, max_tokens: int | None = None,
                  data_dir: str | None = None, reuse: bool = True, progress: bool = False) -> dict[str, dict]:
    """label -> eval.json dict for each run folder: the stored evaluation when it is of the
    same checkpoint and token cap (``reuse``), else a fresh :func:`evaluate_checkpoint`."""
    out = {}
    for label, folder in runs.items():
        info = run_folder(folder)
        ev = info["eval"]
        fresh = (reuse and ev.get("checkpoint") == str(info["checkpoint"])
                 and ev.get("max_tokens") == max_tokens and "splits" in ev
                 and ev.get("iteration") == _ckpt_iter(info))
        out[label] = ev if fresh else evaluate_checkpoint(
            info["checkpoint"], data_dir=data_dir, max_tokens=max_tokens, progress=progress)
    return out


def _ckpt_iter(info: Mapping) -> int | None:
    # best.pt's iteration is the log's best; ckpt.pt's is the run's last. Cheap to read from
    # the checkpoint itself, and it decides whether a stored eval.json is stale.
    return int(read_checkpoint(info["checkpoint"]).get("iter_num", 0))


def summary_rows(runs: Mapping[str, str | Path], evals: Mapping[str, Mapping]) -> list[dict]:
    """One row per run: model, parameters (total and by part), iterations, tokens seen,
    training time, tokens/s, best val loss, val/test bits per byte with intervals."""
    rows = []
    for label, folder in runs.items():
        info = run_folder(folder)
        r, ev = info["run"], evals.get(label, {})
        splits = ev.get("splits", {})
        rows.append({
            "run": label, "model_type": r.get("model_type"),
            "parameters": r.get("parameters", {}),
            "iterations": r.get("iterations"), "tokens_seen": r.get("tokens_seen"),
            "elapsed_s": (info["log"].get("elapsed_s") or [None])[-1],
            "tokens_per_s": r.get("tokens_per_s"), "mfu": r.get("mfu"),
            "best_val_loss": min(info["log"].get("val_loss") or [float("nan")]),
            "best_iter": _argmin_iter(info["log"]),
            "last_iter": (info["log"].get("iterations") or [None])[-1],
            "eval_iteration": ev.get("iteration"),
            "bpb": {s: {lang: (v["bits_per_byte"], v["bpb_ci95"]) for lang, v in d.items()}
                    for s, d in splits.items()},
            "seed": r.get("config", {}).get("seed"),
            "train_tokens": r.get("dataset", {}).get("tokens", {}).get("train"),
        })
    return rows


def _argmin_iter(log: Mapping) -> int | None:
    vals, its = log.get("val_loss") or [], log.get("iterations") or []
    return its[min(range(len(vals)), key=vals.__getitem__)] if vals else None


def _fmt_params(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M"


# One line per row at a report's width (about 1,230 px in a 1,280-px window): Jupyter's tables
# are laid out at a fixed width and wrap their cells, so every cell says how it is laid out.
_LEFT = "text-align:left;white-space:nowrap;padding:3px 8px"
_RIGHT = "text-align:right;white-space:nowrap;padding:3px 8px"
_TABLE = "border-collapse:collapse;table-layout:auto;width:auto"


def _html_table(css_class: str, head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Header rows (their HTML) and body rows of cells (HTML; the first cell left-aligned,
    the others right-aligned), each kept on one line."""
    body = "".join("<tr>" + "".join(f"<td style='{_LEFT if i == 0 else _RIGHT}'>{c}</td>" for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table class='{css_class}' style='{_TABLE}'><thead>{''.join(head)}</thead><tbody>{body}</tbody></table>"


def _th(text: str, left: bool = False, span: str = "") -> str:
    return f"<th{span} style='{_LEFT if left else _RIGHT}'>{text}</th>"


def summary_html(rows: Sequence[Mapping]) -> str:
    """The summary rows as two HTML tables, one line per run in each: the runs (parameters
    in total and by part, iterations, tokens, time, speed, best val loss), then bits per byte
    per split and language with the 95% bootstrap intervals."""
    parts = list(dict.fromkeys(k for r in rows for k in r["parameters"] if k != "total"))
    runs_head = [
        "<tr>" + _th("run", True, " rowspan='2'") + _th("parameters", span=f" colspan='{1 + len(parts)}'")
        + "".join(_th(h, span=" rowspan='2'") for h in
                  ("iterations", "tokens seen", "train time", "tokens/s", "best val loss")) + "</tr>",
        "<tr>" + "".join(_th(html_mod.escape(h)) for h in ["total", *parts]) + "</tr>"]
    runs_rows = []
    for r in rows:
        p = r["parameters"]
        runs_rows.append(
            [f"<b>{html_mod.escape(r['run'])}</b>", _fmt_params(p.get("total"))]
            + [_fmt_params(p.get(k)) for k in parts]
            + [f"{r['iterations'] or '-'}", f"{r['tokens_seen']:,}" if r["tokens_seen"] else "-",
               f"{r['elapsed_s'] / 60:.1f} min" if r["elapsed_s"] else "-",
               f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-", f"{r['best_val_loss']:.4f}"])
    langs: list[str] = []
    for r in rows:
        for s in r["bpb"].values():
            langs += [l for l in s if l not in langs]
    langs.sort(key=lambda l: (l == "all", l))
    splits = [s for s in ("val", "test") if any(s in r["bpb"] for r in rows)]
    bpb_head = [
        "<tr>" + _th("run", True, " rowspan='2'")
        + "".join(_th(f"{s}: bits per byte [95% interval]", span=f" colspan='{len(langs)}'") for s in splits) + "</tr>",
        "<tr>" + "".join(_th(l) for _ in splits for l in langs) + "</tr>"]
    bpb_rows = []
    for r in rows:
        cells = [f"<b>{html_mod.escape(r['run'])}</b>"]
        for s in splits:
            for l in langs:
                v = r["bpb"].get(s, {}).get(l)
                cells.append(f"{v[0]:.4f} <small>[{v[1][0]:.3f}, {v[1][1]:.3f}]</small>" if v else "-")
        bpb_rows.append(cells)
    tables = [_html_table("bnb-summary", runs_head, runs_rows)]
    if splits and langs:
        tables.append(_html_table("bnb-summary bnb-bpb", bpb_head, bpb_rows))
    return ("".join(tables)
            + "<p><small>bpb: bits per UTF-8 byte of held-out text (lower is better), with the 95% "
              "bootstrap interval over evaluation windows; tokens/s: training throughput, optimizer "
              "steps only.</small></p>")


SETUP_KEYS = ("block_size", "n_layer", "n_head", "n_embd", "n_senses", "dropout", "batch_size",
              "learning_rate", "min_lr", "warmup_iters", "lr_decay_iters", "max_iters",
              "weight_decay", "eval_interval", "data_dir", "languages", "encoding", "device", "dtype")


def setup_html(runs: Mapping[str, str | Path]) -> str:
    """The training settings of each run side by side; settings that differ are marked."""
    cfgs = {label: run_folder(f)["run"].get("config", {}) for label, f in runs.items()}
    dsets = {label: run_folder(f)["run"].get("dataset", {}) for label, f in runs.items()}
    rows = []
    for k in ("model_type", "seed") + SETUP_KEYS:
        vals = [cfgs[l].get(k) for l in runs]
        differs = len({json.dumps(v) for v in vals}) > 1
        style = " style='background:#fff3c4'" if differs else ""
        rows.append(f"<tr{style}><td>{k}</td>" + "".join(f"<td>{html_mod.escape(str(v))}</td>" for v in vals) + "</tr>")
    vocab = [dsets[l].get("vocab_size") for l in runs]
    tokens = [dsets[l].get("tokens", {}).get("train") for l in runs]
    rows.append("<tr><td>vocabulary</td>" + "".join(f"<td>{v:,}</td>" if v else "<td>-</td>" for v in vocab) + "</tr>")
    rows.append("<tr><td>training tokens</td>" + "".join(f"<td>{v:,}</td>" if v else "<td>-</td>" for v in tokens) + "</tr>")
    head = "<tr><th>setting</th>" + "".join(f"<th>{html_mod.escape(l)}</th>" for l in runs) + "</tr>"
    return f"<table style='border-collapse:collapse'>{head}{''.join(rows)}</table>"


def lexsim_results(runs: Mapping[str, str | Path], *, compute: bool = True,
                   source: str | None = None) -> tuple[dict[str, dict], str | None]:
    """Multi-SimLex results (label -> the ``lexsim`` section of each run's eval.json),
    scored now (and stored) where missing when ``compute``; and a note saying why there are
    none (no Multi-SimLex source here, not computed) or None."""
    if source is None and not os.environ.get("MULTISIMLEX_SOURCE"):
        # the Makefile's default: the project's copy beside the checkout, when there is one
        beside = paths.project_root().parent / "shared" / "multisimlex"
        source = str(beside) if (beside / "scores.csv").is_file() else None
    out: dict[str, dict] = {}
    bench = None
    for label, folder in runs.items():
        info = run_folder(folder)
        stored = info["eval"].get("lexsim")
        if stored and info["eval"].get("checkpoint") == str(info["checkpoint"]):
            out[label] = stored
            continue
        if not compute:
            return {}, ("not computed for these runs (python -m backpack_nb.lexsim --model_path "
                        "RUN/best.pt, or evaluate.py --model_path RUN/best.pt --lexsim)")
        try:
            bench = bench or lexsim.load_multisimlex(source)
            out[label] = lexsim.write_lexsim(info["checkpoint"], bench)
        except UserError as exc:
            return {}, f"not available here: {exc}"
    return out, None


# --- a Backpack's senses, as text ------------------------------------------------------------


def require_backpack(state: Mapping, path: str | Path = "") -> None:
    """Refuse a checkpoint dict that is not a Backpack's (only a Backpack has senses)."""
    if state.get("model_type") != "backpack":
        raise UserError(f"{path or 'this checkpoint'} holds a {state.get('model_type')}: sense "
                        "vectors exist only in a Backpack; point out_dir at a Backpack run")


def alignment_table(rows: Sequence[Mapping]) -> str:
    """cross_lingual_pairs rows as aligned text."""
    lines = [f"{'en':>12} {'fr':>12} {'alignment':>10} {'best match':>11} {'chance':>8}  note"]
    for r in rows:
        note = "same tokens: 1 by construction" if r["same_tokens"] else ""
        lines.append(f"{r['en']:>12} {r['fr']:>12} {r['alignment']:>+10.3f} {r['best_match']:>+11.3f} "
                     f"{r['baseline']:>+8.3f}  {note}")
    return "\n".join(lines)


def format_reweight(r: Mapping) -> str:
    """A reweight() result: which positions were scaled, the next-token top words before and
    after, and the KL divergence."""
    head = (f"prompt {r['prompt']!r}: sense {r['sense']} of {r['word']!r} scaled by {r['factor']} at "
            f"positions {r['positions'] or 'none (the word is not in the prompt)'}; "
            f"KL(before || after) = {r['kl']:.4f} nats")
    # tokens shown as everywhere else (senses.token_label: a space as ␣, escapes for bytes)
    lines = [head, f"{'before':>27}   {'after':<27}"]
    for (tb, pb), (ta, pa) in zip(r["before"], r["after"]):
        lines.append(f"{token_label(tb):>20} {pb:6.3f}   {token_label(ta):<20} {pa:6.3f}")
    return "\n".join(lines)
