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

A report is replaced only by a finished one. A failing cell makes the command fail (exit 1;
2 when the cell raised a :class:`UserError`) with the cell's error shown; the last finished
report stays and the partial notebook is kept as ``NOTEBOOK.failed.ipynb`` (and ``.html``).

The notebooks stay thin: what they show is computed by :mod:`backpack_nb.results` (run
folders, tables, the live loss plot) and :mod:`backpack_nb.comparison` (paired differences,
written findings).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import logging
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import yaml

from . import paths
from .checkpoint import existing_checkpoints
from .errors import UserError, exit_on_user_error
from .kernel import KERNEL_NAME, ensure_kernel
from .params import (TrainConfig, load_params, params_path, read_params_file,
                     require_typed_dataset)
from .runfiles import read_json
from .spelling import RUNNER_ENV, runner_spelling

# Short names accepted wherever a notebook is named.
ALIASES = {"train": "01_train", "resume": "02_resume", "evaluate": "03_evaluate",
           "senses": "04_senses", "compare": "05_compare"}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
FAILED = ".failed"  # 01_train.failed.ipynb / .html: the notebook of the last run that failed


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


def notebook_parameters(notebook: str | Path) -> dict[str, Any]:
    """The names and defaults of a notebook's ``parameters`` cell."""
    import papermill  # heavy and optional: see ensure_kernel

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
                       overrides: Mapping[str, Any]) -> tuple[dict[str, Any], TrainConfig | None]:
    """The parameters to inject (YAML keys, then overrides) and the validated TrainConfig
    (None without a params file or training keys). An override that neither the config nor
    any of ``notebooks`` knows is an error, with a suggestion."""
    values = read_params_file(params_file) if params_file else {}
    train_keys = set(TrainConfig.keys())
    declared = {name for nb in notebooks for name in notebook_parameters(nb)}
    known = train_keys | declared
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
    if cfg is not None and "data_dir" in overrides:
        require_typed_dataset(cfg, values.get("data_dir", TrainConfig.data_dir), "-p data_dir")
    # A notebook reads the params file itself (results.config_from_notebook); it gets the keys it
    # declares and the training overrides, not every key of the file.
    injected = {k: v for k, v in {**values, **overrides}.items() if k in declared or k in overrides}
    if params_file:
        injected["params_file"] = str(params_path(params_file))
    return injected, cfg


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
    """A cell raised. ``user_error`` is True when it was a UserError (bad input); ``ipynb`` is
    the failed run's notebook (``NOTEBOOK.failed.ipynb``)."""

    def __init__(self, message: str, ipynb: Path, user_error: bool = False):
        super().__init__(message)
        self.ipynb, self.user_error = ipynb, user_error


class NotebookInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says where the partly executed notebook is kept."""


def render_html(ipynb: str | Path, out: str | Path | None = None, *,
                exclude_input: bool = False, template: str = "lab") -> Path:
    """``ipynb`` as a standalone HTML page (figures embedded as data URIs)."""
    import nbformat  # heavy and optional: see ensure_kernel
    from nbconvert import HTMLExporter  # heavy and optional, as nbformat

    ipynb = Path(ipynb)
    if not ipynb.is_file():
        raise UserError(f"notebook {ipynb} does not exist; give the path of an executed .ipynb to render")
    try:
        nb = nbformat.read(ipynb, as_version=4)
    except Exception as exc:  # not JSON, not a notebook: many exception types
        raise UserError(f"{ipynb} is not a readable notebook ({type(exc).__name__}: {exc})") from None
    exporter = HTMLExporter(template_name=template, exclude_input=exclude_input,
                            exclude_input_prompt=exclude_input, exclude_output_prompt=exclude_input)
    target = Path(out) if out else ipynb.with_suffix(".html")
    if target.is_dir():
        raise UserError(f"--out {target} is a folder; give the .html file to write "
                        f"(e.g. {target / ipynb.with_suffix('.html').name})")
    _write_text(target, exporter.from_notebook_node(nb)[0])
    return target


def _write_text(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file beside it: a browser or a bucket sync
    never reads half a page, and a failed write leaves the old page as it was."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {path} ({exc.strerror or exc}); free disk space or fix "
                        f"the permissions of {path.parent}") from None


def finished_report(ipynb: str | Path) -> bool:
    """Whether ``ipynb`` ran to its end: no papermill ``exception`` mark, no error output
    (a report written before failed runs were kept apart may be a failed one)."""
    try:
        nb = json.loads(Path(ipynb).read_text(encoding="utf-8"))
        if (nb.get("metadata", {}).get("papermill") or {}).get("exception"):
            return False
        return not any(o.get("output_type") == "error"
                       for c in nb.get("cells", []) for o in c.get("outputs", []))
    except (OSError, ValueError, AttributeError):  # missing, not JSON, not a notebook
        return False


def _failure_message(exc: BaseException, notebook: str, report: Path, failed: Path,
                     html: Path | None) -> tuple[str, bool]:
    ename = getattr(exc, "ename", type(exc).__name__)
    evalue = getattr(exc, "evalue", str(exc))
    kept = (f"the partly executed notebook is kept as {failed}" + (f" (and {html})" if html else "")
            + (f"; the report {report} is unchanged" if report.exists() else ""))
    if ename == "UserError":
        return f"{notebook}: {runner_spelling(evalue)}\n{kept}", True
    tb = [_ANSI.sub("", line) for line in (getattr(exc, "traceback", None) or [])]
    tb_text = "\n".join("\n".join(tb).splitlines()[-40:])
    cell = getattr(exc, "exec_count", None)
    where = f" in cell [{cell}]" if cell is not None else ""
    return f"{notebook} failed{where}: {ename}: {evalue}\n{tb_text}\n{kept}".replace("\n\n\n", "\n"), False


class _KnownParameters(logging.Filter):
    """Drops papermill's "Passed unknown parameter" warnings. The runner injects training
    settings that a notebook reads through its config without listing them in its
    ``parameters`` cell (``-p data_dir ...``), and has refused unknown names itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Passed unknown parameter")


@contextlib.contextmanager
def _papermill_logging(log_output: bool) -> Iterator[None]:
    logger = logging.getLogger("papermill")
    known, handler, level = _KnownParameters(), logging.StreamHandler(sys.stdout), logger.level
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addFilter(known)
    if log_output:  # papermill logs the notebook's output at INFO, which no handler shows by default
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeFilter(known)
        logger.removeHandler(handler)
        logger.setLevel(level)


def run_notebook(notebook: str | Path, parameters: Mapping[str, Any], run_name: str, *,
                 out_root: str | Path | None = None, kernel: str = KERNEL_NAME,
                 html: bool = True, exclude_input: bool = False,
                 log_output: bool = False) -> NotebookRun:
    """Execute ``notebook`` with ``parameters`` into ``<outputs>/<run_name>/<notebook>.ipynb``
    and render the HTML beside it, both replaced only when every cell ran. Raises
    :class:`NotebookFailed` when a cell fails: the report stays as it was and the partial
    notebook is kept as ``<notebook>.failed.ipynb`` (rendered too)."""
    import papermill  # heavy and optional: see ensure_kernel

    src = notebook_path(notebook)
    folder = Path(out_root) if out_root else paths.outputs_root() / run_name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write reports into {folder} ({exc.strerror or exc}); fix it, or "
                        "move the outputs folder with BACKPACK_NB_OUTPUTS") from None
    report, failed = folder / src.name, folder / f"{src.stem}{FAILED}.ipynb"
    # papermill saves the notebook after every cell, so it writes into a file of its own (one
    # per process: two runs never share it) that becomes the report only once every cell ran.
    running = folder / f".{src.stem}.{os.getpid()}.running.ipynb"
    ensure_kernel(kernel)
    t0 = time.perf_counter()
    try:
        try:
            with _papermill_logging(log_output), _in_report():
                papermill.execute_notebook(
                    str(src), str(running), parameters=dict(parameters), kernel_name=kernel,
                    cwd=str(paths.project_root()), progress_bar=False, log_output=log_output)
            page = _publish(running, report, html, exclude_input)
        except (Exception, KeyboardInterrupt) as exc:  # a cell error, the kernel died, Ctrl-C
            if not running.exists():  # papermill stopped before writing anything
                raise
            interrupted = isinstance(exc, KeyboardInterrupt)  # Ctrl-C wants out now, unrendered
            try:
                page = _publish(running, failed, html and not interrupted, exclude_input)
            except Exception:  # the error itself matters more than its rendering
                page = None
                if running.exists():
                    os.replace(running, failed)
                    failed.with_suffix(".html").unlink(missing_ok=True)
            msg, user = _failure_message(exc, src.stem, report, failed, page)
            if interrupted:  # the last line says what is kept
                raise NotebookInterrupted(msg.splitlines()[-1]) from None
            raise NotebookFailed(msg, failed, user) from None
    finally:
        running.unlink(missing_ok=True)
        running.with_suffix(".html").unlink(missing_ok=True)
    # An earlier failure is history now: the folder shows the run that finished.
    failed.unlink(missing_ok=True)
    failed.with_suffix(".html").unlink(missing_ok=True)
    return NotebookRun(src.stem, report, page, time.perf_counter() - t0, dict(parameters))


