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

from backpack_nb import kernel, paths, reports

ROOT = Path(__file__).resolve().parents[1]


class FakePapermill:
    """Stands in for ``papermill.execute_notebook``: writes the input notebook with one output
    into the output path, as papermill does, then fails as told (``fail``: an exception, or
    None to finish). Records the notebooks it ran."""

    def __init__(self, monkeypatch, text: str = "finished"):
        self.text, self.fail, self.ran = text, None, []
        monkeypatch.setattr(papermill, "execute_notebook", self)
        monkeypatch.setattr(reports, "ensure_kernel", lambda name=reports.KERNEL_NAME, quiet=True: name)

    def __call__(self, input_path, output_path, parameters=None, **kwargs):
        self.ran.append(Path(input_path).stem)
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
    monkeypatch.setattr(reports, "ensure_kernel", lambda name=reports.KERNEL_NAME, quiet=True: name)

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
    assert reports.main(["run", "04_senses", "--run_name", "runner_interrupted"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted: the partly executed notebook is kept as ")
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
    assert fake.ran == ["01_train", "03_evaluate"]
    assert "already reached" not in capsys.readouterr().out

    fake.ran.clear()
    assert reports.main(argv) == 0  # 01_train.ipynb is a finished report now
    assert fake.ran == ["03_evaluate"]
    out = capsys.readouterr().out
    assert "already reached max_iters 200" in out
    command = out.split("raise it: `")[1].split("`")[0]
    assert command.startswith("python -m backpack_nb.reports pipeline -f params/tiny_transformer.yaml")
    words = shlex.split(command.replace(" N", " 300"))
    args = reports._parser().parse_args(words[3:])
    assert dict(args.parameters) == {"out_dir": str(out_dir), "run_name": "runner_pipeline",
                                     "max_iters": "300"}


def test_command_lines_quote_what_the_runner_reads_back():
    overrides = {"runs": ["out/a b", "out/c"], "title": "Backpack vs Transformer: tiny",
                 "max_iters": 300, "compile": False, "eval_data_dir": None}
    line = reports.command_line("compare", "params/compare_cpu.yaml", overrides, "--seeds 1,2")
    args = reports._parser().parse_args(shlex.split(line)[3:])
    assert {k: reports.parse_value(v) for k, v in args.parameters} == overrides
    assert args.seeds == "1,2"


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


def test_a_refused_run_end_to_end(prepared_europarl, tmp_path, capfd, caplog):
    """Issue 17's case, with a real kernel: `run 01_train` on a folder that holds a run exits 2
    with a hint that works in this command, leaves the finished report as it was, keeps the
    failed notebook beside it, and prints neither papermill's unknown-parameter warnings
    (data_dir is not in 01_train's parameters cell) nor the kernel's TCP warning."""
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "ckpt.pt").write_bytes(b"")  # the trainer refuses on the name, before reading it
    folder = paths.outputs_root() / "runner_refused"
    folder.mkdir(parents=True)
    for name in ("01_train.ipynb", "01_train.html"):
        (folder / name).write_text(f"the finished {name}")
    caplog.set_level(logging.DEBUG)
    code = reports.main(["run", "01_train", "-f", "params/tiny_backpack.yaml", "-p", "out_dir",
                         str(out_dir), "-p", "data_dir", "europarl_sample", "-p", "max_iters", "100",
                         "--run_name", "runner_refused"])
    err = capfd.readouterr().err
    assert code == 2
    assert "already holds a run" in err and "-p init_from resume" in err and "--init_from" not in err
    assert "IPKernelApp" not in err and "without encryption" not in err
    assert not [r for r in caplog.records if "unknown parameter" in r.getMessage()]
    for name in ("01_train.ipynb", "01_train.html"):
        assert (folder / name).read_text() == f"the finished {name}"
    failed = nbformat.read(folder / "01_train.failed.ipynb", as_version=4)
    assert failed.metadata.papermill.exception
    assert (folder / "01_train.failed.html").stat().st_size > 1000
    assert leftovers(folder) == []


def docs_papermill_command() -> list[str]:
    lines = [line for line in (ROOT / "docs" / "notebooks.md").read_text().splitlines()
             if "-m papermill " in line and not line.lstrip().startswith("#")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])


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
