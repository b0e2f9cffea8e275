"""Generation (backpack_nb.models.generation): the cached decoders against the uncached model
in float64 at every step, greedy tokens cached and uncached, nucleus sampling, prompts of
different lengths in one batch, and a Backpack's intervention hook. Tiny random models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backpack_nb import sampling
from backpack_nb.errors import UserError
from backpack_nb.models import GPT, BackpackLM, ModelConfig
from backpack_nb.models.generation import (BackpackDecoder, Intervention, UncachedDecoder, decode,
                                           next_tokens)
from backpack_nb.sampling import finished_text, sample_text, stop_condition

KINDS = ["transformer", "backpack/network", "backpack/table"]
V, BLOCK, K = 37, 16, 3


def tiny_model(kind: str, dtype=torch.float64, seed: int = 0):
    """Block 16, 2 layers, d 12, 3 senses; eval mode, given dtype."""
    torch.manual_seed(seed)
    config = dict(vocab_size=V, block_size=BLOCK, n_layer=2, n_head=2, n_embd=12, n_senses=K)
    if kind == "transformer":
        model = GPT(ModelConfig(**config))
    else:
        model = BackpackLM(ModelConfig(**config, sense_source=kind.split("/")[1]))
    return model.to(dtype).eval()


def tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def stepwise_difference(model, text: torch.Tensor, prompt: int, starts=None) -> float:
    """Feed ``text`` (B, W) column by column after a prompt of ``prompt`` columns: the largest
    |cached - uncached| next-token logit over every step."""
    starts = starts or [0] * len(text)
    cached, reference = model.decoder(), UncachedDecoder(model)
    worst = (cached.start(text[:, :prompt], starts)
             - reference.start(text[:, :prompt], starts)).abs().max().item()
    for end in range(prompt + 1, text.shape[1] + 1):
        step = cached.advance(text[:, :end]) - reference.advance(text[:, :end])
        worst = max(worst, step.abs().max().item())
    return worst


# -- exactness: float64, every step ----------------------------------------------------------


@pytest.mark.parametrize("prompt", [3, 20], ids=["shorter-than-block", "longer-than-block"])
@pytest.mark.parametrize("kind", KINDS)
def test_cached_logits_equal_the_uncached_models_at_every_step(kind, prompt):
    """A prompt of 3 or 20 tokens (block 16), then 25 more columns: past block_size both
    ways, the cached path's next-token logits equal the uncached model's on the same context
    to 1e-10."""
    model = tiny_model(kind)
    text = tokens(2, prompt + 25)
    worst = stepwise_difference(model, text, prompt)
    print(f"{kind}, prompt {prompt}: max |cached - uncached| logit {worst:.1e}")
    assert worst < 1e-10


@pytest.mark.parametrize("sum_by", ["token", "position"])
def test_both_ways_of_summing_the_senses_are_exact(sum_by, monkeypatch):
    """The Backpack's new output summed over the senses of each distinct token or of each
    column (the decoder picks the cheaper): both equal the uncached model's to 1e-10, with
    tokens repeated (few distinct) and not."""
    monkeypatch.setattr(BackpackDecoder, "sum_by", sum_by)
    model = tiny_model("backpack/network")
    repeated = tokens(2, 30) % 4  # 4 distinct tokens
    assert stepwise_difference(model, repeated, 5) < 1e-10
    assert stepwise_difference(model, tokens(2, 30, seed=3), 5) < 1e-10


@pytest.mark.parametrize("kind", KINDS)
def test_rows_of_different_lengths_each_get_their_own_logits(kind):
    """Prompts of 2, 9 and 15 tokens left-padded into one batch, then columns past
    block_size: each row's logits at every step equal its own context's through the
    uncached model alone (float64, 1e-10)."""
    model = tiny_model(kind)
    text = tokens(3, 40)
    starts = [13, 6, 0]  # row b's tokens begin at column starts[b]
    text[0, :13] = 0  # padding: any id, never seen
    text[1, :6] = 5
    worst = stepwise_difference(model, text, 15, starts)
    for b, start in enumerate(starts):  # the reference itself: each row alone
        alone = model(text[b:b + 1, max(start, 40 - BLOCK):])[0][0, -1]
        decoder = UncachedDecoder(model)
        decoder.start(text[:, :39], starts)
        assert torch.allclose(decoder.advance(text)[b], alone, rtol=0, atol=1e-12)
    assert worst < 1e-10


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_are_the_same_cached_and_uncached_in_float32(kind):
    model = tiny_model(kind, torch.float32)
    for prompt in (tokens(2, 4), tokens(2, 20, seed=2)):
        cached = model.generate(prompt, 40, temperature=0)
        uncached = model.generate(prompt, 40, temperature=0, use_cache=False)
        assert cached.shape == (2, prompt.shape[1] + 40)
        assert torch.equal(cached, uncached)


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_is_reproducible_per_generator_seed(kind):
    model = tiny_model(kind, torch.float32)
    prompt = tokens(3, 4)

    def run(seed: int) -> torch.Tensor:
        return model.generate(prompt, 30, temperature=1.0, top_k=10, top_p=0.9,
                              generator=torch.Generator().manual_seed(seed))

    first = run(7)
    assert torch.equal(first, run(7))
    assert not torch.equal(first, run(8))
    assert ((0 <= first) & (first < V)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_generation_runs_under_autocast(kind, dtype):
    """Under CPU autocast the caches take the autocast dtype; the tokens stay in range and
    greedy generation agrees with the uncached model's in the same autocast."""
    model = tiny_model(kind, torch.float32)
    prompt = tokens(2, 5)
    with torch.autocast("cpu", dtype=dtype):
        cached = model.generate(prompt, 20, temperature=0)
        uncached = model.generate(prompt, 20, temperature=0, use_cache=False)
        sampled = model.generate(prompt, 20, top_k=5, generator=torch.Generator().manual_seed(0))
    assert ((0 <= sampled) & (sampled < V)).all()
    # the first token after the prompt is the same computation on the same context
    assert torch.equal(cached[:, :6], uncached[:, :6])


