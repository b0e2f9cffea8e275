"""The papermill runner (``python -m backpack_nb.reports``) as a keeper of reports: a report is
replaced only by a finished run, a failed run's notebook is kept under a name that says so,
every hint it prints works in its own command, and it runs quietly.

Most tests run the runner in-process with papermill's executor replaced by a fake that writes
a notebook (and fails, or is interrupted, when told to): the file handling is the runner's
own. One test runs a real notebook end to end: the refusal of issue 17 (a run that already
exists), which stops in the notebook's second cell."""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest
from papermill.exceptions import PapermillExecutionError

from backpack_nb import kernel, notebook_run, paths, reports

ROOT = Path(__file__).resolve().parents[1]


class FakePapermill:
    """Stands in for ``papermill.execute_notebook``: writes the input notebook with one output
    into the output path, as papermill does, then fails as told (``fail``: an exception, or
    None to finish). Records the notebooks it ran and the parameters each got."""

    def __init__(self, monkeypatch, text: str = "finished"):
        self.text, self.fail, self.ran, self.parameters = text, None, [], []
        monkeypatch.setattr(papermill, "execute_notebook", self)
        monkeypatch.setattr(notebook_run, "ensure_kernel", lambda name=reports.KERNEL_NAME, quiet=True: name)

    def __call__(self, input_path, output_path, parameters=None, **kwargs):
        self.ran.append(Path(input_path).stem)
        self.parameters.append(dict(parameters or {}))
        log = logging.getLogger("papermill")
        for key in parameters or {}:  # what papermill says for a name the cell does not list
            log.warning(f"Passed unknown parameter: {key}")
        log.info(f"stdout of the notebook: {self.text}")
        nb = nbformat.v4.new_notebook()
        cell = nbformat.v4.new_code_cell("print('hello')")
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=self.text)]
        if self.fail is not None:
            cell.outputs.append(nbformat.v4.new_output("error", ename="UserError", evalue="bad",
                                                       traceback=[]))
        nb.cells = [cell]
        nb.metadata["papermill"] = {"output_path": str(output_path),
                                    "exception": True if self.fail is not None else None}
        nbformat.write(nb, output_path)
        if self.fail is not None:
            raise self.fail
        return nb


def user_error(message: str) -> PapermillExecutionError:
    return PapermillExecutionError(cell_index=1, exec_count=2, source="train(cfg)",
                                   ename="UserError", evalue=message, traceback=[])


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*"))


def test_a_failed_run_keeps_the_finished_report(monkeypatch, tmp_path):
    """Issue 17, failure 1: a refused run replaced the finished report with the failed one."""
    fake = FakePapermill(monkeypatch)
    done = reports.run_notebook("04_senses", {}, "r", out_root=tmp_path)
    assert done.ipynb == tmp_path / "04_senses.ipynb" and done.html == tmp_path / "04_senses.html"
    before = {p.name: p.read_bytes() for p in (done.ipynb, done.html)}
    # papermill wrote into a running file; the report's record names the report
    assert nbformat.read(done.ipynb, as_version=4).metadata.papermill.output_path == str(done.ipynb)

    fake.text, fake.fail = "refused", user_error("out/x already holds a run; continue it with --init_from resume")
    with pytest.raises(reports.NotebookFailed) as exc:
        reports.run_notebook("04_senses", {}, "r", out_root=tmp_path)
    assert exc.value.user_error and exc.value.ipynb == tmp_path / "04_senses.failed.ipynb"
    assert {p.name: p.read_bytes() for p in (done.ipynb, done.html)} == before
    failed = nbformat.read(tmp_path / "04_senses.failed.ipynb", as_version=4)
    assert failed.cells[0].outputs[0].text == "refused"
    assert "refused" in (tmp_path / "04_senses.failed.html").read_text()
    message = str(exc.value)
    assert "-p init_from resume" in message and "--init_from" not in message
    assert f"kept as {tmp_path / '04_senses.failed.ipynb'}" in message
    assert f"the report {done.ipynb} is unchanged" in message
    assert leftovers(tmp_path) == []

    # The next finished run replaces the report; the failure is history.
    fake.text, fake.fail = "finished again", None
    reports.run_notebook("04_senses", {}, "r", out_root=tmp_path)
    assert nbformat.read(done.ipynb, as_version=4).cells[0].outputs[0].text == "finished again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["04_senses.html", "04_senses.ipynb"]


