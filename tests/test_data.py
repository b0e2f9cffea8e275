"""Preparing Europarl (backpack_nb.data): round trips, split leakage, bad inputs, paths.

The expected texts are computed here from the raw files with a parser of our own, not with
the library's, so a parsing bug cannot hide behind itself."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from backpack_nb import data, dataset, europarl, paths
from backpack_nb.errors import UserError
from backpack_nb.tokenizer import get_encoding

ROOT = Path(__file__).resolve().parents[1]
PREPARED_BLOCK_SIZE = 64  # what conftest.prepared_europarl uses (checked against meta.json below)

LANGS = ("en", "fr")
SPLITS = ("train", "val", "test")
_CHAPTER_LINE = re.compile(r"^<CHAPTER ID=(\w+)>$")


# ----------------------------------------------------------------------------------------
# an independent reading of the sources


def raw_chapters(source: Path, lang: str) -> dict[str, str]:
    """'ep-00-01-17/3' -> text of that chapter: markup and empty lines dropped."""
    out: dict[str, list[str]] = {}
    for f in sorted((source / "raw" / "txt" / lang).glob("ep-*.txt")):
        day = f.stem
        chapter = "0"
        for line in f.read_text(encoding="utf-8").split("\n"):
            m = _CHAPTER_LINE.match(line)
            if m:
                chapter = m.group(1)
                continue
            if line == "" or line == "<P>" or line.startswith("<SPEAKER ") or line.startswith("<CHAPTER"):
                continue
            out.setdefault(f"{day}/{chapter}", []).append(line + "\n")
    return {k: "".join(v) for k, v in out.items()}


def aligned_blocks(path: Path, pair: str, block_lines: int) -> dict[str, str]:
    """'block/000003' -> non-empty lines 300..399 of an aligned file (block i of every pair
    is one unit, so a block and its translations from other pairs share a split)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines[-1] == "":
        lines = lines[:-1]
    out = {}
    for b in range(0, len(lines), block_lines):
        body = "".join(l + "\n" for l in lines[b : b + block_lines] if l != "")
        if body:
            out[f"block/{b // block_lines:06d}"] = body
    return out


def split_docs(tok, ids) -> list[str]:
    """Decoded documents of a token file, each one ended by <|endoftext|>."""
    ids = np.asarray(ids, dtype=np.int64)
    assert len(ids) and ids[-1] == tok.eot_id, "a token file must end with <|endoftext|>"
    ends = np.flatnonzero(ids == tok.eot_id)
    docs, start = [], 0
    for e in ends:
        docs.append(tok.decode(ids[start:e]))
        start = e + 1
    return docs


def hidden_leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


@pytest.fixture(scope="module")
def meta(prepared_europarl):
    return dataset.load_meta(prepared_europarl)


@pytest.fixture(scope="module")
def tok(prepared_europarl):
    return dataset.load_tokenizer(prepared_europarl)


@pytest.fixture(scope="module")
def chapters(europarl_source):
    return {lang: raw_chapters(europarl_source, lang) for lang in LANGS}


