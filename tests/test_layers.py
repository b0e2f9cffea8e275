"""The layers of docs/layers.md, enforced: every import inside backpack_nb goes to the
importer's own group or to one its row names; every module belongs to a group; the
configuration imports neither torch nor tiktoken."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT
from test_structure import _graph

TABLE = ROOT / "docs" / "layers.md"


def _table() -> tuple[dict[str, str], dict[str, set[str]]]:
    """(module prefix -> group, group -> the groups it may import) from docs/layers.md."""
    groups: dict[str, str] = {}
    allowed: dict[str, set[str]] = {}
    rows = [l for l in TABLE.read_text(encoding="utf-8").splitlines() if l.startswith("| ")]
    for row in rows[1:]:  # the header
        group, modules, may = (c.strip() for c in row.strip("|").split("|"))
        for name in re.findall(r"`([\w.]+)`", modules):
            groups[name if name == "backpack_nb" else f"backpack_nb.{name}"] = group
        allowed[group] = {g.strip() for g in may.split(",")}
    every = set(allowed)
    return groups, {g: every if may == {"every group"} else may for g, may in allowed.items()}


def _group(module: str, groups: dict[str, str]) -> str | None:
    # the package itself stands for its __init__ only, not for every module under it
    matches = [p for p in groups
               if module == p or (p != "backpack_nb" and module.startswith(p + "."))]
    return groups[max(matches, key=len)] if matches else None


def _violations(graph: dict[str, set[str]], groups: dict[str, str],
                allowed: dict[str, set[str]]) -> list[str]:
    problems = []
    for module in sorted(graph):
        group = _group(module, groups)
        if group is None:
            problems.append(f"{module} is in no group of docs/layers.md: add it to a row")
            continue
        for dep in sorted(graph[module]):
            dep_group = _group(dep, groups)
            if dep_group is not None and dep_group not in allowed[group]:
                problems.append(f"{module} ({group}) imports {dep} ({dep_group})")
    return problems


def test_the_table_is_read():
    groups, allowed = _table()
    assert _group("backpack_nb.params", groups) == "base"
    assert _group("backpack_nb.hub.load", groups) == "hub"
    assert _group("backpack_nb.hub.__main__", groups) == "doors"
    assert allowed["models"] == {"base", "models"} and "hub" in allowed["doors"]


def test_the_check_finds_an_upward_import():
    """The check can fail: a configuration that imports the models, a checkpoint that imports
    the hub and a module no row names are each reported."""
    groups, allowed = _table()
    graph = {"backpack_nb.params": {"backpack_nb.models.gpt"},
             "backpack_nb.checkpoint": {"backpack_nb.hub.load", "backpack_nb.models"},
             "backpack_nb.newthing": set()}
    assert _violations(graph, groups, allowed) == [
        "backpack_nb.checkpoint (checkpoint) imports backpack_nb.hub.load (hub)",
        "backpack_nb.newthing is in no group of docs/layers.md: add it to a row",
        "backpack_nb.params (base) imports backpack_nb.models.gpt (models)"]


def test_every_import_keeps_to_the_layers():
    groups, allowed = _table()
    problems = _violations(_graph(), groups, allowed)
    assert not problems, "imports against docs/layers.md:\n" + "\n".join(problems)


def test_the_configuration_imports_no_torch():
    """In a fresh interpreter: the configuration and the model's shape load neither torch nor
    tiktoken, and the model config does not run models/__init__ (which builds on torch)."""
    code = ("import sys, backpack_nb.params, backpack_nb.model_config; "
            "print(sorted(m for m in ('torch', 'tiktoken', 'numpy', 'backpack_nb.models') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.strip()
    assert out == "[]"
