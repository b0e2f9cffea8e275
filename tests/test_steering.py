"""Steering (backpack_nb.models.intervention, backpack_nb.steering: gender bias and knowledge
editing; topic control has tests/test_steering_topic.py): every result against a direct
computation written here from the model's sense vectors, contextualization weights and output
embedding, in float64, and the command line's refusals and eval.json merging."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backpack_nb.errors import UserError
from backpack_nb.models import GPT, BackpackLM, ModelConfig
from backpack_nb.models.intervention import Intervention, occurrences
from backpack_nb.steering import edit, gender, report, words
from backpack_nb.steering.__main__ import main as steering_main
from backpack_nb.tokenizer import Tokenizer, build_compact_vocab, get_encoding

LEGACY = Path(__file__).parent / "fixtures" / "legacy_f3defa5" / "best.pt"  # micro Backpack
K = 3


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """cl100k through a compact vocabulary holding the English gender set's tokens (and the
    bytes every compact vocabulary has), but not ' mechanic'."""
    enc = get_encoding("cl100k_base")
    gset = gender.load_set("gender_en")
    texts = [p.format(noun=n) for n in gset.nouns if n != "mechanic" for p in gset.fitting + gset.test]
    texts += [" he she they", " Parliament meets in Strasbourg Brussels"]
    return Tokenizer("cl100k_base", build_compact_vocab(enc, [enc.encode_ordinary(t) for t in texts]))


def tiny(kind: str, vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    config = dict(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=12, n_senses=K)
    model = GPT(ModelConfig(**config)) if kind == "transformer" else BackpackLM(ModelConfig(**config))
    return model.double().eval()


@pytest.fixture(scope="module")
def backpack(tok):
    return tiny("backpack", tok.vocab_size)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> str:
    """The English set with six of its nouns: one outside the vocabulary, two of several
    tokens (a whole run of 40 nouns is the benchmark's job)."""
    text = (words.DATA / "gender_en.yaml").read_text()
    text = re.sub(r"^nouns: \[[^\]]*\]", "nouns: [mechanic, nurse, lawyer, hairdresser, salesperson, farmer]",
                  text, flags=re.M)
    path = tmp_path_factory.mktemp("nouns") / "small.yaml"
    path.write_text(text)
    return str(path)


# -- the intervention object -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["backpack", "transformer"])
def test_no_intervention_or_unit_weights_is_the_model(kind, tok):
    model = tiny(kind, tok.vocab_size)
    idx = torch.randint(0, tok.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    plain = model(idx, all_logits=True)[0]
    assert torch.equal(Intervention().logits(model, idx), plain)
    if kind == "backpack":
        ones = Intervention(sense_weights=lambda ids: torch.ones(*ids.shape, K),
                            token_weights={int(idx[0, 3]): [1.0] * K})
        assert torch.equal(ones.logits(model, idx), plain)


def test_scaling_a_sense_changes_every_positions_logits_by_alpha_times_its_logits(backpack, tok):
    """(w - 1) * sum over x's positions j of alpha_l[i, j] * E C(x)_l, at every position i,
    float64 to 1e-10; by token weights and by a positions function alike."""
    idx = torch.randint(0, tok.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    x, l, w = int(idx[0, 2]), 1, 2.5
    idx[1, 7] = x
    alpha = backpack.contextualization(idx)[:, l]  # (B, T, T)
    sense_logits = backpack.sense_logits(torch.tensor([x]))[0, l]  # (V,)
    expected = backpack(idx, all_logits=True)[0] + (w - 1) * (
        alpha * (idx == x)[:, None, :]).sum(-1)[..., None] * sense_logits
    by_token = torch.ones(K, dtype=torch.float64)
    by_token[l] = w
    for steer in (Intervention(token_weights={x: by_token}),
                  Intervention.scaling(occurrences([x]), l, w, K)):
        assert (steer.logits(backpack, idx) - expected).abs().max() < 1e-10


def test_occurrences_marks_every_token_of_each_whole_occurrence():
    hits = occurrences([5, 6])(torch.tensor([[5, 6, 1, 5, 2, 5, 6]]))
    assert hits[0].nonzero().flatten().tolist() == [0, 1, 5, 6]
    assert not occurrences([9])(torch.tensor([[1, 2]])).any()


def test_input_rows_edit_the_input_embedding_with_the_head_untied(tok):
    model = tiny("transformer", tok.vocab_size)
    idx = torch.randint(0, tok.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    x = int(idx[0, 4])
    row = torch.randn(12, dtype=torch.float64)
    emb = model.wte(idx).clone()
    emb[idx == x] = row
    expected = F.linear(model.transformer(emb), model.wte.weight)  # the head keeps E
    got = Intervention(input_rows={x: row}).logits(model, idx)
    assert (got - expected).abs().max() < 1e-12
    with pytest.raises(UserError, match="need a Backpack"):
        Intervention(token_weights={x: [2.0] * K}).logits(model, idx)
    with pytest.raises(UserError, match="not to generation"):
        model.generate(idx, 2, intervention=Intervention(input_rows={x: row}))
    with pytest.raises(UserError, match=r"input_rows\[.*\] must be a \(12,\) tensor"):
        Intervention(input_rows={x: torch.ones(3)}).logits(model, idx)


# -- gender bias -----------------------------------------------------------------------------


def direct_bias(model, tok, noun: str, prompts, sense=None, row=None) -> float:
    """The bias ratio computed here from sense_vectors, contextualization and E (Backpack),
    or from an edited input embedding (``row``), one prompt at a time."""
    he, she = tok.encode(" he")[0], tok.encode(" she")[0]
    noun_ids = tok.encode(" " + noun)
    ratios = []
    for p in prompts:
        ids = tok.encode(p.format(noun=noun))
        idx = torch.tensor([ids])
        at = torch.tensor([t in noun_ids for t in ids])  # the single-token nouns used here
        if row is not None:
            emb = model.wte(idx).clone()
            emb[0, at] = row
            h = model.transformer(emb)
            if hasattr(model, "sense_network"):
                C = model.sense_network(emb[0]).view(len(ids), K, -1)
                q, key = model.alpha_heads(h)
                from backpack_nb.models.mixing import causal_alpha
                alpha = causal_alpha(q, key)[0, :, -1]  # (k, T)
                h = torch.einsum("lj,jld->d", alpha, C)[None, None]
            logits = F.linear(h[0, -1], model.wte.weight)
        else:
            C = model.sense_vectors(idx)[0].clone()  # (T, k, d)
            if sense is not None:
                C[at, sense] = 0
            alpha = model.contextualization(idx)[0, :, -1]  # (k, T)
            logits = torch.einsum("lj,jld->d", alpha, C) @ model.wte.weight.T
        p_ = logits.softmax(-1)
        ratios.append(max(p_[he] / p_[she], p_[she] / p_[he]).item())
    return float(np.mean(ratios))


@pytest.mark.slow  # the whole protocol on a few nouns: seconds to tens of seconds
def test_bias_ratio_remove_and_projection_match_a_direct_computation(backpack, tok, small_set):
    gset = gender.load_set(small_set)
    result = gender.run_gender(backpack, tok, small_set, sense=2, progress=False)
    assert result["sense"] == 2 and list(result["skipped"]) == ["mechanic"]
    assert [r["noun"] for r in result["nouns"]] == list(gset.nouns[1:])
    E = backpack.wte.weight
    g = E[tok.encode(" she")[0]] - E[tok.encode(" he")[0]]
    with torch.no_grad():
        for row in result["nouns"]:
            noun = row["noun"]
            if len(row["tokens"]) > 1:
                continue  # direct_bias edits single-token nouns
            assert row["bias_before"] == pytest.approx(direct_bias(backpack, tok, noun, gset.test), abs=1e-10)
            assert row["bias_remove"] == pytest.approx(direct_bias(backpack, tok, noun, gset.test, sense=2), abs=1e-10)
            e = E[tok.encode(" " + noun)[0]]
            projected = e - (e @ g) / (g @ g) * g
            assert row["bias_project"] == pytest.approx(
                direct_bias(backpack, tok, noun, gset.test, row=projected), abs=1e-10)
            assert row["bias_optimize"] <= row["bias_before"] + 1e-12  # w = 1 is a candidate
    mean = result["mean"]
    assert mean["bias_before"] == pytest.approx(np.mean([r["bias_before"] for r in result["nouns"]]))
    assert result["reduction_remove"] == pytest.approx(
        (mean["bias_before"] - mean["bias_remove"]) / (mean["bias_before"] - 1))


def test_optimize_finds_the_known_optimum():
    """A bias that is a known function of w: the logit gap he - she is linear in w (as a
    Backpack's is), -0.5 + 1.5 w, so the bias ratio exp|1.5 w - 0.5| + |1 - w| is least at
    w = 1/3, where the gap is 0."""
    zero = torch.zeros(1, 4, dtype=torch.float64)
    zero[0, 0] = -0.5  # the logits at w = 0
    one = zero.clone()
    one[0, 0] = 1.0  # at w = 1
    w = gender.fit_weight(lambda w: gender.bias_ratio(zero + w * (one - zero), (0, 1)))
    assert w == pytest.approx(1 / 3, abs=1e-3)


def test_the_gender_sense_is_the_one_whose_removal_most_reduces_the_fitting_bias(backpack, tok):
    """Scored on the fitting prompts only: each sense's mean reduction (before - after) /
    (before - 1) when removed, against direct_bias with that sense zeroed."""
    gset = gender.load_set("gender_en")
    nouns = [words.word(tok, n) for n in ("nurse", "lawyer", "farmer")]
    pair = gender.pronoun_ids(tok, [" he", " she"])
    sense, scores = gender.find_gender_sense(backpack, tok, nouns, gset, pair)
    direct = []
    with torch.no_grad():
        for n in nouns:
            before = direct_bias(backpack, tok, n.word, gset.fitting)
            direct.append([(before - direct_bias(backpack, tok, n.word, gset.fitting, sense=l)) / (before - 1)
                           for l in range(K)])
    direct = np.mean(direct, axis=0)
    assert np.allclose(scores, direct, atol=1e-9) and sense == int(np.argmax(direct))


@pytest.mark.slow  # the whole protocol on a few nouns: seconds to tens of seconds
def test_a_transformer_gets_the_projection_baseline_only(tok, small_set):
    model = tiny("transformer", tok.vocab_size)
    result = gender.run_gender(model, tok, small_set, progress=False)
    row = result["nouns"][0]
    assert result["sense"] is None and "bias_remove" not in row and "bias_project" in row
    with pytest.raises(UserError, match="a Transformer has no senses"):
        gender.run_gender(model, tok, small_set, sense=0, progress=False)


@pytest.mark.slow  # the whole protocol on a few nouns: seconds to tens of seconds
def test_nouns_outside_the_vocabulary_and_several_token_nouns(backpack, tok, small_set):
    w = words.word(tok, "mechanic")
    assert not w.usable and "byte tokens" in w.skipped
    result = gender.run_gender(backpack, tok, small_set, single_token=True, progress=False,
                               train_tokens=np.array(tok.encode(" he he she they")))
    assert "byte tokens" in result["skipped"]["mechanic"]
    assert all("--single_token" in result["skipped"][n] for n in ("hairdresser", "salesperson"))
    assert [r["noun"] for r in result["nouns"]] == ["nurse", "lawyer", "farmer"]
    assert result["single_token_nouns"] == [r["noun"] for r in result["nouns"]]
    assert result["pronoun_counts"] == {" he": 2, " she": 1, " they": 1}


def test_the_shipped_sets_load_and_the_french_one_avoids_grammatical_gender():
    en, fr = gender.load_set("gender_en"), gender.load_set("gender_fr")
    assert len(en.nouns) == 40 and len(en.fitting) == 5 and len(en.test) == 13
    assert fr.pronouns == (" il", " elle") and len(fr.fitting) == 5 and len(fr.test) == 13
    for prompt in fr.fitting + fr.test:
        assert re.search(r"\b(notre|votre|chaque|Notre|Votre|Chaque) \{noun\}", prompt), prompt
        assert not re.search(r"\b(que|si|le|la|un|une)$", prompt.rstrip(" ,;")), prompt


def test_bad_gender_files_are_one_clear_error(tmp_path):
    bad = tmp_path / "nouns.yaml"
    bad.write_text("pronouns: [' he']\nnouns: [a]\nfitting: ['{noun}']\ntest: ['{noun}']\n")
    with pytest.raises(UserError, match="pronouns must be two words"):
        gender.load_set(str(bad))
    bad.write_text("pronouns: [' he', ' she']\nnouns: [a]\nfitting: ['no noun here']\ntest: ['{noun}']\n")
    with pytest.raises(UserError, match="fitting prompt must hold"):
        gender.load_set(str(bad))
    with pytest.raises(UserError, match="not one of the shipped files"):
        gender.load_set("no_such_set")


# -- knowledge editing -----------------------------------------------------------------------


def test_the_edit_moves_r_onto_a_and_leaves_the_rest(backpack, tok):
    """C~.E_r = (C.E_r)(E_a.E_r)/|E_a|^2 and the part of C orthogonal to E_r and E_a is
    unchanged (float64, 1e-10)."""
    x, r, a = tok.encode(" Parliament")[0], tok.encode(" Strasbourg")[0], tok.encode(" Brussels")[0]
    blocks = edit.edited_senses(backpack, [x], r, a)
    C = backpack.senses_of_tokens(torch.tensor([x])).view(K, -1)  # (k, d)
    E = backpack.wte.weight
    Er, Ea = E[r], E[a]
    assert ((blocks[x] @ Er) - (C @ Er) * (Ea @ Er) / (Ea @ Ea)).abs().max() < 1e-10
    basis, _ = torch.linalg.qr(torch.stack([Er, Ea], 1))  # (d, 2)
    orth = lambda M: M - (M @ basis) @ basis.T  # noqa: E731
    assert (orth(blocks[x]) - orth(C)).abs().max() < 1e-10


def test_run_edit_measures_the_edited_model(backpack, tok):
    prompts = ["The Parliament meets in", "Parliament meets in"]
    T = backpack.config.block_size
    heldout = np.array(tok.encode(" Parliament meets in Strasbourg" * 20))[:2 * T + 1]  # 2 windows
    result = edit.run_edit(backpack, tok, "Parliament", "Strasbourg", "Brussels", prompts, heldout)
    x, r, a = tok.encode(" Parliament")[0], tok.encode(" Strasbourg")[0], tok.encode(" Brussels")[0]
    steer = Intervention(sense_blocks=edit.edited_senses(backpack, [x], r, a))
    idx = torch.tensor([tok.encode(prompts[0])])
    with torch.no_grad():
        after = steer.next_token_logits(backpack, idx)[0].softmax(-1)
        before = backpack(idx)[0][0, -1].softmax(-1)
    first = result["per_prompt"][0]
    assert first["p_to_after"] == pytest.approx(float(after[a]), abs=1e-12)
    assert first["p_from_before"] == pytest.approx(float(before[r]), abs=1e-12)
    x = torch.tensor(heldout[:-1]).view(2, T)  # the two windows and their targets
    y = torch.tensor(heldout[1:]).view(2, T)
    with torch.no_grad():
        loss = F.cross_entropy(backpack(x, all_logits=True)[0].flatten(0, 1), y.flatten()).item()
        edited = F.cross_entropy(steer.logits(backpack, x).flatten(0, 1), y.flatten()).item()
    assert result["heldout_tokens"] == 2 * T + 1
    assert result["heldout_loss_before"] == pytest.approx(loss, abs=1e-10)
    assert result["heldout_loss_after"] == pytest.approx(edited, abs=1e-10) and edited != loss
    with pytest.raises(UserError, match="start with the same token"):
        edit.run_edit(backpack, tok, "Parliament", "Brussels", "Brussels", prompts)


# -- the command line ------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path) -> Path:
    shutil.copy(LEGACY, tmp_path / "best.pt")
    return tmp_path


@pytest.mark.slow  # the whole protocol on a few nouns: seconds to tens of seconds
def test_command_writes_steering_sections_and_keeps_the_others(run_dir, capsys):
    ckpt = run_dir / "best.pt"
    (run_dir / "eval.json").write_text(json.dumps({"checkpoint": str(ckpt), "splits": {"val": {"bpb": 2.0}}}))
    assert steering_main(["gender", "--model_path", str(ckpt), "--no-progress", "--compare-paper"]) == 0
    assert "paper, Backpack (sense 10)" in capsys.readouterr().out
    assert steering_main(["edit", "--model_path", str(ckpt), "--heldout_tokens", "0"]) == 0
    assert steering_main(["topic", "--model_path", str(ckpt), "--topics", "budget", "--samples", "1",
                          "--tokens", "4", "--strengths", "0,3", "--no-progress"]) == 0
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved["splits"] == {"val": {"bpb": 2.0}}
    assert set(saved["steering"]) == {"gender", "edit", "topic"}
    assert set(saved["steering"]["topic"]["bags"]["budget"]["strengths"]) == {"0", "3"}
    assert {"sense", "sense_score", "pronouns", "skipped", "nouns", "mean"} <= set(saved["steering"]["gender"])
    assert {"word", "from", "to", "prompts", "p_from_before", "p_from_after", "p_to_before",
            "p_to_after", "per_prompt"} <= set(saved["steering"]["edit"])


@pytest.mark.parametrize("argv, message", [
    (["gender", "--sense", "7"], "--sense 7: a sense in 0..1"),
    (["topic", "--strengths", "0,4"], "--strengths 0,4: each in 0..3"),
    (["topic", "--samples", "0"], "--samples must be >= 1"),
    (["topic", "--strengths", ","], "--strengths is empty"),
    (["edit", "--edit", "nope"], "--edit 'nope': not in"),
    (["edit", "--heldout_tokens", "-1"], "--heldout_tokens must be >= 0"),
    (["gender", "--nouns", "nope"], "--nouns 'nope': no such file"),
])
def test_bad_flags_exit_2_naming_the_flag(run_dir, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        steering_main([argv[0], "--model_path", str(run_dir / "best.pt"), *argv[1:]])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_out_that_is_not_an_evaluation_is_refused_before_loading(run_dir, capsys):
    params = run_dir / "params.yaml"
    params.write_text("max_iters: 5\n")
    with pytest.raises(SystemExit):
        steering_main(["gender", "--model_path", str(run_dir / "missing.pt"), "--out", str(params)])
    assert "is not an evaluation" in capsys.readouterr().err
    assert params.read_text() == "max_iters: 5\n"


def test_run_tokens_says_what_is_left_out_and_why(tmp_path):
    said = []
    assert report.run_tokens({}, "train", "pronoun counts", say=said.append) is None
    assert report.run_tokens({"data": {"data_dir": str(tmp_path / "gone")}}, "val", "the held-out loss",
                             "; give --heldout TEXT_FILE", say=said.append) is None
    assert said[0] == "pronoun counts left out: the run's train data cannot be read (the checkpoint names no dataset)"
    assert said[1].startswith("the held-out loss left out: the run's val data cannot be read (")
    assert str(tmp_path / "gone") in said[1] and said[1].endswith("; give --heldout TEXT_FILE")