def _copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _bins(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.bin"))}


# ----------------------------------------------------------------------------------------
# round trip


def test_our_parser_sees_the_sample(chapters):
    # 6 + 10 + 4 + 1 chapters, none of them empty, the same ones in both languages
    assert len(chapters["en"]) == 21
    assert set(chapters["en"]) == set(chapters["fr"])
    assert chapters["en"]["ep-00-01-17/1"].startswith("Resumption of the session\nI declare resumed")


@pytest.mark.parametrize("split", ["val", "test"])
@pytest.mark.parametrize("lang", LANGS)
def test_heldout_roundtrip(prepared_europarl, meta, tok, chapters, split, lang):
    units = meta["splits"][split]["units"]
    ids = dataset.load_tokens(prepared_europarl, split, lang)
    assert ids.dtype == np.dtype(meta["dtype"])
    docs = split_docs(tok, ids)
    expected = [chapters[lang][u] for u in units if u in chapters[lang]]
    assert len(docs) == len(expected) == meta["splits"][split]["langs"][lang]["documents"]
    for u, got, want in zip(units, docs, expected):
        assert got == want, f"{split}_{lang}.bin: document {u} differs from the source"
    assert len(ids) == meta["splits"][split]["langs"][lang]["tokens"]
    assert meta["splits"][split]["langs"][lang]["bytes"] == sum(len(t.encode("utf-8")) for t in expected)


@pytest.mark.parametrize("split", ["val", "test"])
def test_heldout_all_languages_file(prepared_europarl, split):
    both = np.asarray(dataset.load_tokens(prepared_europarl, split))
    parts = [np.asarray(dataset.load_tokens(prepared_europarl, split, lang)) for lang in LANGS]
    assert np.array_equal(both, np.concatenate(parts))


def test_train_roundtrip(prepared_europarl, meta, tok, chapters):
    units = meta["splits"]["train"]["units"]
    docs = split_docs(tok, dataset.load_tokens(prepared_europarl, "train"))
    expected = [chapters[lang][u] for u in units for lang in LANGS if u in chapters[lang]]
    assert len(docs) == len(expected)
    assert docs == expected
    with pytest.raises(UserError):
        dataset.load_tokens(prepared_europarl, "train", "en")


def test_units_cover_the_corpus(meta, chapters):
    units = [u for s in SPLITS for u in meta["splits"][s]["units"]]
    assert sorted(units) == sorted(set(chapters["en"]) | set(chapters["fr"]))


# ----------------------------------------------------------------------------------------
# split leakage, floors, determinism


def test_no_unit_in_two_splits(meta):
    seen: dict[str, str] = {}
    for split in SPLITS:
        for u in meta["splits"][split]["units"]:
            assert u not in seen, f"{u} is in {seen.get(u)} and {split}"
            seen[u] = split
    assert all(meta["splits"][s]["units"] for s in SPLITS)


@pytest.mark.parametrize("split", ["val", "test"])
def test_translations_share_a_split(prepared_europarl, meta, tok, chapters, split):
    """Each held-out chapter's en and fr texts are both in that split, and in no other."""
    texts = {lang: split_docs(tok, dataset.load_tokens(prepared_europarl, split, lang)) for lang in LANGS}
    train_docs = set(split_docs(tok, dataset.load_tokens(prepared_europarl, "train")))
    for u in meta["splits"][split]["units"]:
        for lang in LANGS:
            assert chapters[lang][u] in texts[lang], f"{lang} text of {u} is not in {split}"
            assert chapters[lang][u] not in train_docs, f"{lang} text of {u} is also in train"


@pytest.mark.parametrize("split", ["val", "test"])
def test_heldout_floors(prepared_europarl, meta, split):
    floor = 4 * PREPARED_BLOCK_SIZE
    s = meta["splits"][split]
    assert meta["config"]["block_size"] == PREPARED_BLOCK_SIZE
    assert s["documents"] >= 2 and len(s["units"]) >= 2
    itemsize = np.dtype(meta["dtype"]).itemsize
    for lang in LANGS:
        assert s["langs"][lang]["documents"] >= 2
        assert s["langs"][lang]["tokens"] >= floor
        size = (prepared_europarl / f"{split}_{lang}.bin").stat().st_size
        assert size == s["langs"][lang]["tokens"] * itemsize
        assert size // itemsize >= floor


def test_split_is_deterministic_and_seeded(prepared_europarl, europarl_source, meta, tmp_path):
    cfg = data.PrepareConfig(langs=LANGS, form="raw", block_size=PREPARED_BLOCK_SIZE)
    again = data.prepare(europarl_source, tmp_path / "again", cfg, progress=False)
    assert _bins(again) == _bins(prepared_europarl)
    assert set(_bins(again)) == {f"{s}.bin" for s in SPLITS} | {f"{s}_{l}.bin" for s in ("val", "test") for l in LANGS}
    meta2 = dataset.load_meta(again)
    for split in SPLITS:
        assert meta2["splits"][split]["units"] == meta["splits"][split]["units"]
    assert meta2["base_ids"] == meta["base_ids"]

    # another seed, through the CLI and over an existing dataset with --overwrite
    other = _copy_dataset(prepared_europarl, tmp_path / "other")
    rc = data.main(["prepare", "--source", str(europarl_source), "--out", str(other),
                    "--block_size", str(PREPARED_BLOCK_SIZE), "--seed", "7", "--overwrite"])
    assert rc == 0
    meta3 = dataset.load_meta(other)
    assert meta3["config"]["seed"] == 7
    assert meta3["splits"]["val"]["units"] != meta["splits"]["val"]["units"]
    assert sorted(u for s in SPLITS for u in meta3["splits"][s]["units"]) == sorted(
        u for s in SPLITS for u in meta["splits"][s]["units"])
    assert hidden_leftovers(other) == []


# ----------------------------------------------------------------------------------------
# bad inputs: exit status 2, a message that says what to do, nothing left behind


def _bad_input(case: str, tmp_path: Path, src: Path) -> tuple[list[str], list[str]]:
    """(prepare arguments, substrings the error message must contain)."""
    if case == "missing_path":
        return ["--source", str(tmp_path / "nowhere")], ["nowhere", "does not exist", "--source"]
    if case == "empty_dir":
        (tmp_path / "empty").mkdir()
        return ["--source", str(tmp_path / "empty")], [str(tmp_path / "empty"), "empty"]
    if case == "language_not_in_source":
        return ["--source", str(src), "--langs", "en,de"], ["'de'", "--langs"]
    if case == "unknown_language":
        return ["--source", str(src), "--langs", "en,xx"], ["unknown language", "xx"]
    if case == "garbage_tgz":
        bad = tmp_path / "bad.tgz"
        bad.write_bytes(bytes(range(256)) * 40)
        return ["--source", str(bad)], ["bad.tgz", ".tgz"]
    if case == "not_an_archive":
        txt = tmp_path / "notes.txt"
        txt.write_text("hello\n")
        return ["--source", str(txt)], ["notes.txt", ".tgz"]
    if case == "invalid_utf8":
        copy = tmp_path / "src"
        shutil.copytree(src / "raw", copy / "raw")
        f = copy / "raw" / "txt" / "fr" / "ep-00-01-19.txt"
        lines = f.read_bytes().split(b"\n")
        assert not lines[99].startswith(b"<") and lines[99]
        lines[99] = lines[99][:5] + b"\xff" + lines[99][5:]  # line 100
        f.write_bytes(b"\n".join(lines))
        return ["--source", str(copy)], ["fr/ep-00-01-19.txt", "line 100", "UTF-8"]
    if case == "unreachable_url":
        return ["--source", "http://127.0.0.1:9/europarl.tgz"], ["127.0.0.1:9", "--source", "EUROPARL_SOURCE"]
    if case == "corpus_too_small":
        return ["--source", str(src), "--block_size", "100000"], ["too small", "--block_size"]
    raise AssertionError(case)


BAD_INPUTS = ["missing_path", "empty_dir", "language_not_in_source", "unknown_language", "garbage_tgz",
              "not_an_archive", "invalid_utf8", "unreachable_url", "corpus_too_small"]


@pytest.mark.parametrize("mode", ["fresh", "overwrite"])
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input(case, mode, tmp_path, europarl_source, prepared_europarl, capsys):
    args, needles = _bad_input(case, tmp_path, europarl_source)
    out = tmp_path / "outdir" / "ds"
    if mode == "overwrite":
        _copy_dataset(prepared_europarl, out)
        before = (out / "meta.json").read_bytes()
        args = args + ["--overwrite"]
    capsys.readouterr()
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as ei:
        data.main(["prepare", *args, "--out", str(out)])
    elapsed = time.perf_counter() - t0
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err
    for needle in needles:
        assert needle in err, f"{needle!r} missing from the message:\n{err}"
    if case == "unreachable_url":
        assert elapsed < 15, "a refused connection must fail at once"
        downloads = paths.data_root() / "downloads"
        assert not (downloads / "europarl.tgz").exists() and not (downloads / "europarl.tgz.part").exists()
    if mode == "fresh":
        assert not out.exists()
    else:
        assert (out / "meta.json").read_bytes() == before
        assert _bins(out) == _bins(prepared_europarl)
    assert hidden_leftovers(out) == []


def test_existing_dataset_needs_overwrite(tmp_path, europarl_source, prepared_europarl, capsys):
    out = _copy_dataset(prepared_europarl, tmp_path / "ds")
    before = (out / "meta.json").read_bytes()
    with pytest.raises(SystemExit) as ei:
        data.main(["prepare", "--source", str(europarl_source), "--out", str(out), "--block_size", "64", "--seed", "3"])
    assert ei.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "meta.json").read_bytes() == before
    assert hidden_leftovers(out) == []


