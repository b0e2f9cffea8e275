"""Params files a user can get wrong (issue 26, 3-8 and 12): one reader refuses them for every
front door, with one short `error:` line and exit status 2, before anything is written; the
values in them are finite, in range and free of control characters."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

from backpack_nb import paramfile
from backpack_nb.coerce import brief, coerce
from backpack_nb.errors import UserError
from backpack_nb.models import __main__ as models_main
from backpack_nb.params import TrainConfig, config_from_argv, load_params, read_params_file
from backpack_nb import params as params_module
from backpack_nb import reports
from conftest import ROOT

sys.path.insert(0, str(ROOT))
from train import main as train_main  # noqa: E402  (the front door, called in-process)

# The "billion laughs": 9 levels of 9 aliases, 9^9 = 387 million strings once expanded.
BOMB = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{c}: &{c} [{','.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    + ["run_name: *i"]) + "\n"


def _file(tmp_path: Path, text: str | bytes, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _exit2(main, argv, capsys) -> str:
    """Run a front door in-process: exit 2, one short error line, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err, err
    assert err.count("error: ") == 1, err
    return err


def _front_doors(path: Path, out_dir: Path) -> list[tuple[str, object, list[str]]]:
    """Every command that reads a params file, pointed at ``path``."""
    return [
        ("train.py", train_main, ["--config", str(path), "--out_dir", str(out_dir),
                                  "--device", "cpu"]),
        ("reports run", reports.main, ["run", "01_train", "-f", str(path)]),
        ("reports pipeline", reports.main, ["pipeline", "-f", str(path)]),
        ("models", models_main.main, ["--config", str(path), "--vocab-size", "100"]),
        ("params get", params_module.main, ["get", str(path), "max_iters"]),
    ]


# --- 3: anchors and aliases (the alias bomb), values echoed short ----------------------------


def test_the_alias_bomb_is_refused_at_once_by_every_front_door(tmp_path, capsys):
    path = _file(tmp_path, BOMB)
    assert len(BOMB.encode()) < 400
    for name, main, argv in _front_doors(path, tmp_path / "run"):
        t0 = time.perf_counter()
        err = _exit2(main, argv, capsys)
        assert time.perf_counter() - t0 < 1.0, name
        assert len(err) < 300, (name, len(err))
        assert "anchors and aliases" in err and f"{path} line 1" in err, (name, err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text", ["a: &x 1\n", "max_iters: &n 5\nlr_decay_iters: *n\n",
                                  "<<: {max_iters: 5}\nbatch_size: 2\n"])
def test_anchors_aliases_and_merge_keys_are_refused(text, tmp_path):
    with pytest.raises(UserError, match=r"(anchors and aliases \(&name, \*name\)|merge keys "
                                        r"\(<<\)) are not allowed in a params file"):
        read_params_file(str(_file(tmp_path, text)))


@pytest.mark.slow  # parses 700 kB of YAML
def test_echoed_values_are_cut_short(tmp_path, capsys):
    """Every value an error line shows is cut near 200 characters, whatever its size."""
    huge = "y" * 100_000  # seven of them: a file under the 1 MiB a params file may have
    words = ", ".join(["w"] * 50_000)
    path = _file(tmp_path, f"device: {huge}\nmodel_type: {huge}\nsense_source: {huge}\n"
                           f"languages: {huge}\nbatch_size: [{words}]\ninit_from: {huge}\n"
                           f"run_name: a/{huge}\n{'k' * 900}: 1\n")
    err = _exit2(train_main, ["--config", str(path)], capsys)
    for key in ("device", "model_type", "sense_source", "languages", "batch_size", "init_from",
                "run_name", "unknown key"):
        assert re.search(rf"^  - (--)?{key}", err, flags=re.M), key
    assert all(len(line) < 700 for line in err.splitlines()), max(map(len, err.splitlines()))
    assert len(err) < 8000
    assert "(100,000 characters)" in err


def test_brief_cuts_text_and_containers():
    assert brief("abc") == "'abc'"
    assert brief("x" * 1000) == repr("x" * 200) + "... (1,000 characters)"
    assert brief("x" * 1000, 10, quote=False) == "xxxxxxxxxx... (1,000 characters)"
    nested: list = ["lol"] * 9
    for _ in range(8):  # shared references: 9^9 strings if printed whole
        nested = [nested] * 9
    t0 = time.perf_counter()
    assert len(brief(nested)) <= 203
    assert time.perf_counter() - t0 < 0.1