# -- choosing the next token -----------------------------------------------------------------


def nucleus_by_definition(logits: torch.Tensor, p: float) -> set[int]:
    """The smallest set of most likely tokens whose probability reaches p."""
    probs = logits.double().softmax(-1)
    kept, mass = set(), 0.0
    for token in probs.argsort(descending=True).tolist():
        kept.add(token)
        mass += probs[token].item()
        if mass >= p:
            return kept
    return kept


@pytest.mark.parametrize("p", [0.05, 0.3, 0.75, 0.95])
def test_top_p_keeps_the_smallest_set_that_reaches_p(p):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3)) * 2
    generator = torch.Generator().manual_seed(0)
    drawn = next_tokens(logits.repeat(200, 1), top_p=p, generator=generator).view(200, 6)
    for row in range(6):
        allowed = nucleus_by_definition(logits[row], p)
        seen = set(drawn[:, row].tolist())
        assert seen <= allowed
        if len(allowed) <= 3:  # 200 draws meet every token of a small nucleus
            assert seen == allowed


def test_top_k_then_top_p_and_greedy():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    generator = torch.Generator().manual_seed(0)
    draws = next_tokens(logits.repeat(500, 1), top_k=3, generator=generator)
    assert set(draws.tolist()) == {0, 1, 2}
    # top_k 3 renormalises to (.665, .245, .090): p = 0.6 keeps the first alone
    assert set(next_tokens(logits.repeat(100, 1), top_k=3, top_p=0.6).tolist()) == {0}
    assert next_tokens(logits, temperature=0).tolist() == [0]
    assert next_tokens(torch.tensor([[0.0, 5.0]]), top_p=1e-9).tolist() == [1]


