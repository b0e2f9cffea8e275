"""Sense inspection, the reweighting intervention and the SenseBrowser widget, on the
session's tiny trained Backpack."""

from __future__ import annotations

import html

import numpy as np
import pytest
import torch

from backpack_nb import senses as S
from backpack_nb.errors import UserError
from backpack_nb.loading import load_model


@pytest.fixture(scope="module")
def bp(tiny_backpack_run):
    model, tok, _ = load_model(tiny_backpack_run["out_dir"] / "ckpt.pt")
    return model, tok


def test_sense_words_common_word(bp):
    model, tok = bp
    k = model.config.n_senses
    rows = S.sense_words(model, tok, "Commission", top=10)
    assert rows.word == " Commission" and len(rows) == k  # one token, k senses
    assert [r["sense"] for r in rows] == list(range(k))
    for r in rows:
        assert r["token"] == " Commission"
        assert len(r["top"]) == len(r["bottom"]) == 10
        # real words of the vocabulary: decodable strings, several of them alphabetic
        assert sum(t.strip().isalpha() for t in r["top"] + r["bottom"]) >= 5
        assert set(r["top"]).isdisjoint(r["bottom"])
    html = rows._repr_html_()
    assert "<table" in html and "Commission" in html and rows[0]["top"][1].strip() in html
    assert "sense  0" in str(rows)


def test_sense_words_several_tokens_and_exact_form(bp):
    model, tok = bp
    k = model.config.n_senses
    word = "Ponnambalam"  # a rare name: several tokens
    ids = tok.encode(" " + word)
    assert len(ids) > 1
    rows = S.sense_words(model, tok, word, top=3)
    assert len(rows) == k * len(ids)
    assert [r["token"] for r in rows[::k]] == [tok.token_str(i) for i in ids]
    exact = S.sense_words(model, tok, "vote", top=3, exact=True)
    assert [r["token"] for r in exact[::k]] == [tok.token_str(i) for i in tok.encode("vote")]  # no space added
    assert exact.word == "vote" and S.sense_words(model, tok, "vote", top=3)[0]["token"] == " vote"
    with pytest.raises(UserError):
        S.sense_words(model, tok, "   ")


def test_sense_matches_equation(bp):
    """Top words are the largest entries of E C(x)_l."""
    model, tok = bp
    rows = S.sense_words(model, tok, "report", top=5)
    (tid,) = tok.encode(" report")
    with torch.no_grad():
        scores = model.wte.weight @ model.sense_vectors(torch.tensor([[tid]]))[0, 0].T  # (V, k)
    for r in rows:
        assert r["top"] == [tok.token_str(i) for i in scores[:, r["sense"]].topk(5).indices.tolist()]
        assert r["bottom"] == [tok.token_str(i) for i in (-scores[:, r["sense"]]).topk(5).indices.tolist()]


def test_similarity_and_cross_lingual(bp):
    model, tok = bp
    k = model.config.n_senses
    sim = S.sense_similarity(model, tok, "law", "law")
    assert sim.shape == (k, k) and np.allclose(np.diag(sim), 1, atol=1e-5)
    rows = S.cross_lingual_pairs(model, tok, [("law", "loi"), ("vote", "vote"), ("report", "rapport")])
    assert [r["en"] for r in rows] == ["law", "vote", "report"]
    for r in rows:
        assert -1 <= r["alignment"] <= 1 and r["matrix"].shape == (k, k)
        assert r["alignment"] == pytest.approx(float(np.diag(r["matrix"]).mean()))
        assert r["best_match"] >= r["alignment"] - 1e-6
    assert rows[1]["same_tokens"] and rows[1]["alignment"] == pytest.approx(1.0, abs=1e-5)
    assert not rows[0]["same_tokens"]
    fig = S.alignment_figure(rows)
    assert len(fig.axes) >= 1


def test_contextualization_heatmap(bp):
    model, tok = bp
    fig, alpha, tokens = S.contextualization_heatmap(model, tok, "The Parliament adopted the report")
    T = len(tokens)
    assert alpha.shape == (model.config.n_senses, T, T)
    assert np.allclose(alpha.sum(-1), 1, atol=1e-5) and np.allclose(np.triu(alpha, 1), 0)
    assert len(fig.axes) >= model.config.n_senses


def test_next_token_logits_is_the_model(bp):
    model, tok = bp
    idx = torch.tensor([tok.encode("The vote on the report")])
    with torch.no_grad():
        logits, _ = model(idx)
    assert torch.allclose(S.next_token_logits(model, idx), logits[0, -1], atol=1e-4)


def test_reweight_factor_one_changes_nothing(bp):
    model, tok = bp
    r = S.reweight(model, tok, "The vote on the vote", "vote", 1, 1.0)
    assert r["positions"] == [1, 4]
    assert torch.equal(r["logits_before"], r["logits_after"]) and r["kl"] == 0.0
    assert r["before"] == r["after"]


