"""Multi-SimLex word similarity: word counts, a hand-built model whose similarities are
known, the held-out sense choice, bad benchmark files, and evaluate.py --lexsim end to end
on the session's tiny checkpoints. (Spearman and the bootstrap: test_stats.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from backpack_nb import dataset, evaluation, lexsim, loading
from backpack_nb.errors import UserError
from backpack_nb.lexsim import benchmark
from backpack_nb.lexsim.__main__ import main as lexsim_main
from backpack_nb.models import ModelConfig, build_model

# ----------------------------------------------------------------------------------------
# a small benchmark in the official layout

# Eight concept pairs whose words are single tokens of the Europarl sample's compact
# vocabulary, with no French word spelt like an English one.
EN = [("week", "year"), ("work", "job"), ("time", "day"), ("world", "earth"),
      ("report", "letter"), ("law", "country"), ("money", "city"), ("house", "answer")]
FR = [("semaine", "année"), ("travail", "emploi"), ("temps", "jour"), ("monde", "terre"),
      ("rapport", "lettre"), ("loi", "pays"), ("argent", "ville"), ("maison", "réponse")]
GOLD_EN = 0.5 + 0.7 * np.arange(8)  # increasing with the pair index
GOLD_FR = GOLD_EN + 0.2


def write_benchmark(folder: Path, gold_en=GOLD_EN, gold_fr=GOLD_FR) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    scores = ["ID,ENG 1,ENG 2,PoS,ENG,FRA,scores,translation"]
    trans = ["ID,ENG 1,ENG 2,PoS,FRA 1,FRA 2,scores 1,scores 2"]
    for i, ((a, b), (fa, fb)) in enumerate(zip(EN, FR)):
        scores.append(f"{i + 1},{a},{b},nouns,{gold_en[i]},{gold_fr[i]},{(gold_en[i] + gold_fr[i]) / 2},")
        trans.append(f"{i + 1},{a},{b},nouns,{fa},{fb},{a},{b}")
    (folder / "scores.csv").write_text("\n".join(scores) + "\n", encoding="utf-8")
    (folder / "translation.csv").write_text("\n".join(trans) + "\n", encoding="utf-8")
    return folder


# ----------------------------------------------------------------------------------------
# word counts


def test_corpus_counts_single_and_multi_token():
    tokens = np.array([5, 1, 2, 5, 1, 2, 1, 2, 5, 1], dtype=np.uint16)
    seqs = [[5], [1, 2], [5, 1, 2], [2, 5], [7], [5, 1], [1, 2, 1, 2]]
    np.testing.assert_array_equal(lexsim.corpus_counts(tokens, seqs), [3, 3, 2, 2, 0, 3, 1])
    np.testing.assert_array_equal(lexsim.corpus_counts(tokens, seqs, chunk=3), [3, 3, 2, 2, 0, 3, 1])


# ----------------------------------------------------------------------------------------
# the held-out best sense


def test_best_sense_never_uses_the_report_half():
    rng = np.random.default_rng(4)
    k, n = 4, 40
    gold = rng.uniform(0, 6, n)
    sims = rng.normal(size=(k, n))
    sims[1] += 0.5 * gold  # sense 1 is the good one
    select, report = np.arange(20), np.arange(20, 40)
    chosen = lexsim.select_sense(sims, gold, select, report)["sense"]
    assert chosen == 1
    # Poison the report half so that sense 3 is perfect there and sense 1 worthless.
    poisoned_sims, poisoned_gold = sims.copy(), gold.copy()
    poisoned_gold[report] = rng.permutation(poisoned_gold[report])
    poisoned_sims[3, report] = poisoned_gold[report]
    poisoned_sims[1, report] = -poisoned_gold[report]
    assert lexsim.select_sense(poisoned_sims, poisoned_gold, select, report)["sense"] == chosen
    # The same poison in the selection half does change the choice: the test can see one.
    sel_sims, sel_gold = sims.copy(), gold.copy()
    sel_sims[3, select] = sel_gold[select]
    assert lexsim.select_sense(sel_sims, sel_gold, select, report)["sense"] == 3
    with pytest.raises(ValueError):
        lexsim.select_sense(sims, gold, np.arange(21), report)  # overlapping halves


def test_heldout_halves_are_fixed_and_disjoint():
    ids = list(range(1, 1889))
    a, b = lexsim.heldout_halves(ids, seed=0)
    assert not a & b and a | b == set(ids) and abs(len(a) - len(b)) <= 1
    assert lexsim.heldout_halves(list(reversed(ids)), seed=0) == (a, b)  # order-free
    assert lexsim.heldout_halves(ids, seed=1) != (a, b)


# ----------------------------------------------------------------------------------------
# a hand-built model: known similarities must come out ranked as built


@pytest.fixture(scope="module")
def tok(prepared_europarl):
    return dataset.load_tokenizer(prepared_europarl)


@pytest.fixture(scope="module")
def handmade(tok, prepared_europarl, tmp_path_factory) -> dict:
    """A benchmark folder, a dataset (the sample's vocabulary, a train.bin in which every
    benchmark word occurs 3 times except `house`, twice) and the token id of every word."""
    root = tmp_path_factory.mktemp("lexsim_handmade")
    ids = {}
    for w in [w for p in EN + FR for w in p]:
        t = tok.encode(" " + w)
        assert len(t) == 1, f"{w!r} is not one token of the sample's vocabulary: pick another word"
        ids[w] = t[0]
    assert len(set(ids.values())) == len(ids)
    train = np.array([ids[w] for w in ids for _ in range(2 if w == "house" else 3)], dtype=np.uint16)
    ddir = root / "data"
    ddir.mkdir()
    meta = dataset.load_meta(prepared_europarl)
    meta["splits"]["train"]["tokens"] = len(train)
    (ddir / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    train.astype(meta["dtype"]).tofile(ddir / "train.bin")
    return {"bench": write_benchmark(root / "msl"), "data": ddir, "ids": ids, "root": root}


COS = np.linspace(-0.6, 0.9, 8)  # cosine of pair i, increasing like its rating


def _pair_vectors(d: int, cos: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Pair i lives in dimensions 2i, 2i+1: word 1 = e_2i, word 2 at cosine cos[i] to it."""
    out = {}
    for i, c in enumerate(cos):
        a, b = np.zeros(d), np.zeros(d)
        a[2 * i] = 1
        b[2 * i], b[2 * i + 1] = c, np.sqrt(1 - c * c)
        out[i] = (a, b)
    return out