def test_bad_settings_raise_user_error(tmp_path, europarl_source):
    for cfg in (data.PrepareConfig(langs=()), data.PrepareConfig(langs=("en", "en")),
                data.PrepareConfig(form="sentences"), data.PrepareConfig(val_fraction=0.7),
                data.PrepareConfig(block_size=0), data.PrepareConfig(aligned_block_lines=0)):
        with pytest.raises(UserError):
            data.prepare(europarl_source, tmp_path / "x", cfg, progress=False)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------
# other source forms


def test_tgz_source_matches_folder(tmp_path, europarl_source, prepared_europarl, meta):
    archive = tmp_path / "europarl.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for f in sorted((europarl_source / "raw" / "txt").rglob("*.txt")):
            tar.add(f, arcname=f.relative_to(europarl_source / "raw").as_posix())
    with tarfile.open(archive) as tar:
        assert "txt/en/ep-00-01-17.txt" in tar.getnames()
    cfg = data.PrepareConfig(langs=LANGS, form="raw", block_size=PREPARED_BLOCK_SIZE)
    out = data.prepare(archive, tmp_path / "from_tgz", cfg, progress=False)
    m = dataset.load_meta(out)
    assert m["base_ids"] == meta["base_ids"]
    for split in SPLITS:
        assert m["splits"][split]["units"] == meta["splits"][split]["units"]
    assert _bins(out) == _bins(prepared_europarl)
    assert len(m["source_files"]) == 8
    assert all(f["name"].startswith("europarl.tgz:txt/") for f in m["source_files"])


