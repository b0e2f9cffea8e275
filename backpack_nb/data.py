"""Preparing a dataset from Europarl: split the documents without leakage, tokenize, write
token memmaps. (Finding and parsing the source files: :mod:`backpack_nb.europarl`; reading a
prepared dataset: :mod:`backpack_nb.dataset`.)

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
import json
import os
import random
import re
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import paths
from .console import progress_bar
from .dataset import load_meta, resolve_data_dir
from .errors import UserError, command, exit_interrupted
from .europarl import (OFFICIAL_BASE_URL, SourceFile, decode, parse_aligned, parse_raw_day,
                       read_source, resolve_source)
from .params import DATA_FORMS as FORMS, EUROPARL_LANGS, parse_langs
from .runfiles import pid_alive
from .tokenizer import DEFAULT_ENCODING, Tokenizer, build_compact_vocab, get_encoding

META_VERSION = 1


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
    full_vocab: bool = False
    """Keep the encoding's whole vocabulary (ids are the encoding's own) instead of the
    compact one: what a pretrained model needs (the released Backpack reads GPT-2's ids)."""

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
        if self.seed < 0:
            problems.append(f"seed must be >= 0, got {self.seed}")
        if problems:
            raise UserError("bad data settings:\n  - " + "\n  - ".join(problems))




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
        text = decode(f)
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


def _config_record(cfg: PrepareConfig) -> dict:
    """The settings as meta.json keeps them. ``full_vocab`` only when set, so a compact
    dataset's meta.json (and its hash, which checkpoints record) stays what it was before
    the option existed."""
    record = dataclasses.asdict(cfg) | {"langs": list(cfg.langs)}
    if not cfg.full_vocab:
        del record["full_vocab"]
    return record


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
    source_flag: str = "--source",
) -> Path:
    """Prepare a dataset into ``out`` atomically: everything is written to a temporary
    folder beside it and renamed at the end, so a failure leaves ``out`` as it was.
    ``source_flag`` spells the source option in messages (train.py's is --data_source)."""
    cfg = cfg or PrepareConfig()
    cfg.validate()
    out = paths.resolve_in_root(out)
    recover_leftovers(out, progress)
    if (out / "meta.json").exists() and not overwrite:
        raise UserError(f"{out} already holds a prepared dataset; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another --out")
    others = _foreign_files(out)
    if others:  # the folder is replaced whole: never take a user's files with it
        raise UserError(
            f"{out} holds files that are not part of a prepared dataset "
            f"({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}); preparing would "
            "replace the folder and lose them: choose a new or empty --out")
    try:  # early: a folder that cannot be made should not cost the tokenization first
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {out.parent} ({exc.strerror or exc}); choose another "
                        "--out") from None
    t0 = time.perf_counter()
    enc = get_encoding(cfg.encoding)

    roots = resolve_source(source, cfg.form, cfg.langs, flag=source_flag)
    files = read_source(roots, cfg.form, cfg.langs)
    if progress:  # what the next minutes are spent on (the bar follows)
        print(f"preparing {out}: {len(files)} Europarl {cfg.form} files "
              f"({sum(len(f.data) for f in files) / 2**20:,.1f} MiB, {','.join(cfg.langs)}), "
              f"{cfg.encoding}{' full vocabulary' if cfg.full_vocab else ''}",
              file=sys.stderr, flush=True)
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
            bar = progress_bar(n_bytes, "tokenize", "B", progress)
            for u in units:
                for lang in u.texts:
                    u.tokens[lang] = pending.pop((u.uid, lang)).result()
                    bar.update(nbytes[u.uid, lang])
            bar.close()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise

    splits = assign_splits(units, cfg)
    base_ids = (np.arange(enc.n_vocab) if cfg.full_vocab else
                build_compact_vocab(enc, [t for u in splits["train"] for t in u.tokens.values()]))
    tok = Tokenizer(cfg.encoding, base_ids)
    dtype = np.dtype(np.uint16) if tok.vocab_size <= 1 << 16 else np.dtype(np.uint32)
    eot = np.array([tok.eot_id], dtype=dtype)

    # mkdir, not mkdtemp: the dataset folder gets the user's umask like any other (mkdtemp
    # makes it 0700); the random part keeps two preparations from sharing it
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
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
            "config": _config_record(cfg),
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
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # the dataset that was there stays
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):  # a full disk, a permission: out is as it was
            raise UserError(f"could not write the dataset {out} ({exc.strerror or exc}); "
                            f"nothing was changed there: free space or choose another --out"
                            ) from None
        raise
    return out


