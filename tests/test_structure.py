"""The shape of the house: no import cycles inside backpack_nb, imports at the top of modules
(except the optional heavy ones, each saying so), no library module over 600 lines, and
nothing in the library importing the benchmarks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "backpack_nb"
MAX_LINES = 600
# Imports a function may make: optional heavy dependencies kept out of `import backpack_nb`.
LAZY_OK = ("matplotlib", "ipywidgets", "papermill", "nbformat", "nbconvert", "nbclient",
           "jupyter_client", "ipykernel", "IPython", "huggingface_hub", "safetensors",
           "backpack_nb.plots", "backpack_nb.widgets", "wandb", "torch.utils.tensorboard")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Absolute names an import statement refers to (the module and module.name for each
    imported name, since `from pkg import sub` imports a submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{a.name}" for a in node.names]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _imported(node, name, path.name == "__init__.py"):
                    if target in modules and target != name:
                        deps.add(target)
        # a package's __init__ re-exporting its submodules is not a cycle with them
        graph[name] = {d for d in deps if not d.startswith(name + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_cycle_finder_finds_a_cycle():
    """The check below can fail: a two-module and a three-module cycle are found, a chain
    is not."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, ("modules that import each other (directly or through others): "
                        + "; ".join(" <-> ".join(c) for c in cycles))


def test_imports_at_module_top():
    """An import inside a function hides a dependency (and, often, a cycle). Allowed only for
    the optional heavy packages of LAZY_OK, with a comment on that line or the one above."""
    problems = []
    for name, path in _modules().items():
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                targets = _imported(node, name, path.name == "__init__.py")
                # `import x` / `from x import y` name x; `from . import plots` names .plots
                named = targets[1:] if isinstance(node, ast.ImportFrom) else targets
                lazy_ok = (targets[0].split(".")[0] in LAZY_OK
                           or all(t.startswith(LAZY_OK) for t in named))
                commented = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
                if not (lazy_ok and commented):
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not problems, "imports inside functions:\n" + "\n".join(problems)


def test_no_library_module_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (each holds two ideas; split it): {long}"


def test_library_does_not_import_benchmarks():
    offenders = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks"):
                offenders.append(str(path.relative_to(ROOT)))
            elif isinstance(node, ast.Import) and any(a.name.startswith("benchmarks") for a in node.names):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders


_IMPORT_EACH_FRESH = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "backpack_nb" or m.startswith("backpack_nb.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc().strip().splitlines()[-1])
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow  # imports every module in a fresh interpreter
def test_every_module_imports_first():
    """Each module imports when it is the first of the package to be imported (an import
    order that only works because another module came first is a hidden cycle). One
    interpreter, the package forgotten before each module: torch loads once."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _IMPORT_EACH_FRESH, *sorted(_modules())],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