@contextlib.contextmanager
def _in_report() -> Iterator[None]:
    """Tell the kernels started meanwhile that they run a report: their hints then name
    settings as this command takes them (``-p max_iters``; :mod:`backpack_nb.spelling`)."""
    before = os.environ.get(RUNNER_ENV)
    os.environ[RUNNER_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(RUNNER_ENV, None)
        else:
            os.environ[RUNNER_ENV] = before


def _publish(running: Path, target: Path, html: bool, exclude_input: bool) -> Path | None:
    """Move the executed notebook ``running`` to ``target`` and its page to ``target``.html,
    rendered first so that both change or neither; papermill's record names the final file.
    Without ``html``, an older page of ``target`` (which would not match it) is removed."""
    import nbformat  # heavy and optional: see ensure_kernel

    nb = nbformat.read(running, as_version=4)
    nb.metadata.setdefault("papermill", {})["output_path"] = str(target)
    nbformat.write(nb, running)
    page, tmp_page = target.with_suffix(".html"), running.with_suffix(".html")
    if html:
        render_html(running, tmp_page, exclude_input=exclude_input)
    os.replace(running, target)
    if not html:
        page.unlink(missing_ok=True)
        return None
    os.replace(tmp_page, page)
    return page


def _print_run(r: NotebookRun) -> None:
    print(f"{r.notebook}: {r.seconds:.1f} s -> {r.ipynb}" + (f"\n{'':>{len(r.notebook) + 2}}{r.html}" if r.html else ""),
          flush=True)


def run(notebook: str, params_file: str | None, overrides: Mapping[str, Any], *,
        run_name: str | None = None, html: bool = True, log_output: bool = False) -> NotebookRun:
    """The ``run`` subcommand: one notebook."""
    injected, cfg = resolve_parameters([notebook], params_file, overrides)
    # Without a params file the config's run_name is only a default: name the folder after
    # the run the notebook looks at.
    name = (run_name if run_name is not None else injected.get("run_name") or (cfg.run_name if params_file else None)
            or (Path(str(injected["out_dir"])).name if injected.get("out_dir") else None)
            or str(notebook_parameters(notebook).get("run_name") or "").strip("'\"") or "notebooks")
    name = str(name)
    if problem := _folder_name_problem(name):
        raise UserError(f"run name {name!r}: {problem}")
    return run_notebook(notebook, injected, name, html=html, log_output=log_output)


PIPELINE = ("01_train", "03_evaluate", "04_senses")


def pipeline(params_file: str, overrides: Mapping[str, Any], *, html: bool = True,
             log_output: bool = False, verbose: bool = True,
             command: str | None = None) -> list[NotebookRun]:
    """Train (resuming when ``out_dir`` holds a checkpoint) -> evaluate -> senses (Backpack
    only) for the model of ``params_file``; the batch run of one model. ``command``: the
    command line that started it, which its notes extend (default: this pipeline's own)."""
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
    if _finished(out_dir, cfg.max_iters) and finished_report(report):
        # Re-running the pipeline of a finished run (to refresh its evaluation) must not
        # replace its training report with one that says "nothing to train".
        steps.remove("01_train")
        if verbose:
            # The note is read in `make demo`, `compare` and `pipeline` alike: a whole command
            # works in each of them.
            again = command or command_line(
                "pipeline", params_file, {k: v for k, v in overrides.items() if k != "max_iters"})
            print(f"{out_dir} already reached max_iters {cfg.max_iters}: keeping {report}; to "
                  f"train further, raise it: `{again} -p max_iters N` (N > {cfg.max_iters})",
                  flush=True)
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


def command_line(subcommand: str, params_file: str, overrides: Mapping[str, Any],
                 *extra: str) -> str:
    """The runner's command line for ``subcommand`` with ``overrides`` as ``-p`` options,
    quoted for a shell (for notes and the comparison report's "reproduce")."""
    words = ["python -m backpack_nb.reports", subcommand, "-f", shlex.quote(str(params_file))]
    for key, value in overrides.items():
        words += ["-p", key, shlex.quote(value if isinstance(value, str) else json.dumps(value))]
    return " ".join([*words, *extra])


def compare(params_file: str, overrides: Mapping[str, Any], *, seeds: Sequence[int] = (),
            html: bool = True, log_output: bool = False, docs_copy: str | None = None,
            verbose: bool = True) -> NotebookRun:
    """Train and evaluate a Backpack and a Transformer with the settings of ``params_file``
    (only ``model_type``, ``run_name`` and ``out_dir`` differ; one pair per seed), then render
    ``05_compare`` comparing them into ``outputs/<run_name>/``."""
    injected, cfg = resolve_parameters(PIPELINE + ("05_compare",), params_file, overrides)
    if docs_copy:  # before the hours of training, not after
        _check_page_target(paths.resolve_in_root(docs_copy), "--docs")
    seeds = list(seeds) or [cfg.seed]
    seeds_flag = [f"--seeds {','.join(map(str, seeds))}"] if len(seeds) > 1 else []
    again = command_line("compare", params_file,
                         {k: v for k, v in overrides.items() if k != "max_iters"}, *seeds_flag)
    runs: dict[str, str] = {}
    for seed in seeds:
        for model_type in ("backpack", "transformer"):
            suffix = f"{model_type}" + (f"_s{seed}" if len(seeds) > 1 else "")
            run_name, out_dir = f"{cfg.run_name}_{suffix}", f"{cfg.out_dir}/{suffix}"
            child_overrides = {**overrides, "model_type": model_type, "run_name": run_name,
                               "out_dir": out_dir, "seed": seed}
            if verbose:
                print(f"== {run_name} ({model_type}, seed {seed}) -> {out_dir}", flush=True)
            pipeline(params_file, child_overrides, html=html, log_output=log_output,
                     verbose=verbose, command=again)
            runs[f"{model_type}" + (f" s{seed}" if len(seeds) > 1 else "")] = out_dir
    command = command_line("compare", params_file, overrides, *seeds_flag)
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


def _folder_name_problem(name: str) -> str | None:
    if not name.strip() or Path(name).name != name or name in (".", ".."):
        return "give a folder name for outputs/ (not empty, no '/', not '..')"
    return None


def _check_page_target(target: Path, flag: str) -> None:
    if target.is_dir():
        raise UserError(f"{flag} {target} is a folder; give the .html file to write")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{flag} {target}: cannot create {target.parent} "
                        f"({exc.strerror or exc}); choose another place") from None


