"""Europarl data: find the text, split it without leakage, tokenize, write token memmaps.

Two source forms (a dataset uses one, never both: in the sample the aligned lines repeat the
raw days' sentences, so mixing them would leak validation text into training):

- ``raw``: per-language day files ``txt/<lang>/ep-*.txt`` with markup lines (``<CHAPTER ..>``,
  ``<SPEAKER ..>``, ``<P>``). A *document* is one chapter of one sitting day; the markup is
  dropped, the speech text kept line by line.
- ``aligned``: pair files ``europarl-v7.<xx>-en.<xx>`` / ``.en``, one sentence per line (empty
  lines skipped). A *document* is a block of ``aligned_block_lines`` consecutive lines.

The split unit is the document *across languages*: the en and fr text of chapter 3 of
2000-01-18 land in the same split, so a translation of validation text is never trained on.
Units are shuffled with a seeded generator and dealt to val and test until each reaches its
share of tokens and its floor (at least 2 units and ``4 x block_size`` tokens per language).

Output (``data/europarl/`` by default)::

    train.bin  val.bin  test.bin             all languages, documents separated by <|endoftext|>
    val_en.bin val_fr.bin test_en.bin ...    one language each (per-language evaluation)
    meta.json                                encoding, compact vocabulary, counts, hashes, seed

Token files are raw little-endian uint16 arrays when the compact vocabulary fits (else uint32).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import paths
from .console import show_bars
from .errors import UserError, exit_on_user_error
from .tokenizer import DEFAULT_ENCODING, Tokenizer, build_compact_vocab, get_encoding

EUROPARL_LANGS = ("bg cs da de el en es et fi fr hu it lt lv nl pl pt ro sk sl sv").split()
OFFICIAL_BASE_URL = "https://www.statmt.org/europarl/v7/"
FORMS = ("raw", "aligned")
META_VERSION = 1

_CHAPTER_LINE = re.compile(r"^<CHAPTER\s+ID=\"?([^\s\">]+)\"?[^>]*>[ \t\r]*\n", re.MULTILINE)
# Lines to drop inside a chapter: SPEAKER/P markup (a stray CHAPTER too), and empty lines.
# Matched as "the newline before such a line, and the line" (the text gets a leading
# newline first): a pattern that starts with a literal lets the regex engine jump from
# newline to newline instead of trying every position, as a ^-anchored one does.
_DROP_LINES = re.compile(r"\n(?:<(?:CHAPTER|SPEAKER|P)\b[^>\n]*>)?[ \t\r]*(?=\n)")
_RAW_NAME = re.compile(r"(?:^|/)txt/([a-z]{2})/(ep-[^/]+)\.txt$")
_ALIGNED_NAME = re.compile(r"(?:^|/)europarl-v7\.([a-z]{2})-en\.([a-z]{2})$")


# ----------------------------------------------------------------------------------------
# settings


@dataclasses.dataclass
class PrepareConfig:
    """How a dataset is prepared; stored in ``meta.json`` so a dataset describes itself."""

    langs: tuple[str, ...] = ("en", "fr")
    """Europarl language codes, in the order their text is written."""
    form: str = "raw"
    """``raw`` day files or ``aligned`` sentence pairs."""
    encoding: str = DEFAULT_ENCODING
    """tiktoken encoding (``NAME`` or ``NAME:/path/file.tiktoken``)."""
    seed: int = 1337
    """Seed of the split shuffle: the same seed and source give the same split."""
    val_fraction: float = 0.05
    """Target share of tokens for validation."""
    test_fraction: float = 0.05
    """Target share of tokens for test."""
    block_size: int = 1024
    """The largest context the data should serve: val and test hold at least
    ``4 x block_size`` tokens per language (and at least 2 documents each)."""
    aligned_block_lines: int = 100
    """Lines per document in the aligned form."""

    def validate(self) -> None:
        problems = []
        unknown = [l for l in self.langs if l not in EUROPARL_LANGS]
        if not self.langs:
            problems.append("no languages given (e.g. --langs en,fr)")
        if unknown:
            problems.append(f"unknown language code(s) {', '.join(unknown)}; Europarl has {' '.join(EUROPARL_LANGS)}")
        if len(set(self.langs)) != len(self.langs):
            problems.append(f"a language is listed twice in {','.join(self.langs)}")
        if self.form not in FORMS:
            problems.append(f"unknown form {self.form!r}; use raw or aligned")
        for name in ("val_fraction", "test_fraction"):
            if not 0 < getattr(self, name) < 0.5:
                problems.append(f"{name} must be in (0, 0.5), got {getattr(self, name)}")
        if self.block_size < 1:
            problems.append(f"block_size must be >= 1, got {self.block_size}")
        if self.aligned_block_lines < 1:
            problems.append(f"aligned_block_lines must be >= 1, got {self.aligned_block_lines}")
        if problems:
            raise UserError("bad data settings:\n  - " + "\n  - ".join(problems))


def parse_langs(langs: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(langs, str):
        langs = [l for l in re.split(r"[,\s]+", langs) if l]
    return tuple(l.strip().lower() for l in langs)


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


def _download(url: str, dest: Path) -> Path:
    """Download ``url`` to ``dest`` (cached) with a progress bar; a partial file never
    takes the final name."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"could not download {url} ({exc}). Without network access, download the Europarl "
            "files elsewhere and pass a local copy: --source /path/to/europarl (a folder or .tgz), "
            "or set EUROPARL_SOURCE=/path/to/europarl"
        ) from exc
    os.replace(tmp, dest)
    return dest


