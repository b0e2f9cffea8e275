"""Notebooks as reports: execute them with papermill, render them as HTML, chain them.

``python -m backpack_nb.reports run NOTEBOOK -f params/NAME.yaml [-p key value ...]`` executes
``notebooks/NOTEBOOK.ipynb`` with the YAML file's keys (and the overrides) injected after its
``parameters`` cell, into ``outputs/<run_name>/NOTEBOOK.ipynb``, and renders
``outputs/<run_name>/NOTEBOOK.html`` beside it (plots embedded). The kernel is the named
kernel ``backpack-nb`` of this Python environment, installed into it on first use.

``pipeline -f params/NAME.yaml`` is the batch run of one model: train (01, resuming when the
run's checkpoint exists), evaluate (03), senses (04, Backpack only). ``compare -f
params/compare_cpu.yaml`` trains a Backpack and a Transformer with identical settings and
renders one report (05) comparing them.

A failing cell makes the command fail (exit 1; 2 when the cell raised a :class:`UserError`)
with the cell's error shown; the partly executed notebook (and its HTML) is kept.

The notebooks stay thin: what they show is computed by the helpers at the end of this module
(live loss plot, resume summary, evaluation and comparison tables, written findings).
"""

from __future__ import annotations

import argparse
import difflib
import html as html_mod
import io
import json
import logging
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from . import paths
from .errors import UserError, exit_on_user_error

KERNEL_NAME = "backpack-nb"
# Short names accepted wherever a notebook is named.
ALIASES = {"train": "01_train", "resume": "02_resume", "evaluate": "03_evaluate",
           "senses": "04_senses", "compare": "05_compare"}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# --- notebooks and the kernel ---------------------------------------------------------------


def notebooks_dir() -> Path:
    return paths.project_root() / "notebooks"


def available_notebooks() -> list[str]:
    d = notebooks_dir()
    return sorted(p.stem for p in d.glob("*.ipynb")) if d.is_dir() else []


def notebook_path(name: str | Path) -> Path:
    """``train``, ``01_train``, ``01_train.ipynb`` or a path -> the notebook file."""
    s = str(name)
    s = ALIASES.get(s, s)
    if "/" in s:
        path = paths.resolve_in_root(s)
    else:
        path = notebooks_dir() / (s if s.endswith(".ipynb") else f"{s}.ipynb")
    if not path.is_file():
        names = available_notebooks()
        hint = difflib.get_close_matches(Path(s).stem, names + list(ALIASES), n=1)
        raise UserError(f"notebook {name!r} not found (looked for {path}). "
                        + (f"Did you mean {hint[0]!r}? " if hint else "")
                        + f"Available: {', '.join(names) or 'none'}.")
    return path


def ensure_kernel(name: str = KERNEL_NAME, quiet: bool = True) -> str:
    """The Jupyter kernel ``name`` of this Python environment, installed into it
    (``python -m ipykernel install --sys-prefix --name NAME``) when missing."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(name)
        python = Path(spec.argv[0]) if spec.argv else None
        if python is not None and (python == Path(sys.executable) or python.name.startswith("python")
                                   and python.exists()):
            return name
    except NoSuchKernel:
        pass
    cmd = [sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", name,
           "--display-name", f"Python ({name})"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise UserError(f"could not install the Jupyter kernel {name!r} ({' '.join(cmd)}):\n"
                        f"{out.stderr.strip()}")
    if not quiet:
        print(f"installed the Jupyter kernel {name!r} into {sys.prefix}")
    return name


def notebook_parameters(notebook: str | Path) -> dict[str, Any]:
    """The names and defaults of a notebook's ``parameters`` cell."""
    import papermill

    info = papermill.inspect_notebook(str(notebook_path(notebook)))
    return {k: v.get("default") for k, v in info.items()}


# --- parameters ----------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A ``-p`` value as YAML reads it: ``40`` -> 40, ``[a, b]`` -> list, ``null`` -> None;
    anything YAML cannot read stays text."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # "Backpack vs Transformer: tiny" is a title, not a mapping: only brackets make a collection
    if isinstance(value, (dict, list)) and not text.strip().startswith(("[", "{")):
        return text
    return value