def _set_rows(weight: torch.Tensor, ids: dict, vecs: dict, width: int, offset: int = 0) -> None:
    """Write each pair's vectors into the rows of its en and fr words (translations get
    the same vector) at columns [offset, offset + width)."""
    for i, (a, b) in vecs.items():
        for words in (EN[i], FR[i]):
            weight[ids[words[0]], offset : offset + width] = torch.tensor(a, dtype=weight.dtype)
            weight[ids[words[1]], offset : offset + width] = torch.tensor(b, dtype=weight.dtype)


def _tiny(model_type: str, vocab: int, **kw):
    cfg = ModelConfig(vocab_size=vocab, block_size=8, n_layer=1, n_head=2, n_embd=32, n_senses=4, **kw)
    return build_model(model_type, cfg).eval()


def test_transformer_embedding_ranks_as_built(tok, handmade):
    model = _tiny("transformer", tok.vocab_size)
    with torch.no_grad():
        _set_rows(model.wte.weight, handmade["ids"], _pair_vectors(32, COS), 32)
    r = lexsim.evaluate_lexsim(model, tok, handmade["data"], handmade["bench"], min_count=3, n_boot=100)
    assert r["languages"]["scored"] == ["en", "fr"]
    en, fr, x = r["monolingual"]["en"], r["monolingual"]["fr"], r["crosslingual"]["en-fr"]
    assert (en["pairs"], en["covered"]) == (8, 7)  # `house` occurs twice only
    assert (fr["pairs"], fr["covered"]) == (8, 8)
    assert (x["pairs"], x["covered"]) == (16, 15)  # house/réponse out, maison/answer in
    for entry in (en, fr, x):
        assert entry["multi_token"] == 0
        assert entry["methods"]["embedding"]["spearman"] == pytest.approx(1.0)
        assert set(entry["methods"]) == {"embedding", "random"}
    ret = r["retrieval"]["en->fr"]
    assert ret["queries"] == 15 and ret["candidates"] == 16 and ret["identical"] == 0
    assert ret["methods"]["embedding"]["p_at_1"] == pytest.approx(1.0)
    assert ret["methods"]["random"]["p_at_1"] < 0.5
    json.dumps(r)  # JSON-able as it is
    # Reverse the built order: the measure follows it.
    with torch.no_grad():
        _set_rows(model.wte.weight, handmade["ids"], _pair_vectors(32, COS[::-1].copy()), 32)
    r2 = lexsim.evaluate_lexsim(model, tok, handmade["data"], handmade["bench"], min_count=3, n_boot=0)
    assert r2["monolingual"]["en"]["methods"]["embedding"]["spearman"] == pytest.approx(-1.0)
    assert r2["crosslingual"]["en-fr"]["methods"]["embedding"]["spearman"] == pytest.approx(-1.0)


