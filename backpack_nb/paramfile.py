"""Reading a params file (``params/NAME.yaml``): the one reader every front door uses.

``train.py --config``, ``python -m backpack_nb.reports run/pipeline -f``, the notebooks (through
``results.config_from_notebook``), ``python -m backpack_nb.models --config``, ``python -m
backpack_nb.params get`` and ``evaluate.py --config`` all read a params file through
:func:`read_params_file`, so all of them refuse the same files, each with one line that names
the file and the fix:

- a file that is not UTF-8 text (a checkpoint or random bytes given as the params file), or
  that is far larger than a params file could be;
- an empty or comment-only file (it would silently mean "every default": the seed's 50,000
  iterations on CUDA);
- a key set twice (YAML would keep the last value without a word);
- anchors, aliases and merge keys (``&a``, ``*a``, ``<<``): a 355-byte "billion laughs" file
  expands to billions of values. They are refused while the file is parsed, before anything
  is built, so the refusal is instant.

A params file is flat ``key: value`` lines whose values are numbers, text, true/false or short
lists, so none of these refusals costs a real file anything.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.events import AliasEvent

from backpack_nb.coerce import BRIEF_CHARS, brief
from backpack_nb.errors import UserError
from backpack_nb.paths import params_dir, resolve_in_root

# A params file is a few dozen lines (the largest shipped one is under 2 KB). Reading stops
# here, so a checkpoint given by mistake is not read whole into memory to be refused.
MAX_BYTES = 1 << 20
# Values are scalars or lists (the file itself is depth 1, a list in it depth 2): deeper
# nesting is a mistake, and thousands of levels would exhaust the parser's recursion.
MAX_DEPTH = 8
_MERGE_TAG = "tag:yaml.org,2002:merge"


# A derived preset names the preset it builds on (``base: train_europarl_scratch``) and writes
# only the keys that differ from it.
BASE_KEY = "base"


def params_path(name_or_path: str) -> Path:
    """``train_europarl_scratch`` -> params/train_europarl_scratch.yaml; anything that looks
    like a path (has a slash or ends in .yaml/.yml) is taken as one, from the project root."""
    s = str(name_or_path)
    if "/" in s or s.endswith((".yaml", ".yml")):
        return resolve_in_root(s)
    return params_dir() / f"{s}.yaml"


def available_configs() -> list[str]:
    """The names of the params files shipped in params/."""
    d = params_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def read_params_file(name_or_path: str) -> dict[str, Any]:
    """The flat dict a params file stands for, unvalidated: its own keys laid over those of
    the file its ``base:`` names, if any (resolved the same way, to any depth). Raises one
    :class:`UserError` naming the file for anything that is not a non-empty mapping of
    distinct keys written out in plain YAML (see the module's docstring), and for a ``base``
    that is missing or leads back to the file."""
    return _resolve(name_or_path, ())


def _resolve(name_or_path: str, chain: tuple[Path, ...]) -> dict[str, Any]:
    own = read_own_keys(name_or_path)
    if BASE_KEY not in own:
        return own
    path = params_path(name_or_path)
    base = own.pop(BASE_KEY)
    if not isinstance(base, str) or not base.strip():
        raise UserError(f"{path}: {BASE_KEY}: {brief(base)} is not a params name; write the "
                        "name of the preset this one builds on, e.g. base: tiny_backpack")
    here, there = path.resolve(), params_path(base).resolve()
    if there in (*chain, here):
        names = " -> ".join(p.stem for p in (*chain, here, there))
        raise UserError(f"{path}: {BASE_KEY}: {base} leads back to itself ({names}); a preset "
                        "builds on another that does not build on it")
    try:
        under = _resolve(base, (*chain, here))
    except UserError as exc:
        raise UserError(f"{path}: {BASE_KEY}: {exc}") from None
    return {**under, **own}


def read_own_keys(name_or_path: str) -> dict[str, Any]:
    """The keys a params file writes itself (``base`` included), as papermill -f injects them."""
    path = params_path(name_or_path)
    try:
        found = path.is_file()
    except OSError as exc:  # a name too long for the file system, say
        raise UserError(f"config {brief(str(name_or_path))}: {exc.strerror}; give a params "
                        f"name (one of {', '.join(available_configs()) or 'none'}) or the "
                        "path of a .yaml file") from None
    if not found:
        names = available_configs()
        hint = difflib.get_close_matches(str(name_or_path), names, n=1)
        raise UserError(
            f"config {brief(str(name_or_path))} not found (looked for {brief(str(path))}). "
            + (f"Did you mean {hint[0]!r}? " if hint else "")
            + f"Available: {', '.join(names) or 'none'}."
        )
    data = parse_params_text(_read_text(path), str(path))
    if data is None or data == {}:
        raise UserError(f"{path}: params file is empty (no `key: value` lines); copy one of "
                        f"{params_dir()}/*.yaml (e.g. tiny_backpack.yaml) and edit it")
    if not isinstance(data, dict):
        raise UserError(f"{path} must be a mapping of `key: value` lines, got "
                        f"{type(data).__name__} {brief(data)}")
    return data


def _read_text(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise UserError(f"cannot read params file {path}: {exc.strerror}") from None
    if len(raw) > MAX_BYTES:
        raise UserError(f"{path} is over {MAX_BYTES // (1 << 20)} MiB: a params file is a few "
                        "dozen `key: value` lines; is this the params file you meant?")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{path} is not a UTF-8 text file (byte 0x{raw[exc.start]:02x} on line "
                        f"{line}): a params file is YAML `key: value` lines; is this the params "
                        "file you meant (not a checkpoint or a binary)? If it is, save it as "
                        "UTF-8") from None


def parse_params_text(text: str, source: str) -> Any:
    """``text`` read as YAML by :class:`_ParamsLoader` (no anchors or aliases, no key twice,
    bounded nesting); ``source`` names it in the one-line :class:`UserError` for a problem."""
    try:
        loader = _ParamsLoader(text)
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (NUL, ...)
        line = text.count("\n", 0, exc.position) + 1
        raise UserError(f"{source} line {line}: the control character "
                        f"{chr(exc.character)!r} is not allowed in a YAML file; delete it") from None
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(exc.problem or exc.context or exc).split())
        raise UserError(f"{source}{where}: {brief(problem, 2 * BRIEF_CHARS, quote=False)}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{source} is not valid YAML: "
                        f"{brief(' '.join(str(exc).split()), 2 * BRIEF_CHARS, quote=False)}") from None
    finally:
        loader.dispose()


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader without anchors, aliases and merge keys, refusing a key set twice
    and nesting deeper than :data:`MAX_DEPTH`. Each refusal is a MarkedYAMLError, so it
    carries the line it is about."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        # Refused here, from the parser's events, before a node exists: an alias is never
        # resolved, so an alias bomb costs no more than reading its few hundred bytes.
        event = self.peek_event()
        if isinstance(event, AliasEvent) or getattr(event, "anchor", None) is not None:
            raise ComposerError(
                None, None, "anchors and aliases (&name, *name) are not allowed in a params "
                "file; write each value out", event.start_mark)
        if self._depth >= MAX_DEPTH:
            raise ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep; a "
                                "params value is a number, text, true/false or a list",
                                event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                raise ConstructorError(None, None, "merge keys (<<) are not allowed in a "
                                       "params file; write each key out", key_node.start_mark)
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = lines.get(key)
            except TypeError:  # an unhashable key: the safe loader's own error names it
                continue
            if first is not None:
                raise ConstructorError(
                    None, None, f"key {brief(key)} is set twice, on line {first} and on line "
                    f"{line}; keep one", key_node.start_mark)
            lines[key] = line
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as exc:
            # the safe loader's own int() and date() calls: `seed: <5,000 digits>` is past
            # Python's int-from-text limit, `run_name: 2024-02-30` reads as a bad date
            why = str(exc).split(";")[0]  # not Python's advice to raise its digit limit
            raise ConstructorError(None, None, f"{brief(node.value, 40)} cannot be read "
                                   f"({why}); quote it if it is text", node.start_mark) from None
