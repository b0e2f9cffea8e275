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

What a training cell would refuse (a new run in a folder that holds one, a resume without a
checkpoint, a run inside another run's folder) is refused before a kernel starts. Running one
notebook (the hidden running file, the kept failure, a line per cell, Ctrl-C) is
:mod:`backpack_nb.notebook_run`. A failing cell makes the command fail (exit 1; 2 when the
cell raised a :class:`UserError`) with the cell's error shown.

The notebooks stay thin: what they show is computed by :mod:`backpack_nb.results` (run
folders, tables, the live loss plot) and :mod:`backpack_nb.comparison` (paired differences,
written findings).
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import paths
from .checkpoint import RUN_FILES, existing_checkpoints, require_checkpoint
from .errors import UserError, command, exit_interrupted
from .kernel import KERNEL_NAME, ensure_kernel
from .paramfile import parse_params_text
from .notebook_run import (ALIASES, FAILED, NotebookFailed, NotebookInterrupted, NotebookRun,
                           available_notebooks, finished_report, notebook_defaults,
                           notebook_parameters, notebook_path, notebooks_dir, render_html,
                           run_notebook)
from .dataset import require_typed_dataset
from .paramfile import params_path, read_params_file
from .params import TrainConfig, load_params
from .results import config_from_notebook
from .runfiles import read_json
from .spelling import runner_spelling, setting

__all__ = ["ALIASES", "FAILED", "KERNEL_NAME", "NotebookFailed", "NotebookInterrupted",
           "NotebookRun", "available_notebooks", "check_training", "command_line", "compare",
           "enclosing_run", "ensure_kernel", "finished_report", "main", "notebook_parameters",
           "notebook_path", "notebooks_dir", "parse_value", "pipeline", "render_html",
           "resolve_parameters", "run", "run_notebook"]


# --- parameters ----------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A ``-p`` value as YAML reads it: ``40`` -> 40, ``[a, b]`` -> list, ``null`` -> None;
    anything YAML cannot read stays text. Read as a params file is (no anchors or aliases, so no
    alias bomb is expanded); a value of several lines stays text, so a settings check sees its
    newline instead of YAML's folding of it into a space."""
    if "\n" in text or "\r" in text:
        return text
    try:
        value = parse_params_text(text, "-p value")
    except UserError:
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


# --- what a training cell would refuse, refused before a kernel starts ---------------------

# The notebooks that train, and the init_from each trains with (None: the config's own).
TRAINING = {"01_train": None, "02_resume": "resume"}


def check_training(notebook: str | Path, injected: Mapping[str, Any]) -> None:
    """Refuse now what the training cell of ``notebook`` would refuse after the kernel's
    start-up (seconds, and a failed report left behind): the notebook's own config, from
    its defaults and ``injected``, checked by :func:`check_run_folder`."""
    stem = notebook_path(notebook).stem
    if stem not in TRAINING:
        return
    cfg = config_from_notebook({**notebook_defaults(notebook), **injected})
    check_run_folder(cfg.replace(init_from=TRAINING[stem] or cfg.init_from))


def check_run_folder(cfg: TrainConfig) -> None:
    """The trainer's refusals that need only the folder: a resume without a checkpoint, a
    new run where one exists (without ``overwrite``), and a new run inside another run's
    folder."""
    out_dir = paths.resolve_in_root(cfg.out_dir)
    if cfg.init_from == "resume":
        require_checkpoint(out_dir)
        return
    existing = existing_checkpoints(out_dir)
    if existing and not cfg.overwrite:
        raise UserError(
            f"{out_dir} already holds a run ({', '.join(p.name for p in existing)}); "
            f"continue it with {setting('init_from', 'resume')}, pick another "
            f"{setting('out_dir')}, or pass {setting('overwrite', True)} to replace it")
    if not existing and (outer := enclosing_run(out_dir)) is not None:
        raise UserError(
            f"{setting('out_dir')} {out_dir} is inside the run folder {outer} (it holds "
            f"{_run_files(outer)}); a run never goes inside another run's folder: pick an "
            f"{setting('out_dir')} outside it")


def enclosing_run(out_dir: str | Path) -> Path | None:
    """The nearest folder above ``out_dir`` that holds a run's files (``ckpt.pt``,
    ``run.json``, ``training_log.json``, ...), or None."""
    for folder in Path(out_dir).absolute().parents:
        if _run_files(folder):
            return folder
    return None


def _run_files(folder: Path) -> str:
    return ", ".join(name for name in RUN_FILES if (folder / name).is_file())


# --- the commands --------------------------------------------------------------------------


def _print_run(r: NotebookRun) -> None:
    print(f"{r.notebook}: {r.seconds:.1f} s -> {r.ipynb}" + (f"\n{'':>{len(r.notebook) + 2}}{r.html}" if r.html else ""),
          flush=True)


def run(notebook: str, params_file: str | None, overrides: Mapping[str, Any], *,
        run_name: str | None = None, html: bool = True, log_output: bool = False,
        progress: bool = True) -> NotebookRun:
    """The ``run`` subcommand: one notebook."""
    injected, cfg = resolve_parameters([notebook], params_file, overrides)
    # Without a params file the config's run_name is only a default: name the folder after
    # the run the notebook looks at.
    name = (run_name if run_name is not None else injected.get("run_name") or (cfg.run_name if params_file else None)
            or (Path(str(injected["out_dir"])).name if injected.get("out_dir") else None)
            or str(notebook_defaults(notebook).get("run_name") or "") or "notebooks")
    name = str(name)
    if problem := _folder_name_problem(name):
        raise UserError(f"run name {name!r}: {problem}")
    check_training(notebook, injected)
    return run_notebook(notebook, injected, name, html=html, log_output=log_output,
                        progress=progress)


PIPELINE = ("01_train", "03_evaluate", "04_senses", "06_steering")


def pipeline(params_file: str, overrides: Mapping[str, Any], *, html: bool = True,
             log_output: bool = False, verbose: bool = True, progress: bool = True,
             command: str | None = None) -> list[NotebookRun]:
    """Train (resuming when ``out_dir`` holds a checkpoint) -> evaluate -> senses (Backpack
    only) -> steering (a Transformer gets its projection baseline) for the model of
    ``params_file``; the batch run of one model. ``command``: the
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
    else:
        check_training("01_train", injected)
    done = []
    for nb in steps:
        r = run_notebook(nb, injected, cfg.run_name, html=html, log_output=log_output,
                         progress=progress)
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
            verbose: bool = True, progress: bool = True) -> NotebookRun:
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
    pairs = [(seed, model_type, f"{model_type}" + (f"_s{seed}" if len(seeds) > 1 else ""))
             for seed in seeds for model_type in ("backpack", "transformer")]
    _check_compare_folder(cfg, [suffix for _, _, suffix in pairs])
    runs: dict[str, str] = {}
    for seed, model_type, suffix in pairs:
        run_name, out_dir = f"{cfg.run_name}_{suffix}", f"{cfg.out_dir}/{suffix}"
        child_overrides = {**overrides, "model_type": model_type, "run_name": run_name,
                           "out_dir": out_dir, "seed": seed}
        if verbose:
            print(f"== {run_name} ({model_type}, seed {seed}) -> {out_dir}", flush=True)
        pipeline(params_file, child_overrides, html=html, log_output=log_output,
                 verbose=verbose, progress=progress, command=again)
        runs[f"{model_type}" + (f" s{seed}" if len(seeds) > 1 else "")] = out_dir
    command = command_line("compare", params_file, overrides, *seeds_flag)
    report_params = {"runs": runs, "title": f"Backpack vs Transformer: {cfg.run_name}",
                     "params_file": str(injected.get("params_file", "")), "reproduce": command}
    r = run_notebook("05_compare", report_params, cfg.run_name, html=html, exclude_input=True,
                     log_output=log_output, progress=progress)
    if verbose:
        _print_run(r)
    if docs_copy and r.html:
        target = paths.resolve_in_root(docs_copy)
        target.parent.mkdir(parents=True, exist_ok=True)
        render_html(r.ipynb, target, exclude_input=True, flag="--docs")
        if verbose:
            print(f"copied the report to {target}")
    return r


def _check_compare_folder(cfg: TrainConfig, suffixes: Sequence[str]) -> None:
    """``compare`` trains into ``<out_dir>/<model>[_s<seed>]``: refused before any training
    when ``out_dir`` is (or is inside) a run folder, where those runs would nest."""
    parent = paths.resolve_in_root(cfg.out_dir)
    if all(existing_checkpoints(parent / s) for s in suffixes):
        return  # finished or interrupted pairs from before: re-evaluated or resumed
    outer = parent if _run_files(parent) else enclosing_run(parent)
    if outer is not None:
        raise UserError(
            f"compare trains into {parent}/{suffixes[0]} and {parent}/{suffixes[1]}, but "
            f"{outer} is a run folder (it holds {_run_files(outer)}) and a run never goes "
            f"inside another run's folder; give the pair a folder of its own: -p out_dir "
            f"out/{cfg.run_name}_compare")


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


def parse_seeds(text: str) -> list[int]:
    """``--seeds 1337,2024`` -> [1337, 2024]; empty, repeated or negative seeds are refused."""
    words = [s.strip() for s in text.split(",")]
    if not any(words):
        raise UserError(f"--seeds {text!r}: no seed given; list them (--seeds 1337,2024), or "
                        "leave --seeds out to use the params file's seed")
    try:
        seeds = [int(s) for s in words if s]
    except ValueError:
        raise UserError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    twice = sorted({x for x in seeds if seeds.count(x) > 1})
    if twice or any(x < 0 for x in seeds):
        raise UserError(f"--seeds {text}: each seed >= 0 and listed once (one "
                        "Backpack/Transformer pair each)")
    return seeds


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
        p.add_argument("-q", "--quiet", action="store_true",
                       help="no line per cell while a notebook runs (the reports' paths and errors only)")

    r = sub.add_parser("run", help="execute one notebook into outputs/<run_name>/")
    r.add_argument("notebook", help="01_train, 02_resume, 03_evaluate, 04_senses, 05_compare, 06_steering (or train, resume, ...)")
    r.add_argument("--run_name", default=None, help="outputs folder name (default: the parameters' run_name)")
    common(r, need_file=False)
    p = sub.add_parser("pipeline", help="train (resume if possible) -> evaluate -> senses for one model")
    common(p, need_file=True)
    c = sub.add_parser("compare", help="train a Backpack and a Transformer with the same settings and compare them")
    common(c, need_file=True)
    c.add_argument("--seeds", default=None, help="comma-separated seeds (one Backpack/Transformer pair each); default: the file's seed")
    c.add_argument("--docs", default=None, help="also write the report's HTML here (e.g. docs/comparison_cpu.html)")
    k = sub.add_parser("kernel", help=f"install the Jupyter kernel {KERNEL_NAME!r} into this environment")
    k.add_argument("--name", default=KERNEL_NAME)
    rend = sub.add_parser("render", help="render an executed notebook as HTML")
    rend.add_argument("ipynb")
    rend.add_argument("--out", default=None)
    rend.add_argument("--no-input", action="store_true", help="leave the code cells out")
    return ap


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "run_name", None) is not None and (
            problem := _folder_name_problem(args.run_name)):
        # before the spelling below, which would turn the runner's own --run_name into -p
        raise UserError(f"--run_name {args.run_name!r}: {problem}")
    try:
        return _dispatch(args)
    except UserError as exc:  # the params file's validation names train.py's flags
        raise UserError(runner_spelling(str(exc))) from None
    except NotebookFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if exc.user_error else 1
    except NotebookInterrupted as exc:  # one line: what was kept
        exit_interrupted(str(exc))


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "kernel":
        print(f"kernel {ensure_kernel(args.name, quiet=False)!r} is installed")
        return 0
    if args.command == "render":
        print(render_html(args.ipynb, args.out, exclude_input=args.no_input))
        return 0
    overrides = {key: parse_value(value) for key, value in args.parameters}
    shared = {"html": args.html, "log_output": args.log_output, "progress": not args.quiet}
    if args.command == "run":
        _print_run(run(args.notebook, args.params_file, overrides, run_name=args.run_name, **shared))
    elif args.command == "pipeline":
        done = pipeline(args.params_file, overrides, **shared)
        print("reports:\n" + "\n".join(f"  {r.html or r.ipynb}" for r in done))
    elif args.command == "compare":
        seeds = parse_seeds(args.seeds) if args.seeds is not None else []
        r = compare(args.params_file, overrides, seeds=seeds, docs_copy=args.docs, **shared)
        print(f"report: {r.html or r.ipynb}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
