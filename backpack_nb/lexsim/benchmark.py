"""The Multi-SimLex files: where they are (a folder given, MULTISIMLEX_SOURCE, or a copy
fetched once from the official release), reading and checking them, and the word form that
is looked up.

Multi-SimLex (Vulić et al., Computational Linguistics 46(4), 2020) rates 1,888 concept pairs
for similarity (0-6) in 12 languages, aligned across languages: ``scores.csv`` holds the
ratings, ``translation.csv`` the words of each language.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import paths
from ..errors import UserError
from ..runfiles import download

# Multi-SimLex language columns that are Europarl languages, and their Europarl codes.
EUROPARL_CODES = {"ENG": "en", "FRA": "fr", "FIN": "fi", "SPA": "es", "EST": "et", "POL": "pl"}
MULTISIMLEX_LANGS = ("ARA", "CMN", "CYM", "ENG", "EST", "FIN", "FRA", "HEB", "POL", "RUS", "SPA", "SWA", "YUE")
FILES = ("scores.csv", "translation.csv")
OFFICIAL_URL = "https://multisimlex.com/data/"


def _has_files(folder: Path) -> bool:
    return all((folder / f).is_file() for f in FILES)


def _fetch_official(dest: Path, base_url: str | None = None) -> Path:
    """Download the official scores.csv and translation.csv into ``dest``; a partial file
    never takes the final name."""
    base_url = base_url or OFFICIAL_URL
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        target = dest / name
        if target.is_file():
            continue
        url = base_url.rstrip("/") + "/" + name
        download(url, target, lambda exc, url=url: (
            f"Multi-SimLex is not available locally and could not be fetched from {url} ({exc}). "
            f"Download {' and '.join(FILES)} from https://multisimlex.com/ and pass their folder "
            "with --multisimlex PATH, or set MULTISIMLEX_SOURCE=PATH"))
    return dest


def resolve_source(source: str | os.PathLike | None = None, *, base_url: str | None = None) -> Path:
    """The folder holding Multi-SimLex's ``scores.csv`` and ``translation.csv``: ``source``
    (``--multisimlex``), else ``MULTISIMLEX_SOURCE``, else ``data/multisimlex`` (under
    BACKPACK_NB_DATA), fetched from the official release on first use."""
    for given, name in ((source, "--multisimlex"), (os.environ.get("MULTISIMLEX_SOURCE") or None, "MULTISIMLEX_SOURCE")):
        if given is None or str(given) == "":
            continue
        folder = paths.resolve_in_root(given)
        if folder.is_file() and folder.name in FILES:  # pointing at one of the two files
            folder = folder.parent
        if not folder.is_dir():
            raise UserError(f"{name} {folder} is not a folder; give the folder holding Multi-SimLex's {' and '.join(FILES)}")
        missing = [f for f in FILES if not (folder / f).is_file()]
        if missing:
            raise UserError(
                f"{name} {folder} lacks {', '.join(missing)}; give the folder holding Multi-SimLex's "
                f"{' and '.join(FILES)} (from https://multisimlex.com/)"
            )
        return folder
    cache = paths.data_root() / "multisimlex"
    return cache if _has_files(cache) else _fetch_official(cache, base_url)


@dataclass
class MultiSimLex:
    """The benchmark: per concept pair its ID, part of speech, and for each language column
    (``ENG``, ``FRA``, ...) the two words and the mean rating."""

    source: Path
    ids: np.ndarray  # (n,) concept-pair IDs
    pos: list[str]
    words: dict[str, tuple[list[str], list[str]]]  # language -> (word 1 of each pair, word 2)
    scores: dict[str, np.ndarray]  # language -> (n,) ratings, NaN where missing

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def languages(self) -> list[str]:
        """Language columns with both words and ratings."""
        return [l for l in MULTISIMLEX_LANGS if l in self.words and l in self.scores]


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except (UnicodeDecodeError, csv.Error, OSError) as exc:
        raise UserError(f"cannot read Multi-SimLex file {path} ({exc}); {_FIX}") from exc
    return [h.strip() for h in header], [{(k or "").strip(): (v or "") for k, v in r.items()} for r in rows]


_FIX = ("pass the folder holding the official scores.csv and translation.csv with --multisimlex PATH "
        "(or MULTISIMLEX_SOURCE), or delete data/multisimlex to fetch them again")


def load_multisimlex(source: str | os.PathLike | None = None, *, base_url: str | None = None) -> MultiSimLex:
    """Read and check the two files (see :func:`resolve_source` for where they are looked
    for). Every problem found is listed in one :class:`UserError`."""
    folder = resolve_source(source, base_url=base_url)
    s_path, t_path = folder / "scores.csv", folder / "translation.csv"
    s_head, s_rows = _read_csv(s_path)
    t_head, t_rows = _read_csv(t_path)
    problems: list[str] = []
    for path, head, rows in ((s_path, s_head, s_rows), (t_path, t_head, t_rows)):
        if "ID" not in head:
            problems.append(f"{path.name} has no ID column (header: {', '.join(head) or 'empty'})")
        if not rows:
            problems.append(f"{path.name} has no rows")
    langs = [l for l in MULTISIMLEX_LANGS if l in s_head]
    if not any(l in EUROPARL_CODES for l in langs):
        problems.append(f"scores.csv has none of the language columns {', '.join(EUROPARL_CODES)}")
    for l in langs:
        for c in (f"{l} 1", f"{l} 2"):
            if c not in t_head:
                problems.append(f"translation.csv lacks column {c!r} (scores.csv rates {l})")
    if not problems and len(s_rows) != len(t_rows):
        problems.append(f"scores.csv has {len(s_rows)} pairs but translation.csv {len(t_rows)}")
    if problems:
        raise UserError(f"Multi-SimLex at {folder} is malformed:\n  - " + "\n  - ".join(problems) + f"\n{_FIX}")

    ids, bad = [], []
    for i, (s, t) in enumerate(zip(s_rows, t_rows)):
        if s["ID"].strip() != t["ID"].strip():
            bad.append(f"row {i + 2}: ID {s['ID']!r} in scores.csv but {t['ID']!r} in translation.csv")
        try:
            ids.append(int(s["ID"]))
        except ValueError:
            bad.append(f"scores.csv row {i + 2}: ID {s['ID']!r} is not an integer")
    scores: dict[str, np.ndarray] = {}
    for l in langs:
        vals = np.full(len(s_rows), np.nan)
        for i, r in enumerate(s_rows):
            cell = r.get(l, "").strip()
            if not cell:
                continue  # a missing rating: the pair is skipped in this language
            try:
                vals[i] = float(cell)
            except ValueError:
                bad.append(f"scores.csv row {i + 2}: {l} rating {cell!r} is not a number")
                continue
            if not 0 <= vals[i] <= 6:
                bad.append(f"scores.csv row {i + 2}: {l} rating {vals[i]} is outside 0..6")
        scores[l] = vals
    if len(set(ids)) != len(ids):
        bad.append("scores.csv repeats an ID")
    if bad:
        more = f"\n  - ... and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise UserError(f"Multi-SimLex at {folder} is malformed:\n  - " + "\n  - ".join(bad[:8]) + more + f"\n{_FIX}")
    words = {l: ([r[f"{l} 1"] for r in t_rows], [r[f"{l} 2"] for r in t_rows]) for l in langs}
    return MultiSimLex(folder, np.array(ids, dtype=np.int64), [r.get("PoS", "") for r in s_rows], words, scores)


def normalize_word(word: str) -> str:
    """The form looked up: stripped, lower-cased, a parenthesised note removed."""
    return re.sub(r"\s*\([^)]*\)", "", word).strip().lower()
