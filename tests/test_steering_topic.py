"""Topic control (backpack_nb.steering.topic): the bags' data files and tokens, the sense
scores against a direct computation, the quantile bands, the annealed weights against
steering.md's formula at every step of a generation, strength 0 against no intervention, the
protocol's JSON, and bad arguments. Tiny float64 Backpacks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from backpack_nb.errors import UserError
from backpack_nb.models import BackpackLM, ModelConfig
from backpack_nb.models.generation import decode
from backpack_nb.models.intervention import Intervention
from backpack_nb.steering import topic
from backpack_nb.tokenizer import Tokenizer, byte_token_ids, get_encoding

K = 3
EOT = 100257  # cl100k_base's <|endoftext|>


def tiny_backpack(vocab: int, seed: int = 0, block: int = 32) -> BackpackLM:
    """2 layers, d 12, 3 senses, float64, eval mode."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=12,
                         n_senses=K, sense_source="network")
    return BackpackLM(config).double().eval()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """cl100k_base through a compact vocabulary: its bytes, " the", " music", " family",
    " sports", " food", the tokens of " antidisestablishmentarianism", end-of-text; not
    " gaming"."""
    enc = get_encoding("cl100k_base")
    words = [" the", " music", " family", " sports", " food", " antidisestablishmentarianism"]
    ids = {int(i) for i in byte_token_ids(enc)} | {EOT}
    ids |= {i for w in words for i in enc.encode_ordinary(w)}
    return Tokenizer("cl100k_base", sorted(ids))


# -- the data files and the bags' tokens -----------------------------------------------------

PAPER_BAGS = {  # steering.md section 2
    "arts_culture": ["arts", "culture"], "business_entrepreneurs": ["business", "entrepreneurs"],
    "celebrity_pop_culture": ["celebrity", "pop", "culture"],
    "diaries_daily_life": ["diaries", "daily", "life"], "family": ["family"],
    "fashion_style": ["fashion", "style"], "film_tv_video": ["film", "tv", "video"],
    "fitness_health": ["fitness", "health"], "food_dining": ["food", "dining"],
    "gaming": ["gaming"], "music": ["music"], "news_social_concern": ["news", "social", "concern"],
    "other_hobbies": ["hobbies"], "relationships": ["relationships"], "sports": ["sports"],
    "travel_adventure": ["travel", "adventure"], "youth_student_life": ["youth", "student", "life"],
}


def test_the_shipped_topic_files_load_with_every_bag_and_word():
    assert topic.read_bags("topics_paper") == PAPER_BAGS
    europarl = topic.read_bags("topics_europarl")
    assert list(europarl) == ["agriculture", "fisheries", "budget", "energy", "rights"]
    assert europarl["fisheries"][:5] == ["fisheries", "fishing", "fish", "fleet", "sea"]
    assert "pêcheurs" in europarl["fisheries"] and "démocratie" in europarl["rights"]
    # a word written the same in English and French is one word of its bag
    assert europarl["budget"].count("budget") == 1 and europarl["rights"].count("torture") == 1


def test_a_bad_bags_file_is_a_user_error(tmp_path):
    path = tmp_path / "bags.yaml"
    path.write_text("bags:\n  music: []\n")
    with pytest.raises(UserError, match="bag 'music'"):
        topic.read_bags(str(path))


def test_bag_tokens_keep_single_real_tokens_and_say_why_others_are_skipped(tok):
    words = ["music", "family", "music", "antidisestablishmentarianism", "gaming"]
    ids, skipped = topic.bag_tokens(tok, words)
    assert [tok.token_str(i) for i in ids] == [" music", " family"]  # each token once
    assert skipped["antidisestablishmentarianism"] == "6 tokens"
    assert skipped["gaming"].startswith("not in the vocabulary")
    assert set(skipped) == {"antidisestablishmentarianism", "gaming"}


# -- scores and bands ------------------------------------------------------------------------


def test_sense_scores_chunked_equal_the_direct_computation():
    """Chunks of 5 tokens (V 37), with and without precomputed maxima, against
    b . (E C(x)_l) / max(E C(x)_l) from the whole (V, k, V) at once."""
    model = tiny_backpack(37)
    bag = [3, 17, 30]
    with torch.no_grad():
        logits = model.sense_logits(torch.arange(37))  # (V, k, V)
    b = torch.zeros(37, dtype=torch.float64)
    b[bag] = 1
    direct = (logits @ b) / logits.max(dim=-1).values  # (V, k)
    chunked = topic.sense_scores(model, bag, chunk=5, progress=False)
    assert chunked.dtype == torch.float32 and chunked.shape == (37, K)
    torch.testing.assert_close(chunked, direct.float(), rtol=1e-6, atol=1e-7)
    maxima = topic.sense_maxima(model, chunk=7, progress=False)
    torch.testing.assert_close(maxima, logits.max(dim=-1).values, rtol=1e-12, atol=1e-12)
    reused = topic.sense_scores(model, bag, chunk=4, progress=False, maxima=maxima)
    torch.testing.assert_close(reused, direct.float(), rtol=1e-6, atol=1e-7)


