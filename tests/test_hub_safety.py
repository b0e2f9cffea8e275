"""``hub export`` destroys nothing it did not make and writes whole or not at all (issue 26):
``--overwrite`` replaces only an earlier export, a SIGKILL at every point of the swap leaves
the old export or the new one (and the next export removes what the kill left), a read-only or
full disk and Ctrl-C are one line, the files follow the umask, a model with non-finite weights
is not exported; and an exported folder loads with its own tokenizer everywhere."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken.load
import torch

from backpack_nb import hub
from backpack_nb.errors import UserError
from backpack_nb.hub import replace
from backpack_nb.hub.__main__ import main
from backpack_nb.tokenizer import get_encoding
from conftest import ROOT


def _offline(error: type[Exception]):
    """tiktoken's file reader, failing for a URL (a download) and reading local files."""
    real = tiktoken.load.read_file_cached

    def read(blobpath, *args, **kwargs):
        if "://" in str(blobpath):
            raise error(f"tried to download {blobpath}")
        return real(blobpath, *args, **kwargs)

    return read


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` (hidden ones too) -> its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes())
            for p in sorted(folder.rglob("*"))}


def _run(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    return exc.value.code, err


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def exports(tiny_backpack_run, tiny_transformer_run, tmp_path_factory) -> dict[str, Path]:
    """Reference exports of the two tiny runs (never written to by the tests)."""
    base = tmp_path_factory.mktemp("exports")
    refs = {}
    for kind, run in (("backpack", tiny_backpack_run), ("transformer", tiny_transformer_run)):
        assert main(["export", str(run["out_dir"] / "best.pt"), str(base / kind)]) == 0
        refs[kind] = base / kind
    return refs


# --- --overwrite replaces an earlier export and nothing else -----------------------------------


def _run_folder(root: Path, run: dict) -> Path:
    folder = root / "R"
    shutil.copytree(run["out_dir"], folder)
    (folder / "notes.txt").write_text("my notes")
    (folder / "figures").mkdir()
    (folder / "figures" / "loss.png").write_bytes(b"png")
    return folder


def _project_copy(root: Path) -> Path:
    folder = root / "project"
    folder.mkdir()
    for name in ("pyproject.toml", "README.md", "train.py"):
        shutil.copy(ROOT / name, folder / name)
    shutil.copytree(ROOT / "params", folder / "params")
    return folder


def _export_plus(root: Path, exports: dict, extra: str) -> Path:
    folder = root / "exported"
    shutil.copytree(exports["transformer"], folder)
    if extra == "file":
        (folder / "my_notes.md").write_text("mine")
    else:
        (folder / "eval").mkdir()
        (folder / "eval" / "scores.json").write_text("{}")
    return folder


def _downloaded(root: Path, exports: dict) -> Path:
    folder = root / "downloaded"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "README.md"):
        shutil.copy(exports["backpack"] / name, folder / name)
    return folder


@pytest.mark.parametrize("case,named", [
    ("run folder", "ckpt.pt"),
    ("project root", "pyproject.toml"),
    ("export and a user file", "my_notes.md"),
    ("export and a sub-folder", "eval/"),
    ("a downloaded model", "README.md, config.json, model.safetensors but no "
                           "backpack_nb_tokenizer.json"),
])
def test_overwrite_refuses_a_folder_that_is_not_an_earlier_export(
        case, named, tiny_backpack_run, exports, tmp_path, capsys):
    """The issue's case first: `export out/R/best.pt out/R --overwrite` deleted the run."""
    folder = {"run folder": lambda: _run_folder(tmp_path, tiny_backpack_run),
              "project root": lambda: _project_copy(tmp_path),
              "export and a user file": lambda: _export_plus(tmp_path, exports, "file"),
              "export and a sub-folder": lambda: _export_plus(tmp_path, exports, "dir"),
              "a downloaded model": lambda: _downloaded(tmp_path, exports)}[case]()
    ckpt = tiny_backpack_run["out_dir"] / "best.pt"
    if case == "run folder":
        ckpt = folder / "best.pt"
    before = _tree(tmp_path)
    code, err = _run(["export", str(ckpt), str(folder), "--overwrite"], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert named in err and "Nothing was changed" in err and "Traceback" not in err, err
    assert _tree(tmp_path) == before  # not a byte changed, no hidden folder


def test_a_run_folder_is_named_with_what_it_holds(tiny_backpack_run, tmp_path, capsys):
    folder = _run_folder(tmp_path, tiny_backpack_run)
    code, err = _run(["export", str(folder / "best.pt"), str(folder)], capsys)
    assert code == 2
    assert f"{folder} holds best.pt, ckpt.prev.pt, ckpt.pt, figures/, notes.txt and 2 more, " \
        "which no export writes" in err, err
    assert "choose a new or empty OUT_DIR" in err and "pass --overwrite" not in err


def test_overwrite_replaces_an_earlier_export_whole(tiny_backpack_run, exports, tmp_path,
                                                    capsys):
    out = tmp_path / "exported"
    shutil.copytree(exports["transformer"], out)
    code, err = _run(["export", str(tiny_backpack_run["out_dir"] / "best.pt"), str(out)], capsys)
    assert code == 2 and "holds an earlier export; pass --overwrite to replace it" in err, err
    assert _tree(out) == _tree(exports["transformer"])
    assert main(["export", str(tiny_backpack_run["out_dir"] / "best.pt"), str(out),
                 "--overwrite"]) == 0
    assert _tree(out) == _tree(exports["backpack"])
    assert _hidden(tmp_path) == []


def test_an_empty_folder_and_a_link_to_an_export(tiny_backpack_run, exports, tmp_path):
    ckpt = str(tiny_backpack_run["out_dir"] / "best.pt")
    (tmp_path / "empty").mkdir()
    assert main(["export", ckpt, str(tmp_path / "empty")]) == 0
    assert _tree(tmp_path / "empty") == _tree(exports["backpack"])
    real = tmp_path / "real"
    shutil.copytree(exports["transformer"], real)
    (tmp_path / "link").symlink_to(real)
    assert main(["export", ckpt, str(tmp_path / "link"), "--overwrite"]) == 0
    assert (tmp_path / "link").is_symlink() and _tree(real) == _tree(exports["backpack"])


def test_exported_files_follow_the_umask(tiny_backpack_run, tmp_path):
    """model.safetensors was 0600 while the other files were 0644."""
    old = os.umask(0o027)
    try:
        assert main(["export", str(tiny_backpack_run["out_dir"] / "best.pt"),
                     str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert modes == dict.fromkeys(hub.EXPORT_FILES, 0o640)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750


# --- a full or read-only disk, Ctrl-C ---------------------------------------------------------


@pytest.mark.parametrize("where,code_,words", [
    ("write", errno.ENOSPC, "No space left on device"),
    ("mkdir", errno.EROFS, "Read-only file system"),
])
def test_a_full_or_read_only_disk_is_one_line(where, code_, words, tiny_backpack_run, exports,
                                             tmp_path, capsys, monkeypatch):
    out = tmp_path / "exported"
    shutil.copytree(exports["transformer"], out)

    def failing_write(path, data):
        if path.name == "model.safetensors":  # config.json written, this one half-written
            path.write_bytes(data[:10])
            raise OSError(code_, os.strerror(code_), str(path))
        return real_write(path, data)

    def failing_mkdir(self, *args, **kwargs):
        if ".export-" in self.name:
            raise OSError(code_, os.strerror(code_), str(self))
        return real_mkdir(self, *args, **kwargs)

    real_write, real_mkdir = replace._write_file, Path.mkdir
    if where == "write":
        monkeypatch.setattr(replace, "_write_file", failing_write)
    else:
        monkeypatch.setattr(Path, "mkdir", failing_mkdir)
    for target in (out, tmp_path / "new" / "deeper"):
        code, err = _run(["export", str(tiny_backpack_run["out_dir"] / "best.pt"), str(target),
                          "--overwrite"], capsys)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert f"could not write the export {target} ({words})" in err, err
        assert "Free disk space or fix the permissions" in err
    assert "the folder there is untouched" in _run(
        ["export", str(tiny_backpack_run["out_dir"] / "best.pt"), str(out), "--overwrite"],
        capsys)[1]
    assert _tree(out) == _tree(exports["transformer"])
    assert _hidden(tmp_path) == [] and not (tmp_path / "new").exists()


def test_ctrl_c_during_an_export_is_one_line_and_keeps_the_old(tiny_backpack_run, exports,
                                                              tmp_path, capsys, monkeypatch):
    out = tmp_path / "exported"
    shutil.copytree(exports["transformer"], out)
    real_write = replace._write_file

    def interrupted(path, data):
        if path.name == "model.safetensors":
            raise KeyboardInterrupt
        return real_write(path, data)

    monkeypatch.setattr(replace, "_write_file", interrupted)
    code, err = _run(["export", str(tiny_backpack_run["out_dir"] / "best.pt"), str(out),
                      "--overwrite"], capsys)
    assert code == 130 and err == "error: interrupted (Ctrl-C); nothing is half-written\n"
    assert _tree(out) == _tree(exports["transformer"]) and _hidden(tmp_path) == []


# --- non-finite weights ----------------------------------------------------------------------


def test_a_model_with_nan_weights_is_not_exported(tiny_backpack_run, tmp_path, capsys):
    from backpack_nb.loading import load_model

    model, tok, state = load_model(tiny_backpack_run["out_dir"] / "best.pt")
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match=r"non-finite weights \(NaN or inf\) in "
                                        r"transformer\.h\.0\.mlp\.c_fc\.weight"):
        hub.export(model, tok, state, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    # and through the command, however the checkpoint's loading reports it
    saved = torch.load(tiny_backpack_run["out_dir"] / "best.pt", weights_only=True)
    next(v for v in saved["model"].values() if v.is_floating_point())[0] = float("nan")
    (tmp_path / "R").mkdir()
    torch.save(saved, tmp_path / "R" / "best.pt")
    code, err = _run(["export", str(tmp_path / "R" / "best.pt"), str(tmp_path / "out")], capsys)
    assert code == 2 and "NaN" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and _hidden(tmp_path) == []


# --- SIGKILL: the old export or the new one, and no leftovers after the next run ---------------


@pytest.mark.parametrize("point,exchange", [
    ("partial", True), ("written", True), ("exchanged", True),
    ("partial", False), ("aside", False),
])
def test_a_kill_at_any_point_leaves_the_old_export_or_the_new(point, exchange, tiny_backpack_run,
                                                              exports, tmp_path):
    out = tmp_path / "exported"
    shutil.copytree(exports["transformer"], out)
    old, new = _tree(exports["transformer"]), _tree(exports["backpack"])
    env = {**os.environ, replace.KILL_AT_ENV: point}
    if not exchange:
        env[replace.NO_EXCHANGE_ENV] = "1"
    killed = subprocess.run([sys.executable, "-m", "backpack_nb.hub", "export",
                             str(tiny_backpack_run["out_dir"] / "best.pt"), str(out),
                             "--overwrite"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _hidden(tmp_path), "the kill should have left the hidden folder to clean up"
    if point == "aside":  # no renameat2: between its two renames the folder is missing...
        assert not out.exists()
        replace.check_out_dir(out, overwrite=True)  # ...and the next run puts it back first
    assert _tree(out) == (new if point == "exchanged" else old)
    assert main(["export", str(tiny_backpack_run["out_dir"] / "best.pt"), str(out),
                 "--overwrite"]) == 0
    assert _tree(out) == new and _hidden(tmp_path) == []


def test_leftovers_are_removed_only_when_their_process_is_gone(exports, tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "exported"
    partial = tmp_path / f".exported.export-{gone.pid}-abc123"
    shutil.copytree(exports["backpack"], partial)
    (partial / "README.md").unlink()
    aside = tmp_path / f".exported.old-{gone.pid}-def456"
    shutil.copytree(exports["transformer"], aside)
    live = tmp_path / f".exported.export-{os.getpid()}-abc123"  # a running export's
    shutil.copytree(exports["backpack"], live)
    foreign = tmp_path / f".exported.export-{gone.pid}-0abcde"  # named so, holding a user's file
    foreign.mkdir()
    (foreign / "mine.txt").write_text("mine")
    assert replace.check_out_dir(out, overwrite=True) == out
    assert _tree(out) == _tree(exports["transformer"])  # the folder the kill moved aside
    assert _hidden(tmp_path) == sorted([live.name, foreign.name])


# --- an exported folder loads with its own tokenizer -------------------------------------------


@pytest.mark.parametrize("kind", ["backpack", "transformer"])
def test_an_export_loads_with_its_own_tokenizer(kind, exports, tiny_backpack_run,
                                                tiny_transformer_run, capsys, monkeypatch):
    """The tiny runs use cl100k_base's compact vocabulary: reading GPT-2's BPE instead (which
    needs a download) was the failure. Without network, nothing may try."""
    from backpack_nb.loading import load_model
    from backpack_nb.sampling import main as sample_main

    monkeypatch.setattr("tiktoken.load.read_file_cached", _offline(AssertionError))
    run = {"backpack": tiny_backpack_run, "transformer": tiny_transformer_run}[kind]
    ours, run_tok, _ = load_model(run["out_dir"] / "best.pt")
    model, tok, info = hub.load_pretrained(exports[kind])
    assert info["model_type"] == kind
    assert tok.state_dict() == run_tok.state_dict()
    _, tok2, state = load_model(exports[kind])
    assert state["tokenizer"] == run_tok.state_dict() and tok2.vocab_size == tok.vocab_size
    text = "The Commission votes"
    assert tok.decode(tok.encode(text)) == text
    assert sample_main(["--model_path", str(exports[kind]), "--device", "cpu", "--num_samples",
                        "1", "--max_new_tokens", "4", "--start", "The Commission"]) == 0
    assert capsys.readouterr().out.count("---------- sample") == 1


def test_an_export_evaluates_on_its_runs_dataset(exports, tiny_backpack_run, tmp_path):
    from backpack_nb.evaluation import evaluate_checkpoint

    kw = dict(data_dir=tiny_backpack_run["config"].data_dir, splits=["val"], max_tokens=300,
              progress=False)
    ours = evaluate_checkpoint(tiny_backpack_run["out_dir"] / "best.pt",
                               out=tmp_path / "run" / "eval.json", **kw)
    theirs = evaluate_checkpoint(exports["backpack"], out=tmp_path / "export" / "eval.json", **kw)
    a, b = (r["splits"]["val"]["all"]["bits_per_byte"] for r in (ours, theirs))
    assert abs(a - b) < 1e-4, (a, b)


def _two_more(ids: list[int]) -> list[int]:
    unused = [i for i in range(max(ids)) if i not in set(ids)][:2]
    return sorted(ids + unused)


@pytest.fixture(scope="module")
def small_export(tmp_path_factory) -> Path:
    """An untrained tiny Backpack with a compact cl100k_base vocabulary, exported."""
    from backpack_nb.models import ModelConfig, build_model
    from backpack_nb.tokenizer import Tokenizer, build_compact_vocab

    enc = get_encoding("cl100k_base")
    tok = Tokenizer("cl100k_base", build_compact_vocab(enc, [enc.encode_ordinary("The vote")]))
    config = ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2,
                         n_embd=16, n_senses=2, bias=False, dropout=0.0)
    model = build_model("backpack", config).eval()
    out = tmp_path_factory.mktemp("small") / "exported"
    return hub.export(model, tok, {"model_type": "backpack", "iter_num": 0}, out)


@pytest.mark.parametrize("edit,words", [
    (lambda t: "not json", "is not readable JSON"),
    (lambda t: json.dumps({"encoding": "cl100k_base"}), "is not a tokenizer this project wrote"),
    (lambda t: json.dumps({**t, "base_ids": [-1] + t["base_ids"]}),
     "is not a tokenizer this project wrote"),
    (lambda t: json.dumps({**t, "base_ids": _two_more(t["base_ids"])}),
     "more than the model's vocabulary"),
    (lambda t: json.dumps({**t, "encoding": "no_such_encoding"}), "nknown encoding"),
])
def test_a_damaged_export_tokenizer_is_one_error(edit, words, small_export, tmp_path):
    folder = tmp_path / "exported"
    shutil.copytree(small_export, folder)
    assert hub.load_pretrained(folder)[1].vocab_size == hub.read_config(folder)["vocab_size"]
    path = folder / hub.TOKENIZER_FILE
    path.write_text(edit(json.loads(path.read_text())))
    with pytest.raises(UserError, match="backpack_nb_tokenizer.json") as exc:
        hub.load_pretrained(folder)
    assert words in str(exc.value)


def test_no_tokenizer_and_no_network_names_no_flag(tmp_path, monkeypatch):
    """A pretrained folder without tokenizer files, offline: the hint must work for
    sample.py, which has no --encoding."""
    from hub_fixtures import TINY

    monkeypatch.setattr("tiktoken.load.read_file_cached", _offline(ConnectionError))
    get_encoding.cache_clear()  # a gpt2 read earlier in the session would hide the case
    folder = tmp_path / "snapshot"
    shutil.copytree(TINY, folder)
    with pytest.raises(UserError) as exc:
        hub.load_pretrained(folder)
    message = str(exc.value)
    assert "--encoding" not in message and "vocab.json and merges.txt" in message, message
    assert str(folder) in message
