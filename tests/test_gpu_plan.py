"""The prepared GPU measurement (issue #18), rehearsed on the CPU at tiny shapes: compiles
capped and a fallback to eager caught, the levers timed compiled, the loss-curve verdict, the
summary of a run's files, and the device script's own wiring. No timing assertions."""

from __future__ import annotations

import importlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import curves, gpu_summary, speed
from benchmarks.compile_guard import guarded_warmup

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"
SLOW_FIXTURES = {"plan_dir"}  # compiles every variant


@pytest.mark.slow  # compiles
def test_guard_reports_the_recompile_limit_instead_of_a_silent_eager_run():
    f = torch.compile(lambda x: (x * 2).sin().sum(), dynamic=False)
    sizes = iter(range(1, 100))
    report = guarded_warmup(lambda: f(torch.randn(next(sizes))), 12, compiled=True)
    assert report["status"] == "recompile limit" and report["graphs"] == 8
    assert not torch._dynamo.config.fail_on_recompile_limit_hit  # put back


@pytest.mark.slow  # compiles
def test_guard_stops_a_compile_over_its_cap_and_passes_an_eager_warmup():
    g = torch.compile(lambda x: (x @ x).relu().cos().sum())
    report = guarded_warmup(lambda: g(torch.randn(48, 48)), 1, compiled=True, cap_s=0.01)
    assert report["status"] == "over cap" and "0.01 s cap" in report["message"]
    calls = []
    eager = guarded_warmup(lambda: calls.append(1), 3, compiled=False, cap_s=0.01)
    assert eager["status"] == "ok" and calls == [1, 1, 1] and "graphs" not in eager


@pytest.fixture(scope="module")
def plan_dir(tmp_path_factory, europarl_source):
    """A device run's folder, made on the CPU: the speed benchmark (every variant compiled,
    Europarl batches), the loss curves of the Transformer, and train.py's numbers (made up:
    train.py's own runs are tested elsewhere)."""
    out = tmp_path_factory.mktemp("plan")
    speed.main(["--tiny", "--data", "europarl", "--compile-all", "--compile-cap", "300",
                "--only", "backpack", "transformer", "nanogpt",
                "backpack/fused-loss", "backpack/distinct-on-host",
                "--json", str(out / "speed_13034.json")])
    curves.main(["--tiny", "--models", "transformer", "--json", str(out / "curves.json")])
    bench = {r["variant"]: r for r in json.loads((out / "speed_13034.json").read_text())["rows"]}
    (out / "train.json").write_text(json.dumps({
        "backpack": {"tokens_per_s": bench["backpack"]["tokens_per_s"] * 1.05, "mfu": 0.2},
        "transformer": {"tokens_per_s": bench["transformer"]["tokens_per_s"] * 0.5, "mfu": 0.1},
    }))
    return out


