"""The docs cannot go stale without a test failing.

Every ``python -m MODULE ...`` and ``python SCRIPT.py ...`` command quoted in README.md and
docs/*.md (code blocks and inline code; also ``.venv/bin/python``, ``python3``, any
``.../bin/python``) runs with ``--help`` and exits 0, once per module, script and subcommand.
Every relative link points to a file that exists (and an anchor into a page to one of its
headings); every repository path and ``backpack_nb.``/``benchmarks.`` name quoted in inline
code exists; every import and module attribute in the Python examples resolves; the seed's
``train.py`` command lines parse into a valid configuration. A failure names the page and line.

The ``--help`` runs happen in one child interpreter (torch imported once), each command
in-process there through runpy, from the project root as the docs say to run them.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 12_000
SLOW_FIXTURES = {"help_results"}  # runs every quoted command (conftest marks its tests slow)
HELP_TIMEOUT_S = 300  # all the --help runs together; they take seconds


# --- reading the pages -----------------------------------------------------------------------


@dataclass(frozen=True)
class Snippet:
    """A piece of code quoted in a page: one logical line of a fenced block (backslash
    continuations joined), a whole fenced block (``block=True``), or one inline code span."""

    page: Path
    line: int
    text: str
    lang: str  # the fence's language ("bash", "python", ""), or "inline"

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _fenced_blocks(page: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(first line number, language, lines) of each fenced code block."""
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i + 1
        i += 1
        body: list[str] = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        yield start + 1, lang, body
        i += 1


def _prose(page: Path) -> str:
    """The page with every fenced block blanked out (line numbers kept)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blank = set()
    for start, _lang, body in _fenced_blocks(page):
        blank.update(range(start - 2, start + len(body)))  # the fences and the body (0-based)
    return "\n".join("" if n in blank else line for n, line in enumerate(lines))


def snippets(page: Path) -> list[Snippet]:
    out: list[Snippet] = []
    for start, lang, body in _fenced_blocks(page):
        n = 0
        while n < len(body):
            first, text = n, body[n]
            while text.rstrip().endswith("\\") and n + 1 < len(body):
                n += 1
                text = text.rstrip()[:-1] + " " + body[n].strip()
            out.append(Snippet(page, start + first, text, lang))
            n += 1
    prose = _prose(page)
    for m in re.finditer(r"(`+)(.+?)\1", prose, flags=re.S):
        out.append(Snippet(page, prose.count("\n", 0, m.start()) + 1,
                           " ".join(m.group(2).split()), "inline"))
    return out


def python_blocks(page: Path) -> list[Snippet]:
    return [Snippet(page, start, "\n".join(body), lang)
            for start, lang, body in _fenced_blocks(page) if lang in ("python", "py")]


# --- the commands ----------------------------------------------------------------------------

# An interpreter at the start of a command: python, python3, python3.11, .venv/bin/python, ...
_PYTHON = re.compile(r"(?:^|(?<=[\s;&|(]))(?:[\w.~$/-]*/)?python(?:3(?:\.\d+)?)?\s+(?P<rest>\S.*)$")
_MODULE = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")
_SCRIPT = re.compile(r"^[\w./~-]+\.py$")
_SUBCOMMAND = re.compile(r"^[a-z][a-z0-9_-]*$")


@dataclass(frozen=True)
class Command:
    kind: str  # "module" or "script"
    target: str  # the module name, or the script path relative to the project root
    sub: str | None  # the first bare-word argument (a subcommand), if any

    @property
    def argv(self) -> list[str]:
        return [*([self.sub] if self.sub else []), "--help"]

    @property
    def shown(self) -> str:
        head = f"python -m {self.target}" if self.kind == "module" else f"python {self.target}"
        return " ".join([head, *self.argv])


def _words(text: str) -> list[str]:
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in prose: good enough for the first words
        return text.split("#")[0].split()


def parse_command(text: str) -> tuple[Command, list[str]] | None:
    """The command a snippet quotes (and its arguments), or None when it quotes none."""
    m = _PYTHON.search(text)
    if not m:
        return None
    words = _words(m.group("rest"))
    if len(words) >= 2 and words[0] == "-m" and _MODULE.match(words[1]):
        kind, target, args = "module", words[1], words[2:]
    elif words and _SCRIPT.match(words[0]):
        kind, target, args = "script", words[0], words[1:]
    else:
        return None
    sub = args[0] if args and _SUBCOMMAND.match(args[0]) else None
    return Command(kind, target, sub), args


def quoted_commands() -> dict[Command, list[tuple[Snippet, list[str]]]]:
    found: dict[Command, list[tuple[Snippet, list[str]]]] = {}
    for page in DOCS:
        for snip in snippets(page):
            parsed = parse_command(snip.text)
            if parsed:
                found.setdefault(parsed[0], []).append((snip, parsed[1]))
    return found


COMMANDS = quoted_commands()

# Runs in the child: each job in-process, as `python -m X` / `python X.py` would from the root.
_RUNNER = textwrap.dedent(r"""
    import contextlib, io, json, os, runpy, sys, time, traceback, warnings
    warnings.simplefilter("ignore")  # runpy's "found in sys.modules" for a module run twice
    root = os.getcwd()
    jobs = json.loads(sys.stdin.read())
    for job in jobs:
        print(json.dumps({"id": job["id"], "started": True}), flush=True)
        buf, code, t0 = io.StringIO(), None, time.perf_counter()
        saved_argv, saved_path = sys.argv[:], sys.path[:]
        try:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                if job["kind"] == "module":
                    sys.path.insert(0, root)
                    sys.argv = [job["target"], *job["argv"]]
                    runpy.run_module(job["target"], run_name="__main__", alter_sys=True)
                else:
                    script = os.path.join(root, job["target"])
                    if not os.path.isfile(script):
                        raise FileNotFoundError(f"no such script: {job['target']}")
                    sys.path.insert(0, os.path.dirname(script))
                    sys.argv = [script, *job["argv"]]
                    runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                buf.write(str(exc.code) + "\n")
                code = 1
        except BaseException:
            buf.write(traceback.format_exc())
            code = "exception"
        finally:
            sys.argv[:], sys.path[:] = saved_argv, saved_path
        out = buf.getvalue()
        print(json.dumps({"id": job["id"], "code": code, "usage": "usage" in out.lower(),
                          "output": out[-4000:], "seconds": round(time.perf_counter() - t0, 2)}),
              flush=True)
