"""Running one notebook into a report: papermill into a hidden file, published whole.

:func:`run_notebook` executes ``notebooks/NAME.ipynb`` into ``<outputs>/<run_name>/NAME.ipynb``
and renders ``NAME.html`` beside it; both are replaced only when every cell ran. papermill saves
the notebook after every cell, so it writes into a file of its own
(``.NAME.<pid>.running.ipynb``) that becomes the report at the end. A failing cell keeps the
partial notebook as ``NAME.failed.ipynb`` (and its page); the report stays as it was.

While it runs, one line per code cell says what the kernel is doing (``progress=False``: none).
Ctrl-C is passed on to the kernel, so the cell stops the way it would at a terminal (training
saves a checkpoint), and no later cell starts; a third Ctrl-C kills the kernel. Leftovers of a
runner that died (SIGKILL, power cut) are removed by the next run of the same notebook into the
same folder, once their process is gone. :mod:`backpack_nb.reports` is the command line.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import errno
import functools
import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from . import paths
from .errors import UserError
from .kernel import KERNEL_NAME, ensure_kernel
from .runfiles import atomic_write, pid_alive, write_error
from .spelling import RUNNER_ENV, runner_spelling

# Short names accepted wherever a notebook is named.
ALIASES = {"train": "01_train", "resume": "02_resume", "evaluate": "03_evaluate",
           "senses": "04_senses", "compare": "05_compare", "steering": "06_steering"}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
FAILED = ".failed"  # 01_train.failed.ipynb / .html: the notebook of the last run that failed
ENGINE = "backpack-nb"  # the papermill engine registered by _engine()
# Write failures that mean "this disk or folder takes no reports", not a broken notebook.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


# --- notebooks -------------------------------------------------------------------------------


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
    """The names and defaults of a notebook's ``parameters`` cell, as source text."""
    import papermill  # heavy and optional: see ensure_kernel

    info = papermill.inspect_notebook(str(notebook_path(notebook)))
    return {k: v.get("default") for k, v in info.items()}


def notebook_defaults(notebook: str | Path) -> dict[str, Any]:
    """The ``parameters`` cell's defaults as values (``"tiny_backpack"``, ``None``, ``[...]``);
    one that is not a literal is left out."""
    values = {}
    for name, source in notebook_parameters(notebook).items():
        with contextlib.suppress(ValueError, SyntaxError, TypeError):
            values[name] = ast.literal_eval(source)
    return values


# --- results -------------------------------------------------------------------------------


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


# --- pages ---------------------------------------------------------------------------------


def render_html(ipynb: str | Path, out: str | Path | None = None, *,
                exclude_input: bool = False, template: str = "lab",
                flag: str | None = "--out") -> Path:
    """``ipynb`` as a standalone HTML page (figures embedded as data URIs), written whole or
    not at all (``flag``: the option that chose ``out``, named when it cannot be written)."""
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
        raise UserError(f"{flag or '--out'} {target} is a folder; give the .html file to write "
                        f"(e.g. {target / ipynb.with_suffix('.html').name})")
    page = exporter.from_notebook_node(nb)[0].encode("utf-8")
    # a browser or a bucket sync never reads half a page; a failed write leaves the old one
    atomic_write(target, lambda f: f.write(page), flag=flag)
    return target


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


def reports_folder_error(target: Path, exc: OSError) -> str:
    """The message for a report that cannot be written: what failed, that nothing changed,
    the fix, and the other way out (the reports' root, ``BACKPACK_NB_OUTPUTS``)."""
    return write_error(target, exc, flag="BACKPACK_NB_OUTPUTS folder")


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


# --- running -------------------------------------------------------------------------------


