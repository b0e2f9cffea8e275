"""Edges of the command lines (issue 17, failures 2, 3, 4, 7 and 8): a run folder that
cannot be one, every bad value of sample.py and evaluate.py, too few tokens to evaluate,
relative paths given from another folder, a folder or a text file given as a checkpoint, and
evaluate.py's progress in a log. Each bad input is exit 2 with one ``error:`` line that names
the flag and what is allowed, and leaves every file as it was. Every test here fails on main
at f3defa5 (a traceback, a silent acceptance, NaN, or a message without the fix)."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from backpack_nb import checkpoint as ck
from backpack_nb.loading import load_model
from backpack_nb import console, dataset, evaluation, paths, runfiles, sampling
from backpack_nb.errors import UserError
from conftest import ROOT

sys.path.insert(0, str(ROOT))
from train import main as train_main  # noqa: E402  (the front door, called in-process)

LEGACY = ROOT / "tests" / "fixtures" / "legacy_f3defa5"  # a micro Backpack: block_size 16
LEGACY_BLOCK = 16


def _tree_hash(*folders: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for f in folders if f.exists() for p in sorted(f.rglob("*"))}


def _exit2(main, argv, capsys) -> str:
    """Run a front door in-process; it must exit 2 with one error line and no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err, err
    assert len(re.findall(r"(^|: )error: ", err, flags=re.M)) == 1, err
    return err


@pytest.fixture
def run_copy(tmp_path) -> Path:
    """A copy of the legacy run folder (ckpt.pt, best.pt, run.json...), free to write into."""
    out = tmp_path / "run"
    shutil.copytree(LEGACY, out)
    return out


# --- 2: a run folder that cannot be one ------------------------------------------------------


def _train_argv(out_dir: Path) -> list[str]:
    return ["--config", "tiny_backpack", "--data_dir", "europarl_sample", "--out_dir",
            str(out_dir), "--max_iters", "1"]


def test_out_dir_that_is_a_file_exits_2(prepared_europarl, tmp_path, capsys):
    """f3defa5: FileExistsError traceback from the run lock's mkdir."""
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    err = _exit2(train_main, _train_argv(f), capsys)
    assert f"--out_dir {f} is a file, not a folder" in err and "choose another --out_dir" in err
    assert f.read_text() == "mine"


@pytest.mark.parametrize("depth", [["sub"], ["sub", "deeper"]])
def test_out_dir_inside_a_file_exits_2(depth, prepared_europarl, tmp_path, capsys):
    """f3defa5: NotADirectoryError traceback."""
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    out = f.joinpath(*depth)
    err = _exit2(train_main, _train_argv(out), capsys)
    assert f"is inside {f}, which is a file" in err and "--out_dir" in err
    assert f.read_text() == "mine" and sorted(tmp_path.iterdir()) == [f]


def _refuse_mkdir_under(monkeypatch, parent: Path) -> None:
    """Make ``parent`` behave as a read-only folder for mkdir. The tests run as root, where a
    chmod 0555 folder is still writable, so the refusal is simulated where it happens."""
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).parent == parent:
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)


def test_new_out_dir_under_a_read_only_folder_exits_2(prepared_europarl, tmp_path, capsys,
                                                       monkeypatch):
    """f3defa5: PermissionError traceback."""
    parent = tmp_path / "read_only"
    parent.mkdir()
    _refuse_mkdir_under(monkeypatch, parent)
    out = parent / "new_run"
    err = _exit2(train_main, _train_argv(out), capsys)
    assert f"--out_dir {out}: cannot create or open the run folder (Permission denied)" in err
    assert "fix the permissions" in err and "choose another --out_dir" in err
    assert not out.exists()