def test_a_run_that_never_started_changes_nothing(monkeypatch, tmp_path):
    (tmp_path / "04_senses.ipynb").write_text("old report")
    monkeypatch.setattr(notebook_run, "ensure_kernel", lambda name=reports.KERNEL_NAME, quiet=True: name)

    def no_kernel(*args, **kwargs):
        raise RuntimeError("Kernel died before replying to kernel_info")

    monkeypatch.setattr(papermill, "execute_notebook", no_kernel)
    with pytest.raises(RuntimeError):
        reports.run_notebook("04_senses", {}, "r", out_root=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["04_senses.ipynb"]
    assert (tmp_path / "04_senses.ipynb").read_text() == "old report"


def test_ctrl_c_keeps_the_partial_notebook_and_exits_130(monkeypatch, capsys):
    fake = FakePapermill(monkeypatch)
    folder = paths.outputs_root() / "runner_interrupted"
    folder.mkdir(parents=True)
    (folder / "04_senses.ipynb").write_text("old report")
    (folder / "04_senses.failed.html").write_text("page of an older failure")
    fake.text, fake.fail = "half way", KeyboardInterrupt()
    with pytest.raises(SystemExit) as exc:
        reports.main(["run", "04_senses", "--run_name", "runner_interrupted", "-q"])
    err = capsys.readouterr().err
    assert exc.value.code == 130
    assert err.startswith("error: interrupted (Ctrl-C); the partly executed notebook is kept as ")
    assert "04_senses.failed.ipynb" in err and err.count("\n") == 1  # one line
    assert (folder / "04_senses.ipynb").read_text() == "old report"
    kept = nbformat.read(folder / "04_senses.failed.ipynb", as_version=4)
    assert kept.cells[0].outputs[0].text == "half way"
    assert not (folder / "04_senses.failed.html").exists()  # it would show another run
    assert leftovers(folder) == []


def finished_run(out_dir: Path, iterations: int) -> None:
    out_dir.mkdir(parents=True)
    (out_dir / "ckpt.pt").write_bytes(b"")  # the pipeline looks at the names only
    (out_dir / "run.json").write_text(json.dumps({"status": "finished", "iterations": iterations}))


def training_report(run_name: str, exception: bool | None) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"exception": exception}
    path = paths.outputs_root() / run_name / "01_train.ipynb"
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def test_the_pipeline_keeps_only_a_finished_training_report(monkeypatch, tmp_path, capsys):
    """A finished run with a failed 01_train report (written before failures were kept apart)
    is not a report worth keeping: the pipeline runs 01_train again. A finished report is
    kept, and the note says how to train further in a command that works as printed."""
    fake = FakePapermill(monkeypatch)
    out_dir = tmp_path / "run"
    finished_run(out_dir, 200)
    argv = ["pipeline", "-f", "params/tiny_transformer.yaml", "-p", "out_dir", str(out_dir),
            "-p", "run_name", "runner_pipeline"]
    training_report("runner_pipeline", exception=True)
    assert reports.main(argv) == 0
    assert fake.ran == ["01_train", "03_evaluate", "06_steering"]  # a Transformer: no 04_senses
    assert "already reached" not in capsys.readouterr().out

    fake.ran.clear()
    assert reports.main(argv) == 0  # 01_train.ipynb is a finished report now
    assert fake.ran == ["03_evaluate", "06_steering"]
    out = capsys.readouterr().out
    assert "already reached max_iters 200" in out
    command = out.split("raise it: `")[1].split("`")[0]
    assert command.startswith("python -m backpack_nb.reports pipeline -f params/tiny_transformer.yaml")
    words = shlex.split(command.replace(" N", " 300"))
    fake.ran.clear()
    fake.parameters.clear()
    assert reports.main(words[3:]) == 0  # as printed, it trains the same run on to 300
    assert fake.ran == ["01_train", "03_evaluate", "06_steering"]
    got = fake.parameters[0]
    assert (got["out_dir"], got["run_name"], got["max_iters"]) == (str(out_dir), "runner_pipeline", 300)