def _official_urls(form: str, langs: Sequence[str], base: str = OFFICIAL_BASE_URL) -> list[str]:
    base = base if base.endswith("/") else base + "/"
    if form == "raw":
        return [base + "europarl.tgz"]
    pairs = [l for l in langs if l != "en"] or ["fr"]  # English alone: take it from fr-en
    return [base + f"{l}-en.tgz" for l in pairs]


def resolve_source(source: str | os.PathLike | None, form: str, langs: Sequence[str]) -> list[Path]:
    """Local paths to read: ``source`` (a path, an archive URL or a mirror base URL), else
    ``EUROPARL_SOURCE``, else the official archives (downloaded once into ``data/downloads``)."""
    source = str(source) if source else os.environ.get("EUROPARL_SOURCE", "")
    if not source:
        urls = _official_urls(form, langs)
    elif re.match(r"^(https?|ftp)://", source):
        urls = [source] if _is_archive(Path(source)) else _official_urls(form, langs, source)
    else:
        path = paths.resolve_in_root(source)
        if not path.exists():
            raise UserError(
                f"Europarl source {path} does not exist; pass a folder or .tgz with --source "
                "(or EUROPARL_SOURCE), or leave both unset to download the official archives"
            )
        return [path]
    downloads = paths.data_root() / "downloads"
    return [_download(u, downloads / u.rstrip("/").rsplit("/", 1)[-1]) for u in urls]


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


def _decode(f: SourceFile) -> str:
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


@dataclasses.dataclass
class Unit:
    """One document in every language that has it: the indivisible unit of the split."""

    uid: str
    texts: dict[str, str]  # lang -> text
    tokens: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # lang -> tiktoken ids


def collect_units(files: Sequence[SourceFile], cfg: PrepareConfig,
                  on_document: Callable[[Unit, str], None] | None = None) -> list[Unit]:
    """Parse the files into units, sorted by id. ``on_document(unit, lang)`` is called as
    soon as a document's text is final (prepare starts encoding it while the next files
    are parsed)."""
    units: dict[str, Unit] = {}
    english_pair: str | None = None
    if cfg.form == "aligned" and "en" in cfg.langs:
        # Each pair file has its own English side with the same proceedings: taking English
        # from several pairs would put the same sentences in different splits.
        pairs = sorted({f.key for f in files if f.lang == "en"})
        preferred = [f"{l}-en" for l in cfg.langs if l != "en" and f"{l}-en" in pairs]
        english_pair = (preferred or pairs)[0]
    for f in files:
        if english_pair and f.lang == "en" and f.key != english_pair:
            continue
        text = _decode(f)
        docs = parse_raw_day(text) if cfg.form == "raw" else parse_aligned(text, cfg.aligned_block_lines)
        for doc_id, body in docs.items():
            # Raw: a chapter of a day. Aligned: block i of every pair, so that German block
            # i and the en/fr block i (translations of nearly the same sentences) share a
            # split. Pairs drift by a few lines at block edges, and pairs covering different
            # periods do not line up at all: the raw form is the leakage-free multilingual one.
            uid = f"{f.key}/{doc_id}" if cfg.form == "raw" else f"block/{doc_id}"
            unit = units.setdefault(uid, Unit(uid, {}))
            unit.texts[f.lang] = body
            if on_document is not None:
                on_document(unit, f.lang)
    return [units[k] for k in sorted(units)]


