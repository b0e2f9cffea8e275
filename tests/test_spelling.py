"""Hints name settings as the place they are read in takes them (backpack_nb.spelling):
train.py's flags, the report runner's -p, a notebook's parameters cell."""

from __future__ import annotations

import shutil
import sys
import types

import pytest

from backpack_nb import spelling
from backpack_nb.errors import UserError
from conftest import tiny_config


class ZMQInteractiveShell:  # the class name of a Jupyter kernel's shell
    pass


@pytest.fixture
def in_jupyter(monkeypatch):
    fake = types.ModuleType("IPython")
    fake.get_ipython = lambda: ZMQInteractiveShell()
    monkeypatch.setitem(sys.modules, "IPython", fake)
    monkeypatch.delenv(spelling.RUNNER_ENV, raising=False)


def test_train_py_spelling(monkeypatch):
    monkeypatch.delenv(spelling.RUNNER_ENV, raising=False)
    assert spelling.where() == "cli"
    assert spelling.setting("init_from", "resume") == "--init_from resume"
    assert spelling.setting("overwrite", True) == "--overwrite"
    assert spelling.setting("compile", False) == "--compile false"
    assert spelling.setting("max_iters") == "--max_iters"


def test_the_runners_spelling(monkeypatch):
    monkeypatch.setenv(spelling.RUNNER_ENV, "1")
    assert spelling.where() == "runner"
    assert spelling.setting("init_from", "resume") == "-p init_from resume"
    assert spelling.setting("overwrite", True) == "-p overwrite true"
    assert spelling.setting("max_iters") == "-p max_iters"


def test_a_notebooks_spelling(in_jupyter):
    assert spelling.where() == "notebook"
    assert spelling.setting("init_from", "resume") == "init_from = 'resume'"
    assert spelling.setting("overwrite", True) == "overwrite = True"
    assert spelling.setting("max_iters") == "max_iters"


def test_the_training_loops_hints_follow_the_place(tiny_backpack_run, tmp_path, monkeypatch,
                                                   in_jupyter):
    """A run folder that already holds a run, asked to start from scratch: the refusal says
    how to resume in the spelling of where train() was called from."""
    from backpack_nb.training import train

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_backpack_run["out_dir"] / "ckpt.pt", run / "ckpt.pt")
    cfg = tiny_config("backpack", run)
    with pytest.raises(UserError) as exc:
        train(cfg)
    assert "continue it with init_from = 'resume', pick another out_dir, or pass " \
           "overwrite = True" in str(exc.value)
    monkeypatch.setenv(spelling.RUNNER_ENV, "1")
    with pytest.raises(UserError) as exc:
        train(cfg)
    assert "continue it with -p init_from resume, pick another -p out_dir, or pass " \
           "-p overwrite true" in str(exc.value)
    with pytest.raises(UserError) as exc:
        train(cfg.replace(init_from="resume", out_dir=str(tmp_path / "empty")))
    assert "check -p out_dir, or start with -p init_from scratch" in str(exc.value)