def test_compiled_speed_rows_report_their_compilation(plan_dir):
    result = json.loads((plan_dir / "speed_13034.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"backpack", "transformer", "nanogpt", "backpack/fused-loss",
                         "backpack/distinct-on-host"} and result["dropped"] == {}
    for r in rows.values():
        c = r["compile"]
        assert c["status"] == "ok" and c["seconds"] >= 0 and c["graphs_while_timing"] == 0
        assert r["syncs_per_step"] is None  # counted on CUDA only
    # the on-device torch.unique breaks the Backpack's graph; found on the host, it does not
    assert rows["backpack/distinct-on-host"]["compile"]["graph_breaks"] < \
        rows["backpack"]["compile"]["graph_breaks"]


def test_loss_curve_verdict_compares_levers_with_the_dropout_seed_yardstick(plan_dir):
    result = json.loads((plan_dir / "curves.json").read_text())
    entry = result["models"]["transformer"]
    assert [len(r["losses"]) for r in entry["runs"].values()] == [60, 60, 60]
    v = entry["verdict"]
    assert isinstance(v["agree"], bool)
    assert v["allowed"] >= max(2 * v["dropout_seed_effect"], curves.FLOOR_NATS) - 1e-4
    assert v["agree"] == (abs(v["levers_minus_plain"]) <= v["allowed"])
    # levers that lift the curve by 0.5 nats (both runs with them) disagree with plain
    runs = {name: dict(r) for name, r in entry["runs"].items()}
    for name in ("levers", "levers, dropout seed 2"):
        runs[name]["losses"] = [x + 0.5 for x in runs[name]["losses"]]
    assert curves.verdict(runs)["agree"] is False


def test_summary_lays_out_the_goals_the_speed_tables_train_py_and_curves(plan_dir):
    text = gpu_summary.summarize(plan_dir)
    goals = text.split("## Goals")[1].split("##")[0]
    assert re.search(r"- V 13,034: Transformer / nanoGPT-style step time: [\d.]+ \(goal <= "
                     r"1\.00: (met|MISSED)\)", goals)
    assert re.search(r"- V 13,034: Backpack / Transformer .* goal <= 1\.10x: (met|MISSED)", goals)
    assert "## Speed at V 13,034 (europarl batches)" in text
    assert "backpack/distinct-on-host" in text and "compiled in" in text
    assert re.search(r"- backpack: train.py [\d,]+ tokens/s, benchmark [\d,]+ "
                     r"\(\+5\.0%: within", text)
    assert "(-50.0%: NOT within 10%)" in text
    assert "transformer: levers" in text


@pytest.mark.slow
def test_a_spent_budget_drops_variants_by_name_and_still_writes_the_result(tmp_path, capsys):
    out = tmp_path / "speed.json"
    speed.main(["--tiny", "--budget", "0.001", "--only", "backpack", "transformer",
                "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["rows"] == []
    assert {k: v["status"] for k, v in result["dropped"].items()} == {
        "backpack": "no time left", "transformer": "no time left"}
    assert "backpack: not timed, no time left" in capsys.readouterr().out


@pytest.mark.parametrize("main, argv, expected", [
    (speed.main, ["--tiny", "--budget", "-1"], "--compile-cap and --budget are seconds >= 0"),
    (speed.main, ["--tiny", "--compile-cap", "-1"], "--compile-cap and --budget are seconds"),
    (speed.main, ["--tiny", "--data", "europarl", "--vocab", "100"], "europarl batches bring"),
    (curves.main, ["--tiny", "--budget", "-1"], "--compile-cap and --budget are seconds >= 0"),
    (curves.main, ["--tiny", "--steps", "10"], "--steps 10: the verdict needs at least 50"),
    (curves.main, ["--tiny", "--dtype", "float16"], "--dtype float16 runs with a gradient scaler"),
])
def test_bad_plan_flags_are_one_error_and_exit_2(main, argv, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and "Traceback" not in err


def _script(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": path, "OUT": str(tmp_path / "out"), **env}, timeout=120)


@pytest.mark.parametrize("tiny", ["", "1"])
def test_every_benchmark_the_dry_plan_names_parses_with_its_own_parser(tmp_path, tiny):
    """DRY=1 prints the plan, a command a line, and runs nothing; each benchmark command
    parses with that benchmark's parser, and the speed variants it names exist."""
    proc = _script(tmp_path, DRY="1", TINY=tiny)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "out").exists()  # nothing ran
    commands = [shlex.split(line) for line in proc.stdout.splitlines()]
    assert (["nvidia-smi"] == commands[0][:1]) != bool(tiny)
    parsed = {}
    for argv in commands:
        if "-m" not in argv or not argv[argv.index("-m") + 1].startswith("benchmarks."):
            continue
        name, rest = argv[argv.index("-m") + 1], argv[argv.index("-m") + 2:]
        try:
            args = importlib.import_module(name).parser().parse_args(rest)
        except SystemExit:
            pytest.fail(f"{name} does not parse {rest}")
        parsed.setdefault(name, []).append(args)
    assert set(parsed) == {"benchmarks.speed", "benchmarks.curves", "benchmarks.generate",
                           "benchmarks.gpu_summary"}
    known = {v.name for v in speed.MAIN + speed.LEVERS}
    assert all(set(a.only) <= known for a in parsed["benchmarks.speed"])
    assert [a.device for a in parsed["benchmarks.generate"]] == ["cpu" if tiny else "cuda"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="refuses only without CUDA")
def test_the_device_script_refuses_in_one_line_without_cuda(tmp_path):
    proc = _script(tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and "no CUDA device here" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_device_script_with_no_phase_only_summarizes(tmp_path):
    proc = _script(tmp_path, PHASES="none", TINY="1")
    assert proc.returncode == 0, proc.stderr
    assert "nothing measured" in proc.stdout and (tmp_path / "out" / "summary.md").exists()