# ----------------------------------------------------------------------------------------
# splitting


def assign_splits(units: Sequence[Unit], cfg: PrepareConfig) -> dict[str, list[Unit]]:
    """Deal shuffled units to val, then test, until each has its share of tokens and its
    floor; the rest is training data. Deterministic given the seed.

    A unit that would overshoot the share by more than a quarter is passed over while
    smaller ones can still fill it (chapters vary from a few hundred to tens of thousands
    of tokens), so a held-out split stays close to its target fraction."""
    size = {u.uid: sum(len(t) for t in u.tokens.values()) for u in units}
    total = sum(size.values())
    order = list(units)
    random.Random(cfg.seed).shuffle(order)
    floor = 4 * cfg.block_size
    splits: dict[str, list[Unit]] = {}
    for name, fraction in (("val", cfg.val_fraction), ("test", cfg.test_fraction)):
        target = fraction * total
        per_lang = dict.fromkeys(cfg.langs, 0)
        chosen: list[Unit] = []

        def satisfied() -> bool:
            return len(chosen) >= 2 and sum(per_lang.values()) >= target and all(n >= floor for n in per_lang.values())

        def take(unit: Unit) -> None:
            order.remove(unit)
            chosen.append(unit)
            for lang, toks in unit.tokens.items():
                per_lang[lang] += len(toks)

        for unit in list(order):  # first pass: units that fit the budget
            if satisfied():
                break
            if sum(per_lang.values()) + size[unit.uid] <= 1.25 * max(target, floor * len(cfg.langs)):
                take(unit)
        while not satisfied() and order:  # second pass: what it takes to reach the floors
            short = [lang for lang, n in per_lang.items() if n < floor]
            helpful = [u for u in order if any(lang in u.tokens for lang in short)]
            take(helpful[0] if helpful else order[0])
        if not satisfied():
            raise UserError(
                f"the corpus is too small to hold out a {name} split of at least 2 documents and "
                f"{floor} tokens per language (4 x block_size {cfg.block_size}); use more text, "
                "fewer languages or a smaller --block_size"
            )
        splits[name] = chosen
    splits["train"] = order
    if not order:
        raise UserError("nothing is left for training after the val/test split; use more text")
    return splits


# ----------------------------------------------------------------------------------------
# preparing a dataset


def _write_tokens(path: Path, ids: np.ndarray, dtype: np.dtype) -> None:
    ids.astype(dtype, copy=False).tofile(path)


def _array_encoder(enc) -> Callable[[str], np.ndarray]:
    """``text -> token ids`` as a numpy array, ordinary text only (special-token strings
    are encoded as text, like ``encode_ordinary``)."""
    if hasattr(enc, "encode_to_numpy"):  # tiktoken >= 0.8: no Python list in between
        return lambda text: enc.encode_to_numpy(text, disallowed_special=())
    return lambda text: np.asarray(enc.encode_ordinary(text), dtype=np.uint32)