def _backpack_with_senses(tok, ids) -> torch.nn.Module:
    """Sense 2 holds the built similarities, the other senses the reverse order."""
    model = _tiny("backpack", tok.vocab_size, sense_source="table")
    d, k = 32, 4
    with torch.no_grad():
        table = model.sense_table.weight  # (V, k*d)
        for l in range(k):
            _set_rows(table, ids, _pair_vectors(d, COS if l == 2 else -COS), d, offset=l * d)
    return model


def test_backpack_senses_rank_as_built_and_best_sense_is_held_out(tok, handmade):
    model = _backpack_with_senses(tok, handmade["ids"])
    r = lexsim.evaluate_lexsim(model, tok, handmade["data"], handmade["bench"], min_count=3, n_boot=100)
    for key in ("en", "fr"):
        m = r["monolingual"][key]["methods"]
        assert m["sense_2"]["spearman"] == pytest.approx(1.0)
        assert m["sense_0"]["spearman"] == pytest.approx(-1.0)
        best = m["sense_best"]
        assert best["sense"] == 2 and best["spearman"] == pytest.approx(1.0)
        assert best["n"] + best["selected_on"] == r["monolingual"][key]["covered"]
    assert r["crosslingual"]["en-fr"]["methods"]["sense_2"]["spearman"] == pytest.approx(1.0)
    assert r["retrieval"]["en->fr"]["methods"]["sense_2"]["p_at_1"] == pytest.approx(1.0)
    assert r["methods"][:4] == ["embedding", "random", "sense_mean", "sense_best"]

    # Poison the ratings of the report half (concept IDs) so that sense 0 would win there:
    # the chosen sense must not move, only its reported score.
    select, report = lexsim.heldout_halves(range(1, 9), seed=0)
    flip = np.array([i + 1 in report for i in range(8)])
    poisoned_en = np.where(flip, GOLD_EN[::-1], GOLD_EN)
    bench2 = write_benchmark(handmade["root"] / "msl_poisoned", poisoned_en, poisoned_en + 0.2)
    r2 = lexsim.evaluate_lexsim(model, tok, handmade["data"], bench2, min_count=3, n_boot=0)
    for key in ("en", "fr"):
        best2 = r2["monolingual"][key]["methods"]["sense_best"]
        assert best2["sense"] == 2
        assert best2["selection_spearman"] == r["monolingual"][key]["methods"]["sense_best"]["selection_spearman"]
        assert best2["spearman"] < 0.5  # it is scored on the poisoned half

    rows = lexsim.pair_senses(model, tok, [EN[7], EN[6], EN[0]], source=handmade["bench"], lang="en")
    # The high-rated pairs are similar in sense 2 only; the lowest-rated one in the others.
    assert [r_["carrier"] for r_ in rows] == [2, 2, 0]
    assert rows[0]["gold"] == pytest.approx(GOLD_EN[7])
    assert "<table" in rows._repr_html_() and "house / answer" in str(rows)
    assert len(rows.figure().axes) >= 1


# ----------------------------------------------------------------------------------------
# finding and checking the files


