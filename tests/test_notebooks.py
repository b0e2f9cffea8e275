"""The notebooks run headless through papermill (``backpack_nb.reports``) with tiny
parameters: no error outputs, plots where plots are expected, an HTML report beside each.
They reuse the session's tiny checkpoints (copied, since evaluating writes eval.json)."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import nbformat
import pytest

from backpack_nb.senses import token_label
from backpack_nb import comparison, reports

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SLOW_FIXTURES = {"kernel"}  # a test that starts the kernel runs a notebook (conftest marks it)

# A training run of a few seconds on the session's prepared sample.
TINY_TRAIN = {"data_dir": "europarl_sample", "max_iters": 30, "lr_decay_iters": 30,
              "warmup_iters": 5, "eval_interval": 5, "eval_iters": 2, "checkpoint_interval": 15,
              "log_interval": 5}


@pytest.fixture(scope="session")
def kernel() -> str:
    return reports.ensure_kernel()


def copy_run(run: dict, dest: Path, with_ckpt: bool = False) -> Path:
    """A copy of a session run folder, so a notebook may write eval.json into it."""
    dest.mkdir(parents=True, exist_ok=True)
    names = ["best.pt", "run.json", "training_log.json"] + (["ckpt.pt"] if with_ckpt else [])
    for name in names:
        shutil.copy2(run["out_dir"] / name, dest / name)
    return dest


def outputs(ipynb: Path) -> list[dict]:
    nb = nbformat.read(ipynb, as_version=4)
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def check_executed(r: reports.NotebookRun, min_images: int = 1) -> list[dict]:
    """No error outputs, at least ``min_images`` PNG figures, and the HTML exists."""
    outs = outputs(r.ipynb)
    errors = [o for o in outs if o.get("output_type") == "error"]
    assert not errors, f"{r.notebook}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    pngs = [o for o in outs if "image/png" in o.get("data", {})]
    assert len(pngs) >= min_images, f"{r.notebook}: {len(pngs)} PNG outputs, expected >= {min_images}"
    assert r.html is not None and r.html.is_file() and r.html.stat().st_size > 1000
    return outs


def text_of(outs: list[dict]) -> str:
    return "".join(o.get("text", "") if o.get("output_type") == "stream"
                   else o.get("data", {}).get("text/plain", "") for o in outs)


# --- the notebooks in git ----------------------------------------------------------------------


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped_and_parameterized(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), \
        f"{path.name} holds outputs; clear them before committing (nbstripout or Jupyter's Clear All Outputs)"
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged 'parameters', expected 1"
    assert nb.metadata.get("kernelspec", {}).get("name") == reports.KERNEL_NAME


def test_every_issue_notebook_exists():
    assert {"01_train", "02_resume", "03_evaluate", "04_senses"} <= {p.stem for p in NOTEBOOKS}


# --- running them --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interrupted_run(kernel, prepared_europarl, tmp_path_factory) -> tuple[reports.NotebookRun, Path]:
    """01_train, stopped half way (stop_after) as if interrupted."""
    out_dir = tmp_path_factory.mktemp("nb_train") / "run"
    r = reports.run("01_train", "tiny_backpack",
                    {**TINY_TRAIN, "out_dir": str(out_dir), "stop_after": 15},
                    run_name="nb_train")
    return r, out_dir


def test_01_train(interrupted_run):
    r, out_dir = interrupted_run
    outs = check_executed(r)
    assert r.ipynb.parent.name == "nb_train" and r.html == r.ipynb.with_suffix(".html")
    text = text_of(outs)
    assert "iteration 15, stopped" in text and "val" in text  # ends with the log
    assert json.loads((out_dir / "run.json").read_text())["status"] == "interrupted"


def test_02_resume(interrupted_run):
    _, out_dir = interrupted_run
    r = reports.run("02_resume", "tiny_backpack", {**TINY_TRAIN, "out_dir": str(out_dir)},
                    run_name="nb_train")
    outs = check_executed(r, min_images=2)  # the live plot and the curve across the interruption
    text = text_of(outs)
    assert "at iteration 15 of 30" in text and "restarts at iteration 15" in text
    assert "iteration 30, finished" in text
    log = json.loads((out_dir / "training_log.json").read_text())
    assert log["iterations"][-1] == 30 and 15 in log["iterations"]


def test_03_evaluate(kernel, tiny_backpack_run, tiny_transformer_run, tmp_path):
    bp = copy_run(tiny_backpack_run, tmp_path / "bp")
    tf = copy_run(tiny_transformer_run, tmp_path / "tf")
    r = reports.run("03_evaluate", None, {"runs": [str(bp), str(tf)], "max_tokens": 2000},
                    run_name="nb_eval")
    outs = check_executed(r, min_images=3)  # val bars, test bars, loss curves
    text = text_of(outs)
    assert "bits/byte" in text and "tiny_backpack" in text and "tiny_transformer" in text
    for folder in (bp, tf):
        ev = json.loads((folder / "eval.json").read_text())
        assert set(ev["splits"]["val"]) == {"all", "en", "fr"}


def test_06_steering_runs_the_three_experiments_and_keeps_eval_json(kernel, tiny_backpack_run,
                                                                      tiny_transformer_run, tmp_path):
    """A Backpack run: the gender table and figures, topic and edit, written into its
    eval.json beside the sections already there; a Transformer run: the projection baseline
    and the reason the rest needs senses."""
    bp = copy_run(tiny_backpack_run, tmp_path / "bp")
    (bp / "eval.json").write_text(json.dumps({"checkpoint": str(bp / "best.pt"), "splits": {"val": {}}}))
    small = {"nouns": ["gender_en"], "topic_samples": 1, "topic_tokens": 6, "strengths": [0, 3]}
    r = reports.run("06_steering", None, {"out_dir": str(bp), **small}, run_name="nb_steering")
    outs = check_executed(r, min_images=4)  # bias per noun, the sweep, bag share, the edit
    assert "gender sense" in text_of(outs) and "held-out loss" in text_of(outs)
    saved = json.loads((bp / "eval.json").read_text())
    assert saved["splits"] == {"val": {}} and {"gender", "topic", "edit"} <= set(saved["steering"])
    tf = copy_run(tiny_transformer_run, tmp_path / "tf")
    r = reports.run("06_steering", None, {"out_dir": str(tf), **small}, run_name="nb_steering_tf")
    outs = check_executed(r, min_images=1)
    text = text_of(outs)
    assert "A Transformer has no sense vectors" in text and "needs a Backpack" in text
    assert set(json.loads((tf / "eval.json").read_text())["steering"]) == {"gender"}


def test_04_senses_html_has_the_sense_tables(kernel, tiny_backpack_run, tmp_path):
    from backpack_nb.loading import load_model
    from backpack_nb.senses import sense_words

    bp = copy_run(tiny_backpack_run, tmp_path / "bp")
    words = ["Parliament", "vote"]
    r = reports.run("04_senses", None, {"out_dir": str(bp), "words": words, "top": 5},
                    run_name="nb_senses")
    check_executed(r, min_images=2)  # alignment heatmap, contextualization heatmap
    page = r.html.read_text(encoding="utf-8")
    model, tok, _ = load_model(bp / "best.pt")
    for word in words:
        table = sense_words(model, tok, word, top=5)
        assert f"senses of <b>{html.escape(table.word)}</b>" in page
        for row in table[:2]:
            for t in row["top"][:3]:  # the words themselves, as text in the report
                assert f"<code>{html.escape(token_label(t))}</code>" in page
    assert "top words (promoted)" in page


def test_05_compare_report(kernel, tiny_backpack_run, tiny_transformer_run, tmp_path):
    bp = copy_run(tiny_backpack_run, tmp_path / "bp")
    tf = copy_run(tiny_transformer_run, tmp_path / "tf")
    r = reports.run_notebook("05_compare", {"runs": {"backpack": str(bp), "transformer": str(tf)},
                                            "max_tokens": 2000, "n_boot": 200, "words": ["vote"]},
                             "nb_compare", exclude_input=True)
    check_executed(r, min_images=3)
    page = r.html.read_text(encoding="utf-8")
    for needle in ("What the numbers show", "paired 95% interval", "tokens/s", "Limits", "senses of"):
        assert needle in page


def test_pipeline_resumes_an_existing_checkpoint(kernel, tiny_transformer_run, tmp_path, capsys):
    """The GCP script's command: pipeline -f params/X.yaml -p out_dir DIR. A run folder
    with a checkpoint is resumed (here: already at max_iters, so nothing to train), then
    evaluated; a Transformer gets no senses notebook."""
    tf = copy_run(tiny_transformer_run, tmp_path / "tf", with_ckpt=True)
    code = reports.main(["pipeline", "-f", "params/tiny_transformer.yaml", "-p", "out_dir", str(tf),
                         "-p", "data_dir", "europarl_sample", "-p", "max_tokens", "2000"])
    assert code == 0
    out = capsys.readouterr().out
    assert "resuming it" in out and "03_evaluate.html" in out and "04_senses" not in out
    folder = Path(reports.paths.outputs_root()) / "tiny_transformer"
    train_outs = check_executed(reports.NotebookRun("01_train", folder / "01_train.ipynb",
                                                    folder / "01_train.html", 0.0), min_images=0)
    # the report's hint names the setting as the runner takes it
    assert "nothing to train (raise -p max_iters to continue)" in text_of(train_outs)
    assert (tf / "eval.json").is_file()
    # Run again on the finished run: it is re-evaluated, and its training report is kept.
    before = (folder / "01_train.ipynb").stat().st_mtime_ns
    assert reports.main(["pipeline", "-f", "params/tiny_transformer.yaml", "-p", "out_dir", str(tf),
                         "-p", "data_dir", "europarl_sample", "-p", "max_tokens", "2000"]) == 0
    out = capsys.readouterr().out
    assert "already reached max_iters" in out and "01_train:" not in out and "03_evaluate:" in out
    assert (folder / "01_train.ipynb").stat().st_mtime_ns == before


def test_findings_pair_each_seed_and_say_which_directions_every_pair_resolves():
    rows = [{"run": f"{m} s{seed}", "model_type": m, "seed": seed, "parameters": {"total": 1},
             "tokens_per_s": None, "bpb": {"val": {"all": (1.0, (0.9, 1.1))}}}
            for seed in (1, 2) for m in ("backpack", "transformer")]
    assert comparison.seed_pairs(rows) == [("backpack s1", "transformer s1"),
                                        ("backpack s2", "transformer s2")]
    assert comparison.seed_pairs([{**r, "seed": None} for r in rows]) == [("backpack s1", "transformer s1")]

    def diff(d, lo, hi):
        return {"difference": d, "ci95": [lo, hi], "windows": 10}

    paired = {"backpack s1 - transformer s1": {"en": diff(0.1, 0.05, 0.15), "fr": diff(-0.1, -0.2, -0.05)},
              "backpack s2 - transformer s2": {"en": diff(0.1, 0.02, 0.2), "fr": diff(-0.01, -0.1, 0.05)}}
    text = comparison.findings(rows, paired)
    assert "paired, backpack s2 - transformer s2:" in text and "mean bits per byte" in text
    assert "every pair resolves the same direction for en (Backpack higher)" in text
    assert "fr (Backpack" not in text  # resolved in one pair only
    single = comparison.findings(rows[:2], paired["backpack s1 - transformer s1"])
    assert "paired, " not in single and "Across seeds" not in single and "- fr: Backpack minus" in single


def test_failing_cell_fails_the_command_and_keeps_the_notebook(kernel, tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    code = reports.main(["run", "04_senses", "-p", "out_dir", str(missing), "--run_name", "nb_fail"])
    err = capsys.readouterr().err
    assert code == 2  # a UserError raised in the notebook: bad input, shown without a traceback
    assert "does not exist" in err and "partly executed notebook is kept" in err
    kept = Path(reports.paths.outputs_root()) / "nb_fail" / "04_senses.failed.ipynb"
    assert kept.is_file() and not kept.with_name("04_senses.ipynb").exists()  # no finished report
    assert any(o.get("output_type") == "error" for o in outputs(kept))


def test_unknown_parameter_is_refused_before_running(capsys):
    with pytest.raises(SystemExit) as exc:
        reports.main(["run", "03_evaluate", "-p", "max_tokenz", "10"])
    assert exc.value.code == 2
    assert "did you mean 'max_tokens'" in capsys.readouterr().err


def test_relayed_hints_are_spelled_as_the_runner_takes_them():
    """A UserError raised in a notebook names train.py's flags; relayed by the runner, its
    hint must work in the runner's command (-p KEY VALUE), except inside a quoted command and
    for a data-preparation command's own flags."""
    spell = reports.runner_spelling
    assert spell("out/x already holds a run (ckpt.pt); continue it with --init_from resume, pick "
                 "another --out_dir, or pass --overwrite to replace it") == (
        "out/x already holds a run (ckpt.pt); continue it with -p init_from resume, pick "
        "another -p out_dir, or pass -p overwrite true to replace it")
    assert spell("--compile false; --strict_device") == "-p compile false; -p strict_device true"
    quoted = "use another --data_dir or re-prepare it with `python -m backpack_nb.data prepare --out d --overwrite`"
    assert spell(quoted) == quoted.replace("--data_dir", "-p data_dir", 1)
    assert spell("d: too short; prepare it with --block_size 64 --overwrite") == \
        "d: too short; prepare it with --block_size 64 --overwrite"
    assert spell("--model_path x, --no-compile") == "--model_path x, --no-compile"  # not training settings