""")


@pytest.fixture(scope="module")
def help_results() -> dict[str, dict]:
    """Run every quoted command with --help in one child interpreter: {shown: result}."""
    jobs = [{"id": c.shown, "kind": c.kind, "target": c.target, "argv": c.argv} for c in COMMANDS]
    proc = subprocess.Popen([sys.executable, "-c", _RUNNER], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = proc.communicate(json.dumps(jobs), timeout=HELP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    results: dict[str, dict] = {}
    running = None
    for line in stdout.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # something a command printed straight to the file descriptor
        if rec.get("started"):
            running = rec["id"]
        else:
            results[rec["id"]] = rec
            running = None
    if running is not None:  # the child died or hung inside this one
        results[running] = {"code": "killed", "output": f"timed out or crashed (after "
                            f"{HELP_TIMEOUT_S} s at most); child stderr:\n{stderr[-3000:]}"}
    for job in jobs:
        results.setdefault(job["id"], {"code": "not run", "output": stderr[-3000:]})
    return results


@pytest.mark.parametrize("command", list(COMMANDS), ids=lambda c: c.shown)
def test_quoted_command_runs_with_help(command: Command, help_results: dict[str, dict]) -> None:
    result = help_results[command.shown]
    where = ", ".join(snip.where for snip, _ in COMMANDS[command])
    ok = result["code"] == 0 and result.get("usage", False)
    assert ok, (f"{where}: `{command.shown}` (quoted there) exited {result['code']!r}"
                f"{'' if result['code'] != 0 else ' without printing a usage'}:\n"
                f"{result['output'][-2000:]}")


def test_the_docs_quote_the_front_doors() -> None:
    """A sanity check of the parser: the commands every reader needs are found."""
    shown = {c.shown for c in COMMANDS}
    for expected in ("python train.py --help", "python evaluate.py --help",
                     "python -m backpack_nb.data prepare --help",
                     "python -m backpack_nb.reports pipeline --help"):
        assert expected in shown, f"{expected!r} not found among the quoted commands: {sorted(shown)}"


def test_quoted_train_commands_parse_into_a_valid_config() -> None:
    """The seed's train.py command lines (every complete one quoted) are accepted as written:
    the flags exist and the values validate (nothing is trained)."""
    from backpack_nb.errors import UserError
    from backpack_nb.params import config_from_argv

    checked, problems = 0, []
    for command, quotes in COMMANDS.items():
        if command.kind != "script" or Path(command.target).name != "train.py":
            continue
        for snip, args in quotes:
            if not args or any("..." in a or "<" in a or a.startswith("$") for a in args):
                continue  # an abbreviated or placeholder command line
            try:
                config_from_argv(args)
            except (UserError, SystemExit) as exc:
                problems.append(f"{snip.where}: `python train.py {' '.join(args)}`: {exc}")
            checked += 1
    assert checked, "no complete train.py command found in the docs"
    assert not problems, "\n".join(problems)


# --- links, paths and names ------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip())
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(page).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_relative_links_point_to_existing_files() -> None:
    broken = []
    for page in DOCS:
        prose = _prose(page)
        for m in re.finditer(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I):  # http:, mailto:, ...
                continue
            line = prose.count("\n", 0, m.start()) + 1
            where = f"{page.relative_to(ROOT)}:{line}"
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{where}: ({target}) -> {dest} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{where}: ({target}) -> no heading #{anchor} in {dest.name}")
    assert not broken, "\n".join(broken)


_REPO_PATH = re.compile(r"^(?:backpack_nb|benchmarks|tests|params|notebooks|docs|\.ci)/[\w./-]*$")
_DOTTED = re.compile(r"^((?:backpack_nb|benchmarks)(?:\.\w+)+)(?:\(.*\))?$")


def _resolve(dotted: str) -> str | None:
    """None when ``a.b.c`` names an importable module or an attribute of one, else why not."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not name.startswith(exc.name) and exc.name != name:
                return f"importing {name} fails: {exc}"
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return f"{name} has no {'.'.join(parts[cut:])}"
            obj = getattr(obj, attr)
        return None
    return f"no module {parts[0]}"