def prepare(
    source: str | os.PathLike | None,
    out: str | os.PathLike,
    cfg: PrepareConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Prepare a dataset into ``out`` atomically: everything is written to a temporary
    folder beside it and renamed at the end, so a failure leaves ``out`` as it was."""
    cfg = cfg or PrepareConfig()
    cfg.validate()
    out = paths.resolve_in_root(out)
    if (out / "meta.json").exists() and not overwrite:
        raise UserError(f"{out} already holds a prepared dataset; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another --out")
    t0 = time.perf_counter()
    enc = get_encoding(cfg.encoding)

    roots = resolve_source(source, cfg.form, cfg.langs)
    files = read_source(roots, cfg.form, cfg.langs)
    # Each document is encoded on a worker thread (tiktoken releases the GIL) as soon as it
    # is parsed, so parsing the next files overlaps with encoding; the ids come back as
    # numpy arrays, never as Python lists.
    threads = min(8, os.cpu_count() or 1)
    encode = _array_encoder(enc)
    pending: dict[tuple[str, str], Future] = {}
    with ThreadPoolExecutor(threads, thread_name_prefix="encode") as pool:
        try:
            units = collect_units(files, cfg, lambda u, lang: pending.__setitem__(
                (u.uid, lang), pool.submit(encode, u.texts[lang])))
            nbytes = {(u.uid, lang): len(t.encode("utf-8")) for u in units for lang, t in u.texts.items()}
            n_bytes = sum(nbytes.values())
            bar = tqdm(total=n_bytes, unit="B", unit_scale=True, desc="tokenize",
                       disable=not show_bars(progress))
            for u in units:
                for lang in u.texts:
                    u.tokens[lang] = pending.pop((u.uid, lang)).result()
                    bar.update(nbytes[u.uid, lang])
            bar.close()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise

    splits = assign_splits(units, cfg)
    base_ids = build_compact_vocab(enc, [t for u in splits["train"] for t in u.tokens.values()])
    tok = Tokenizer(cfg.encoding, base_ids)
    dtype = np.dtype(np.uint16) if tok.vocab_size <= 1 << 16 else np.dtype(np.uint32)
    eot = np.array([tok.eot_id], dtype=dtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        stats: dict[str, dict] = {}
        byte_fallback = {}
        for split, members in splits.items():
            per_lang: dict[str, dict] = {}
            docs: dict[str, list[np.ndarray]] = {lang: [] for lang in cfg.langs}
            by_unit: list[np.ndarray] = []  # a document, then its translations
            fallback = 0
            for u in members:
                for lang in cfg.langs:
                    if lang in u.tokens:
                        ids = tok.to_compact(u.tokens[lang])
                        fallback += len(ids) - len(u.tokens[lang])
                        # in the file's dtype from here on: a quarter of the bytes to copy
                        docs[lang].append(np.concatenate([ids.astype(dtype), eot]))
                        by_unit.append(docs[lang][-1])
            for lang in cfg.langs:
                arr = np.concatenate(docs[lang]) if docs[lang] else np.zeros(0, dtype=dtype)
                per_lang[lang] = {
                    "tokens": int(len(arr)),
                    "bytes": sum(nbytes[u.uid, lang] for u in members if lang in u.texts),
                    "documents": len(docs[lang]),
                }
                if split != "train":
                    _write_tokens(tmp / f"{split}_{lang}.bin", arr, dtype)
            # train.bin: unit by unit (a chapter, then its translation); val/test.bin: the
            # per-language files back to back.
            order = by_unit if split == "train" else [d for lang in cfg.langs for d in docs[lang]]
            arr = np.concatenate(order) if order else np.zeros(0, dtype=dtype)
            _write_tokens(tmp / f"{split}.bin", arr, dtype)
            stats[split] = {
                "tokens": int(len(arr)),
                "bytes": sum(v["bytes"] for v in per_lang.values()),
                "documents": len(members),
                "langs": per_lang,
                "units": [u.uid for u in members],
            }
            byte_fallback[split] = int(fallback)

        meta = {
            "format_version": META_VERSION,
            "encoding": cfg.encoding,
            "vocab_size": tok.vocab_size,
            "base_vocab_size": enc.n_vocab,
            "dtype": dtype.name,
            "eot_id": tok.eot_id,
            "langs": list(cfg.langs),
            "form": cfg.form,
            "config": dataclasses.asdict(cfg) | {"langs": list(cfg.langs)},
            "splits": stats,
            "byte_fallback_tokens": byte_fallback,
            "source": str(source or os.environ.get("EUROPARL_SOURCE", "") or OFFICIAL_BASE_URL),
            "source_files": [{"name": f.name, "lang": f.lang, "bytes": len(f.data), "sha256": f.sha256} for f in files],
            "prepare_seconds": round(time.perf_counter() - t0, 3),
            "text_bytes": n_bytes,
            "base_ids": base_ids.tolist(),
        }
        with open(tmp / "meta.json", "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------------------
# reading a prepared dataset


def resolve_data_dir(data_dir: str | os.PathLike) -> Path:
    """``europarl`` (a bare name, as in the seed's ``--data_dir europarl``) is a folder of
    the data root; anything with a slash, or absolute, is a path from the project root."""
    s = str(data_dir)
    if os.sep in s or "/" in s or s.startswith("."):
        return paths.resolve_in_root(s)
    return paths.data_root() / s


def load_meta(data_dir: str | os.PathLike) -> dict:
    """``meta.json`` of a prepared dataset (a bare name is looked up in the data root)."""
    path = resolve_data_dir(data_dir) / "meta.json"
    if not path.is_file():
        raise UserError(
            f"{data_dir} is not a prepared dataset (no meta.json); prepare it with "
            f"`python -m backpack_nb.data prepare --out {data_dir}`"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is damaged ({exc}); prepare the dataset again with --overwrite") from exc
    missing = [k for k in ("encoding", "vocab_size", "dtype", "langs", "splits", "base_ids") if k not in meta]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; prepare the dataset again with --overwrite")
    return meta


def meta_hash(data_dir: str | os.PathLike) -> str:
    """SHA-256 naming the exact dataset (vocabulary, split, source file hashes): the same
    source prepared twice with the same settings gets the same hash (timings and the
    source's path are left out)."""
    meta = load_meta(data_dir)
    stable = {k: v for k, v in meta.items() if k not in ("prepare_seconds", "source")}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode("utf-8")).hexdigest()


def load_tokens(data_dir: str | os.PathLike, split: str, lang: str | None = None) -> np.memmap:
    """Token ids of a split (all languages, or one), as a read-only memmap."""
    meta = load_meta(data_dir)
    if split not in ("train", "val", "test"):
        raise UserError(f"unknown split {split!r}; use train, val or test")
    if lang is not None and lang not in meta["langs"]:
        raise UserError(f"{data_dir} has no language {lang!r}; it has {', '.join(meta['langs'])}")
    if lang is not None and split == "train":
        raise UserError("per-language token files exist for val and test only")
    name = f"{split}.bin" if lang is None else f"{split}_{lang}.bin"
    path = resolve_data_dir(data_dir) / name
    expected = meta["splits"][split]["tokens"] if lang is None else meta["splits"][split]["langs"][lang]["tokens"]
    itemsize = np.dtype(meta["dtype"]).itemsize
    if not path.is_file() or path.stat().st_size != expected * itemsize:
        have = path.stat().st_size if path.is_file() else "no file"
        raise UserError(
            f"{path} does not match meta.json ({expected} tokens x {itemsize} bytes expected, "
            f"found {have} bytes); prepare the dataset again with --overwrite"
        )
    return np.memmap(path, dtype=meta["dtype"], mode="r")


def check_token_ids(tokens: np.ndarray, vocab_size: int, path: str | os.PathLike) -> None:
    """Token ids beyond the vocabulary mean a damaged .bin of the right size, or a meta.json
    from another preparation: one clear error here instead of an index error later."""
    top = int(tokens.max()) if len(tokens) else -1
    if top >= vocab_size:
        raise UserError(
            f"{path} holds token id {top}, outside the vocabulary of {vocab_size} tokens in "
            "meta.json: the file is damaged or meta.json belongs to another preparation; "
            "prepare the dataset again with --overwrite")


def ensure_prepared(
    data_dir: str | os.PathLike,
    *,
    source: str | None = None,
    langs: str | Sequence[str] = ("en", "fr"),
    form: str = "raw",
    block_size: int = 1024,
    seed: int = 1337,
    encoding: str = DEFAULT_ENCODING,
    progress: bool = True,
) -> Path:
    """The prepared dataset at ``data_dir``, preparing it on first use. An existing dataset
    must match the requested languages, form and encoding, and hold more than
    ``block_size`` tokens per language in val and test."""
    data_dir = resolve_data_dir(data_dir)
    wanted = parse_langs(langs)
    if not (data_dir / "meta.json").exists():
        cfg = PrepareConfig(langs=wanted, form=form, encoding=encoding, seed=seed, block_size=max(block_size, 1024))
        try:
            prepare(source, data_dir, cfg, progress=progress)
        except UserError as exc:
            if "too small" not in str(exc):
                raise
            # A small corpus can still serve a small model: use the floor of this block size.
            prepare(source, data_dir, dataclasses.replace(cfg, block_size=block_size), progress=progress)
    meta = load_meta(data_dir)
    problems = []
    if list(meta["langs"]) != list(wanted):
        problems.append(f"languages {','.join(meta['langs'])} (asked: {','.join(wanted)})")
    if meta.get("form") != form:
        problems.append(f"form {meta.get('form')} (asked: {form})")
    if meta["encoding"] != encoding:
        problems.append(f"encoding {meta['encoding']} (asked: {encoding})")
    if problems:
        raise UserError(
            f"{data_dir} was prepared with {'; '.join(problems)}; use another --data_dir or "
            f"re-prepare it with `python -m backpack_nb.data prepare --out {data_dir} --overwrite`"
        )
    for split in ("val", "test"):
        for lang, s in meta["splits"][split]["langs"].items():
            if s["tokens"] <= block_size:
                raise UserError(
                    f"{data_dir}: {split} holds only {s['tokens']} {lang} tokens, not more than "
                    f"block_size {block_size}; prepare it with --block_size {block_size} --overwrite"
                )
    return data_dir


# ----------------------------------------------------------------------------------------
# command line


def format_stats(meta: dict) -> str:
    lines = [
        f"encoding {meta['encoding']}: compact vocabulary {meta['vocab_size']:,} of "
        f"{meta.get('base_vocab_size', 0):,} tokens ({meta['dtype']}), form {meta['form']}, "
        f"seed {meta['config']['seed']}",
        f"{'split':<6} {'lang':<5} {'docs':>5} {'tokens':>10} {'bytes':>11} {'bytes/tok':>9}",
    ]
    for split in ("train", "val", "test"):
        s = meta["splits"][split]
        for lang, v in s["langs"].items():
            bpt = v["bytes"] / v["tokens"] if v["tokens"] else 0.0
            lines.append(f"{split:<6} {lang:<5} {v['documents']:>5} {v['tokens']:>10,} {v['bytes']:>11,} {bpt:>9.2f}")
        lines.append(f"{split:<6} {'all':<5} {s['documents']:>5} {s['tokens']:>10,} {s['bytes']:>11,}")
    fb = meta.get("byte_fallback_tokens", {})
    lines.append(
        f"tokens spelled out as bytes (outside the compact vocabulary): val {fb.get('val', 0)}, "
        f"test {fb.get('test', 0)}"
    )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m backpack_nb.data", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="prepare a dataset from Europarl")
    p.add_argument("--source", default=None, help="folder, .tgz or URL (default: EUROPARL_SOURCE, else the official archives)")
    p.add_argument("--langs", default="en,fr", help="comma-separated Europarl codes (default en,fr)")
    p.add_argument("--out", default=None, help="output folder (default: <data root>/europarl)")
    p.add_argument("--form", default="raw", choices=FORMS)
    p.add_argument("--encoding", default=DEFAULT_ENCODING)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--val_fraction", type=float, default=0.05)
    p.add_argument("--test_fraction", type=float, default=0.05)
    p.add_argument("--block_size", type=int, default=1024, help="val/test floor is 4 x block_size tokens per language")
    p.add_argument("--aligned_block_lines", type=int, default=100)
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset")
    s = sub.add_parser("stats", help="print a prepared dataset's statistics")
    s.add_argument("data_dir", nargs="?", default="europarl")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "prepare":
            cfg = PrepareConfig(
                langs=parse_langs(args.langs),
                form=args.form,
                encoding=args.encoding,
                seed=args.seed,
                val_fraction=args.val_fraction,
                test_fraction=args.test_fraction,
                block_size=args.block_size,
                aligned_block_lines=args.aligned_block_lines,
            )
            out = resolve_data_dir(args.out) if args.out else paths.data_root() / "europarl"
            t0 = time.perf_counter()
            prepare(args.source, out, cfg, overwrite=args.overwrite)
            meta = load_meta(out)
            dt = time.perf_counter() - t0
            print(f"prepared {out} in {dt:.2f} s ({meta['text_bytes'] / dt / 2**20:.2f} MiB/s of text)")
            print(format_stats(meta))
        else:
            print(format_stats(load_meta(resolve_data_dir(args.data_dir))))
    except UserError as exc:
        exit_on_user_error(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