def run_notebook(notebook: str | Path, parameters: Mapping[str, Any], run_name: str, *,
                 out_root: str | Path | None = None, kernel: str = KERNEL_NAME,
                 html: bool = True, exclude_input: bool = False,
                 log_output: bool = False, progress: bool = True) -> NotebookRun:
    """Execute ``notebook`` with ``parameters`` into ``<outputs>/<run_name>/<notebook>.ipynb``
    and render the HTML beside it, both replaced only when every cell ran. Raises
    :class:`NotebookFailed` when a cell fails: the report stays as it was and the partial
    notebook is kept as ``<notebook>.failed.ipynb`` (rendered too). ``progress``: a line on
    stderr as the kernel starts and as each code cell starts."""
    import papermill  # heavy and optional: see ensure_kernel

    src = notebook_path(notebook)
    folder = Path(out_root) if out_root else paths.outputs_root() / run_name
    report, failed = folder / src.name, folder / f"{src.stem}{FAILED}.ipynb"
    _prepare_folder(folder, report)
    remove_dead_leftovers(folder, src.stem)
    running = folder / f".{src.stem}.{os.getpid()}.running.ipynb"
    say = _progress_line(src.stem) if progress and not log_output else None
    ensure_kernel(kernel)
    if say:
        say(f"starting the kernel {kernel}")
    t0 = time.perf_counter()
    try:
        try:
            with _papermill_logging(log_output), _in_report():
                papermill.execute_notebook(
                    str(src), str(running), parameters=dict(parameters), kernel_name=kernel,
                    cwd=str(paths.project_root()), progress_bar=False, log_output=log_output,
                    engine_name=_engine(), announce=say)
            page = _publish(running, report, html, exclude_input)
        except OSError as exc:
            if exc.errno not in _WRITE_ERRNOS:
                raise
            raise UserError(reports_folder_error(report, exc)) from None  # finally cleans up
        except UserError:  # every cell ran but the page could not be written: the report stays
            raise
        except (Exception, KeyboardInterrupt) as exc:  # a cell error, the kernel died, Ctrl-C
            if not running.exists():  # papermill stopped before writing anything
                raise
            interrupted = isinstance(exc, KeyboardInterrupt)  # Ctrl-C wants out now, unrendered
            page = _keep_failed(running, failed, html and not interrupted, exclude_input)
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