def test_quoted_paths_and_names_exist() -> None:
    """Inline code such as `backpack_nb/models/mixing.py` or `backpack_nb.optim.make_optimizer`
    must name something that is there."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # benchmarks/ is imported from the root, as the docs run it
    missing = []
    for page in DOCS:
        for snip in snippets(page):
            if snip.lang != "inline":
                continue
            text = snip.text.strip()
            placeholder = re.search(r"\b[A-Z]{2,}\b", text)  # params/NAME.yaml
            if _REPO_PATH.match(text) and not placeholder and not (ROOT / text).exists():
                missing.append(f"{snip.where}: `{text}` does not exist")
            m = _DOTTED.match(text)
            if m and (why := _resolve(m.group(1))):
                missing.append(f"{snip.where}: `{text}`: {why}")
    assert not missing, "\n".join(missing)


def test_python_examples_import_what_exists() -> None:
    """Every import of the docs' Python examples resolves, and every ``module.name`` they use
    of an imported module exists (nothing is run)."""
    problems = []
    for page in DOCS:
        for block in python_blocks(page):
            try:
                tree = ast.parse(block.text)
            except SyntaxError as exc:
                problems.append(f"{block.where}: not valid Python: {exc}")
                continue
            modules: dict[str, str] = {}  # local name -> module it is bound to
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        modules[alias.asname or alias.name.split(".")[0]] = (
                            alias.name if alias.asname else alias.name.split(".")[0])
                elif isinstance(node, ast.ImportFrom) and node.module:
                    for alias in node.names:
                        name = f"{node.module}.{alias.name}"
                        if why := _resolve(name):
                            problems.append(f"{block.where}: from {node.module} import {alias.name}: {why}")
                        elif isinstance(sys.modules.get(name), type(sys)):
                            modules[alias.asname or alias.name] = name
            for node in ast.walk(tree):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                        and node.value.id in modules):
                    name = f"{modules[node.value.id]}.{node.attr}"
                    if why := _resolve(name):
                        problems.append(f"{block.where}: {node.value.id}.{node.attr}: {why}")
    assert not problems, "\n".join(problems)


# --- the README ------------------------------------------------------------------------------


def test_readme_is_short_and_starts_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text) <= README_LIMIT, f"README.md is {len(text):,} characters (at most {README_LIMIT:,})"
    first_block = next(_fenced_blocks(ROOT / "README.md"))
    commands = [line.split("#")[0].strip() for line in first_block[2] if line.strip()]
    assert commands[:2] == ["make demo", "make test"], (
        f"README.md:{first_block[0]}: the first code block should start with `make demo` and "
        f"`make test`, not {commands[:2]}")


def test_readme_layout_names_every_library_module() -> None:
    """The README's layout table names every module of backpack_nb/ (as `path/name.py`, or by
    its name in backticks on its package's row), so a new module cannot go unmentioned."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"^## Layout\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert m, "README.md has no '## Layout' section"
    layout = m.group(1)
    quoted = " ".join(re.findall(r"`([^`]*)`", layout))
    missing = []
    for path in sorted((ROOT / "backpack_nb").rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        rel = path.relative_to(ROOT).as_posix()
        if rel not in quoted and not re.search(rf"(?<![\w/.]){re.escape(path.stem)}(?![\w/])", quoted):
            missing.append(rel)
    assert not missing, f"README.md's layout table does not name: {', '.join(missing)}"