def test_too_many_problems_are_counted_not_listed(tmp_path):
    path = _file(tmp_path, "".join(f"unknown_{i}: 1\n" for i in range(500)))
    with pytest.raises(UserError) as err:
        load_params(str(path))
    msg = str(err.value)
    assert "500 problems" in msg and "... and 480 more" in msg
    assert msg.count("unknown key") == 20


# --- 4: empty or comment-only -----------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n# and another\n", "---\n",
                                  "{}\n"])
def test_an_empty_params_file_is_refused(text, tmp_path, capsys):
    path = _file(tmp_path, text)
    for name, main, argv in _front_doors(path, tmp_path / "run"):
        err = _exit2(main, argv, capsys)
        assert f"{path}: params file is empty" in err, (name, err)
    assert not (tmp_path / "run").exists()


# --- 5: a key twice ---------------------------------------------------------------------------


def test_a_key_set_twice_names_the_key_and_both_lines(tmp_path, capsys):
    path = _file(tmp_path, "max_iters: 5\nbatch_size: 2\n\nmax_iters: 7\n")
    for name, main, argv in _front_doors(path, tmp_path / "run"):
        err = _exit2(main, argv, capsys)
        assert "key 'max_iters' is set twice, on line 1 and on line 4" in err, (name, err)
    # the notebooks read params_file through the same reader
    from backpack_nb.results import config_from_notebook

    with pytest.raises(UserError, match="set twice, on line 1 and on line 4"):
        config_from_notebook({"params_file": str(path)})


def test_a_key_twice_in_a_flow_mapping_or_far_apart(tmp_path):
    with pytest.raises(UserError, match="key 'a' is set twice, on line 1 and on line 1"):
        read_params_file(str(_file(tmp_path, "{a: 1, a: 2}\n")))
    far = "".join(f"# {i}\n" for i in range(400))
    with pytest.raises(UserError, match="on line 1 and on line 402"):
        read_params_file(str(_file(tmp_path, f"seed: 1\n{far}seed: 2\n")))


# --- 6: not UTF-8, binary, huge ---------------------------------------------------------------


def test_random_bytes_name_the_file(tmp_path, capsys):
    path = _file(tmp_path, os.urandom(4096).replace(b"\x00", b"\x80") + b"\xff")
    for name, main, argv in _front_doors(path, tmp_path / "run"):
        err = _exit2(main, argv, capsys)
        assert f"{path} is not a UTF-8 text file" in err, (name, err)
        assert len(err) < 400


def test_a_checkpoint_sized_file_is_not_read_whole(tmp_path):
    path = _file(tmp_path, b"a: 1\n" + b"#" * (paramfile.MAX_BYTES + 10))
    with pytest.raises(UserError, match="is over 1 MiB: a params file is a few dozen"):
        read_params_file(str(path))


@pytest.mark.parametrize("text,message", [
    ("run_name: a\x00b\n", r"line 1: the control character '\\x00' is not allowed in a YAML"),
    ("probe_words: " + "[" * 3000 + "]" * 3000 + "\n", "nested more than 8 levels deep"),
    ("seed: " + "1" * 5000 + "\n", r"line 1, column 7: '1111.*\(5,000 characters\) cannot be read"),
    ("run_name: 2024-02-30\n", "'2024-02-30' cannot be read .*; quote it if it is text"),
    ("- a\n- b\n", "must be a mapping of `key: value` lines, got list"),
    ("max_iters: 5\n  batch_size: [\n", r"line 2, column 13: mapping values are not allowed"),
])
def test_yaml_that_python_or_yaml_cannot_read_is_one_line(text, message, tmp_path, capsys):
    path = _file(tmp_path, text)
    err = _exit2(train_main, ["--config", str(path), "--device", "cpu"], capsys)
    assert re.search(message, err), err
    assert len(err) < 400


def test_a_config_name_too_long_for_the_file_system(capsys):
    err = _exit2(train_main, ["--config", "x" * 5000], capsys)
    assert "name too long" in err.lower() and len(err) < 600


# --- 7, 8 and the newcomer's silently accepted values ------------------------------------------


def test_a_seed_past_torch_range_gives_the_range(tmp_path, capsys):
    out = tmp_path / "run"
    for seed in (str(2**70), "-1", str(2**63)):
        err = _exit2(train_main, ["--config", "tiny_backpack", "--out_dir", str(out),
                                  "--seed", seed], capsys)
        assert f"--seed: must be in 0..{2**63 - 1}, got {seed}" in err
    assert not out.exists()
    # the largest one is taken, digit for digit (not through a float)
    assert config_from_argv(["--config", "tiny_backpack", "--seed", str(2**63 - 1)]).seed \
        == 2**63 - 1
    assert coerce(str(2**53 + 1), int) == 2**53 + 1