@pytest.fixture(scope="module")
def aligned_en_fr(europarl_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("aligned") / "en_fr"
    assert data.main(["prepare", "--source", str(europarl_source), "--form", "aligned",
                      "--langs", "en,fr", "--out", str(out)]) == 0
    return out


def test_aligned_roundtrip_and_leakage(aligned_en_fr, europarl_source):
    meta = dataset.load_meta(aligned_en_fr)
    tok = dataset.load_tokenizer(aligned_en_fr)
    assert meta["form"] == "aligned" and meta["langs"] == ["en", "fr"]
    lines = meta["config"]["aligned_block_lines"]
    al = europarl_source / "aligned"
    blocks = {lang: aligned_blocks(al / f"europarl-v7.fr-en.{lang}", "fr-en", lines) for lang in LANGS}
    assert set(blocks["en"]) == set(blocks["fr"]) and len(blocks["en"]) == 3000 // lines

    # leakage by block id: each block in exactly one split, every block somewhere
    where: dict[str, str] = {}
    for split in SPLITS:
        for u in meta["splits"][split]["units"]:
            assert u not in where
            where[u] = split
    assert set(where) == set(blocks["en"])

    for split in ("val", "test"):
        units = meta["splits"][split]["units"]
        assert len(units) >= 2
        for lang in LANGS:
            text_docs = split_docs(tok, dataset.load_tokens(aligned_en_fr, split, lang))
            assert text_docs == [blocks[lang][u] for u in units]  # en and fr of a block together
            joined = "".join(text_docs)
            assert "\n\n" not in joined and not joined.startswith("\n")
            assert meta["splits"][split]["langs"][lang]["tokens"] >= 4 * meta["config"]["block_size"]
    train = split_docs(tok, dataset.load_tokens(aligned_en_fr, "train"))
    assert train == [blocks[lang][u] for u in meta["splits"]["train"]["units"] for lang in LANGS]
    assert all(d and "\n\n" not in d and not d.startswith("\n") for d in train)


@pytest.fixture(scope="module")
def aligned_en_fr_de(europarl_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("aligned3") / "en_fr_de"
    assert data.main(["prepare", "--source", str(europarl_source), "--form", "aligned", "--langs", "en,fr,de",
                      "--block_size", "32", "--aligned_block_lines", "20", "--out", str(out)]) == 0
    return out


def test_aligned_three_languages(aligned_en_fr_de, europarl_source):
    meta = dataset.load_meta(aligned_en_fr_de)
    tok = dataset.load_tokenizer(aligned_en_fr_de)
    assert meta["langs"] == ["en", "fr", "de"]
    de_blocks = aligned_blocks(europarl_source / "aligned" / "europarl-v7.de-en.de", "de-en", 20)
    for split in ("val", "test"):
        for lang in ("en", "fr", "de"):
            assert (aligned_en_fr_de / f"{split}_{lang}.bin").is_file()
            assert meta["splits"][split]["langs"][lang]["tokens"] >= 4 * 32
        de_units = [u for u in meta["splits"][split]["units"] if u in de_blocks]
        docs = split_docs(tok, dataset.load_tokens(aligned_en_fr_de, split, "de"))
        assert docs == [de_blocks[u] for u in de_units]
    # English comes from one pair only (fr-en), never twice; German units hold German only
    fr_en = aligned_blocks(europarl_source / "aligned" / "europarl-v7.fr-en.en", "fr-en", 20)
    units = [u for s in SPLITS for u in meta["splits"][s]["units"]]
    assert sorted(units) == sorted(set(fr_en) | set(de_blocks))
    assert sum(meta["splits"][s]["langs"]["en"]["documents"] for s in SPLITS) == len(fr_en)
    assert sum(meta["splits"][s]["langs"]["de"]["documents"] for s in SPLITS) == len(de_blocks) == 5


def test_aligned_three_languages_no_translation_leak(aligned_en_fr_de, europarl_source):
    """The module promises that a translation of held-out text is never trained on. Line i of
    europarl-v7.de-en.de translates line i of de-en.en, and those English sentences are (almost
    all) the first lines of fr-en.en: a held-out German block must not have most of its English
    counterpart in the training split."""
    meta = dataset.load_meta(aligned_en_fr_de)
    al = europarl_source / "aligned"
    de_en = [l for l in (al / "europarl-v7.de-en.en").read_text(encoding="utf-8").split("\n")]
    fr_en_blocks = aligned_blocks(al / "europarl-v7.fr-en.en", "fr-en", 20)
    train_en = {l for u in meta["splits"]["train"]["units"] if u in fr_en_blocks
                for l in fr_en_blocks[u].split("\n") if len(l) > 40}
    de_blocks = aligned_blocks(al / "europarl-v7.de-en.de", "de-en", 20)
    leaks, checked = [], 0
    for split in ("val", "test"):
        for u in meta["splits"][split]["units"]:
            if u not in de_blocks:
                continue
            checked += 1
            b = int(u.split("/")[1])
            english = [l for l in de_en[20 * b : 20 * b + 20] if len(l) > 40]
            trained = [l for l in english if l in train_en]
            if english and len(trained) * 2 > len(english):
                leaks.append(f"{split} {u}: {len(trained)}/{len(english)} English counterparts in train")
    assert checked >= 2  # val and test each hold German
    assert not leaks, "; ".join(leaks)


def test_raw_parser_keeps_unusual_line_characters(europarl_source):
    """Only \\n ends a line in Europarl files: a form feed, U+2028 or U+0085 inside a sentence
    is text and must survive (str.splitlines would cut the sentence there)."""
    text = ("<CHAPTER ID=1>\nTitle\n<SPEAKER ID=1 NAME=\"X\">\n"
            "one\x0ctwo\nthree\u2028four\nfive\x85six\nseven\x1cend\n<P>\n")
    assert europarl.parse_raw_day(text) == {"1": "Title\none\x0ctwo\nthree\u2028four\nfive\x85six\nseven\x1cend\n"}


def test_raw_parser_edges():
    """Text before the first chapter is chapter 0; a last line without a newline still ends
    in one; a chapter with only markup and empty lines is no document."""
    text = "<SPEAKER ID=9 NAME=\"A\">\nbefore\n\n<CHAPTER ID=2>\n<P>\n\n<CHAPTER ID=3>\nlast line"
    assert europarl.parse_raw_day(text) == {"0": "before\n", "3": "last line\n"}


def test_raw_parser_drops_exactly_markup_and_blank_lines():
    """Markup lines (with trailing blanks, CR line ends), blank lines and whitespace-only
    lines go, at the start, in the middle and at the end of a chapter; text lines that
    merely contain or resemble markup stay; a chapter line must start its line."""
    text = ("<P>  \r\nfirst\r\n \t\n<SPEAKER ID=1 NAME=\"B\">\nsays <P> here\n<Pa>\n"
            "x <CHAPTER ID=5>\n\n<P>\n<CHAPTER ID=\"7\" >\n\n<P>\nseven\n<P>\n\n")
    assert europarl.parse_raw_day(text) == {"0": "first\r\nsays <P> here\n<Pa>\nx <CHAPTER ID=5>\n",
                                        "7": "seven\n"}


# ----------------------------------------------------------------------------------------
# reading prepared datasets


def test_truncated_bin_is_reported(tmp_path, prepared_europarl):
    d = _copy_dataset(prepared_europarl, tmp_path / "ds")
    f = d / "val.bin"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size - 2)
    with pytest.raises(UserError) as ei:
        dataset.load_tokens(d, "val")
    assert str(f) in str(ei.value)
    assert len(dataset.load_tokens(d, "val", "en")) > 0  # the other files are still fine
    (d / "test_fr.bin").unlink()
    with pytest.raises(UserError) as ei:
        dataset.load_tokens(d, "test", "fr")
    assert "test_fr.bin" in str(ei.value)


def test_load_tokens_bad_arguments(prepared_europarl):
    with pytest.raises(UserError):
        dataset.load_tokens(prepared_europarl, "dev")
    with pytest.raises(UserError) as ei:
        dataset.load_tokens(prepared_europarl, "val", "de")
    assert "de" in str(ei.value)


def test_load_meta_without_meta(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError) as ei:
        dataset.load_meta(tmp_path / "nothing")
    assert "prepare" in str(ei.value)
    with pytest.raises(UserError):
        dataset.load_tokenizer(tmp_path / "nothing")


def test_load_meta_damaged(tmp_path):
    d = tmp_path / "damaged"
    d.mkdir()
    (d / "meta.json").write_text("{not json")
    with pytest.raises(UserError) as ei:
        dataset.load_meta(d)
    assert "--overwrite" in str(ei.value)
    (d / "meta.json").write_text('{"encoding": "cl100k_base"}')
    with pytest.raises(UserError) as ei:
        dataset.load_meta(d)
    assert "vocab_size" in str(ei.value)


def test_ensure_prepared(europarl_source, session_tmp):
    name = "ensure_prepared_test_data"
    d = data.ensure_prepared(name, source=str(europarl_source), langs="en,fr", form="raw",
                             block_size=64, progress=False)
    assert d == Path(os.environ["BACKPACK_NB_DATA"]).resolve() / name
    assert d.is_relative_to(session_tmp.resolve())
    meta = dataset.load_meta(d)
    assert meta["langs"] == ["en", "fr"] and meta["form"] == "raw"
    for split in ("val", "test"):
        for lang in LANGS:
            assert meta["splits"][split]["langs"][lang]["tokens"] > 64
    mtime = (d / "meta.json").stat().st_mtime_ns
    content = (d / "meta.json").read_bytes()
    assert data.ensure_prepared(name, source=str(europarl_source), langs=("en", "fr"), block_size=64,
                                progress=False) == d
    assert (d / "meta.json").stat().st_mtime_ns == mtime
    assert (d / "meta.json").read_bytes() == content
    with pytest.raises(UserError) as ei:
        data.ensure_prepared(name, source=str(europarl_source), langs="en,de", block_size=64, progress=False)
    assert "en,de" in str(ei.value) and "--overwrite" in str(ei.value)
    with pytest.raises(UserError):
        data.ensure_prepared(name, source=str(europarl_source), langs="en,fr", form="aligned", block_size=64,
                             progress=False)
    with pytest.raises(UserError):  # more context than val/test hold
        data.ensure_prepared(name, source=str(europarl_source), langs="en,fr", block_size=10**6, progress=False)
    assert (d / "meta.json").stat().st_mtime_ns == mtime


# ----------------------------------------------------------------------------------------
# paths


def test_project_root_from_anywhere(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("BACKPACK_NB_DATA", "BACKPACK_NB_OUTPUTS")}
    code = "from backpack_nb import paths, dataset; print(paths.project_root()); print(dataset.resolve_data_dir('out/x'))"
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    root, out_x = res.stdout.split("\n")[:2]
    assert Path(root) == ROOT
    assert (Path(root) / "pyproject.toml").is_file() and (Path(root) / "backpack_nb").is_dir()
    assert Path(out_x) == ROOT / "out" / "x"
    assert paths.project_root() == ROOT


def test_resolve_data_dir():
    data_root = Path(os.environ["BACKPACK_NB_DATA"]).resolve()
    assert paths.data_root() == data_root
    assert dataset.resolve_data_dir("europarl") == data_root / "europarl"
    assert dataset.resolve_data_dir("out/x") == paths.project_root() / "out" / "x"
    assert dataset.resolve_data_dir("/abs/path") == Path("/abs/path")
    assert paths.resolve_in_root("params") == ROOT / "params"
    assert paths.outputs_root() == Path(os.environ["BACKPACK_NB_OUTPUTS"]).resolve()


# ----------------------------------------------------------------------------------------
# command line


def test_cli_stats(prepared_europarl, meta, capsys):
    capsys.readouterr()
    assert data.main(["stats", str(prepared_europarl)]) == 0
    out = capsys.readouterr().out
    assert "cl100k_base" in out and f"{meta['vocab_size']:,}" in out
    for split in SPLITS:
        for lang in LANGS:
            s = meta["splits"][split]["langs"][lang]
            row = re.search(rf"^{split}\s+{lang}\s+(\d+)\s+([\d,]+)\s+([\d,]+)\s", out, re.M)
            assert row, f"no {split}/{lang} row in:\n{out}"
            assert int(row.group(1)) == s["documents"]
            assert int(row.group(2).replace(",", "")) == s["tokens"]
            assert int(row.group(3).replace(",", "")) == s["bytes"]
        assert re.search(rf"^{split}\s+all\s+{meta['splits'][split]['documents']}\s", out, re.M)


def test_cli_stats_missing_dataset(tmp_path, capsys):
    with pytest.raises(SystemExit) as ei:
        data.main(["stats", str(tmp_path / "none")])
    assert ei.value.code == 2
    assert "prepare" in capsys.readouterr().err


# --- a --data_dir typo, Ctrl-C, folder modes (issue 17) ------------------------------------


def test_a_data_dir_typo_is_an_error_not_a_new_dataset(prepared_europarl, session_tmp):
    """At f3defa5 `train.py --data_dir europarl_sampel` prepared (or downloaded) a second
    dataset under the typo. Now: exit 2 naming what exists, the likely name and the prepare
    command; nothing is created."""
    from backpack_nb.dataset import train_config as config_from_argv

    root = paths.data_root()
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(UserError) as exc:
        config_from_argv(["--config", "tiny_backpack", "--data_dir", "europarl_sampel"])
    msg = str(exc.value)
    assert "--data_dir europarl_sampel: no prepared dataset" in msg
    assert "(did you mean 'europarl_sample'?)" in msg and "europarl_sample" in msg.split(";")[1]
    assert msg.endswith("to create it: python -m backpack_nb.data prepare --out europarl_sampel "
                        "--langs en,fr --form raw")
    with pytest.raises(UserError, match=r"prepare --out /nowhere/ep --langs en,fr --form raw "
                                        r"--source /my/europarl$"):
        config_from_argv(["--config", "tiny_backpack", "--data_dir", "/nowhere/ep",
                          "--data_source", "/my/europarl"])
    assert sorted(p.name for p in root.iterdir()) == before


def test_the_params_files_own_dataset_is_still_prepared_on_first_use(prepared_europarl):
    """The seed's `--config train_europarl_scratch --data_dir europarl` on a fresh machine, or
    no --data_dir at all: the dataset the params file names, prepared by train.py itself."""
    from backpack_nb.dataset import train_config as config_from_argv

    assert not (paths.data_root() / "europarl").exists()
    cfg = config_from_argv(["--config", "train_europarl_scratch", "--data_dir", "europarl"])
    assert cfg.data_dir == "europarl"
    assert config_from_argv(["--config", "tiny_backpack"]).data_dir == "europarl_tiny"
    assert config_from_argv(["--data_dir", "europarl"]).data_dir == "europarl"
    assert config_from_argv(["--data_dir", "europarl_sample"]).data_dir == "europarl_sample"


def test_train_py_names_its_own_source_flag(tmp_path, monkeypatch):
    """Preparing from train.py, a missing source is named as train.py spells it."""
    with pytest.raises(UserError, match="with --data_source"):
        data.ensure_prepared(tmp_path / "d", source=str(tmp_path / "none"), progress=False,
                             source_flag="--data_source")
    with pytest.raises(UserError, match="with --source"):
        data.prepare(str(tmp_path / "none"), tmp_path / "d", progress=False)


def test_ctrl_c_while_preparing_is_one_line_and_leaves_nothing(tmp_path, europarl_source,
                                                               monkeypatch, capsys):
    """At f3defa5 Ctrl-C printed a KeyboardInterrupt traceback."""
    out = tmp_path / "ep"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "_write_tokens", interrupted)  # mid-write: the temporary folder exists
    with pytest.raises(SystemExit) as exc:
        data.main(["prepare", "--source", str(europarl_source), "--out", str(out),
                   "--block_size", "64"])
    rc = exc.value.code
    err = capsys.readouterr().err
    lines = err.splitlines()  # what it was reading, the tokenizer's first line, then the error
    assert rc == 130 and lines[-1].startswith("error: interrupted") and err.count("error") == 1
    assert f"nothing was written ({out} is as it was)" in lines[-1]
    assert lines[0].startswith(f"preparing {out}: ")
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_prepared_folder_follows_the_umask(tmp_path, europarl_source, monkeypatch):
    """At f3defa5 a prepared dataset folder was 0700 (made by mkdtemp)."""
    old = os.umask(0o022)
    try:
        out = data.prepare(europarl_source, tmp_path / "ep",
                           data.PrepareConfig(langs=("en",), block_size=64), progress=False)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "meta.json").stat().st_mode & 0o777 == 0o644