def test_loads_the_shared_copy():
    bench = lexsim.load_multisimlex()  # MULTISIMLEX_SOURCE, set by conftest
    assert len(bench) == 1888 and bench.languages == list(lexsim.MULTISIMLEX_LANGS)
    assert bench.words["FRA"][0][0] == "bras" and bench.scores["ENG"].shape == (1888,)
    assert lexsim.normalize_word(" abikaasa (naine)") == "abikaasa" and lexsim.normalize_word("Leche") == "leche"


def test_fetch_when_nothing_is_local(tmp_path, monkeypatch):
    monkeypatch.delenv("MULTISIMLEX_SOURCE", raising=False)
    monkeypatch.setenv("BACKPACK_NB_DATA", str(tmp_path / "data"))
    mirror = write_benchmark(tmp_path / "mirror")
    bench = lexsim.load_multisimlex(base_url=mirror.as_uri() + "/")  # a local "release": no network
    assert len(bench) == 8 and (tmp_path / "data" / "multisimlex" / "scores.csv").is_file()
    assert not list((tmp_path / "data" / "multisimlex").glob("*.part"))
    assert len(lexsim.load_multisimlex(base_url="http://127.0.0.1:9/")) == 8  # cached now


@pytest.fixture(scope="module")
def ckpt_copy(tiny_backpack_run, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lexsim_ckpt") / "backpack"
    folder.mkdir()
    shutil.copy(tiny_backpack_run["out_dir"] / "ckpt.pt", folder / "ckpt.pt")
    return folder / "ckpt.pt"


def _break(kind: str, folder: Path) -> Path:
    good = write_benchmark(folder)
    if kind == "missing_folder":
        shutil.rmtree(good)
    elif kind == "missing_file":
        (good / "translation.csv").unlink()
    elif kind == "bad_rating":
        text = (good / "scores.csv").read_text(encoding="utf-8").splitlines()
        text[3] = text[3].replace(",nouns,", ",nouns,high,", 1).replace(f",{GOLD_EN[2]},", ",", 1)
        (good / "scores.csv").write_text("\n".join(text) + "\n", encoding="utf-8")
    elif kind == "no_id_column":
        text = (good / "scores.csv").read_text(encoding="utf-8")
        (good / "scores.csv").write_text(text.replace("ID,", "Id,", 1), encoding="utf-8")
    elif kind == "not_utf8":
        (good / "translation.csv").write_bytes("ID,ENG 1\n1,caf\xe9\n".encode("latin-1"))
    return good


@pytest.mark.parametrize("kind,needle", [
    ("missing_folder", "--multisimlex"), ("missing_file", "lacks translation.csv"),
    ("bad_rating", "'high' is not a number"), ("no_id_column", "no ID column"),
    ("not_utf8", "cannot read"),
])
def test_bad_multisimlex_exits_2(kind, needle, ckpt_copy, prepared_europarl, tmp_path, capsys):
    folder = _break(kind, tmp_path / "msl")
    with pytest.raises(SystemExit) as exc:
        evaluation.main(["--model_path", str(ckpt_copy), "--data_dir", str(prepared_europarl),
                         "--lexsim", "--multisimlex", str(folder)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (ckpt_copy.parent / "eval.json").exists()  # failed before writing anything


def test_unreachable_release_exits_2(ckpt_copy, prepared_europarl, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MULTISIMLEX_SOURCE", raising=False)
    monkeypatch.setenv("BACKPACK_NB_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(benchmark, "OFFICIAL_URL", "http://127.0.0.1:9/")  # refused at once
    with pytest.raises(SystemExit) as exc:
        evaluation.main(["--model_path", str(ckpt_copy), "--data_dir", str(prepared_europarl), "--lexsim"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--multisimlex" in err and "MULTISIMLEX_SOURCE" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------
# end to end on the session's tiny checkpoints


def test_evaluate_lexsim_end_to_end(tiny_backpack_run, tiny_transformer_run, prepared_europarl, tmp_path, capsys):
    folders = {}
    for name, run in (("backpack", tiny_backpack_run), ("transformer", tiny_transformer_run)):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        shutil.copy(run["out_dir"] / "ckpt.pt", folders[name] / "ckpt.pt")
    assert evaluation.main(["--model_path", str(folders["backpack"] / "ckpt.pt"), "--data_dir", str(prepared_europarl),
                            "--lexsim", "--max_tokens", "200", "--splits", "val"]) == 0
    out = capsys.readouterr().out
    assert "sense_best" in out and "en->fr P@1" in out and "coverage" in out
    ev = json.loads((folders["backpack"] / "eval.json").read_text(encoding="utf-8"))
    assert "val" in ev["splits"] and ev["lexsim"]["min_count"] == lexsim.DEFAULT_MIN_COUNT
    lx = ev["lexsim"]
    assert set(lx["monolingual"]) == {"en", "fr"} and set(lx["crosslingual"]) == {"en-fr"}
    assert "ENG" not in lx["languages"]["not_in_corpus"] and "ARA" in lx["languages"]["not_in_corpus"]
    k = 4
    assert lx["methods"] == ["embedding", "random", "sense_mean", "sense_best"] + [f"sense_{l}" for l in range(k)]
    for key in ("en", "fr"):
        e = lx["monolingual"][key]
        assert 50 < e["covered"] < e["pairs"] == 1888
        for m in lx["methods"]:
            assert -1 <= e["methods"][m]["spearman"] <= 1
    assert lx["retrieval"]["en->fr"]["queries"] > 50

    # The Transformer through the standalone command, then both side by side.
    assert lexsim_main(["--model_path", str(folders["transformer"] / "ckpt.pt"), "--data_dir", str(prepared_europarl),
                        "--n_boot", "200"]) == 0
    tf = json.loads((folders["transformer"] / "eval.json").read_text(encoding="utf-8"))["lexsim"]
    assert tf["methods"] == ["embedding", "random"]
    assert tf["monolingual"]["en"]["covered"] == lx["monolingual"]["en"]["covered"]  # same data, same pairs
    table = lexsim.side_by_side({"backpack": lx, "transformer": tf})
    assert [r["model"] for r in table].count("transformer") == 2 and "en-fr" in table.columns
    assert "<table" in table._repr_html_() and "transformer" in str(table)
    assert len(lexsim.comparison_figure({"backpack": lx, "transformer": tf}).axes) == 1
    model, tok, _ = loading.load_model(folders["transformer"] / "ckpt.pt")
    with pytest.raises(UserError):
        lexsim.pair_senses(model, tok, [("law", "rule")])


# ----------------------------------------------------------------------------------------
# what --out may write, bad values, Ctrl-C (issue 26)

ROOT = Path(__file__).resolve().parents[1]
LEGACY = ROOT / "tests" / "fixtures" / "legacy_f3defa5"  # a micro Backpack run folder


def _lexsim_exit(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        lexsim_main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    return exc.value.code, err


@pytest.mark.parametrize("victim", ["params", "training_log", "checkpoint", "notes"])
def test_lexsim_out_never_replaces_a_file_that_is_not_an_evaluation(victim, prepared_europarl,
                                                                    tmp_path, capsys):
    """At f768900 `lexsim --out params/tiny_backpack.yaml` (or a run's training_log.json)
    exited 0 after overwriting that file with JSON; evaluate.py refused the same paths."""
    run = tmp_path / "run"
    shutil.copytree(LEGACY, run)
    target = {"params": tmp_path / "tiny_backpack.yaml", "training_log": run / "training_log.json",
              "checkpoint": run / "ckpt.pt", "notes": tmp_path / "notes.json"}[victim]
    if victim == "params":
        shutil.copy(ROOT / "params" / "tiny_backpack.yaml", target)
    elif victim == "notes":
        target.write_text('{"mine": true}\n')
    before = target.read_bytes()
    code, err = _lexsim_exit(["--model_path", str(run / "best.pt"), "--data_dir",
                              str(prepared_europarl), "--n_boot", "100", "--out", str(target)],
                             capsys)
    assert code == 2
    assert f"--out {target} exists and is not an evaluation (eval.json) file" in err
    assert "choose another --out" in err
    assert target.read_bytes() == before
    assert not list(target.parent.glob(".*.tmp"))


def test_lexsim_out_that_is_a_folder_names_out_not_out_dir(prepared_europarl, tmp_path, capsys):
    """At f768900 the write error named --out_dir (lexsim's flag is --out) and advised freeing
    disk space for a folder."""
    folder = tmp_path / "results"
    folder.mkdir()
    code, err = _lexsim_exit(["--model_path", str(LEGACY / "best.pt"), "--data_dir",
                              str(prepared_europarl), "--n_boot", "100", "--out", str(folder)],
                             capsys)
    assert code == 2 and f"--out {folder} is a folder; give a file path such as " \
                         f"{folder / 'eval.json'}" in err
    assert "--out_dir" not in err and "disk space" not in err
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("flag,value,words", [
    ("--n_boot", "0", "--n_boot must be >= 100 (the resamples behind each 95% interval; "
                      "default 1000), got 0"),
    ("--n_boot", "-5", "got -5"),
    ("--min_count", "0", "--min_count must be >= 1, got 0"),  # f768900: no flag named
])
def test_lexsim_bad_values_exit_2(flag, value, words, prepared_europarl, tmp_path, capsys):
    """At f768900 `--n_boot 0` was accepted and wrote NaN intervals."""
    run = tmp_path / "run"
    shutil.copytree(LEGACY, run)
    code, err = _lexsim_exit(["--model_path", str(run / "best.pt"), "--data_dir",
                              str(prepared_europarl), flag, value], capsys)
    assert code == 2 and words in err
    assert not (run / "eval.json").exists()


def test_lexsim_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    """At f768900 Ctrl-C ended in a KeyboardInterrupt traceback (exit status -2)."""
    from backpack_nb.lexsim import __main__ as front

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(front, "write_lexsim", interrupted)
    try:
        code, err = _lexsim_exit(["--model_path", str(LEGACY / "best.pt")], capsys)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped as a KeyboardInterrupt (a traceback on the command line)")
    assert code == 130 and err.startswith("error: interrupted (Ctrl-C)")


def test_lexsim_out_may_write_a_new_path_or_an_evaluation(ckpt_copy, prepared_europarl, tmp_path,
                                                         capsys):
    """A new path is written (relative paths from the project root, as evaluate.py's); an
    existing eval.json of another checkpoint is replaced by this one's section."""
    new = tmp_path / "new" / "lexsim.json"
    argv = ["--model_path", str(ckpt_copy), "--data_dir", str(prepared_europarl), "--n_boot", "100"]
    assert lexsim_main([*argv, "--out", str(new)]) == 0
    written = json.loads(new.read_text(encoding="utf-8"))
    assert written["checkpoint"] == str(ckpt_copy) and "monolingual" in written["lexsim"]
    other = tmp_path / "other_eval.json"
    other.write_text(json.dumps({"checkpoint": "/elsewhere/ckpt.pt", "splits": {}}))
    assert lexsim_main([*argv, "--out", str(other)]) == 0
    replaced = json.loads(other.read_text(encoding="utf-8"))
    assert replaced["checkpoint"] == str(ckpt_copy) and "splits" not in replaced
    assert f"wrote the lexsim section of {other}" in capsys.readouterr().out


def test_lexsim_write_error_names_out(prepared_europarl, tmp_path, monkeypatch, capsys):
    """At f768900 a failed write named --out_dir (a train.py flag) and, for any failure,
    advised freeing disk space."""
    import errno

    from backpack_nb import runfiles

    run = tmp_path / "run"
    shutil.copytree(LEGACY, run)
    target = tmp_path / "results" / "eval.json"

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(runfiles.tempfile, "mkstemp", refuse)
    code, err = _lexsim_exit(["--model_path", str(run / "best.pt"), "--data_dir",
                              str(prepared_europarl), "--n_boot", "100", "--out", str(target)],
                             capsys)
    assert code == 2 and f"could not write {target} (Permission denied); no eval.json was " \
                         f"written. Fix the permissions of {target.parent} (or choose another " \
                         "--out), then run again" in err
    assert "--out_dir" not in err and "disk space" not in err
    assert not target.exists()
