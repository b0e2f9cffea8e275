"""Europarl source files: where the text is, and how a file becomes documents.

Two forms: ``raw`` day files ``txt/<lang>/ep-*.txt`` (a document is one chapter of one sitting
day, markup lines dropped) and ``aligned`` pair files ``europarl-v7.<xx>-en.<xx>`` (a document
is a block of consecutive lines). A source is a folder, a ``.tgz``, a folder of ``.tgz`` files,
or a URL; by default ``EUROPARL_SOURCE``, else the official archives
(:data:`OFFICIAL_BASE_URL`). :mod:`backpack_nb.data` turns the documents into a dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import paths
from .errors import UserError
from .runfiles import download

OFFICIAL_BASE_URL = "https://www.statmt.org/europarl/v7/"

_CHAPTER_LINE = re.compile(r"^<CHAPTER\s+ID=\"?([^\s\">]+)\"?[^>]*>[ \t\r]*\n", re.MULTILINE)
# Lines to drop inside a chapter: SPEAKER/P markup (a stray CHAPTER too), and empty lines.
# Matched as "the newline before such a line, and the line" (the text gets a leading
# newline first): a pattern that starts with a literal lets the regex engine jump from
# newline to newline instead of trying every position, as a ^-anchored one does.
_DROP_LINES = re.compile(r"\n(?:<(?:CHAPTER|SPEAKER|P)\b[^>\n]*>)?[ \t\r]*(?=\n)")
_RAW_NAME = re.compile(r"(?:^|/)txt/([a-z]{2})/(ep-[^/]+)\.txt$")
_ALIGNED_NAME = re.compile(r"(?:^|/)europarl-v7\.([a-z]{2})-en\.([a-z]{2})$")



# ----------------------------------------------------------------------------------------
# finding the source files (a folder, a .tgz, a folder of .tgz files, or a URL)


@dataclasses.dataclass
class SourceFile:
    name: str  # path inside the source, for messages and meta.json
    lang: str  # language of the text
    key: str  # raw: day (ep-00-01-17); aligned: pair (fr-en)
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def _match(name: str, form: str, langs: Sequence[str]) -> tuple[str, str] | None:
    """(lang, key) when ``name`` is a source file of the requested form and languages."""
    if form == "raw":
        m = _RAW_NAME.search(name)
        if m and m.group(1) in langs:
            return m.group(1), m.group(2)
    else:
        m = _ALIGNED_NAME.search(name)
        if m and m.group(2) in (m.group(1), "en"):
            pair = f"{m.group(1)}-en"
            if m.group(2) in langs:
                return m.group(2), pair
    return None


def _is_archive(path: Path) -> bool:
    return path.name.endswith((".tgz", ".tar.gz", ".tar"))


def _read_archive(path: Path, form: str, langs: Sequence[str]) -> Iterator[SourceFile]:
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UserError(
            f"{path} is not a readable .tgz archive ({exc}); give the Europarl archive or a folder "
            "holding txt/<lang>/ep-*.txt or europarl-v7.<xx>-en.* files"
        ) from exc
    with tar:
        try:
            for member in tar:
                hit = member.isfile() and _match(member.name, form, langs)
                if hit:
                    data = tar.extractfile(member).read()
                    yield SourceFile(f"{path.name}:{member.name}", hit[0], hit[1], data)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise UserError(f"{path} is a damaged archive ({exc}); download it again") from exc


def _download(url: str, dest: Path, flag: str = "--source") -> Path:
    """Download ``url`` to ``dest`` (cached) with a progress bar."""
    if dest.is_file():
        return dest
    return download(url, dest, lambda exc: (
        f"could not download {url} ({exc}). Without network access, download the Europarl "
        f"files elsewhere and pass a local copy: {flag} /path/to/europarl (a folder or .tgz), "
        "or set EUROPARL_SOURCE=/path/to/europarl"), bar=f"download {dest.name}")


def _official_urls(form: str, langs: Sequence[str], base: str = OFFICIAL_BASE_URL) -> list[str]:
    base = base if base.endswith("/") else base + "/"
    if form == "raw":
        return [base + "europarl.tgz"]
    pairs = [l for l in langs if l != "en"] or ["fr"]  # English alone: take it from fr-en
    return [base + f"{l}-en.tgz" for l in pairs]


def resolve_source(source: str | os.PathLike | None, form: str, langs: Sequence[str], *,
                   flag: str = "--source") -> list[Path]:
    """Local paths to read: ``source`` (a path, an archive URL or a mirror base URL), else
    ``EUROPARL_SOURCE``, else the official archives (downloaded once into ``data/downloads``).
    ``flag`` is how the command that asked spells the source option, for its messages."""
    source = str(source) if source else os.environ.get("EUROPARL_SOURCE", "")
    if not source:
        urls = _official_urls(form, langs)
    elif re.match(r"^(https?|ftp)://", source):
        urls = [source] if _is_archive(Path(source)) else _official_urls(form, langs, source)
    else:
        path = paths.resolve_in_root(source)
        if not path.exists():
            raise UserError(
                f"Europarl source {path} does not exist; pass a folder or .tgz with {flag} "
                "(or EUROPARL_SOURCE), or leave both unset to download the official archives"
            )
        return [path]
    downloads = paths.data_root() / "downloads"
    return [_download(u, downloads / u.rstrip("/").rsplit("/", 1)[-1], flag) for u in urls]


def read_source(roots: Sequence[Path], form: str, langs: Sequence[str]) -> list[SourceFile]:
    """Every source file of the requested form and languages under ``roots``, sorted."""
    found: list[SourceFile] = []
    for root in roots:
        if root.is_file():
            if not _is_archive(root) and not tarfile.is_tarfile(root):
                raise UserError(
                    f"{root} is not a .tgz archive; give a Europarl archive or a folder holding "
                    "txt/<lang>/ep-*.txt (raw) or europarl-v7.<xx>-en.* (aligned) files"
                )
            found += _read_archive(root, form, langs)
            continue
        entries = sorted(p for p in root.rglob("*") if p.is_file())
        if not entries:
            raise UserError(f"Europarl source folder {root} is empty; download the Europarl files into it")
        for p in entries:
            rel = p.relative_to(root).as_posix()
            if _is_archive(p):
                found += _read_archive(p, form, langs)
            elif hit := _match(rel, form, langs):
                found.append(SourceFile(rel, hit[0], hit[1], p.read_bytes()))
    found.sort(key=lambda f: (f.key, f.lang, f.name))
    where = ", ".join(str(r) for r in roots)
    pattern = "txt/<lang>/ep-*.txt" if form == "raw" else "europarl-v7.<xx>-en.<xx|en>"
    for lang in langs:
        if not any(f.lang == lang for f in found):
            raise UserError(
                f"no {form} Europarl files for language {lang!r} in {where} (looked for {pattern}); "
                f"choose languages that are there with --langs, or the other form with --form"
            )
    return found


# ----------------------------------------------------------------------------------------
# parsing text into documents


def decode(f: SourceFile) -> str:
    """The file's text; invalid UTF-8 is a UserError naming the line."""
    try:
        return f.data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = f.data[: exc.start].count(b"\n") + 1
        raise UserError(
            f"{f.name}, line {line}: invalid UTF-8 ({exc.reason} at byte {exc.start}); "
            "Europarl files are UTF-8: re-download the file or fix that line"
        ) from exc