@pytest.mark.parametrize("key,value", [
    ("learning_rate", "1e400"), ("learning_rate", "1.0e400"), ("learning_rate", ".inf"),
    ("min_lr", ".nan"), ("weight_decay", "-.inf"), ("beta1", ".nan"), ("grad_clip", ".inf"),
    ("dropout", ".nan"), ("learning_rate", "1" * 400),
])
def test_every_float_setting_is_finite_before_anything_is_written(key, value, tmp_path, capsys):
    out = tmp_path / "run"
    path = _file(tmp_path, f"{key}: {value}\nout_dir: {out}\ndevice: cpu\n")
    err = _exit2(train_main, ["--config", str(path)], capsys)
    assert f"{key}: expected a finite number" in err
    assert not out.exists()  # no run.json, no training_log.json


def test_float_flags_are_finite_too(capsys):
    err = _exit2(train_main, ["--config", "tiny_backpack", "--learning_rate", "inf",
                              "--beta2", "nan"], capsys)
    assert "--learning_rate: expected a finite number, got 'inf'" in err
    assert "--beta2: expected a finite number, got 'nan'" in err


def test_integers_stop_at_int64(capsys):
    err = _exit2(train_main, ["--config", "tiny_backpack", "--batch_size", "1e30"], capsys)
    assert f"--batch_size: must be <= {2**63 - 1}" in err


def test_no_iteration_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    err = _exit2(train_main, ["--config", "tiny_backpack", "--out_dir", str(out),
                              "--max_iters", "0"], capsys)
    assert "--max_iters: must be >= 1, got 0" in err and "evaluate.py" in err
    assert not out.exists()


def test_warmup_past_the_decay_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    err = _exit2(train_main, ["--config", "tiny_backpack", "--out_dir", str(out),
                              "--warmup_iters", "500", "--lr_decay_iters", "200"], capsys)
    assert "--warmup_iters: 500 is past lr_decay_iters = 200" in err
    assert "set warmup_iters <= lr_decay_iters" in err
    assert not out.exists()
    # equal is a warmup straight into min_lr, and a decay past max_iters ends unfinished: fine
    load_params("tiny_backpack", {"warmup_iters": 200, "lr_decay_iters": 200})
    load_params("tiny_backpack", {"max_iters": 10, "lr_decay_iters": 10_000})


@pytest.mark.parametrize("key,value", [
    ("out_dir", "out/a\nb"), ("out_dir", "out/a\tb"), ("run_name", "run\x1b[31m"),
    ("data_dir", "europarl\r"), ("init_from", "res\x00ume"), ("out_dir", "out/a\u2028b"),
])
def test_control_characters_in_names_and_paths_are_refused(key, value, tmp_path, capsys):
    err = _exit2(train_main, ["--config", "tiny_backpack", f"--{key}", value], capsys)
    assert f"--{key}: {value!r} holds a control character" in err, err
    assert "retype the value" in err
    assert err.count("\n") == 2  # the heading and the one problem: the value stays on its line


def test_a_control_character_in_a_probe_word_or_a_file(tmp_path):
    with pytest.raises(UserError, match=r"probe_words: \['vote', 'lo\\ti'\] holds a control"):
        TrainConfig.from_dict({"probe_words": ["vote", "lo\ti"]})
    path = _file(tmp_path, 'out_dir: "out/x\\ny"\n')
    with pytest.raises(UserError, match=r"out_dir: 'out/x\\ny' holds a control character"):
        load_params(str(path))


def test_an_init_from_too_long_for_the_file_system(capsys):
    err = _exit2(train_main, ["--config", "tiny_backpack", "--init_from", "a" * 5000], capsys)
    assert "--init_from: 'aaaa" in err and "name too long" in err.lower()


# --- 12: Ctrl-C --------------------------------------------------------------------------------


@pytest.mark.parametrize("main,where,argv", [
    (models_main.main, models_main, ["--config", "tiny_backpack", "--vocab-size", "100"]),
    (params_module.main, params_module, ["get", "tiny_backpack", "max_iters"]),
])
def test_ctrl_c_is_one_line_and_status_130(main, where, argv, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(where, "load_params", interrupted)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 130
    assert err.startswith("error: interrupted (Ctrl-C)") and err.count("\n") == 1, err


def test_models_vocab_size_out_of_range_is_one_line(capsys):
    """A vocabulary past uint32 ids made torch's meta device fail with a traceback."""
    for v in ("0", str(10**20)):
        err = _exit2(models_main.main, ["--config", "tiny_backpack", "--vocab-size", v], capsys)
        assert "--vocab-size: must be in 1..4,294,967,296" in err