def test_until_stops_rows_and_reports_where():
    model = tiny_model("transformer", torch.float32)
    prompt = tokens(2, 3)
    full = model.generate(prompt, 12, temperature=0)
    row0 = full[0, 3:].tolist()
    stop_token = row0[4]
    first = 3 + row0.index(stop_token) + 1
    ids, ends = decode(model, prompt, 12, temperature=0, until=lambda ids: ids[:, -1] == stop_token)
    assert ends[0] == first
    assert torch.equal(ids, full[:, : ids.shape[1]])
    if stop_token not in full[1, 3:].tolist():
        assert ends[1] is None and ids.shape[1] == full.shape[1]


# -- the intervention hook (Backpack) --------------------------------------------------------


def scaling(token: int, sense: int, w: float):
    """A sense_weights hook: sense ``sense`` of every occurrence of ``token`` times w."""
    def weights(ids: torch.Tensor) -> torch.Tensor:
        out = torch.ones(*ids.shape, K, dtype=torch.float64)
        out[..., sense] = torch.where(ids == token, w, 1.0)
        return out
    return weights


@pytest.mark.parametrize("source", ["network", "table"])
def test_scaling_a_sense_changes_the_logits_by_alpha_times_its_logits(source):
    """Scaling sense l of token x by w adds (w - 1) * sum over x's positions j of
    alpha_l[i, j] * E C(x)_l to the next-token logits (float64, 1e-10), uncached and cached,
    at every step of a text longer than block_size."""
    model = tiny_model(f"backpack/{source}")
    text = tokens(2, 30, seed=4)
    x, l, w = int(text[0, 2]), 1, 2.5
    steer = Intervention(sense_weights=scaling(x, l, w))
    sense_logits = model.sense_logits(torch.tensor([x]))[0, l]  # E C(x)_l: (V,)
    decoders = [model.decoder(steer), UncachedDecoder(model, steer)]
    worst = 0.0
    for end in range(6, 31):
        context = text[:, max(0, end - BLOCK):end]  # what the model sees
        alpha = model.contextualization(context)[:, l, -1]  # (B, T): the last row of alpha_l
        expected = model(context)[0][:, -1] + (w - 1) * (
            alpha * (context == x)).sum(-1, keepdim=True) * sense_logits
        for decoder in decoders:
            got = decoder.start(text[:, :end], [0, 0]) if end == 6 else decoder.advance(text[:, :end])
            worst = max(worst, (got - expected).abs().max().item())
    print(f"backpack/{source}: max |steered logits - formula| {worst:.1e}")
    assert worst < 1e-10


@pytest.mark.parametrize("use_cache", [True, False])
def test_no_hook_or_unit_weights_generate_the_same_bits(use_cache):
    model = tiny_model("backpack/network", torch.float32)
    prompt = tokens(2, 6)
    kwargs = dict(top_k=8, use_cache=use_cache)
    plain = model.generate(prompt, 25, generator=torch.Generator().manual_seed(1), **kwargs)
    ones = Intervention(sense_weights=lambda ids: torch.ones(*ids.shape, K))
    for steer in (None, Intervention(), ones):
        again = model.generate(prompt, 25, generator=torch.Generator().manual_seed(1),
                               intervention=steer, **kwargs)
        assert torch.equal(plain, again)


def test_weights_see_the_text_so_far_and_may_change_past_positions():
    """The hook gets every token so far at every step (prompt and generated), and weights
    that depend on the whole text (here: on its length) are applied to past positions too:
    cached and uncached agree to 1e-10 in float64."""
    model = tiny_model("backpack/network")
    seen = []

    def annealed(ids: torch.Tensor) -> torch.Tensor:
        seen.append(ids.shape[1])
        T = ids.shape[1]
        return torch.linspace(0.5, 2.0, K, dtype=torch.float64).expand(*ids.shape, K) * (1 + T / 10)

    steer = Intervention(sense_weights=annealed)
    cached = model.generate(tokens(1, 4), 20, temperature=0, intervention=steer)
    assert seen == list(range(4, 24))
    assert torch.equal(cached, model.generate(tokens(1, 4), 20, temperature=0,
                                              intervention=steer, use_cache=False))
    text = tokens(2, 26, seed=5)
    decoders = [model.decoder(steer), UncachedDecoder(model, steer)]
    for end in range(4, 27):
        a, b = (d.start(text[:, :end], [0, 0]) if end == 4 else d.advance(text[:, :end])
                for d in decoders)
        assert (a - b).abs().max().item() < 1e-10