def test_command_lines_quote_what_the_runner_reads_back(monkeypatch):
    overrides = {"runs": ["out/a b", "out/c"], "title": "Backpack vs Transformer: tiny",
                 "max_iters": 300, "compile": False, "eval_data_dir": None}
    line = reports.command_line("compare", "params/compare_cpu.yaml", overrides, "--seeds 1,2")
    got = {}

    def compare(params_file, given, *, seeds=(), **kwargs):  # what the runner would train
        got.update(params_file=params_file, overrides=given, seeds=list(seeds))
        return notebook_run.NotebookRun("05_compare", Path("r.ipynb"), Path("r.html"), 0.0)

    monkeypatch.setattr(reports, "compare", compare)
    assert reports.main(shlex.split(line)[3:]) == 0
    assert got == {"params_file": "params/compare_cpu.yaml", "overrides": overrides, "seeds": [1, 2]}


@pytest.mark.parametrize("argv, hint", [
    # the params file's validation names train.py's flags (--batch_size: must be >= 1)
    (["-f", "params/tiny_backpack.yaml", "-p", "batch_size", "0"], "-p batch_size: must be >= 1"),
    (["-f", "params/tiny_backpack.yaml", "-p", "compile", "maybe"], "-p compile: expected true"),
    # train.py's spelling given to the runner
    (["--init_from", "resume", "--compile"], "-p init_from resume -p compile true"),
])
def test_the_runners_own_messages_name_its_spelling(argv, hint, capsys):
    with pytest.raises(SystemExit) as exc:
        reports.main(["run", "01_train", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and hint in err
    assert "--batch_size" not in err and "--compile:" not in err and "Traceback" not in err


def test_the_runner_passes_on_no_unknown_parameter_warning(monkeypatch, tmp_path, caplog, capsys):
    """papermill warns for each injected name the parameters cell does not list, which the
    runner does on purpose (training settings); with --log-output the notebook's own output
    is streamed (papermill logs it at INFO, which no handler showed)."""
    FakePapermill(monkeypatch, text="loss 4.2")
    logger = logging.getLogger("papermill")
    before = (list(logger.filters), list(logger.handlers), logger.level)
    caplog.set_level(logging.DEBUG)
    reports.run_notebook("04_senses", {"data_dir": "d", "out_dir": "o"}, "r", out_root=tmp_path,
                         html=False, log_output=True)
    assert "stdout of the notebook: loss 4.2" in capsys.readouterr().out
    assert not [r for r in caplog.records if "unknown parameter" in r.getMessage()]
    reports.run_notebook("04_senses", {"data_dir": "d"}, "r", out_root=tmp_path, html=False)
    assert not [r for r in caplog.records if "unknown parameter" in r.getMessage()]
    assert (logger.filters, logger.handlers, logger.level) == before  # left as it was


def test_the_kernel_is_registered_without_the_tcp_warning(monkeypatch, tmp_path):
    """An existing registration (made before) gets the quiet option added, once."""
    spec_dir = tmp_path / "kernels" / "runner-test"
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec_dir / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "t",
                                                      "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    for _ in range(2):
        assert reports.ensure_kernel("runner-test") == "runner-test"
    spec = json.loads((spec_dir / "kernel.json").read_text())
    assert spec["argv"] == [*argv, kernel.KERNEL_QUIET] and spec["display_name"] == "t"


class NoKernel:
    """Stands in for papermill.execute_notebook where the runner must refuse before a kernel
    starts: calling it fails the test."""

    def __init__(self, monkeypatch):
        monkeypatch.setattr(papermill, "execute_notebook", self)

    def __call__(self, *args, **kwargs):
        raise AssertionError("a kernel was started for a run the runner should have refused")


def test_a_refused_run_never_starts_a_kernel(prepared_europarl, tmp_path, capsys, monkeypatch):
    """Issues 17 and 26: `run 01_train` on a folder that holds a run exits 2 with a hint that
    works in this command. Issue 26: it did so only after the kernel's start-up (about 9 s) and
    left 01_train.failed.* behind; now it is refused before any kernel starts, and the reports
    folder is as it was."""
    NoKernel(monkeypatch)
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "ckpt.pt").write_bytes(b"")  # the trainer refuses on the name, before reading it
    folder = paths.outputs_root() / "runner_refused"
    folder.mkdir(parents=True)
    for name in ("01_train.ipynb", "01_train.html"):
        (folder / name).write_text(f"the finished {name}")
    with pytest.raises(SystemExit) as exc:
        reports.main(["run", "01_train", "-f", "params/tiny_backpack.yaml", "-p", "out_dir",
                      str(out_dir), "-p", "data_dir", "europarl_sample", "-p", "max_iters", "100",
                      "--run_name", "runner_refused"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{out_dir} already holds a run (ckpt.pt)" in err
    assert "-p init_from resume" in err and "--init_from" not in err
    assert sorted(p.name for p in folder.iterdir()) == ["01_train.html", "01_train.ipynb"]
    for name in ("01_train.ipynb", "01_train.html"):
        assert (folder / name).read_text() == f"the finished {name}"


def test_what_a_training_cell_would_refuse_is_refused_first(tmp_path, capsys, monkeypatch):
    """The other refusals of the training cell that need only the folders, each exit 2 before
    a kernel starts and before a reports folder is made: a resume without a checkpoint (the
    02_resume notebook always resumes), a new run inside another run's folder (issue 26,
    failure 16), by `run` and by `pipeline`."""
    NoKernel(monkeypatch)
    monkeypatch.setenv("BACKPACK_NB_OUTPUTS", str(tmp_path / "outputs"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")  # a run that has not saved a checkpoint yet
    cases = [
        (["run", "02_resume", "-f", "tiny_backpack", "-p", "out_dir", str(tmp_path / "none")],
         f"-p init_from resume: no checkpoint in {tmp_path / 'none'}"),
        (["run", "01_train", "-f", "tiny_backpack", "-p", "out_dir", str(run / "inner")],
         f"-p out_dir {run / 'inner'} is inside the run folder {run} (it holds run.json)"),
        (["pipeline", "-f", "tiny_backpack", "-p", "out_dir", str(run / "a" / "b")],
         f"is inside the run folder {run} (it holds run.json)"),
    ]
    for argv, words in cases:
        with pytest.raises(SystemExit) as exc:
            reports.main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and words in err and err.count("\n") == 1, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert sorted(p.name for p in run.iterdir()) == ["run.json"]


def test_compare_never_trains_inside_a_run_folder(tmp_path, capsys, monkeypatch):
    """Issue 26, failure 16: `compare -f params/tiny_backpack.yaml --seeds ''` took '' as one
    seed and trained two runs inside the finished run out/tiny_backpack (as backpack/ and
    transformer/). An empty --seeds is refused, and so is a pair inside a run folder."""
    NoKernel(monkeypatch)
    monkeypatch.setenv("BACKPACK_NB_OUTPUTS", str(tmp_path / "outputs"))
    run = tmp_path / "tiny_backpack"
    run.mkdir()
    for name in ("ckpt.pt", "run.json", "training_log.json"):
        (run / name).write_bytes(b"{}")
    for seeds in ("", " , "):
        with pytest.raises(SystemExit) as exc:
            reports.main(["compare", "-f", "tiny_backpack", "-p", "out_dir", str(run), "--seeds", seeds])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"--seeds {seeds!r}: no seed given" in err, err
    with pytest.raises(SystemExit) as exc:
        reports.main(["compare", "-f", "tiny_backpack", "-p", "out_dir", str(run)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert f"compare trains into {run}/backpack and {run}/transformer, but {run} is a run folder" in err
    assert "-p out_dir out/tiny_backpack_compare" in err
    assert sorted(p.name for p in run.iterdir()) == ["ckpt.pt", "run.json", "training_log.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_backpack"]


def docs_papermill_command() -> list[str]:
    lines = [line for line in (ROOT / "docs" / "notebooks.md").read_text().splitlines()
             if "-m papermill " in line and not line.lstrip().startswith("#")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])


@pytest.mark.slow  # starts papermill
def test_the_docs_direct_papermill_command_is_quiet(tmp_path):
    """docs/notebooks.md's direct papermill form passes the params file as one parameter, so
    papermill has no unknown name to warn about (its -f form warns once per key of the file).
    Checked with --prepare-only: papermill injects and warns, but runs nothing."""
    words = docs_papermill_command()
    assert words[0].endswith("python") and words[1:3] == ["-m", "papermill"]
    quiet = [sys.executable, *words[1:4], str(tmp_path / "quiet.ipynb"), *words[5:], "--prepare-only"]
    noisy = [sys.executable, *words[1:4], str(tmp_path / "noisy.ipynb"), "-f",
             "params/tiny_backpack.yaml", "--prepare-only"]
    runs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for cmd in (quiet, noisy)]  # side by side: each spends its time importing
    (_, quiet_err), (_, noisy_err) = (p.communicate(timeout=120) for p in runs)
    assert [p.returncode for p in runs] == [0, 0], quiet_err + noisy_err
    assert "unknown parameter" not in quiet_err
    assert noisy_err.count("Passed unknown parameter") > 20  # the form the docs advise against
    injected = nbformat.read(tmp_path / "quiet.ipynb", as_version=4)
    source = "".join(c.source for c in injected.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert 'params_file = "params/tiny_backpack.yaml"' in source


def test_a_data_dir_typo_given_to_the_runner_is_an_error(prepared_europarl, capsys):
    """-p data_dir TYPO used to prepare (or download) a second dataset inside 01_train."""
    from backpack_nb import paths
    from backpack_nb.reports import main

    before = sorted(p.name for p in paths.data_root().iterdir())
    with pytest.raises(SystemExit) as exc:
        main(["run", "01_train", "-f", "params/tiny_backpack.yaml", "-p", "data_dir",
              "europarl_sampel"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "-p data_dir europarl_sampel: no prepared dataset" in err
    assert "did you mean 'europarl_sample'?" in err and "Traceback" not in err
    assert sorted(p.name for p in paths.data_root().iterdir()) == before


def test_runner_flags_out_of_range_or_pointing_at_the_wrong_thing(tmp_path, capsys, monkeypatch):
    """Issue 17's flag-by-flag audit of the runner: each is exit 2 with one message naming
    the flag, before any notebook runs or anything is written."""
    monkeypatch.setenv("BACKPACK_NB_OUTPUTS", str(tmp_path / "outputs"))
    nb = tmp_path / "nb.ipynb"
    nb.write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    cases = [
        (["run", "03_evaluate", "-f", "tiny_backpack", "--run_name", "../../escape"],
         "--run_name '../../escape': give a folder name for outputs/"),
        (["run", "03_evaluate", "-f", "tiny_backpack", "--run_name", ""],
         "--run_name '': give a folder name"),
        (["run", "03_evaluate", "-f", "tiny_backpack", "-p", "run_name", "a/b"],
         "run_name: 'a/b' names the reports' folder"),
        (["render", str(nb), "--out", str(tmp_path)], f"--out {tmp_path} is a folder"),
        (["kernel", "--name", "bad name/x"], "--name 'bad name/x': a kernel name is"),
        (["kernel", "--name", ""], "--name '': a kernel name is"),
        (["compare", "-f", "tiny_backpack", "--seeds", "1,1"], "each seed >= 0 and listed once"),
        (["compare", "-f", "tiny_backpack", "--seeds", "-5"], "each seed >= 0 and listed once"),
        (["compare", "-f", "tiny_backpack", "--docs", str(nb / "x.html")],
         f"--docs {nb / 'x.html'}: cannot create {nb}"),
        (["compare", "-f", "tiny_backpack", "--docs", str(tmp_path)], "is a folder"),
    ]
    for argv, words in cases:
        with pytest.raises(SystemExit) as exc:
            reports.main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and words in err and "Traceback" not in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nb.ipynb"]


# --- issue 26: progress, Ctrl-C, a disk that takes no reports, leftovers ----------------------


def test_a_line_per_notebook_unless_quiet(monkeypatch, tmp_path, capsys):
    """Issue 26: `run` printed nothing while a notebook ran (26 s of silence). The kernel's
    start is announced (each cell too, by the engine: see the Ctrl-C test below); -q is quiet."""
    FakePapermill(monkeypatch)
    monkeypatch.setenv("BACKPACK_NB_OUTPUTS", str(tmp_path))
    assert reports.main(["run", "04_senses", "--run_name", "r"]) == 0
    assert capsys.readouterr().err == "04_senses: starting the kernel backpack-nb\n"
    assert reports.main(["run", "04_senses", "--run_name", "r", "-q"]) == 0
    assert capsys.readouterr().err == ""


def test_ctrl_c_in_a_pipeline_is_one_line_and_130(monkeypatch, tmp_path, capsys):
    fake = FakePapermill(monkeypatch)
    fake.fail = KeyboardInterrupt()
    monkeypatch.setenv("BACKPACK_NB_OUTPUTS", str(tmp_path / "outputs"))
    with pytest.raises(SystemExit) as exc:
        reports.main(["pipeline", "-f", "params/tiny_transformer.yaml", "-p", "out_dir",
                      str(tmp_path / "run"), "-p", "run_name", "r", "-q"])
    err = capsys.readouterr().err
    assert exc.value.code == 130 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: interrupted (Ctrl-C); the partly executed notebook is kept as "
                          f"{tmp_path / 'outputs' / 'r' / '01_train.failed.ipynb'}")


def sleepy_notebook(path: Path) -> Path:
    """A notebook whose second cell loops until Ctrl-C and stops cleanly on it (as training
    does: it saves, then returns), after writing its kernel's pid to ``marker``."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": reports.KERNEL_NAME, "display_name": "Python (backpack-nb)",
                                 "language": "python"}
    params = nbformat.v4.new_code_cell("marker = ''")
    params.metadata["tags"] = ["parameters"]
    loop = nbformat.v4.new_code_cell(
        "# stops on Ctrl-C the way the trainer does\n"
        "import os, pathlib, signal, time\n"
        "stop = []\n"
        "signal.signal(signal.SIGINT, lambda *a: stop.append(1))\n"
        "pathlib.Path(marker).write_text(str(os.getpid()))\n"
        "t0 = time.time()\n"
        "while not stop and time.time() - t0 < 120:\n"
        "    time.sleep(0.05)\n"
        "print('stopped cleanly' if stop else 'never stopped')")
    nb.cells = [params, loop, nbformat.v4.new_code_cell("print('the next cell ran')")]
    nbformat.write(nb, path)
    return path


@pytest.mark.slow
def test_ctrl_c_reaches_the_running_cell(tmp_path):
    """Issue 26, failure 12: Ctrl-C on `reports run`/`pipeline` killed the kernel in the middle
    of a cell; the kernel printed a zmq "Socket operation on non-socket" traceback and the cell
    never saved its work. Now the cell gets the Ctrl-C (the kernel runs in a process group of
    its own, out of the terminal's reach), stops as it would at a terminal, no later cell
    starts, and the command ends with one line and status 130 after a line per cell."""
    import os
    import signal
    import time

    marker = tmp_path / "kernel.pid"
    nb = sleepy_notebook(tmp_path / "sleepy.ipynb")
    proc = subprocess.Popen([sys.executable, "-m", "backpack_nb.reports", "run", str(nb),
                             "--run_name", "runner_ctrl_c", "-p", "marker", str(marker)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # a terminal's foreground group, alone
    try:
        deadline = time.monotonic() + 180
        while not marker.exists() or not marker.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = err.splitlines()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "ZMQError" not in err and "non-socket" not in err, err
    assert all(line.startswith("sleepy: ") for line in lines[:-1]), err
    assert "sleepy: starting the kernel backpack-nb" in lines
    assert "sleepy: cell 3/4: import os, pathlib, signal, time" in lines
    folder = paths.outputs_root() / "runner_ctrl_c"
    assert lines[-1] == ("error: interrupted (Ctrl-C); the partly executed notebook is kept as "
                         f"{folder / 'sleepy.failed.ipynb'}")
    kept = nbformat.read(folder / "sleepy.failed.ipynb", as_version=4)
    texts = ["".join(o.get("text", "") for o in c.outputs) for c in kept.cells]
    assert "stopped cleanly\n" in texts and "the next cell ran\n" not in texts
    assert sorted(p.name for p in folder.iterdir()) == ["sleepy.failed.ipynb"]
    kernel_pid = int(marker.read_text())
    for _ in range(50):  # the kernel was shut down, not left running
        try:
            os.kill(kernel_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the kernel {kernel_pid} is still running")


def test_a_disk_that_fills_during_a_run_is_one_line(monkeypatch, tmp_path, capsys):
    """Issue 26, failure 14: an OSError while papermill saves the notebook was a traceback."""
    import errno

    fake = FakePapermill(monkeypatch)
    monkeypatch.setenv("BACKPACK_NB_OUTPUTS", str(tmp_path))
    assert reports.main(["run", "04_senses", "--run_name", "r", "-q"]) == 0
    folder = tmp_path / "r"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def filling(input_path, output_path, **kwargs):
        Path(output_path).write_text('{"cells": [')  # half a notebook, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(papermill, "execute_notebook", filling)
    with pytest.raises(SystemExit) as exc:
        reports.main(["run", "04_senses", "--run_name", "r", "-q"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: could not write {folder / '04_senses.ipynb'} (No space left "
                          "on device); the existing 04_senses.ipynb is untouched. Free disk space")
    assert "BACKPACK_NB_OUTPUTS" in err
    assert fake.ran == ["04_senses"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing hidden left


@pytest.mark.slow  # starts the runner
def test_reports_on_a_read_only_file_system_are_one_line(tmp_path):
    """Issue 26, failure 14: `reports run` with its outputs on a read-only file system ended
    in an OSError traceback from papermill, after the kernel's start-up. Now it is one line
    and status 2 before a kernel starts. A real read-only mount, in a user namespace."""
    outputs = tmp_path / "outputs"
    (outputs / "r").mkdir(parents=True)
    (outputs / "r" / "04_senses.ipynb").write_text("the old report")
    probe = subprocess.run(["unshare", "-Urm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no user namespaces here to mount a read-only folder: {probe.stderr!r}")
    script = (f"mount --bind -o ro {shlex.quote(str(outputs))} {shlex.quote(str(outputs))} && "
              f"exec {shlex.quote(sys.executable)} -m backpack_nb.reports run 04_senses --run_name r")
    env = {**__import__("os").environ, "BACKPACK_NB_OUTPUTS": str(outputs)}
    done = subprocess.run(["unshare", "-Urm", "sh", "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"error: could not write {outputs / 'r' / '04_senses.ipynb'} "
                                  "(Read-only file system)")
    assert "BACKPACK_NB_OUTPUTS" in done.stderr
    assert sorted(p.name for p in (outputs / "r").iterdir()) == ["04_senses.ipynb"]


def test_leftovers_of_a_dead_run_go_with_the_next_run(monkeypatch, tmp_path):
    """Issue 26: a killed pipeline left `.01_train.PID.running.ipynb` behind and later runs
    never removed it. The next run of that notebook into that folder removes what a dead
    process left (the running notebook, its page, their temporary files); a live process's
    files and other notebooks' files stay."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        names = {f".04_senses.{dead.pid}.running.ipynb": False,
                 f".04_senses.{dead.pid}.running.html": False,
                 f"..04_senses.{dead.pid}.running.html.k2j4x9.tmp": False,
                 f".04_senses.{live.pid}.running.ipynb": True,  # another run, right now
                 f".01_train.{dead.pid}.running.ipynb": True,  # removed by the next 01_train
                 "notes.txt": True}
        for name in names:
            (tmp_path / name).write_text("left")
        FakePapermill(monkeypatch)
        reports.run_notebook("04_senses", {}, "r", out_root=tmp_path, html=False, progress=False)
        kept = {p.name for p in tmp_path.iterdir()}
        assert kept == {n for n, stays in names.items() if stays} | {"04_senses.ipynb"}
    finally:
        live.kill()
        live.wait()


def test_p_values_are_read_as_params_files_are():
    """-p values: YAML scalars and bracketed lists as before; an alias is never expanded (it
    stays text), and a value of several lines keeps its newline for the settings check."""
    assert reports.parse_value("40") == 40 and reports.parse_value("[a, b]") == ["a", "b"]
    assert reports.parse_value("null") is None
    assert reports.parse_value("title: with a colon") == "title: with a colon"
    bomb = "[&a [x, x], [*a, *a], [*a, *a]]"
    assert reports.parse_value(bomb) == bomb
    assert reports.parse_value("out/a\nb") == "out/a\nb"