def test_bands_split_the_scores_at_their_quantiles():
    scores = torch.randn(501, 7, generator=torch.Generator().manual_seed(0)).float()
    thresholds, band = topic.bands(scores)
    values = np.sort(scores.double().numpy().ravel())
    N = values.size
    for q, v in thresholds.items():  # the quantile by linear interpolation, written out
        pos = q * (N - 1)
        lo = math.floor(pos)
        assert v == pytest.approx(values[lo] + (pos - lo) * (values[min(lo + 1, N - 1)] - values[lo]),
                                  abs=1e-12)
    assert band.shape == scores.shape and set(band.unique().tolist()) == {0, 1, 2, 3}
    expected = sum((scores.double() >= t).long() for t in thresholds.values())
    assert torch.equal(band, expected)
    for b, q in zip((1, 2, 3), topic.QUANTILES):  # share at or above the q-quantile: 1 - q
        assert abs(float((band >= b).double().mean()) - (1 - q)) <= 1 / N + 1e-12
    delta = topic.strength_delta(band, 2)
    assert torch.equal(delta, torch.tensor([1.0, 1.5, 2.2, 2.2], dtype=torch.float64)[band])


def test_strengths_are_the_papers_top_band_first():
    paper = {1: (1.5, 1.5, 1.3, 1), 2: (2.2, 2.2, 1.5, 1), 3: (3.3, 3.3, 3, 1)}
    for s, top_first in paper.items():
        assert topic.STRENGTHS[s] == tuple(reversed(top_first))
    assert topic.STRENGTHS[0] == (1, 1, 1, 1)


# -- the annealed weights --------------------------------------------------------------------


