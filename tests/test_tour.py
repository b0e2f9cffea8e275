"""A newcomer's first minutes (issue 26): ``make demo``, then every command of the README's
"A short tour", in order, on a clean clone, then the commands the tour leads to (the training
notebook's own command, the docs' papermill command, the README's Python lines). After the
demo, ``python train.py --config tiny_backpack``, ``reports run 01_train -f ... -p max_iters
100`` and the docs' papermill command used to be refused: the demo had made
``out/tiny_backpack``.

The clone is the working tree's files (git's tracked and unignored ones) in a temporary folder,
so the commands write their ``out/`` and ``data/`` there; prepared data and reports go to
folders of this test (``BACKPACK_NB_DATA``, ``BACKPACK_NB_OUTPUTS``; preparing the sample takes
a second or two). Every command that trains
or evaluates runs at tiny sizes (the flags below, appended to the command as written); Multi-
SimLex is left out, which the evaluation notebook reports in a line and skips.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]

# A training run of a few seconds, and evaluations of a few windows.
TINY = {"max_iters": 20, "lr_decay_iters": 20, "warmup_iters": 2, "eval_interval": 10,
        "eval_iters": 2, "checkpoint_interval": 10, "log_interval": 5}
TINY_P = [w for k, v in {**TINY, "max_tokens": 2000}.items() for w in ("-p", k, str(v))]
# the steering report of a pipeline at its smallest: one noun set, one sample per topic
STEER_P = ["-p", "nouns", "[gender_en]", "-p", "topic_samples", "1", "-p", "topic_tokens", "8"]
TINY_FLAGS = {"train.py": [w for k, v in TINY.items() for w in (f"--{k}", str(v))],
              "evaluate.py": ["--max_tokens", "2000"],
              "sample.py": ["--max_new_tokens", "20"]}


def tour_commands() -> list[str]:
    """The README's tour: the bash block of its "A short tour" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## A short tour\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert section, "README.md has no '## A short tour' section"
    block = re.search(r"^```bash\n(.*?)^```", section.group(1), flags=re.M | re.S)
    assert block, "README.md's tour has no bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def shown_commands() -> list[str]:
    """What the tour leads to: the training notebook's command (its first cell) and the docs'
    papermill command."""
    first = nbformat.read(ROOT / "notebooks" / "01_train.ipynb", as_version=4).cells[0].source
    train = [ln for ln in first.splitlines() if ln.startswith("python -m backpack_nb.reports run")]
    docs = (ROOT / "docs" / "notebooks.md").read_text(encoding="utf-8").splitlines()
    papermill = [ln for ln in docs if "-m papermill " in ln and not ln.lstrip().startswith("#")]
    assert len(train) == 1 and len(papermill) == 1, (train, papermill)
    return train + papermill


def readme_python() -> str:
    """The README's Python lines ("Reading a Backpack in Python")."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)
    assert len(blocks) == 1, blocks
    return blocks[0]


def clean_clone(dest: Path) -> Path:
    """The working tree's files (tracked, or new and not ignored) under ``dest``."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, names):
        src = ROOT / name.decode()
        if src.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name.decode())
    return dest


def tiny(words: list[str]) -> list[str]:
    """``words`` with the tiny sizes appended, in the spelling of the command (a pipeline's
    evaluation notebook also takes max_tokens; one notebook, only what it declares)."""
    if words[:3] == ["python", "-m", "backpack_nb.reports"] and words[3] == "pipeline":
        return words + TINY_P + STEER_P
    if words[:2] == ["python", "-m"] and words[2] in ("backpack_nb.reports", "papermill"):
        return words + TINY_P[:-3]
    script = next((w for w in words[1:2] if w.endswith(".py")), None)
    return words + TINY_FLAGS.get(script, [])


@pytest.mark.slow
def test_the_readme_tour_after_the_demo(europarl_source, tmp_path):
    clone = clean_clone(tmp_path / "clone")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "VIRTUAL_ENV": str(bin_dir.parent),
           "BACKPACK_NB_DATA": str(tmp_path / "data"), "BACKPACK_NB_OUTPUTS": str(tmp_path / "outputs"),
           "MULTISIMLEX_SOURCE": str(tmp_path / "no_multisimlex")}

    def run(words: list[str], what: str) -> subprocess.CompletedProcess:
        if words[0] == "python":
            words = [sys.executable, *words[1:]]
        done = subprocess.run(words, cwd=clone, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{what}\nexit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    # make demo: the Makefile's recipe, at tiny sizes
    recipe = re.search(r"^demo:.*\n\t(.*)$", (ROOT / "Makefile").read_text(), flags=re.M)
    assert recipe and recipe.group(1) == "$(PY) -m backpack_nb.demo", recipe
    run(["python", "-m", "backpack_nb.demo", *TINY_P, *STEER_P], "make demo")
    assert (clone / "out" / "tiny_backpack" / "ckpt.pt").is_file()

    for line in tour_commands():
        words = shlex.split(line, comments=True)
        if words[0] == "source":  # the venv's python is first on PATH
            assert words[1] == ".venv/bin/activate"
        elif words[0] == "export":  # the Europarl sample: the session's EUROPARL_SOURCE
            assert words[1].startswith("EUROPARL_SOURCE=")
        elif words[0] == "jupyter":  # a server: checked to be there, not started
            run([str(bin_dir / "jupyter"), words[1], "--version"], line)
        else:
            run(tiny(words), line)
    for line in shown_commands():
        words = shlex.split(line.replace(".venv/bin/python", "python"), comments=True)
        run(tiny(words), line)
    run(["python", "-c", readme_python()], "README.md's Python lines")

    # the demo's runs are as the demo left them, each new run has its own folder
    demo = json.loads((clone / "out" / "tiny_backpack" / "run.json").read_text())
    assert demo["status"] == "finished" and demo["iterations"] == TINY["max_iters"]
    for new in ("my_backpack", "tiny_backpack_100", "papermill_100"):
        assert (clone / "out" / new / "ckpt.pt").is_file(), new
    assert (clone / "data" / "europarl" / "meta.json").is_file()
    reports = sorted(p.name for p in (tmp_path / "outputs" / "tiny_backpack").iterdir())
    assert reports == ["01_train.html", "01_train.ipynb", "03_evaluate.html", "03_evaluate.ipynb",
                       "04_senses.html", "04_senses.ipynb", "06_steering.html", "06_steering.ipynb"]