def test_an_edited_sense_block_replaces_the_tokens_senses():
    """A token's k x d block replaced: the logits equal the model's with that token's senses
    replaced, cached and uncached (float64); a zero block removes the token's contribution."""
    model = tiny_model("backpack/network")
    text = tokens(1, 12, seed=6)
    x = int(text[0, 3])
    block = torch.randn(K, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    steer = Intervention(sense_blocks={x: block})
    senses = model.sense_vectors(text)  # (1, T, k, d)
    senses[text == x] = block
    alpha = model.contextualization(text)[0, :, -1]  # (k, T)
    expected = torch.einsum("lj,jld->d", alpha, senses[0]) @ model.wte.weight.T  # (V,)
    for decoder in (model.decoder(steer), UncachedDecoder(model, steer)):
        got = decoder.start(text, [0])[0]
        assert (got - expected).abs().max().item() < 1e-10


def test_bad_interventions_are_one_clear_error():
    backpack, gpt = tiny_model("backpack/network"), tiny_model("transformer")
    prompt = tokens(1, 3)
    with pytest.raises(UserError, match="need a Backpack"):
        gpt.generate(prompt, 2, intervention=Intervention(sense_weights=scaling(1, 0, 2.0)))
    with pytest.raises(UserError, match=r"must return one weight per sense, \(1, 3, 3\)"):
        backpack.generate(prompt, 2, intervention=Intervention(
            sense_weights=lambda ids: torch.ones(*ids.shape)))
    with pytest.raises(UserError, match=r"sense_blocks\[4\] must be a \(3, 12\) tensor"):
        backpack.generate(prompt, 2, intervention=Intervention(sense_blocks={4: torch.ones(12)}))
    with pytest.raises(UserError, match="token id 99 is not in 0..36"):
        backpack.generate(prompt, 2, intervention=Intervention(sense_blocks={99: torch.ones(3, 12)}))


@pytest.mark.slow  # compiles (tens of seconds on a CPU)
@pytest.mark.parametrize("kind", ["transformer", "backpack/network"])
def test_a_compiled_step_generates_the_same_tokens_and_does_not_compile_per_token(kind):
    """Greedy tokens compiled equal eager ones, and 60 new tokens compile no more graphs than
    20 (both past block_size 16; float32, prompts of different lengths in one batch)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = tiny_model(kind, torch.float32)
    prompt = tokens(2, 5)
    graphs = []
    for new in (20, 60):
        torch._dynamo.reset()
        counters.clear()
        eager, _ = decode(model, prompt, new, starts=[0, 2], temperature=0)
        fast, _ = decode(model, prompt, new, starts=[0, 2], temperature=0, compile=True)
        assert torch.equal(eager, fast)
        graphs.append(counters["stats"]["unique_graphs"])
    print(f"{kind}: graphs compiled for 20 and 60 new tokens: {graphs}")
    assert 0 < graphs[1] == graphs[0] <= 16  # a few pieces around the eager sense cache


# -- sample_text and sample.py: batches of prompts, stopping, top_p --------------------------


LEGACY = Path(__file__).parent / "fixtures" / "legacy_f3defa5" / "best.pt"  # micro Backpack


@pytest.fixture(scope="module")
def tok():
    from backpack_nb.loading import load_model

    return load_model(LEGACY)[1]  # a real tokenizer (cl100k_base, V 13,034) without data


def word_model(kind: str, vocab: int):
    torch.manual_seed(0)
    config = dict(vocab_size=vocab, block_size=BLOCK, n_layer=1, n_head=2, n_embd=8, n_senses=2)
    return (GPT(ModelConfig(**config)) if kind == "transformer"
            else BackpackLM(ModelConfig(**config))).eval()


PROMPTS = ["The Commission has adopted the report on", "Le", "Mr President, I would like"]


@pytest.mark.parametrize("kind", ["transformer", "backpack/network"])
def test_each_row_of_a_batch_of_prompts_is_what_it_gets_alone(kind, tok):
    """Prompts of 1 to 8 tokens in one greedy batch, 30 new tokens (past block_size 16):
    every row equals the same prompt generated alone, cached and uncached."""
    model = word_model(kind, tok.vocab_size)
    batch = sample_text(model, tok, PROMPTS, num_samples=2, max_new_tokens=30, temperature=0)
    assert len(batch) == 6
    for i, start in enumerate(PROMPTS):
        alone = sample_text(model, tok, start, num_samples=1, max_new_tokens=30, temperature=0)
        assert batch[2 * i] == batch[2 * i + 1] == alone[0]
        assert alone[0].startswith(start) and len(tok.encode(alone[0])) > len(tok.encode(start))
    assert batch == sample_text(model, tok, PROMPTS, num_samples=2, max_new_tokens=30,
                                temperature=0, use_cache=False)


def test_samples_are_reproducible_per_seed_and_leave_torchs_generator_alone(tok):
    model = word_model("backpack/network", tok.vocab_size)
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    kwargs = dict(num_samples=3, max_new_tokens=20, top_p=0.9)
    first = sample_text(model, tok, PROMPTS[:2], seed=3, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert first == sample_text(model, tok, PROMPTS[:2], seed=3, **kwargs)
    assert first != sample_text(model, tok, PROMPTS[:2], seed=4, **kwargs)


def test_a_sample_ends_just_after_a_stop_text(tok):
    model = word_model("transformer", tok.vocab_size)
    full = sample_text(model, tok, "The", num_samples=1, max_new_tokens=25, temperature=0)[0]
    generated = full[len("The"):]
    stop = generated[len(generated) // 2:][:3]  # a piece of text it will write
    cut = sample_text(model, tok, "The", num_samples=1, max_new_tokens=25, temperature=0,
                      stop=[stop, "never written \u2603"])[0]
    assert cut == "The" + generated[: generated.index(stop) + len(stop)]


def test_stopping_rows_at_the_end_of_text_token_and_at_stop_texts(tok):
    """sampling's ``until`` and text: a row stops at its end-of-text token (left out of the
    text) or once its generated bytes hold a stop text (kept); the prompt does not count."""
    eot = tok.eot_id
    the, comm = tok.encode("The"), tok.encode(" Commission")
    ids = torch.tensor([the + comm + [eot], the + comm + comm, the + comm + the])
    until = stop_condition(tok, len(the), eot, [" Commission Comm"])
    assert until(ids).tolist() == [True, True, False]
    assert stop_condition(tok, len(the), None, ["The"])(ids).tolist() == [False, False, True]
    assert stop_condition(tok, len(the), None, ()) is None
    assert finished_text(tok, ids[0].tolist(), len(the), eot, ()) == "The Commission"
    assert finished_text(tok, ids[1].tolist(), len(the), None, ["ssion C", "sion"]) == "The Commission"
    assert finished_text(tok, ids[0].tolist(), len(the), None, ()).endswith("<|endoftext|>")


def test_bad_top_p_and_stop_are_refused_naming_them(tok):
    model = word_model("transformer", tok.vocab_size)
    for value in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(UserError, match=r"^top_p must be in \(0, 1\]"):
            sample_text(model, tok, "The", top_p=value)
    with pytest.raises(UserError, match="stop must be non-empty text"):
        sample_text(model, tok, "The", stop=[""])
    with pytest.raises(UserError, match="start must be a text or a non-empty list"):
        sample_text(model, tok, [])


@pytest.mark.parametrize("value", ["nan", "0", "1.01", "-1"])
def test_sample_py_refuses_a_bad_top_p_with_exit_2(value, capsys):
    with pytest.raises(SystemExit) as caught:
        sampling.main(["--model_path", str(LEGACY), "--top_p", value])
    assert caught.value.code == 2
    assert f"--top_p must be in (0, 1] (1 keeps every token), got {float(value)}" in \
        capsys.readouterr().err


def test_sample_py_takes_several_starts(capsys):
    assert sampling.main(["--model_path", str(LEGACY), "--start", "The Commission", "--start",
                          "Le", "--num_samples", "2", "--max_new_tokens", "20", "--top_p",
                          "0.8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    samples = out.split("---------- sample ")[1:]
    assert [s.split("\n")[0] for s in samples] == [
        "1 (start 1)", "2 (start 1)", "3 (start 2)", "4 (start 2)"]
    assert all(s.split("\n", 1)[1].startswith("The Commission") for s in samples[:2])
    assert all(s.split("\n", 1)[1].startswith("Le") for s in samples[2:])


# -- against transformers (importing it takes seconds: the slow tier) -------------------------


@pytest.mark.slow
def test_an_exported_transformer_generates_the_tokens_transformers_generates(tok, tmp_path):
    """A random Transformer exported (backpack_nb.hub.export) and loaded by transformers:
    our greedy tokens equal its generate(do_sample=False), for prompts shorter than the
    block, batch 2, 12 new tokens (transformers' GPT-2 stops at its n_positions)."""
    transformers = pytest.importorskip("transformers")
    from backpack_nb.hub.export import export

    ours = word_model("transformer", tok.vocab_size)
    export(ours, tok, {"model_type": "transformer"}, tmp_path / "gpt")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt").eval()
    prompt = torch.tensor([tok.encode("The Commission has")] * 2)
    with torch.no_grad():
        expected = theirs.generate(prompt, attention_mask=torch.ones_like(prompt),
                                   do_sample=False, max_new_tokens=BLOCK - prompt.shape[1],
                                   min_new_tokens=BLOCK - prompt.shape[1],
                                   pad_token_id=tok.eot_id)
    assert torch.equal(ours.generate(prompt, BLOCK - prompt.shape[1], temperature=0), expected)


@pytest.mark.slow
def test_top_p_keeps_what_transformers_top_p_keeps():
    transformers = pytest.importorskip("transformers")
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(4)) * 3
    for p in (0.1, 0.5, 0.9, 0.99):
        kept = transformers.TopPLogitsWarper(top_p=p)(None, logits.clone()) > float("-inf")
        for row in range(8):
            assert set(kept[row].nonzero().flatten().tolist()) == nucleus_by_definition(logits[row], p)


def test_a_steered_batch_of_prompts_gives_each_row_what_it_gets_alone(tok):
    """The hook sees each row's own tokens (rows of different lengths in groups of equal
    length, never the padding): a greedy steered batch equals each prompt steered alone,
    and steering changes the samples."""
    model = word_model("backpack/network", tok.vocab_size)
    favoured = tok.encode(" Commission")[0]

    def towards(ids: torch.Tensor) -> torch.Tensor:
        assert ids.shape[1] >= 1 and not (ids == 0).all(dim=1).any()
        w = torch.ones(*ids.shape, 2, dtype=torch.float64)
        w[..., 0] += 3.0 * (ids == favoured) + ids.shape[1] / 10  # anneals with the length
        return w

    steer = Intervention(sense_weights=towards)
    kwargs = dict(num_samples=1, max_new_tokens=20, temperature=0, intervention=steer)
    batch = sample_text(model, tok, PROMPTS, **kwargs)
    assert batch == [sample_text(model, tok, start, **kwargs)[0] for start in PROMPTS]
    assert batch != sample_text(model, tok, PROMPTS, num_samples=1, max_new_tokens=20,
                                temperature=0)