def _prepare_folder(folder: Path, report: Path) -> None:
    """Create the reports folder and make sure a file can be written there, before a kernel
    starts: a read-only or full disk is one message, not a traceback after the first cell."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{report.stem}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        blocker = next((p for p in (folder, *folder.parents) if p.exists()), folder)
        if not blocker.is_dir():  # a file where a folder must be
            raise UserError(f"cannot write reports into {folder}: {blocker} is a file, not a "
                            "folder; move it, or set BACKPACK_NB_OUTPUTS to put the reports in "
                            "another folder") from None
        raise UserError(reports_folder_error(report, exc)) from None


_LEFTOVER = r"^\.\.?{stem}\.(\d+)\.running\.(?:ipynb|html)(?:\..+\.tmp)?$"


def remove_dead_leftovers(folder: Path, stem: str) -> list[Path]:
    """Remove what a run of notebook ``stem`` into ``folder`` left behind when its process
    died (``.01_train.<pid>.running.ipynb``, its page and their temporary files). A file of a
    process that is still alive (another run right now) is left alone. Returns the removed."""
    pattern = re.compile(_LEFTOVER.format(stem=re.escape(stem)))
    removed = []
    for path in folder.glob(".*"):
        m = pattern.match(path.name)
        if m and path.is_file() and not pid_alive(int(m.group(1))):
            with contextlib.suppress(FileNotFoundError):  # another run removed it first
                path.unlink()
                removed.append(path)
    return removed


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
        render_html(running, tmp_page, exclude_input=exclude_input, flag=None)
    os.replace(running, target)
    if not html:
        page.unlink(missing_ok=True)
        return None
    os.replace(tmp_page, page)
    return page


def _keep_failed(running: Path, failed: Path, html: bool, exclude_input: bool) -> Path | None:
    """The partial notebook as ``failed`` (rendered when ``html``); returns its page."""
    try:
        return _publish(running, failed, html, exclude_input)
    except Exception:  # the error itself matters more than its rendering
        with contextlib.suppress(OSError):  # a full disk: the error message still comes
            if running.exists():
                os.replace(running, failed)
            failed.with_suffix(".html").unlink(missing_ok=True)
        return None


def _progress_line(stem: str) -> Callable[[str], None]:
    def say(text: str) -> None:
        print(f"{stem}: {text}", file=sys.stderr, flush=True)
    return say


def _cell_label(cell: Any) -> str:
    """A code cell in a few words: its first line of code, or what its parameters are."""
    tags = cell.get("metadata", {}).get("tags", [])
    if "injected-parameters" in tags:
        return "the parameters given"
    if "parameters" in tags:
        return "the notebook's default parameters"
    lines = [ln.strip() for ln in cell.get("source", "").splitlines()]
    code = [ln for ln in lines if ln and not ln.startswith("#")]
    first = code[0] if code else "(empty)"
    return first if len(first) <= 72 else first[:71] + "…"


@functools.cache
def _engine() -> str:
    """Register, once, the papermill engine that announces each cell and hands Ctrl-C to the
    kernel (papermill's own lets it kill the kernel mid-cell: the kernel then prints a zmq
    "Socket operation on non-socket" traceback and the cell never saves its work)."""
    # heavy and optional (see ensure_kernel): papermill's own engine and client, extended
    from nbclient.exceptions import CellExecutionError  # papermill's executor, as above
    from papermill.clientwrap import PapermillNotebookClient  # as above
    from papermill.engines import NBClientEngine, papermill_engines  # as above
    from papermill.log import logger as papermill_logger  # as above

    class Client(PapermillNotebookClient):
        announce: Callable[[str], None] | None = None
        interrupts = 0

        def papermill_execute_cells(self) -> None:
            """papermill's loop over the cells, with a line per code cell and Ctrl-C
            forwarded: the running cell stops as it would at a terminal, no later cell starts."""
            cells = self.nb.cells
            code = [i for i, c in enumerate(cells) if c.cell_type == "code"]
            main = threading.current_thread() is threading.main_thread()
            previous = signal.signal(signal.SIGINT, self._on_sigint) if main else None
            try:
                for index, cell in enumerate(cells):
                    if self.interrupts:
                        break
                    if self.announce and cell.cell_type == "code":
                        self.announce(f"cell {code.index(index) + 1}/{len(code)}: {_cell_label(cell)}")
                    try:
                        self.nb_man.cell_start(cell, index)
                        self.execute_cell(cell, index)
                    except CellExecutionError as ex:
                        self.nb_man.cell_exception(self.nb.cells[index], cell_index=index, exception=ex)
                        break
                    finally:
                        self.nb_man.cell_complete(self.nb.cells[index], cell_index=index)
            finally:
                if main:
                    signal.signal(signal.SIGINT, previous)
            if self.interrupts:
                raise KeyboardInterrupt  # the kernel is idle: closing it prints nothing

        def _on_sigint(self, signum: int, frame: Any) -> None:
            self.interrupts += 1
            if self.interrupts < 3:  # a first stops, a second aborts, as at a terminal
                self._signal_kernel(signal.SIGINT)
                return
            self._signal_kernel(signal.SIGKILL)  # the cell ignores Ctrl-C: stop waiting
            raise KeyboardInterrupt

        def _signal_kernel(self, signum: int) -> None:
            # The kernel runs in a process group of its own, out of reach of the terminal's
            # Ctrl-C; jupyter_client's provisioner signals that group (the kernel and its
            # children).
            provisioner = getattr(self.km, "provisioner", None)
            pgid = getattr(provisioner, "pgid", None)
            process = getattr(provisioner, "process", None)
            with contextlib.suppress(OSError):
                if pgid:
                    os.killpg(pgid, signum)
                elif process is not None:
                    process.send_signal(signum)

    class Engine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, log_output=False,
                                     stdout_file=None, stderr_file=None, start_timeout=60,
                                     execution_timeout=None, announce=None, **kwargs):
            kwargs.pop("input_path", None)
            kwargs.pop("timeout", None)
            kwargs.pop("startup_timeout", None)
            client = Client(nb_man, timeout=execution_timeout, startup_timeout=start_timeout,
                            kernel_name=kernel_name, log=papermill_logger, log_output=log_output,
                            stdout_file=stdout_file, stderr_file=stderr_file, **kwargs)
            client.announce = announce
            return client.execute()

    papermill_engines.register(ENGINE, Engine)
    return ENGINE
