"""The steering experiments' data (word lists, prompts, topic bags, edits) and which of their
words a model can be steered on.

The data are YAML files a user can replace: ``--nouns FILE`` or a name of a file shipped in
``backpack_nb/steering/data/`` (``gender_en``, ``gender_fr``, ``topics_paper``,
``topics_europarl``, ``edits``). They are read with the params files' reader (no anchors or
aliases, no key twice).

A word is steered through its tokens in the mid-sentence form (a leading space). A word is
*usable* when every one of those tokens is a real token of the model's vocabulary. A compact
vocabulary (:class:`~backpack_nb.tokenizer.Tokenizer`) spells a word it never saw in training
as its bytes, and those byte tokens are shared by every unknown word: steering them would
steer all of those words, so such a word is skipped, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..paramfile import parse_params_text

DATA = Path(__file__).parent / "data"


def data_path(name_or_path: str, flag: str) -> Path:
    """A shipped data file by name (``gender_en``) or any YAML file by path."""
    shipped = DATA / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    names = ", ".join(sorted(p.stem for p in DATA.glob("*.yaml")))
    raise UserError(f"{flag} {name_or_path!r}: no such file, and not one of the shipped files "
                    f"({names})")


def read_data(name_or_path: str, flag: str, keys: dict[str, type]) -> dict:
    """The YAML mapping of a data file, with ``keys`` (name -> type) present and typed."""
    path = data_path(name_or_path, flag)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{flag} {path}: cannot be read as UTF-8 text ({exc})") from None
    data = parse_params_text(text, f"{flag} {path}")
    if not isinstance(data, dict):
        raise UserError(f"{flag} {path}: expected a mapping with the keys {', '.join(keys)}")
    for key, kind in keys.items():
        if not isinstance(data.get(key), kind):
            raise UserError(f"{flag} {path}: {key!r} must be a {kind.__name__}, got "
                            f"{type(data.get(key)).__name__}")
    data["path"] = str(path)
    return data


@dataclass(frozen=True)
class Word:
    """A word as a model sees it: its token ids and token strings in the mid-sentence form,
    or why it cannot be used (``skipped``)."""

    word: str
    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    skipped: str | None = None

    @property
    def usable(self) -> bool:
        return self.skipped is None


def word(tok, text: str) -> Word:
    """``text`` in its mid-sentence form (leading space) through ``tok``'s vocabulary."""
    form = text if text.startswith(" ") else " " + text.strip()
    if not text.strip():
        return Word(text, (), (), "empty")
    ids = tok.encode(form)
    tokens = tuple(tok.token_str(i) for i in ids)
    missing = tok.out_of_vocabulary(form)
    if missing:
        return Word(text, tuple(ids), tokens,
                    f"not in the vocabulary ({', '.join(map(repr, missing))} would be spelled "
                    "in byte tokens every unknown word shares)")
    return Word(text, tuple(ids), tokens)