def test_run_lock_removes_the_levels_it_made_before_a_refusal(tmp_path, monkeypatch):
    """mkdir -p made ``a`` and ``a/b``, then ``a/b/c`` was refused: nothing is left behind."""
    _refuse_mkdir_under(monkeypatch, tmp_path / "a" / "b")
    with pytest.raises(UserError, match="Permission denied"):
        with runfiles.run_lock(tmp_path / "a" / "b" / "c"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_run_lock_still_locks_and_cleans_up(tmp_path):
    out = tmp_path / "x" / "run"
    with runfiles.run_lock(out):
        assert out.is_dir()
        with pytest.raises(UserError, match="in use by another training run"):
            with runfiles.run_lock(out):
                pass
    assert not (tmp_path / "x").exists()  # made only to be locked, and left empty


# --- 3: sample.py's values --------------------------------------------------------------------


@pytest.mark.parametrize("flag,value,allowed", [
    ("--num_samples", "0", "--num_samples must be >= 1, got 0"),  # f3defa5: IndexError
    ("--num_samples", "-3", "--num_samples must be >= 1, got -3"),  # f3defa5: IndexError
    ("--temperature", "nan", "--temperature must be 0 (always the most likely token) or a "
                             "finite number >= 1e-06, got nan"),  # f3defa5: RuntimeError
    ("--temperature", "inf", "finite number"),  # f3defa5: accepted (uniform samples)
    ("--temperature", "1e-40", "got 1e-40"),  # f3defa5: sampled from NaN probabilities
    ("--temperature", "-1", "--temperature must be 0"),  # f3defa5: no flag in the message
    ("--max_new_tokens", "-5", "--max_new_tokens must be >= 1, got -5"),  # f3defa5: accepted
    ("--max_new_tokens", "0", "--max_new_tokens must be >= 1, got 0"),
    ("--top_k", "0", "--top_k must be >= 1, got 0"),  # f3defa5: "top_k must...", no flag
    ("--seed", "-1", "--seed must be in 0.."),  # f3defa5: accepted
    ("--seed", str(2**64), "--seed must be in 0.."),  # f3defa5: ValueError "Overflow"
    ("--device", "foo", "--device: 'foo' is not one of cpu, cuda, cuda:N, mps"),
])
def test_sample_refuses_each_bad_value(flag, value, allowed, capsys):
    err = _exit2(sampling.main, ["--model_path", str(LEGACY / "best.pt"), flag, value], capsys)
    assert allowed in err


def test_sample_lists_every_bad_value_at_once(capsys):
    err = _exit2(sampling.main, ["--model_path", str(LEGACY / "best.pt"), "--num_samples", "0",
                                 "--top_k", "0", "--device", "tpu"], capsys)
    assert "--num_samples" in err and "--top_k" in err and "--device: 'tpu'" in err


def test_sample_text_refuses_bad_values_from_a_notebook():
    model, tok, _ = load_model(LEGACY / "best.pt")
    with pytest.raises(UserError, match=r"^num_samples must be >= 1, got 0$"):
        sampling.sample_text(model, tok, "The", num_samples=0)
    with pytest.raises(UserError, match="temperature"):
        sampling.sample_text(model, tok, "The", temperature=float("nan"))


def test_sample_temperature_zero_is_greedy_and_runs(capsys):
    assert sampling.main(["--model_path", str(LEGACY / "best.pt"), "--temperature", "0",
                          "--num_samples", "2", "--max_new_tokens", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.split("---------- sample ")
    assert len(out) == 3 and out[1][1:] == out[2][1:]  # greedy: both samples the same


# --- 7: relative paths from another folder ---------------------------------------------------


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A project root and a separate current directory, both temporary: (root, cwd)."""
    root, cwd = tmp_path / "project", tmp_path / "elsewhere"
    root.mkdir()
    cwd.mkdir()
    monkeypatch.setattr(paths, "project_root", lambda: root)
    monkeypatch.chdir(cwd)
    return root, cwd


def test_start_file_is_read_from_the_project_root(elsewhere, capsys):
    """f3defa5 read FILE: from the current directory (here: the French prompt)."""
    root, cwd = elsewhere
    (root / "prompt.txt").write_text("The Commission", encoding="utf-8")
    (cwd / "prompt.txt").write_text("Le Parlement", encoding="utf-8")
    assert sampling.main(["--model_path", str(LEGACY / "best.pt"), "--start", "FILE:prompt.txt",
                          "--num_samples", "1", "--max_new_tokens", "2", "--device", "cpu"]) == 0
    text = capsys.readouterr().out.split("---------- sample 1\n")[1]
    assert text.startswith("The Commission")


def test_start_file_only_in_the_current_directory_says_so(elsewhere, capsys):
    root, cwd = elsewhere
    (cwd / "prompt.txt").write_text("Le Parlement", encoding="utf-8")
    err = _exit2(sampling.main, ["--model_path", str(LEGACY / "best.pt"), "--start",
                                 "FILE:prompt.txt"], capsys)
    assert f"prompt file {root / 'prompt.txt'} does not exist" in err
    assert f"Relative paths are taken from the project root ({root}), not from the current " \
           "directory" in err
    assert f"pass its full path {cwd / 'prompt.txt'}" in err


@pytest.mark.parametrize("given", ["./run/best.pt", "run/best.pt"])
@pytest.mark.parametrize("door", ["sample", "evaluate"])
def test_model_path_only_in_the_current_directory_says_so(given, door, elsewhere, capsys):
    """f3defa5: "does not exist", although ./run/best.pt is right there."""
    root, cwd = elsewhere
    (cwd / "run").mkdir()
    shutil.copy(LEGACY / "best.pt", cwd / "run" / "best.pt")
    before = _tree_hash(cwd)
    main = sampling.main if door == "sample" else evaluation.main
    err = _exit2(main, ["--model_path", given, "--device", "cpu"], capsys)
    assert f"checkpoint {root / given} does not exist" in err
    assert f"{given} exists in the current directory: pass its full path " \
           f"{cwd / 'run' / 'best.pt'}" in err
    assert _tree_hash(cwd) == before


def test_missing_everywhere_has_no_hint(elsewhere):
    assert paths.elsewhere_hint("nowhere/best.pt") == ""
    assert paths.missing_message("nowhere/best.pt", "checkpoint") == \
        f"checkpoint {elsewhere[0] / 'nowhere' / 'best.pt'} does not exist"


@pytest.mark.parametrize("content,words", [
    (None, "does not exist"),  # f3defa5: the same words, and that stays
    (b"\xff\xfe\x00\x01", "is not UTF-8 text"),  # f3defa5: UnicodeDecodeError traceback
    ("folder", "is a folder; give a text file"),  # f3defa5: "Is a directory"
])
def test_bad_prompt_files(content, words, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    if content == "folder":
        prompt.mkdir()
    elif content is not None:
        prompt.write_bytes(content)
    err = _exit2(sampling.main, ["--model_path", str(LEGACY / "best.pt"), "--start",
                                 f"FILE:{prompt}"], capsys)
    assert "--start" in err and words in err


# --- 8: a folder or a text file as a checkpoint ---------------------------------------------


@pytest.mark.parametrize("door", ["sample", "evaluate"])
def test_run_folder_as_checkpoint_lists_its_checkpoints(door, run_copy, capsys):
    """f3defa5: "checkpoint out/tiny_backpack does not exist"."""
    before = _tree_hash(run_copy)
    main = sampling.main if door == "sample" else evaluation.main
    err = _exit2(main, ["--model_path", str(run_copy), "--device", "cpu"], capsys)
    assert f"checkpoint {run_copy} is a folder, not a checkpoint file; it holds ckpt.pt, best.pt" \
           in err
    assert f"for example {run_copy / 'ckpt.pt'}" in err and "does not exist" not in err
    assert _tree_hash(run_copy) == before


def test_folder_of_runs_names_the_runs_inside(run_copy):
    with pytest.raises(UserError, match=rf"folder of run folders.*{run_copy} \(ckpt.pt, best.pt\)"):
        load_model(run_copy.parent)


def test_empty_folder_as_checkpoint(tmp_path):
    with pytest.raises(UserError, match="is a folder with no checkpoint"):
        ck.read_checkpoint(tmp_path)


@pytest.mark.parametrize("text", ["out_dir: out/tiny_backpack\nmax_iters: 100\n",
                                  '{"splits": {}}', "garbage"])
def test_text_file_as_checkpoint_says_it_is_not_one(text, tmp_path, capsys):
    """f3defa5: "checkpoint ... is unreadable (101)" (a KeyError's text) for a YAML file."""
    f = tmp_path / "params.yaml"
    f.write_text(text)
    err = _exit2(evaluation.main, ["--model_path", str(f), "--device", "cpu"], capsys)
    assert f"checkpoint {f} is unreadable: it is a text file, not a checkpoint " \
           f"(it begins {text.splitlines()[0]!r})" in err
    assert "give the ckpt.pt or best.pt" in err
    assert f.read_text() == text


def test_empty_file_as_checkpoint(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"")
    with pytest.raises(UserError, match="is unreadable: the file is empty"):
        ck.read_checkpoint(tmp_path / "ckpt.pt")


# --- 4 and the rest of evaluate.py's values ------------------------------------------------


@pytest.mark.parametrize("max_tokens", ["1", "2", str(LEGACY_BLOCK + 1)])
def test_too_few_tokens_for_two_windows_is_refused(max_tokens, run_copy, capsys):
    """f3defa5: --max_tokens 1 printed a table of NaN and wrote NaN into eval.json; 17 (one
    window of 16) gave a NaN interval."""
    before = _tree_hash(run_copy)
    err = _exit2(evaluation.main, ["--model_path", str(run_copy / "best.pt"), "--device", "cpu",
                                   "--max_tokens", max_tokens], capsys)
    assert f"--max_tokens {max_tokens} is too few" in err
    assert f"give at least {LEGACY_BLOCK + 2}" in err
    assert _tree_hash(run_copy) == before and not (run_copy / "eval.json").exists()


def test_the_minimum_gives_finite_numbers(run_copy, prepared_europarl, capsys):
    assert evaluation.main(["--model_path", str(run_copy / "best.pt"), "--device", "cpu",
                            "--data_dir", str(prepared_europarl), "--splits", "val",
                            "--max_tokens", str(evaluation.min_tokens(LEGACY_BLOCK))]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out.lower()
    saved = json.loads((run_copy / "eval.json").read_text())
    for lang, r in saved["splits"]["val"].items():
        assert r["windows"] >= 2, lang
        assert all(math.isfinite(x) for x in (r["loss"], r["ppl"], r["bits_per_byte"],
                                              *r["bpb_ci95"])), (lang, r)


def test_a_held_out_file_too_short_to_score_is_refused(prepared_europarl, monkeypatch):
    """Zero windows another way: a language's file with a single token."""
    model, tok, _ = load_model(LEGACY / "best.pt")
    real = dataset.load_tokens

    def load_tokens(data_dir, split, lang=None):
        toks = real(data_dir, split, lang)
        return toks[:1] if lang == "fr" else toks

    monkeypatch.setattr(dataset, "load_tokens", load_tokens)
    with pytest.raises(UserError, match=r"val_fr.bin holds 1 token\(s\), too few to score"):
        evaluation.evaluate_model(model, tok, prepared_europarl, splits=["val"], max_tokens=500,
                                  progress=False)


def test_evaluate_model_refuses_a_cap_below_two_windows(prepared_europarl):
    model, tok, _ = load_model(LEGACY / "best.pt")
    with pytest.raises(UserError, match=r"^max_tokens 5 is too few"):
        evaluation.evaluate_model(model, tok, prepared_europarl, splits=["val"], max_tokens=5,
                                  progress=False)


@pytest.mark.parametrize("argv,words", [
    (["--splits", ""], "--splits is empty"),  # f3defa5: an empty table, eval.json written
    (["--splits", ","], "--splits is empty"),
    (["--splits", "val,dev"], "--splits: unknown split(s) dev; use comma-separated names from "
                              "val, test"),
    (["--device", "foo"], "--device: 'foo' is not one of cpu, cuda, cuda:N, mps"),
    (["--batch_size", "0", "--stride", "-1"], "--batch_size must be >= 1, got 0; --stride must"),
    (["--stride", str(LEGACY_BLOCK + 1)], f"--stride must be in 1..{LEGACY_BLOCK}"),
])
def test_evaluate_refuses_each_bad_value(argv, words, run_copy, capsys):
    before = _tree_hash(run_copy)
    err = _exit2(evaluation.main, ["--model_path", str(run_copy / "best.pt"), *argv], capsys)
    assert words in err
    assert _tree_hash(run_copy) == before


@pytest.mark.parametrize("target,words", [
    ("ckpt.pt", "exists and is not an evaluation (eval.json) file"),  # f3defa5: overwritten
    ("run.json", "exists and is not an evaluation (eval.json) file"),  # f3defa5: overwritten
    (".", "is a folder; give a file path such as"),  # f3defa5: IsADirectoryError message
    ("run.json/eval.json", "which is a file; choose another --out"),
])
def test_evaluate_out_never_replaces_what_is_not_an_evaluation(target, words, run_copy, capsys):
    before = _tree_hash(run_copy)
    err = _exit2(evaluation.main, ["--model_path", str(run_copy / "best.pt"), "--device", "cpu",
                                   "--out", str(run_copy / target)], capsys)
    assert "--out" in err and words in err
    assert _tree_hash(run_copy) == before


def test_out_relative_to_the_project_root(elsewhere):
    root, _ = elsewhere
    assert evaluation.eval_json_path("evals/x.json") == root / "evals" / "x.json"
    (root / "old.json").write_text(json.dumps({"checkpoint": "a", "splits": {}}))
    assert evaluation.eval_json_path("old.json") == root / "old.json"  # an evaluation: rewritable


# --- evaluate.py in a log: progress lines -----------------------------------------------------


def test_evaluate_prints_progress_lines_when_not_a_terminal(run_copy, prepared_europarl,
                                                            capsys):
    """f3defa5 printed nothing on stderr until the table (tqdm is off outside a terminal)."""
    assert evaluation.main(["--model_path", str(run_copy / "best.pt"), "--device", "cpu",
                            "--data_dir", str(prepared_europarl), "--splits", "val",
                            "--max_tokens", "200"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    for lang in ("en", "fr"):
        assert re.search(rf"^val {lang}: 0/\d+ windows$", err, flags=re.M), err


def test_plain_progress_prints_a_line_every_few_seconds(monkeypatch, capsys):
    clock = [100.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: clock[0])
    bar = console.progress_bar(100, "val en", "windows", every=5.0)
    assert isinstance(bar, console.PlainProgress)  # pytest's stderr is no terminal
    for _ in range(100):
        clock[0] += 0.25  # 25 s in all: a line at 5, 10, 15, 20 s
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "val en: 0/100 windows"
    assert lines[1] == "val en: 20/100 windows (20%), 5 s, about 20 s left"
    assert len(lines) == 6 and lines[-1] == "val en: 100/100 windows in 25 s"


def test_quick_work_prints_one_line_and_progress_false_none(capsys):
    with console.progress_bar(3, "test fr", "windows") as bar:
        bar.update(3)
    assert capsys.readouterr().err == "test fr: 0/3 windows\n"
    bar = console.progress_bar(3, "test fr", "windows", progress=False)
    bar.update(3)
    bar.close()
    assert capsys.readouterr().err == ""


def test_no_time_estimate_from_the_first_few_percent(monkeypatch, capsys):
    clock = [0.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: clock[0])
    bar = console.PlainProgress(1000, "test en", "windows", every=5.0)
    clock[0] = 6.0
    bar.update(8)  # 0.8% after a slow start: an estimate would say 744 s
    assert capsys.readouterr().err.splitlines()[-1] == "test en: 8/1,000 windows (1%), 6 s"


def test_bytes_and_unknown_totals_in_plain_lines(monkeypatch, capsys):
    """Downloads and data preparation in a log file: MiB, and a download without a length
    shows what arrived (issue 17: plain progress lines for preparation and downloads)."""
    clock = [0.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: clock[0])
    with console.progress_bar(8 * 2**20, "tokenize", "B") as bar:
        clock[0] = 6.0
        bar.update(2 * 2**20)
        clock[0] = 12.0
        bar.update(6 * 2**20)
    assert capsys.readouterr().err.splitlines() == [
        "tokenize: 0.0/8.0 MiB", "tokenize: 2.0/8.0 MiB (25%), 6 s, about 18 s left",
        "tokenize: 8.0/8.0 MiB in 12 s"]
    with console.progress_bar(None, "download x.tgz", "B") as bar:
        clock[0] = 20.0
        bar.update(3 * 2**20)
    assert capsys.readouterr().err.splitlines() == [
        "download x.tgz: 0.0 MiB", "download x.tgz: 3.0 MiB, 8 s", "download x.tgz: 3.0 MiB in 8 s"]


def test_preparing_in_a_log_says_what_it_reads_in_plain_lines(tmp_path, europarl_source, capsys):
    from backpack_nb import data

    data.prepare(europarl_source, tmp_path / "ep", data.PrepareConfig(langs=("en",), block_size=64))
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith(f"preparing {tmp_path / 'ep'}: 4 Europarl raw files (")
    assert lines[1].startswith("tokenize: 0.0/") and lines[1].endswith(" MiB")


# --- issue 26, failure 17: hints that pointed the wrong way ----------------------------------


@pytest.mark.parametrize("kind", ["loop", "loop_inside", "dangling"])
def test_out_dir_through_a_broken_symlink_names_the_link(kind, prepared_europarl, tmp_path, capsys):
    """At f768900 a symlink loop as --out_dir said "File exists; fix the permissions of its
    parent folder"."""
    if kind == "dangling":
        link = tmp_path / "run"
        link.symlink_to(tmp_path / "gone")
        out, words = link, f"--out_dir {link} is a symbolic link to {tmp_path / 'gone'}, a path " \
                           "that does not exist"
    else:
        link = tmp_path / "loop"
        link.symlink_to("loop")
        out = link if kind == "loop" else link / "sub"
        where = "is" if kind == "loop" else f"goes through {link}, which is"
        words = f"--out_dir {out} {where} a symbolic link in a loop (it points to loop, which " \
                "leads back to it)"
    err = _exit2(train_main, _train_argv(out), capsys)
    assert words in err and "fix or remove the link, or choose another --out_dir" in err
    assert "permissions" not in err and "File exists" not in err
    assert [p.name for p in tmp_path.iterdir()] == [link.name] and link.is_symlink()


def test_write_errors_name_the_flag_given_and_the_fix_for_the_failure(tmp_path, monkeypatch):
    """atomic_write's message named --out_dir for every command and advised freeing disk space
    whatever failed; now the option is a parameter and the fix follows the error."""
    def failing(code: int, text: str):
        def refuse(*args, **kwargs):
            raise OSError(code, text)
        return refuse

    target = tmp_path / "eval.json"
    target.write_text("{}")
    cases = [
        (errno.ENOSPC, "No space left on device", "Free disk space (or choose another --out)"),
        (errno.EACCES, "Permission denied", f"Fix the permissions of {tmp_path} (or choose "
                                            "another --out)"),
        (errno.EROFS, "Read-only file system", f"{tmp_path} is on a read-only file system"),
        (errno.EFBIG, "File too large", "Raise the file size limit (ulimit -f)"),
    ]
    for code, text, fix in cases:
        monkeypatch.setattr(runfiles.tempfile, "mkstemp", failing(code, text))
        with pytest.raises(UserError) as exc:
            runfiles.write_json(target, {"x": 1}, flag="--out")
        msg = str(exc.value)
        assert msg.startswith(f"could not write {target} ({text}); the existing eval.json is "
                              "untouched. ") and fix in msg and "--out_dir" not in msg, msg
        if code != errno.ENOSPC:
            assert "disk space" not in msg, msg
    assert target.read_text() == "{}"
    monkeypatch.undo()
    # a folder where the file should be: said so, no advice about disk space
    folder = tmp_path / "a_folder"
    folder.mkdir()
    with pytest.raises(UserError) as exc:
        runfiles.write_json(folder, {"x": 1}, flag="--out")
    msg = str(exc.value)
    assert f"could not write {folder} (" in msg and "it is a folder, and it is untouched; give " \
           "--out a file path instead" in msg and "disk space" not in msg, msg
    assert folder.is_dir() and list(folder.iterdir()) == []
    # train.py's files keep naming --out_dir (the default)
    monkeypatch.setattr(runfiles.tempfile, "mkstemp", failing(errno.EACCES, "Permission denied"))
    with pytest.raises(UserError, match=r"\(or choose another --out_dir\), then run again$"):
        runfiles.write_json(tmp_path / "run.json", {})


@pytest.mark.parametrize("door", ["train", "evaluate", "lexsim"])
def test_a_run_folder_as_data_dir_says_so_and_names_its_dataset(door, run_copy, capsys):
    """At f768900 a --data_dir that is a run folder suggested `data prepare --out
    out/tiny_backpack` (preparing a dataset into the run folder)."""
    before = _tree_hash(run_copy)
    if door == "train":
        err = _exit2(train_main, ["--config", "tiny_backpack", "--data_dir", str(run_copy),
                                  "--out_dir", str(run_copy.parent / "new_run")], capsys)
    elif door == "evaluate":
        err = _exit2(evaluation.main, ["--model_path", str(run_copy / "best.pt"), "--device",
                                       "cpu", "--data_dir", str(run_copy)], capsys)
    else:
        from backpack_nb.lexsim.__main__ import main as lexsim_main
        err = _exit2(lexsim_main, ["--model_path", str(run_copy / "best.pt"), "--data_dir",
                                   str(run_copy)], capsys)
    assert f"--data_dir {run_copy} is a training run's folder (it holds run.json, ckpt.pt, " \
           "best.pt, training_log.json), not a prepared dataset; its run was trained on " \
           "'europarl_sample'" in err
    assert err.rstrip().endswith("pass --data_dir europarl_sample"), err
    assert "data prepare" not in err
    assert _tree_hash(run_copy) == before and not (run_copy.parent / "new_run").exists()