def test_reweight_factor_zero_removes_exactly_that_sense(bp):
    model, tok = bp
    prompt, word, sense = "The vote on the vote", "vote", 2
    r = S.reweight(model, tok, prompt, word, sense, 0.0)
    idx = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        C = model.sense_vectors(idx)[0].double()  # (T, k, d)
        alpha = model.contextualization(idx)[0, sense, -1].double()  # (T,): last position's weights of sense l
        E = model.wte.weight.double()
    removed = sum(alpha[j] * C[j, sense] for j in r["positions"]) @ E.T  # E sum_j alpha_l[T-1, j] C(x_j)_l
    diff = (r["logits_before"] - r["logits_after"]).double()
    assert torch.allclose(diff, removed, atol=1e-4)
    assert diff.abs().max() > 1e-3  # the sense did contribute
    assert r["kl"] > 0
    with pytest.raises(UserError):
        S.reweight(model, tok, prompt, word, model.config.n_senses, 0.0)


def test_reweight_word_absent(bp):
    model, tok = bp
    r = S.reweight(model, tok, "The Parliament adopted", "vote", 0, 0.0)
    assert r["positions"] == [] and r["kl"] == 0.0


def test_sense_browser_reacts(bp):
    from backpack_nb.widgets import SenseBrowser

    model, tok = bp
    w = SenseBrowser(model, tok, words=["Commission", "vote", "report"], prompt="The vote on the")
    table0 = w.table.value
    assert "Commission" in table0 and table0.count("<tr") == model.config.n_senses + 1
    w.word.value = "report"  # typing a word: the sense table changes
    assert w.table.value != table0 and "report" in w.table.value
    chosen = w.table.value
    w.sense.value = 1  # the highlighted row moves
    assert w.table.value != chosen and w.table.value.index("class='chosen'") > chosen.index("class='chosen'")
    assert "type a second word" in w.similarity.value
    w.other.value = "rapport"
    assert "rapport" in w.similarity.value and "cosine" in w.similarity.value
    w.word.value = "vote"
    pred = w.prediction.value
    assert "positions [1]" in pred and "KL 0.0000" in pred
    sense = w.sense.value
    plain, same = S.continuations(model, tok, "The vote on the", "vote", sense, 1.0)
    assert plain == same and html.escape(plain) in w.continuation.value  # scale 1: unchanged
    w.factor.value = 0.0
    assert w.prediction.value != pred and "scaled by 0.0" in w.prediction.value
    assert f"sense {sense} scaled by 0.0" in w.continuation.value
    plain, removed = S.continuations(model, tok, "The vote on the", "vote", sense, 0.0)
    assert html.escape(removed) in w.continuation.value
    w.word.value = ""  # an empty word shows an error, not a traceback
    assert "give a word" in w.table.value


# ---- a sense report's parameters (issue 26: `-p words '[]'` was an IndexError traceback) ----


@pytest.mark.parametrize("kw, named", [
    ({"words": []}, "words []: give a non-empty list of words"),
    ({"words": "vote"}, "words 'vote': give a non-empty list"),
    ({"words": ["vote", " "]}, "words: ' ' is not a word"),
    ({"top": 0}, "top 0: the number of top and bottom words per sense is a whole number >= 1"),
    ({"top": 2.5}, "top 2.5:"),
    ({"top": True}, "top True:"),
    ({"heatmap_senses": []}, "heatmap_senses []: a non-empty list of senses in 0..3"),
    ({"heatmap_senses": [4]}, "heatmap_senses [4]:"),
    ({"browser_words": []}, "browser_words []:"),
    ({"reweight_sense": -1}, "reweight_sense -1: a sense in 0..3"),
    ({"reweight_factor": float("inf")}, "reweight_factor inf: a finite number >= 0"),
])
def test_sense_report_parameters_refused(kw, named):
    good = {"words": ["vote", "loi"], "top": 8, "n_senses": 4, "heatmap_senses": None, "browser_words": None,
            "reweight_sense": 0, "reweight_factor": 0.0}
    S.check_report_parameters(**good)
    with pytest.raises(UserError) as exc:
        S.check_report_parameters(**{**good, **kw})
    assert named in str(exc.value) and "\n" not in str(exc.value)


def test_sense_report_parameters_name_every_problem_at_once():
    with pytest.raises(UserError) as exc:
        S.check_report_parameters(words=[], top=0)
    assert "words []" in str(exc.value) and "top 0" in str(exc.value)
    assert '-p words "[vote, loi]"' in str(exc.value)  # a hint that works in a shell


@pytest.mark.slow
@pytest.mark.parametrize("key, value, named", [("words", "[]", "words []"), ("top", "0", "top 0")])
def test_senses_report_refuses_bad_parameters(tiny_backpack_run, tmp_path, capsys, key, value, named):
    """`reports run 04_senses -p words '[]'`: an IndexError traceback and exit 1 on 535162e;
    `-p top 0`: empty sense tables and exit 0. Now exit 2 naming the parameter, no traceback."""
    import shutil

    from backpack_nb import reports

    run = tmp_path / "bp"
    run.mkdir()
    for name in ("best.pt", "run.json", "training_log.json"):
        shutil.copy2(tiny_backpack_run["out_dir"] / name, run / name)
    code = reports.main(["run", "04_senses", "-p", "out_dir", str(run), "-p", key, value,
                         "--run_name", f"senses_bad_{key}"])
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: 04_senses: ") and named in errors[0], err
    assert "Traceback" not in err and "IndexError" not in err