def test_full_vocabulary_keeps_the_encodings_ids(tmp_path, europarl_source, meta):
    """--full_vocab: no compaction, ids are the encoding's own (what a pretrained model
    reads); a compact dataset's meta.json does not change (checkpoints record its hash)."""
    from hub_fixtures import TEXT, write_small_gpt2_bpe

    write_small_gpt2_bpe(tmp_path / "bpe", TEXT, n_merges=63)
    encoding = f"gpt2:{tmp_path / 'bpe'}"
    assert data.main(["prepare", "--source", str(europarl_source), "--langs", "en",
                      "--encoding", encoding, "--full_vocab", "--block_size", "64",
                      "--out", str(tmp_path / "full")]) == 0
    full = dataset.load_meta(tmp_path / "full")
    assert full["vocab_size"] == 320 and full["base_ids"] == list(range(320))
    assert full["config"]["full_vocab"] is True
    enc = get_encoding(encoding)
    ids = np.asarray(dataset.load_tokens(tmp_path / "full", "val", "en"))
    text = enc.decode(ids.tolist())
    first_doc = text.split("<|endoftext|>")[0]
    assert enc.encode_ordinary(first_doc) == ids[:len(enc.encode_ordinary(first_doc))].tolist()
    assert "full_vocab" not in meta["config"]  # the session's compact dataset