def resolve_parameters(notebooks: Sequence[str | Path], params_file: str | None,
                       overrides: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """The parameters to inject (YAML keys, then overrides) and the validated TrainConfig
    (None without a params file or training keys). An override that neither the config nor
    any of ``notebooks`` knows is an error, with a suggestion."""
    from .params import TrainConfig, load_params, params_path, read_params_file

    values = read_params_file(params_file) if params_file else {}
    train_keys = set(TrainConfig.keys())
    known = set(train_keys)
    for nb in notebooks:
        known |= set(notebook_parameters(nb))
    unknown = [k for k in overrides if k not in known]
    if unknown:
        msgs = []
        for k in unknown:
            hint = difflib.get_close_matches(k, sorted(known), n=1)
            msgs.append(f"-p {k}: no such parameter" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        raise UserError("\n".join(msgs) + "\nparameters: " + ", ".join(sorted(known)))
    cfg = None
    train_overrides = {k: v for k, v in overrides.items() if k in train_keys}
    if params_file:
        cfg = load_params(params_file, train_overrides)
    elif train_overrides:
        cfg = TrainConfig.from_dict(train_overrides, source="-p parameters")
    declared = set()
    for nb in notebooks:
        declared |= set(notebook_parameters(nb))
    # A notebook reads the params file itself (config_from_notebook); it gets the keys it
    # declares and the training overrides, not every key of the file.
    injected = {k: v for k, v in {**values, **overrides}.items() if k in declared or k in overrides}
    if params_file:
        injected["params_file"] = str(params_path(params_file))
    return injected, cfg


def config_from_notebook(namespace: Mapping[str, Any]):
    """A notebook's TrainConfig: ``params_file`` (a params name or path; papermill -f or the
    reports runner inject it) laid under every TrainConfig key the notebook defines, except
    those left at None ("from the file")."""
    from .params import TrainConfig, load_params

    overrides = {k: namespace[k] for k in TrainConfig.keys()
                 if k in namespace and namespace[k] is not None}
    params_file = namespace.get("params_file")
    if params_file:
        return load_params(params_file, overrides)
    return TrainConfig.from_dict(overrides, source="notebook parameters")


# --- running -------------------------------------------------------------------------------


@dataclass
class NotebookRun:
    """One executed notebook."""

    notebook: str
    ipynb: Path
    html: Path | None
    seconds: float
    parameters: dict[str, Any] = field(default_factory=dict)


class NotebookFailed(Exception):
    """A cell raised. ``user_error`` is True when it was a UserError (bad input)."""

    def __init__(self, message: str, ipynb: Path, user_error: bool = False):
        super().__init__(message)
        self.ipynb, self.user_error = ipynb, user_error


def render_html(ipynb: str | Path, out: str | Path | None = None, *,
                exclude_input: bool = False, template: str = "lab") -> Path:
    """``ipynb`` as a standalone HTML page (figures embedded as data URIs)."""
    import nbformat
    from nbconvert import HTMLExporter

    ipynb = Path(ipynb)
    if not ipynb.is_file():
        raise UserError(f"notebook {ipynb} does not exist; give the path of an executed .ipynb to render")
    try:
        nb = nbformat.read(ipynb, as_version=4)
    except Exception as exc:  # not JSON, not a notebook: many exception types
        raise UserError(f"{ipynb} is not a readable notebook ({type(exc).__name__}: {exc})") from None
    exporter = HTMLExporter(template_name=template, exclude_input=exclude_input,
                            exclude_input_prompt=exclude_input, exclude_output_prompt=exclude_input)
    body, _ = exporter.from_notebook_node(nb)
    target = Path(out) if out else ipynb.with_suffix(".html")
    tmp = target.with_suffix(".html.tmp")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(target)
    return target


def _failure_message(exc: Exception, notebook: str, ipynb: Path, html: Path | None) -> tuple[str, bool]:
    ename = getattr(exc, "ename", type(exc).__name__)
    evalue = getattr(exc, "evalue", str(exc))
    kept = f"the partly executed notebook is kept: {ipynb}" + (f" (and {html})" if html else "")
    if ename == "UserError":
        return f"{notebook}: {evalue}\n{kept}", True
    tb = [_ANSI.sub("", line) for line in (getattr(exc, "traceback", None) or [])]
    tb_text = "\n".join("\n".join(tb).splitlines()[-40:])
    cell = getattr(exc, "exec_count", None)
    where = f" in cell [{cell}]" if cell is not None else ""
    return f"{notebook} failed{where}: {ename}: {evalue}\n{tb_text}\n{kept}".replace("\n\n\n", "\n"), False


def run_notebook(notebook: str | Path, parameters: Mapping[str, Any], run_name: str, *,
                 out_root: str | Path | None = None, kernel: str = KERNEL_NAME,
                 html: bool = True, exclude_input: bool = False,
                 log_output: bool = False) -> NotebookRun:
    """Execute ``notebook`` with ``parameters`` into ``<outputs>/<run_name>/<notebook>.ipynb``
    and render the HTML beside it. Raises :class:`NotebookFailed` when a cell fails (the
    partial notebook stays, rendered too)."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    src = notebook_path(notebook)
    folder = Path(out_root) if out_root else paths.outputs_root() / run_name
    folder.mkdir(parents=True, exist_ok=True)
    ipynb = folder / src.name
    ensure_kernel(kernel)
    if not log_output:  # papermill warns about every injected name the cell does not list
        logging.getLogger("papermill").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(src), str(ipynb), parameters=dict(parameters), kernel_name=kernel,
            cwd=str(paths.project_root()), progress_bar=False, log_output=log_output)
    except Exception as exc:  # a cell error, or the kernel died: keep what ran
        if not isinstance(exc, PapermillExecutionError) and not ipynb.exists():
            raise
        html_path = None
        if html and ipynb.exists():
            try:
                html_path = render_html(ipynb, exclude_input=exclude_input)
            except Exception:  # the error itself matters more than its rendering
                html_path = None
        msg, user = _failure_message(exc, src.stem, ipynb, html_path)
        raise NotebookFailed(msg, ipynb, user) from None
    seconds = time.perf_counter() - t0
    html_path = render_html(ipynb, exclude_input=exclude_input) if html else None
    return NotebookRun(src.stem, ipynb, html_path, seconds, dict(parameters))


def _print_run(r: NotebookRun) -> None:
    print(f"{r.notebook}: {r.seconds:.1f} s -> {r.ipynb}" + (f"\n{'':>{len(r.notebook) + 2}}{r.html}" if r.html else ""),
          flush=True)


def run(notebook: str, params_file: str | None, overrides: Mapping[str, Any], *,
        run_name: str | None = None, html: bool = True, log_output: bool = False) -> NotebookRun:
    """The ``run`` subcommand: one notebook."""
    injected, cfg = resolve_parameters([notebook], params_file, overrides)
    # Without a params file the config's run_name is only a default: name the folder after
    # the run the notebook looks at.
    name = (run_name or injected.get("run_name") or (cfg.run_name if params_file else None)
            or (Path(str(injected["out_dir"])).name if injected.get("out_dir") else None)
            or str(notebook_parameters(notebook).get("run_name") or "").strip("'\"") or "notebooks")
    name = str(name)
    return run_notebook(notebook, injected, name, html=html, log_output=log_output)


PIPELINE = ("01_train", "03_evaluate", "04_senses")


def pipeline(params_file: str, overrides: Mapping[str, Any], *, html: bool = True,
             log_output: bool = False, verbose: bool = True) -> list[NotebookRun]:
    """Train (resuming when ``out_dir`` holds a checkpoint) -> evaluate -> senses (Backpack
    only) for the model of ``params_file``; the batch run of one model."""
    from .checkpoint import existing_checkpoints

    injected, cfg = resolve_parameters(PIPELINE, params_file, overrides)
    out_dir = paths.resolve_in_root(cfg.out_dir)
    if existing_checkpoints(out_dir):
        injected["init_from"] = "resume"
        if verbose:
            print(f"{out_dir} holds a checkpoint: resuming it", flush=True)
    # The batch report of one model shows that model only, unless asked (-p compare_with).
    injected.setdefault("compare_with", [])
    steps = [nb for nb in PIPELINE if nb != "04_senses" or cfg.model_type == "backpack"]
    report = paths.outputs_root() / cfg.run_name / "01_train.ipynb"
    if _finished(out_dir, cfg.max_iters) and report.exists():
        # Re-running the pipeline of a finished run (to refresh its evaluation) must not
        # replace its training report with one that says "nothing to train".
        steps.remove("01_train")
        if verbose:
            print(f"{out_dir} already reached max_iters {cfg.max_iters}: keeping {report}; "
                  "raise max_iters to train further", flush=True)
    done = []
    for nb in steps:
        r = run_notebook(nb, injected, cfg.run_name, html=html, log_output=log_output)
        done.append(r)
        if verbose:
            _print_run(r)
    return done


def _finished(out_dir: Path, max_iters: int) -> bool:
    """Whether the run in ``out_dir`` finished at ``max_iters`` or beyond (its run.json)."""
    try:
        info = read_json(out_dir / "run.json")
    except ValueError:  # a damaged run.json: let the training notebook report on the run
        return False
    return info.get("status") == "finished" and (info.get("iterations") or 0) >= max_iters


def compare(params_file: str, overrides: Mapping[str, Any], *, seeds: Sequence[int] = (),
            html: bool = True, log_output: bool = False, docs_copy: str | None = None,
            verbose: bool = True) -> NotebookRun:
    """Train and evaluate a Backpack and a Transformer with the settings of ``params_file``
    (only ``model_type``, ``run_name`` and ``out_dir`` differ; one pair per seed), then render
    ``05_compare`` comparing them into ``outputs/<run_name>/``."""
    injected, cfg = resolve_parameters(PIPELINE + ("05_compare",), params_file, overrides)
    seeds = list(seeds) or [cfg.seed]
    runs: dict[str, str] = {}
    for seed in seeds:
        for model_type in ("backpack", "transformer"):
            suffix = f"{model_type}" + (f"_s{seed}" if len(seeds) > 1 else "")
            run_name, out_dir = f"{cfg.run_name}_{suffix}", f"{cfg.out_dir}/{suffix}"
            child_overrides = {**overrides, "model_type": model_type, "run_name": run_name,
                               "out_dir": out_dir, "seed": seed}
            if verbose:
                print(f"== {run_name} ({model_type}, seed {seed}) -> {out_dir}", flush=True)
            pipeline(params_file, child_overrides, html=html, log_output=log_output, verbose=verbose)
            runs[f"{model_type}" + (f" s{seed}" if len(seeds) > 1 else "")] = out_dir
    command = " ".join(["python -m backpack_nb.reports compare -f", str(params_file)]
                       + [f"-p {k} {json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]
                       + ([f"--seeds {','.join(map(str, seeds))}"] if len(seeds) > 1 else []))
    report_params = {"runs": runs, "title": f"Backpack vs Transformer: {cfg.run_name}",
                     "params_file": str(injected.get("params_file", "")), "reproduce": command}
    r = run_notebook("05_compare", report_params, cfg.run_name, html=html, exclude_input=True,
                     log_output=log_output)
    if verbose:
        _print_run(r)
    if docs_copy and r.html:
        target = paths.resolve_in_root(docs_copy)
        target.parent.mkdir(parents=True, exist_ok=True)
        render_html(r.ipynb, target, exclude_input=True)
        if verbose:
            print(f"copied the report to {target}")
    return r


# --- command line --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m backpack_nb.reports",
                                 description="Execute the notebooks with papermill and keep them as HTML reports.")
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, need_file: bool) -> None:
        p.add_argument("-f", "--parameters_file", "--params", dest="params_file",
                       required=need_file, help="params/NAME.yaml (or a params name)")
        p.add_argument("-p", "--parameter", dest="parameters", nargs=2, action="append", default=[],
                       metavar=("KEY", "VALUE"), help="override one parameter (repeatable); VALUE is read as YAML")
        p.add_argument("--no-html", dest="html", action="store_false", help="skip the HTML rendering")
        p.add_argument("--log-output", action="store_true", help="stream the notebook's output to this terminal")

    r = sub.add_parser("run", help="execute one notebook into outputs/<run_name>/")
    r.add_argument("notebook", help="01_train, 02_resume, 03_evaluate, 04_senses, 05_compare (or train, resume, ...)")
    r.add_argument("--run_name", default=None, help="outputs folder name (default: the parameters' run_name)")
    common(r, need_file=False)
    p = sub.add_parser("pipeline", help="train (resume if possible) -> evaluate -> senses for one model")
    common(p, need_file=True)
    c = sub.add_parser("compare", help="train a Backpack and a Transformer with the same settings and compare them")
    common(c, need_file=True)
    c.add_argument("--seeds", default="", help="comma-separated seeds (one Backpack/Transformer pair each); default: the file's seed")
    c.add_argument("--docs", default=None, help="also write the report's HTML here (e.g. docs/comparison_cpu.html)")
    k = sub.add_parser("kernel", help=f"install the Jupyter kernel {KERNEL_NAME!r} into this environment")
    k.add_argument("--name", default=KERNEL_NAME)
    rend = sub.add_parser("render", help="render an executed notebook as HTML")
    rend.add_argument("ipynb")
    rend.add_argument("--out", default=None)
    rend.add_argument("--no-input", action="store_true", help="leave the code cells out")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "kernel":
            print(f"kernel {ensure_kernel(args.name, quiet=False)!r} is installed")
            return 0
        if args.command == "render":
            print(render_html(args.ipynb, args.out, exclude_input=args.no_input))
            return 0
        overrides: dict[str, Any] = {}
        for key, value in args.parameters:
            overrides[key] = parse_value(value)
        if args.command == "run":
            r = run(args.notebook, args.params_file, overrides, run_name=args.run_name,
                    html=args.html, log_output=args.log_output)
            _print_run(r)
        elif args.command == "pipeline":
            done = pipeline(args.params_file, overrides, html=args.html, log_output=args.log_output)
            print("reports:\n" + "\n".join(f"  {r.html or r.ipynb}" for r in done))
        elif args.command == "compare":
            try:
                seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
            except ValueError:
                raise UserError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
            r = compare(args.params_file, overrides, seeds=seeds, html=args.html,
                        log_output=args.log_output, docs_copy=args.docs)
            print(f"report: {r.html or r.ipynb}")
    except UserError as exc:
        exit_on_user_error(exc)
    except NotebookFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if exc.user_error else 1
    return 0


# --- what the notebooks show -----------------------------------------------------------------


class LiveLossPlot:
    """A :func:`backpack_nb.training.train` callback that redraws the train/val loss after
    every evaluation, in place in a notebook (one figure, updated)."""

    def __init__(self, title: str = "loss", previous: Mapping | None = None):
        from matplotlib.figure import Figure

        # A pyplot-free Figure: the inline backend would otherwise show it again at cell end.
        self.fig = Figure(figsize=(7, 3.8), layout="constrained")
        self.ax = self.fig.add_subplot()
        self.title = title
        self.previous = previous  # an earlier log (a resumed run's history), drawn grey
        self.records: list[dict] = []
        self.handle = None

    def __call__(self, record: Mapping) -> None:
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


def read_json(path: str | Path) -> dict:
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


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


def resume_summary(out_dir: str | Path) -> dict:
    """What happened to the run in ``out_dir`` and where it restarts: run.json's status,
    the checkpoint's iteration and schedule position, the last evaluation."""
    from .checkpoint import existing_checkpoints, read_checkpoint

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


def evaluate_runs(runs: Mapping[str, str | Path], *, max_tokens: int | None = None,
                  data_dir: str | None = None, reuse: bool = True, progress: bool = False) -> dict[str, dict]:
    """label -> eval.json dict for each run folder: the stored evaluation when it is of the
    same checkpoint and token cap (``reuse``), else a fresh :func:`evaluate_checkpoint`."""
    from .evaluation import evaluate_checkpoint

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
    from .checkpoint import read_checkpoint

    return int(read_checkpoint(info["checkpoint"]).get("iter_num", 0))


def _fmt_params(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M"


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


def _epochs_text(rows: Sequence[Mapping]) -> str:
    r = rows[0]
    if r.get("train_tokens") and r.get("tokens_seen"):
        return (f"{r['tokens_seen']:,} tokens ({r['tokens_seen'] / r['train_tokens']:.1f} passes over "
                f"the {r['train_tokens']:,}-token training split)")
    return "a few hundred thousand tokens"


def _argmin_iter(log: Mapping) -> int | None:
    vals, its = log.get("val_loss") or [], log.get("iterations") or []
    return its[min(range(len(vals)), key=vals.__getitem__)] if vals else None


def summary_html(rows: Sequence[Mapping]) -> str:
    """The summary rows as an HTML table (numbers with their 95% bootstrap intervals)."""
    langs: list[str] = []
    for r in rows:
        for s in r["bpb"].values():
            langs += [l for l in s if l not in langs]
    langs.sort(key=lambda l: (l == "all", l))
    splits = [s for s in ("val", "test") if any(s in r["bpb"] for r in rows)]
    head = ("<tr><th>run</th><th>parameters</th><th>iterations</th><th>tokens seen</th><th>train time</th>"
            "<th>tokens/s</th><th>best val loss</th>"
            + "".join(f"<th>{s} bpb {l}</th>" for s in splits for l in langs) + "</tr>")
    body = []
    for r in rows:
        p = r["parameters"]
        parts = ", ".join(f"{k} {_fmt_params(v)}" for k, v in p.items() if k != "total")
        cells = [f"<b>{html_mod.escape(r['run'])}</b>",
                 f"{_fmt_params(p.get('total'))}<br><small>{html_mod.escape(parts)}</small>",
                 f"{r['iterations'] or '-'}", f"{r['tokens_seen']:,}" if r["tokens_seen"] else "-",
                 f"{r['elapsed_s'] / 60:.1f} min" if r["elapsed_s"] else "-",
                 f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-",
                 f"{r['best_val_loss']:.4f}"]
        for s in splits:
            for l in langs:
                v = r["bpb"].get(s, {}).get(l)
                cells.append(f"{v[0]:.4f}<br><small>[{v[1][0]:.3f}, {v[1][1]:.3f}]</small>" if v else "-")
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ("<table class='bnb-summary' style='border-collapse:collapse'>" + head + "".join(body)
            + "</table><p><small>bpb: bits per UTF-8 byte of held-out text (lower is better), with the 95% "
              "bootstrap interval over evaluation windows; tokens/s: training throughput, optimizer "
              "steps only.</small></p>")


def paired_bpb_difference(runs: Mapping[str, str | Path], a: str, b: str, *, split: str = "val",
                          max_tokens: int | None = None, n_boot: int = 2000, seed: int = 0) -> dict:
    """Bits per byte of run ``a`` minus run ``b`` on the same held-out windows, per language
    and pooled, with a *paired* bootstrap interval (both models scored on the same resampled
    windows, so text difficulty cancels out). Both must share block size and vocabulary."""
    import numpy as np

    from . import data
    from .evaluation import WindowScores, load_model, score_tokens, token_byte_lengths

    models = {}
    for label in (a, b):
        info = run_folder(runs[label])
        models[label] = load_model(info["checkpoint"])
    (ma, tok, sa), (mb, _, sb) = models[a], models[b]
    if ma.config.block_size != mb.config.block_size:
        raise UserError(f"{a} and {b} have different block sizes; a paired comparison needs the same windows")
    ddir = data.resolve_data_dir(sa.get("data", {}).get("data_dir", "europarl"))
    meta = data.load_meta(ddir)
    lengths = token_byte_lengths(tok)
    per: dict[str, tuple[WindowScores, WindowScores]] = {}
    for lang in meta["langs"]:
        toks = data.load_tokens(ddir, split, lang)
        kw = dict(block_size=ma.config.block_size, max_tokens=max_tokens, progress=False)
        per[lang] = (score_tokens(ma, toks, lengths, **kw), score_tokens(mb, toks, lengths, **kw))
    per["all"] = (WindowScores.concat([v[0] for v in per.values()]),
                  WindowScores.concat([v[1] for v in per.values()]))
    rng = np.random.default_rng(seed)
    out = {}
    for lang, (wa, wb) in per.items():
        n = len(wa.nats)
        diff = (wa.nats.sum() - wb.nats.sum()) / math.log(2) / wa.bytes.sum()
        picks = rng.integers(0, n, size=(n_boot, n))
        boot = (wa.nats[picks].sum(1) - wb.nats[picks].sum(1)) / math.log(2) / np.maximum(wa.bytes[picks].sum(1), 1)
        lo, hi = np.percentile(boot, [2.5, 97.5])
        out[lang] = {"difference": float(diff), "ci95": [float(lo), float(hi)], "windows": int(n),
                     "bpb_a": float(wa.nats.sum() / math.log(2) / wa.bytes.sum()),
                     "bpb_b": float(wb.nats.sum() / math.log(2) / wb.bytes.sum())}
    return out


def seed_pairs(rows: Sequence[Mapping]) -> list[tuple[str, str]]:
    """(Backpack label, Transformer label) pairs to compare window by window: runs with the
    same seed, in order; the first of each model when no seeds match."""
    bp = [r for r in rows if r["model_type"] == "backpack"]
    tf = [r for r in rows if r["model_type"] == "transformer"]
    pairs = [(b["run"], t["run"]) for b in bp for t in tf
             if b.get("seed") is not None and b.get("seed") == t.get("seed")]
    return pairs or ([(bp[0]["run"], tf[0]["run"])] if bp and tf else [])


def findings(rows: Sequence[Mapping], paired: Mapping[str, Mapping] | None = None,
             split: str = "val") -> str:
    """What the numbers show, in words (Markdown), for a Backpack/Transformer comparison.
    ``paired``: :func:`paired_bpb_difference` of one pair ({lang: ...}), or of several
    ({"<backpack> - <transformer>": {lang: ...}}, one pair per seed)."""
    bp = [r for r in rows if r["model_type"] == "backpack"]
    tf = [r for r in rows if r["model_type"] == "transformer"]
    if not bp or not tf:
        return "Only one model type was found; there is nothing to compare."
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    out = []
    pb, pt = mean([r["parameters"].get("total", 0) for r in bp]), mean([r["parameters"].get("total", 0) for r in tf])
    out.append(f"- **Size.** The Backpack has {pb / 1e6:.2f}M parameters against the Transformer's "
               f"{pt / 1e6:.2f}M ({pb / pt:.2f}x): the sense network is the difference; both share the "
               "same embedding, contextualization network shape and training settings.")
    sb = [r["tokens_per_s"] for r in bp if r["tokens_per_s"]]
    st = [r["tokens_per_s"] for r in tf if r["tokens_per_s"]]
    if sb and st:
        out.append(f"- **Speed.** Training ran at {mean(sb):,.0f} tokens/s for the Backpack and "
                   f"{mean(st):,.0f} for the Transformer: the Backpack step costs {mean(st) / mean(sb):.2f}x "
                   "the Transformer's here (the paper reports about 1.4x for the forward pass at GPU scale). "
                   "Rates measured on a shared machine are noisy.")
    vb = [r["bpb"].get(split, {}).get("all") for r in bp]
    vt = [r["bpb"].get(split, {}).get("all") for r in tf]
    if all(vb) and all(vt):
        b, t = mean([v[0] for v in vb]), mean([v[0] for v in vt])
        better = "Backpack" if b < t else "Transformer"
        spread = (f" (per seed: Backpack {', '.join(f'{v[0]:.4f}' for v in vb)}; Transformer "
                  f"{', '.join(f'{v[0]:.4f}' for v in vt)})" if len(vb) > 1 or len(vt) > 1 else "")
        what = "mean bits per byte" if len(vb) > 1 or len(vt) > 1 else "bits per byte"
        out.append(f"- **Held-out text ({split}).** {b:.4f} {what} for the Backpack, {t:.4f} for the "
                   f"Transformer{spread}: the {better} is lower by {abs(b - t):.4f} bpb "
                   f"({100 * abs(b - t) / max(b, t):.1f}%).")
    if paired:
        if all("difference" in d for d in paired.values()):  # one pair: {lang: ...}
            paired = {"": paired}
        outcome: dict[str, list[str]] = {}  # lang -> per pair: "lower", "higher" or "unresolved"
        for pair, by_lang in paired.items():
            if len(paired) > 1:
                out.append(f"  - paired, {pair}:")
            for lang, d in by_lang.items():
                lo, hi = d["ci95"]
                resolved = lo > 0 or hi < 0
                outcome.setdefault(lang, []).append(
                    ("lower" if hi < 0 else "higher") if resolved else "unresolved")
                verdict = ("the interval excludes 0: a real difference on this text" if resolved
                           else "the interval includes 0: no difference this data can resolve")
                out.append(f"{'    ' if len(paired) > 1 else '  '}- {lang}: Backpack minus Transformer "
                           f"{d['difference']:+.4f} bpb, paired 95% interval [{lo:+.4f}, {hi:+.4f}] over "
                           f"{d['windows']} windows; {verdict}.")
        if len(paired) > 1:
            agree = [f"{lang} (Backpack {o[0]})" for lang, o in outcome.items()
                     if len(o) == len(paired) and len(set(o)) == 1 and o[0] != "unresolved"]
            out.append("  - Across seeds: " + (
                f"every pair resolves the same direction for {', '.join(agree)}" if agree
                else "no language has a difference of the same direction resolved in every pair")
                + "; the paired intervals cover the choice of held-out windows, the seeds the "
                  "variation between training runs.")
    still = [r["run"] for r in rows if r.get("best_iter") is not None and r["best_iter"] == r.get("last_iter")]
    peaked = [f"{r['run']} (best at iteration {r['best_iter']} of {r['last_iter']})" for r in rows
              if r.get("best_iter") is not None and r["best_iter"] != r.get("last_iter")]
    if still or peaked:
        out.append("- **Training length.** "
                   + (f"Validation loss was still falling at the last evaluation for {', '.join(still)}: "
                      "longer training would lower these numbers. " if still else "")
                   + (f"Validation loss had stopped improving for {', '.join(peaked)}: the sample is "
                      "small enough to overfit; the best checkpoint is the one evaluated." if peaked else ""))
    seeds = {r.get("seed") for r in rows}
    out.append("- **Limits.** " + (
        "One seed per model: the intervals cover which held-out windows were drawn, not the "
        "variation between training runs, which at this scale can be as large as the gap."
        if len(seeds) <= 1 else f"{len(seeds)} seeds per model; the spread between seeds shows run-to-run variation.")
        + f" The models are tiny, trained for minutes on {_epochs_text(rows)} of "
          "parliamentary English and French, far from the paper's 100k steps of 512k tokens "
          "on OpenWebText. The ranking at this scale need not hold at scale: the Backpack's "
          "extra parameters (the sense network) need data to pay off, and its sense words "
          "are still noisy here.")
    return "\n".join(out)


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


def require_backpack(state: Mapping, path: str | Path = "") -> None:
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
    lines = [head, f"{'before':>28}   {'after':<28}"]
    for (tb, pb), (ta, pa) in zip(r["before"], r["after"]):
        lines.append(f"{tb!r:>20} {pb:6.3f}   {ta!r:<20} {pa:6.3f}")
    return "\n".join(lines)


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
    import os

    from . import lexsim

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
            return {}, "not computed for these runs (python -m backpack_nb.lexsim, or evaluate.py --lexsim)"
        try:
            bench = bench or lexsim.load_multisimlex(source)
            out[label] = lexsim.write_lexsim(info["checkpoint"], bench)
        except UserError as exc:
            return {}, f"not available here: {exc}"
    return out, None


if __name__ == "__main__":
    sys.exit(main())