def recover_leftovers(out: Path, report: bool = True) -> list[str]:
    """Tidy what a preparation of ``out`` killed mid-way (SIGKILL, a power cut) left beside
    it, once its process is gone: its temporary folders (``.NAME.tmp-PID-*``) are removed,
    and the old dataset an ``--overwrite`` had moved aside (``.NAME.old-PID``) is put back if
    the new one never took its place (else removed). A folder holding anything but a
    dataset's own files is left alone. Returns what was done (also printed when ``report``)."""
    done: list[str] = []
    if not out.parent.is_dir():
        return done
    leftover = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)(?:-[0-9a-f]+)?")
    for p in sorted(out.parent.iterdir()):
        m = leftover.fullmatch(p.name)
        if (not m or p.is_symlink() or not p.is_dir() or pid_alive(int(m[2]))
                or _foreign_files(p)):
            continue
        if m[1] == "old" and not out.exists() and not out.is_symlink():
            os.replace(p, out)
            done.append(f"restored {out} from {p.name}, moved aside by an --overwrite that "
                        "was killed before its new dataset took the name")
        else:
            shutil.rmtree(p)
            done.append(f"removed {p}, left by a preparation that was killed (process "
                        f"{m[2]} is gone)")
    if report:
        for line in done:
            print(line, file=sys.stderr, flush=True)
    return done


def _foreign_files(out: Path) -> list[str]:
    """What ``out`` holds besides a prepared dataset's own files (meta.json, *.bin)."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir()
                  if not (p.is_file() and (p.name == "meta.json" or p.suffix == ".bin")))



def ensure_prepared(
    data_dir: str | os.PathLike,
    *,
    source: str | None = None,
    langs: str | Sequence[str] = ("en", "fr"),
    form: str = "raw",
    block_size: int = 1024,
    seed: int = 1337,
    encoding: str = DEFAULT_ENCODING,
    full_vocab: bool = False,
    progress: bool = True,
    source_flag: str = "--source",
) -> Path:
    """The prepared dataset at ``data_dir``, preparing it on first use. An existing dataset
    must match the requested languages, form and encoding (by name: ``gpt2`` read from a
    snapshot folder is still ``gpt2``), hold the encoding's own ids when ``full_vocab`` (a
    pretrained model's), and hold more than ``block_size`` tokens per language in val and
    test."""
    data_dir = resolve_data_dir(data_dir)
    wanted = parse_langs(langs)
    recover_leftovers(data_dir, progress)  # a killed --overwrite may have moved it aside
    if not (data_dir / "meta.json").exists():
        cfg = PrepareConfig(langs=wanted, form=form, encoding=encoding, seed=seed,
                            block_size=max(block_size, 1024), full_vocab=full_vocab)
        try:
            prepare(source, data_dir, cfg, progress=progress, source_flag=source_flag)
        except UserError as exc:
            if "too small" not in str(exc):
                raise
            # A small corpus can still serve a small model: use the floor of this block size.
            prepare(source, data_dir, dataclasses.replace(cfg, block_size=block_size),
                    progress=progress, source_flag=source_flag)
    meta = load_meta(data_dir)
    problems = []
    if list(meta["langs"]) != list(wanted):
        problems.append(f"languages {','.join(meta['langs'])} (asked: {','.join(wanted)})")
    if meta.get("form") != form:
        problems.append(f"form {meta.get('form')} (asked: {form})")
    if meta["encoding"].split(":")[0] != encoding.split(":")[0]:
        problems.append(f"encoding {meta['encoding']} (asked: {encoding})")
    if full_vocab and not meta["config"].get("full_vocab"):
        problems.append("a compact vocabulary (asked: the encoding's own ids, --full_vocab)")
    if problems:
        raise UserError(
            f"{data_dir} was prepared with {'; '.join(problems)}; use another --data_dir or "
            f"re-prepare it with `python -m backpack_nb.data prepare --out {data_dir} "
            f"--langs {','.join(wanted)} --form {form} --encoding {encoding}"
            f"{' --full_vocab' if full_vocab else ''} --overwrite`"
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
        f"encoding {meta['encoding']}: "
        f"{'full' if meta['config'].get('full_vocab') else 'compact'} vocabulary "
        f"{meta['vocab_size']:,} of "
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
    p.add_argument("--full_vocab", action="store_true",
                   help="keep the encoding's whole vocabulary and ids (for a pretrained model, "
                   "e.g. --encoding gpt2:/path/to/snapshot --full_vocab)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset")
    s = sub.add_parser("stats", help="print a prepared dataset's statistics")
    s.add_argument("data_dir", nargs="?", default="europarl")
    return ap


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
            full_vocab=args.full_vocab,
        )
        out = resolve_data_dir(args.out) if args.out else paths.data_root() / "europarl"
        t0 = time.perf_counter()
        try:
            prepare(args.source, out, cfg, overwrite=args.overwrite)
        except KeyboardInterrupt:
            # prepare() removed its temporary folder on the way out
            exit_interrupted(f"nothing was written ({out} is as it was): run the same command "
                             "again to prepare it")
        meta = load_meta(out)
        dt = time.perf_counter() - t0
        print(f"prepared {out} in {dt:.2f} s ({meta['text_bytes'] / dt / 2**20:.2f} MiB/s of text)")
        print(format_stats(meta))
    else:
        print(format_stats(load_meta(resolve_data_dir(args.data_dir), flag="stats")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