def expected_weights(model, delta: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """steering.md step 3, position by position, from the model's own E C(x)_l."""
    f = float(delta.max()) / 7.5
    G, T = ids.shape
    out = torch.empty(G, T, K, dtype=torch.float64)
    with torch.no_grad():
        for g in range(G):
            logits = model.sense_logits(ids[g])  # (T, k, V): E C(x_j)_l
            for j in range(T):
                for sense in range(K):
                    a = sum(max(float(logits[j, sense, int(x)]), 0.0) for x in ids[g])
                    b = 1 / (1 + math.exp(f * a - 6)) * (1 + j / 100)
                    out[g, j, sense] = b * float(delta[ids[g, j], sense]) + (1 - b)
    return out


def test_annealed_weights_equal_the_formula_at_every_position_and_step():
    """A generation of 8 tokens after prompts of 4 and 2 tokens (padded): every call of the
    hook, each row's weights from its first token, against the formula (1e-12)."""
    V = 37
    model = tiny_backpack(V)
    delta = 1 + 2.3 * torch.rand(V, K, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    steer = topic.annealed_intervention(model, delta)
    calls = []

    def recorded(ids):
        w = steer.sense_weights(ids)
        calls.append((ids.clone(), w.clone()))
        return w

    prompts = torch.tensor([[5, 9, 5, 20], [0, 0, 11, 3]])
    out, _ = decode(model, prompts, 8, starts=[0, 2], generator=torch.Generator().manual_seed(0),
                    intervention=Intervention(sense_weights=recorded))
    assert len(calls) >= 2 * 8  # every step, each group of equal prompt length
    rows = [out[0].tolist(), out[1, 2:].tolist()]
    for ids, w in calls:
        # each call's rows are the text so far of a row from its first token (j = 0 there)
        assert all(any(r[:ids.shape[1]] == row for r in rows) for row in ids.tolist())
        torch.testing.assert_close(w, expected_weights(model, delta, ids), rtol=0, atol=1e-12)


def test_strength_zero_generates_exactly_what_no_intervention_does():
    V = 37
    model = tiny_backpack(V)
    band = torch.randint(0, 4, (V, K), generator=torch.Generator().manual_seed(3))
    steer = topic.annealed_intervention(model, topic.strength_delta(band, 0))
    prompt = torch.tensor([[1, 2, 3]] * 3)
    with_zero, _ = decode(model, prompt, 20, generator=torch.Generator().manual_seed(7), intervention=steer)
    without, _ = decode(model, prompt, 20, generator=torch.Generator().manual_seed(7))
    assert torch.equal(with_zero, without)
    assert bool((steer.sense_weights(with_zero) == 1).all())
    strong = topic.annealed_intervention(model, topic.strength_delta(band, 3))
    with torch.no_grad():  # strength 3 does change the logits (a tiny random model's samples may not)
        change = strong.logits(model, without) - model(without, all_logits=True)[0]
    assert change.abs().max() > 1e-4


# -- metrics ---------------------------------------------------------------------------------


def test_metrics_on_hand_made_samples():
    samples = [[1, 2, 1, 2], [3, 1, 2, 4]]
    assert topic.bag_share(samples, [1, 4]) == pytest.approx(4 / 8)
    assert topic.distinct_2(samples) == pytest.approx(4 / 6)  # (1,2) x3, (2,1), (3,1), (2,4)
    model = tiny_backpack(37, block=4)
    ids = torch.tensor([[0, 5, 6, 7, 8, 9], [0, 1, 2, 3, 4, 5]])  # longer than the block
    with torch.no_grad():
        want = []
        for row in ids:
            for t in range(2, 6):  # prompt of 2; each token from at most 4 before it
                logits = model(row[max(0, t - 4):t][None], all_logits=True)[0][0, -1]
                want.append(float(-logits.log_softmax(-1)[row[t]]))
    assert topic.fluency_loss(model, ids, prompt_len=2, batch_size=1) == pytest.approx(
        sum(want) / len(want), abs=1e-12)


# -- the protocol ----------------------------------------------------------------------------


def test_run_topic_gives_the_issues_json(tok, tmp_path):
    bags = tmp_path / "bags.yaml"
    bags.write_text("bags:\n  music: [music, family, gaming]\n  lost: [gaming]\n")
    model = tiny_backpack(tok.vocab_size)
    kwargs = dict(bags=str(bags), strengths=(0, 3), n_samples=3, max_new_tokens=5, seed=4,
                  batch_size=2, progress=False,
                  scorers={"length": lambda texts, name: float(len(texts))})
    result = topic.run_topic(model, tok, **kwargs)
    json.dumps(result)
    assert result["bags_file"] == str(bags) and list(result["bags"]) == ["music", "lost"]
    music = result["bags"]["music"]
    assert music["tokens"] == [" music", " family"] and set(music["skipped"]) == {"gaming"}
    assert list(music["thresholds"]) == ["0.6", "0.8", "0.95"]
    assert list(music["strengths"]) == ["0", "3"]
    for entry in music["strengths"].values():
        assert {"bag_share", "fluency_loss", "distinct_2", "n_samples", "examples"} <= set(entry)
        assert entry["n_samples"] == 3 and len(entry["examples"]) == 3
        assert 0 <= entry["bag_share"] <= 1 and 0 < entry["distinct_2"] <= 1
        assert entry["fluency_loss"] > 0 and entry["scores"] == {"length": 3.0}
    lost = result["bags"]["lost"]
    assert lost["tokens"] == [] and lost["strengths"] == {} and "no word" in lost["note"]
    assert topic.run_topic(model, tok, **kwargs) == result  # reproducible per seed
    # strength 0 is the unsteered model's ancestral samples from end-of-text
    gen = torch.Generator().manual_seed(4)
    plain = torch.cat([decode(model, torch.tensor([[tok.eot_id]] * b), 5, generator=gen)[0]
                       for b in (2, 1)])
    assert music["strengths"]["0"]["examples"] == [tok.decode(r[1:]) for r in plain.tolist()]
    fig = topic.strength_figure(result)
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 1


@pytest.mark.parametrize("bad, name", [(dict(strengths=(0, 4)), "strengths"),
                                       (dict(strengths=(-1,)), "strengths"),
                                       (dict(n_samples=0), "n_samples"),
                                       (dict(max_new_tokens=0), "max_new_tokens"),
                                       (dict(batch_size=0), "batch_size"),
                                       (dict(topics=["nope"]), "topics")])
def test_bad_arguments_are_user_errors_naming_them(tok, bad, name):
    model = tiny_backpack(tok.vocab_size)
    with pytest.raises(UserError, match=name):
        topic.run_topic(model, tok, **{"n_samples": 1, "max_new_tokens": 1, "progress": False, **bad})


def test_unconditional_samples_need_an_end_of_text_token():
    no_eot = Tokenizer("cl100k_base", list(range(300)))
    with pytest.raises(UserError, match="prompt"):
        topic.run_topic(tiny_backpack(300), no_eot, n_samples=1, max_new_tokens=1, progress=False)