# --- command line --------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that answers train.py's ``--max_iters 100`` with ``-p max_iters 100``."""

    def error(self, message: str):
        given = (re.findall(r"unrecognized arguments: (.*)", message) or [""])[0]
        if runner_spelling(given) != given:
            message += f"; training settings are given as -p KEY VALUE here: {runner_spelling(given)}"
        super().error(message)


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m backpack_nb.reports",
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
    if getattr(args, "run_name", None) is not None and (
            problem := _folder_name_problem(args.run_name)):
        # before the spelling below, which would turn the runner's own --run_name into -p
        exit_on_user_error(UserError(f"--run_name {args.run_name!r}: {problem}"))
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
            twice = sorted({x for x in seeds if seeds.count(x) > 1})
            if twice or any(x < 0 for x in seeds):
                raise UserError(f"--seeds {args.seeds}: each seed >= 0 and listed once (one "
                                "Backpack/Transformer pair each)")
            r = compare(args.params_file, overrides, seeds=seeds, html=args.html,
                        log_output=args.log_output, docs_copy=args.docs)
            print(f"report: {r.html or r.ipynb}")
    except UserError as exc:  # the params file's validation names train.py's flags
        exit_on_user_error(UserError(runner_spelling(str(exc))))
    except NotebookFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if exc.user_error else 1
    except NotebookInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