def test_evaluate_with_a_config_and_a_data_dir_typo(tiny_backpack_run, capsys):
    """evaluate.py --config X --data_dir TYPO used to prepare a dataset under the typo."""
    from backpack_nb import evaluation

    before = sorted(p.name for p in paths.data_root().iterdir())
    with pytest.raises(SystemExit) as exc:
        evaluation.main(["--model_path", str(tiny_backpack_run["out_dir"] / "best.pt"),
                         "--config", "tiny_backpack", "--data_dir", "europarl_sampel"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--data_dir europarl_sampel: no prepared dataset" in err
    assert "did you mean 'europarl_sample'?" in err and "Traceback" not in err
    assert sorted(p.name for p in paths.data_root().iterdir()) == before


# --- the data command, flag by flag (issue 17: every flag of every command) ------------------


def _prepare_main(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        data.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    return exc.value.code, err


def test_prepare_never_replaces_a_folder_holding_other_files(tmp_path, europarl_source, capsys):
    """A folder that is not a dataset used to be replaced whole, the user's files with it."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        code, err = _prepare_main(["prepare", "--source", str(europarl_source), "--out",
                                   str(out), "--langs", "en", "--block_size", "64", *extra],
                                  capsys)
        assert code == 2 and "notes.txt" in err and "choose a new or empty --out" in err
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    # an empty folder is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    assert data.main(["prepare", "--source", str(europarl_source), "--out", str(empty),
                      "--langs", "en", "--block_size", "64"]) == 0
    assert (empty / "meta.json").is_file()
    assert "compact vocabulary" in capsys.readouterr().out


def test_prepare_flags_out_of_range_or_pointing_at_the_wrong_thing(tmp_path, europarl_source,
                                                                   capsys):
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("text")
    src = ["--source", str(europarl_source), "--block_size", "64"]
    cases = [
        (["prepare", *src, "--seed", "-1", "--out", str(tmp_path / "x")], "seed must be >= 0"),
        (["prepare", *src, "--out", str(a_file / "sub")], "cannot create"),
        (["prepare", *src, "--out", str(a_file)], "is not a folder"),
        (["prepare", *src, "--test_fraction", "nan", "--out", str(tmp_path / "x")],
         "test_fraction must be in (0, 0.5)"),
        (["prepare", *src, "--aligned_block_lines", "0", "--form", "aligned", "--out",
          str(tmp_path / "x")], "aligned_block_lines must be >= 1"),
        (["stats", str(a_file)], "is a file, not a prepared dataset's folder"),
    ]
    for argv, words in cases:
        code, err = _prepare_main(argv, capsys)
        assert code == 2 and words in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file.txt"]
    assert a_file.read_text() == "text"


def test_a_full_disk_while_preparing_keeps_the_dataset_that_was_there(tmp_path, europarl_source,
                                                                      monkeypatch, capsys):
    out = tmp_path / "ep"
    argv = ["prepare", "--source", str(europarl_source), "--out", str(out), "--langs", "en",
            "--block_size", "64"]
    assert data.main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data, "_write_tokens", full)
    code, err = _prepare_main(argv + ["--overwrite", "--seed", "7"], capsys)
    assert code == 2 and "No space left on device" in err and "nothing was changed" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ep"]  # no temporary folder left


# --- Ctrl-C anywhere, leftovers of a killed preparation (issue 26) --------------------------


def test_ctrl_c_outside_the_preparation_is_one_line_and_exit_130(prepared_europarl, monkeypatch,
                                                                 capsys):
    """At f768900 only Ctrl-C inside prepare() was caught: `stats` (or the stats printed after
    a preparation) ended in a KeyboardInterrupt traceback."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "load_meta", interrupted)
    try:
        with pytest.raises(SystemExit) as exc:
            data.main(["stats", str(prepared_europarl)])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped as a KeyboardInterrupt (a traceback on the command line)")
    err = capsys.readouterr().err
    assert exc.value.code == 130 and err == ("error: interrupted (Ctrl-C); nothing is "
                                             "half-written\n")


def _dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


_KILLED_MID_WRITE = """
import sys, time
from backpack_nb import data
write = data._write_tokens
def slow(*args, **kwargs):
    write(*args, **kwargs)
    print("written", flush=True)
    time.sleep(60)  # killed here, a token file in the temporary folder
data._write_tokens = slow
data.main(sys.argv[1:])
"""


def test_a_killed_preparation_leaves_a_folder_the_next_one_removes(tmp_path, europarl_source,
                                                                   capsys):
    """At f768900 a `data prepare` killed mid-write (SIGKILL: no cleanup runs) left
    data/.NAME.tmp-PID-* behind, and later successful runs never removed it."""
    out = tmp_path / "ep"
    argv = ["prepare", "--source", str(europarl_source), "--out", str(out), "--langs", "en",
            "--block_size", "64"]
    child = subprocess.Popen([sys.executable, "-c", _KILLED_MID_WRITE, *argv], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert child.stdout.readline() == "written\n"
    finally:
        child.kill()
        child.wait()
    left = hidden_leftovers(out)
    assert len(left) == 1 and left[0].startswith(f".ep.tmp-{child.pid}-"), left
    assert not out.exists()
    # a preparation of another dataset beside it leaves it alone
    assert data.main(["prepare", "--source", str(europarl_source), "--out",
                      str(tmp_path / "other"), "--langs", "en", "--block_size", "64"]) == 0
    assert hidden_leftovers(out) == left
    capsys.readouterr()
    assert data.main(argv) == 0
    assert hidden_leftovers(out) == [] and (out / "meta.json").is_file()
    assert f"removed {tmp_path / left[0]}, left by a preparation that was killed (process " \
           f"{child.pid} is gone)" in capsys.readouterr().err


def test_leftovers_of_live_processes_and_user_folders_are_kept(tmp_path):
    out = tmp_path / "ep"
    mine = tmp_path / f".ep.tmp-{os.getpid()}-0123abcd"  # a preparation still running
    users = tmp_path / f".ep.tmp-{_dead_pid()}-deadbeef"  # named alike, holding a user's file
    for folder in (mine, users):
        folder.mkdir()
        (folder / "train.bin").write_bytes(b"12")
    (users / "notes.txt").write_text("keep me")
    assert data.recover_leftovers(out, report=False) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, users.name])
    assert (users / "notes.txt").read_text() == "keep me"


def test_an_overwrite_killed_between_its_renames_gets_the_old_dataset_back(
        tmp_path, prepared_europarl, europarl_source):
    """An --overwrite moves the old dataset aside (.NAME.old-PID) and renames the new one into
    place; killed between the two, the name was empty and the old dataset hidden for good.
    The next run that would write the dataset puts the old one back."""
    out = tmp_path / "ep"
    old = tmp_path / f".ep.old-{_dead_pid()}"
    _copy_dataset(prepared_europarl, old)
    new_tmp = tmp_path / f".ep.tmp-{_dead_pid()}-0123abcd"  # the complete new one, stranded
    _copy_dataset(prepared_europarl, new_tmp)
    path = data.ensure_prepared(out, source=str(europarl_source), langs="en,fr",
                                block_size=PREPARED_BLOCK_SIZE, progress=False)
    assert path == out and sorted(p.name for p in tmp_path.iterdir()) == ["ep"]
    assert (out / "meta.json").read_bytes() == (prepared_europarl / "meta.json").read_bytes()
    assert _bins(out) == _bins(prepared_europarl)