def parse_raw_day(text: str) -> dict[str, str]:
    """Chapter id -> chapter text of one day file: markup lines and empty lines dropped,
    one line per sentence, each ending in a newline. Text before the first ``<CHAPTER>``
    (some day files start mid-chapter) is its own chapter, id ``0``."""
    if not text.endswith("\n"):
        text += "\n"
    chapters: dict[str, str] = {}
    starts = [(0, 0, "0")]
    at = text.find("<CHAPTER")  # a plain search, then the full pattern where it can match
    while at != -1:
        if at == 0 or text[at - 1] == "\n":
            m = _CHAPTER_LINE.match(text, at)
            if m:
                starts.append((m.start(), m.end(), m.group(1)))
        at = text.find("<CHAPTER", at + 1)
    for (_, body_start, cid), (next_start, _, _) in zip(starts, starts[1:] + [(len(text), 0, "")]):
        # one regex pass per chapter instead of a Python loop over its lines
        body = _DROP_LINES.sub("", "\n" + text[body_start:next_start])[1:]
        if body:
            chapters[cid] = chapters.get(cid, "") + body
    return chapters


def parse_aligned(text: str, block_lines: int) -> dict[str, str]:
    """Block index -> text of ``block_lines`` consecutive lines (empty lines skipped, but
    counted, so block i of both sides of a pair holds the same sentences)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    blocks: dict[str, str] = {}
    for start in range(0, len(lines), block_lines):
        body = "".join(l + "\n" for l in lines[start : start + block_lines] if l.strip())
        if body:
            blocks[f"{start // block_lines:06d}"] = body
    return blocks

