"""Unit tests of the models: the paper's equations in float64 against direct references,
causality, the chunked loss, parameter counts, initial loss, configs, and the public API."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from backpack_nb.errors import UserError
from backpack_nb.models import (
    GPT,
    BackpackLM,
    ConfigError,
    ModelConfig,
    build_model,
    linear_cross_entropy,
)
from backpack_nb.models.__main__ import main as models_cli
from backpack_nb.paramfile import read_params_file

SOURCES = ["network", "table"]


def tiny_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=12, n_senses=3)
    return ModelConfig(**{**values, **overrides})


def tiny_model(kind: str, dtype=torch.float64, seed: int = 0, **overrides):
    """kind: "transformer" or "backpack/<sense_source>"; eval mode, given dtype."""
    torch.manual_seed(seed)
    if kind == "transformer":
        model = GPT(tiny_config(**overrides))
    else:
        model = BackpackLM(tiny_config(sense_source=kind.split("/")[1], **overrides))
    return model.to(dtype).eval()


ALL_KINDS = ["transformer", "backpack/network", "backpack/table"]


# -- the paper's equations, float64 --------------------------------------------------------


def reference_contextualization(model: BackpackLM, idx: torch.Tensor) -> torch.Tensor:
    """alpha_l[i, j] = softmax_{j <= i}(q_l,i . k_l,j / sqrt(d/k)), written with loops."""
    B, T = idx.shape
    k, d = model.config.n_senses, model.config.n_embd
    h = model.transformer(model.wte(idx))  # (B, T, d): the contextualization network
    qk = h @ model.alpha_qk.weight.T + model.alpha_qk.bias  # (B, T, 2d)
    q, key = qk[..., :d], qk[..., d:]
    alpha = torch.zeros(B, k, T, T, dtype=h.dtype)
    for b in range(B):
        for l in range(k):
            heads = slice(l * d // k, (l + 1) * d // k)
            for i in range(T):
                scores = torch.stack(
                    [q[b, i, heads] @ key[b, j, heads] / math.sqrt(d / k) for j in range(i + 1)]
                )
                alpha[b, l, i, : i + 1] = torch.exp(scores) / torch.exp(scores).sum()
    return alpha


def reference_sense_network(model: BackpackLM, idx: torch.Tensor) -> torch.Tensor:
    """r1 = e + LN_0(e); r2 = r1 + FF_1(LN_1(r1)); C = FF_2(LN_2(r2)), from the raw weights."""
    net = model.sense_network
    k, d = model.config.n_senses, model.config.n_embd

    def layer_norm(x, ln):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        y = (x - mean) / torch.sqrt(var + 1e-5) * ln.weight
        return y if ln.bias is None else y + ln.bias

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    def linear(x, lin):
        return x @ lin.weight.T + (0 if lin.bias is None else lin.bias)

    def ff(x, mlp):
        return linear(gelu_tanh(linear(x, mlp.c_fc)), mlp.c_proj)

    e = model.wte.weight[idx]  # (B, T, d), no positions
    r1 = e + layer_norm(e, net.ln_0)
    r2 = r1 + ff(layer_norm(r1, net.ln_1), net.ff_1)
    C = ff(layer_norm(r2, net.ln_2), net.ff_2)  # (B, T, k*d)
    return C.view(*idx.shape, k, d)


@pytest.mark.parametrize("source", SOURCES)
def test_backpack_logits_are_E_times_sum_of_weighted_senses(source):
    model = tiny_model(f"backpack/{source}", bias=True)
    idx = torch.randint(0, 37, (2, 9))
    idx[1, 4:] = idx[1, 0]  # repeated tokens exercise the unique-then-gather path
    logits, _ = model(idx, all_logits=True)  # (B, T, V)
    C = model.sense_vectors(idx)  # (B, T, k, d)
    alpha = model.contextualization(idx)  # (B, k, T, T)
    B, T, k, d = C.shape
    o = torch.zeros(B, T, d, dtype=torch.float64)
    for i in range(T):
        for j in range(i + 1):
            for l in range(k):
                o[:, i] += alpha[:, l, i, j, None] * C[:, j, l]
    expected = o @ model.wte.weight.T  # the same E that embeds the input
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(alpha, reference_contextualization(model, idx), rtol=0, atol=1e-10)


def test_sense_network_matches_the_equations():
    model = tiny_model("backpack/network", bias=True)
    with torch.no_grad():  # give LayerNorms and biases non-trivial values
        for name, p in model.sense_network.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    idx = torch.tensor([[3, 5, 3, 0, 36], [5, 5, 1, 2, 3]])
    torch.testing.assert_close(
        model.sense_vectors(idx), reference_sense_network(model, idx), rtol=0, atol=1e-10
    )
    # senses depend on the token only: both occurrences of token 3 and of 5 agree
    C = model.sense_vectors(idx)
    torch.testing.assert_close(C[0, 0], C[0, 2], rtol=0, atol=0)
    torch.testing.assert_close(C[0, 1], C[1, 1], rtol=0, atol=0)


def test_sense_vectors_contextualization_and_sense_logits_shapes():
    model = tiny_model("backpack/network")
    idx = torch.randint(0, 37, (3, 10))
    C = model.sense_vectors(idx)
    assert C.shape == (3, 10, 3, 12)
    alpha = model.contextualization(idx)
    assert alpha.shape == (3, 3, 10, 10)
    assert (alpha >= 0).all()
    assert (alpha.triu(1) == 0).all()
    torch.testing.assert_close(alpha.sum(-1), torch.ones(3, 3, 10, dtype=torch.float64))
    ids = torch.tensor([4, 7])
    sense_logits = model.sense_logits(ids)
    assert sense_logits.shape == (2, 3, 37)
    senses_of_ids = model.sense_vectors(ids[None])[0]  # (n, k, d)
    torch.testing.assert_close(sense_logits, senses_of_ids @ model.wte.weight.T)


# -- causality -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_changing_the_future_leaves_past_logits_unchanged(kind):
    model = tiny_model(kind)
    idx = torch.randint(0, 37, (2, 12))
    t = 6
    changed = idx.clone()
    changed[:, t + 1 :] = (idx[:, t + 1 :] + 1 + torch.randint(0, 30, (2, 5))) % 37
    before, _ = model(idx, all_logits=True)
    after, _ = model(changed, all_logits=True)
    torch.testing.assert_close(before[:, : t + 1], after[:, : t + 1], rtol=0, atol=1e-12)
    assert not torch.allclose(before[:, t + 1 :], after[:, t + 1 :])


@pytest.mark.parametrize("mixing", ["einsum", "sdpa"])
def test_every_mixing_kernel_is_causal(mixing):
    """The same check for each way of computing the Backpack's sum, the change at two
    positions."""
    model = tiny_model("backpack/network")
    model.mixing = mixing
    idx = torch.randint(0, 37, (2, 12))
    before, _ = model(idx, all_logits=True)
    for t in (3, 5):
        changed = idx.clone()
        changed[:, t + 1:] = (idx[:, t + 1:] + 1) % 37
        after, _ = model(changed, all_logits=True)
        torch.testing.assert_close(before[:, : t + 1], after[:, : t + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(before[:, t + 1:], after[:, t + 1:])


# -- chunked linear cross-entropy ----------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_chunked_loss_equals_full_cross_entropy_with_gradients(kind):
    model = tiny_model(kind, bias=True)
    idx = torch.randint(0, 37, (2, 13))  # B*T = 26 rows
    targets = torch.randint(0, 37, (2, 13))
    targets[0, :3] = -1
    targets[1, 7] = -1

    def loss_and_grads(**kwargs):
        model.zero_grad()
        logits, loss = model(idx, targets, ignore_index=-1, **kwargs)
        loss.backward()
        return logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    full_logits, full_loss, full_grads = loss_and_grads(chunked_loss=False)
    assert full_logits.shape == (2, 13, 37)
    for chunk_rows in (7, 1024):  # 7 does not divide 26
        logits, loss, grads = loss_and_grads(loss_chunk_rows=chunk_rows)
        assert logits is None
        torch.testing.assert_close(loss, full_loss, rtol=0, atol=1e-9)
        assert grads.keys() == full_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], full_grads[name], rtol=0, atol=1e-9, msg=name)


def test_linear_cross_entropy_function_against_F_cross_entropy():
    torch.manual_seed(1)
    h = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    W = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 1] = -100
    loss = linear_cross_entropy(h, W, targets, chunk_rows=3)
    gh, gW = torch.autograd.grad(2.5 * loss, (h, W))
    ref = F.cross_entropy((h @ W.T).view(-1, 11), targets.view(-1))
    rh, rW = torch.autograd.grad(2.5 * ref, (h, W))
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(gh, rh, rtol=0, atol=1e-12)
    torch.testing.assert_close(gW, rW, rtol=0, atol=1e-12)


# -- parameter counts ----------------------------------------------------------------------

SEED = dict(block_size=512, n_layer=6, n_head=6, n_embd=384, n_senses=16, bias=False)


def closed_form_counts(V: int, d=384, L=6, T=512, k=16) -> dict[str, int]:
    """bias=False everywhere except the Backpack's d -> 2d contextualization projection,
    which has its bias as in the paper; LayerNorms have weights only."""
    transformer = V * d + T * d + L * (12 * d * d + 2 * d) + d  # E, positions, blocks, ln_f
    alpha_qk = d * 2 * d + 2 * d
    sense_network = 3 * d + (d * 4 * d + 4 * d * d) + (d * 4 * d + 4 * d * k * d)
    return {
        "transformer": transformer,
        "backpack/network": transformer + alpha_qk + sense_network,
        "backpack/table": transformer + alpha_qk + V * k * d,
    }


def seed_counts(V: int) -> dict[str, int]:
    counts = {}
    with torch.device("meta"):
        counts["transformer"] = GPT(ModelConfig(vocab_size=V, **SEED)).num_parameters(False)
        for source in SOURCES:
            config = ModelConfig(vocab_size=V, sense_source=source, **SEED)
            counts[f"backpack/{source}"] = BackpackLM(config).num_parameters(by_part=False)
    return counts


@pytest.mark.parametrize("V", [50_257, 100_277, 200_019])
def test_parameter_counts_at_the_seed_configuration(V):
    assert seed_counts(V) == closed_form_counts(V)


def test_parameter_counts_match_the_design_table():
    millions = {
        V: {kind: round(n / 1e6, 1) for kind, n in seed_counts(V).items()}
        for V in (50_257, 200_019)
    }
    assert millions[50_257] == {
        "transformer": 30.1, "backpack/network": 41.6, "backpack/table": 339.2
    }
    assert millions[200_019] == {
        "transformer": 87.6, "backpack/network": 99.1, "backpack/table": 1316.8
    }
    cl100k = seed_counts(100_277)  # the design table gives ~49M / ~60M / ~665M
    assert abs(cl100k["transformer"] / 1e6 - 49) < 1
    assert abs(cl100k["backpack/network"] / 1e6 - 60) < 1
    assert abs(cl100k["backpack/table"] / 1e6 - 665) < 1


def test_parameter_parts_sum_to_total_and_tied_head_counted_once():
    for kind in ALL_KINDS:
        model = tiny_model(kind)
        parts = model.num_parameters()
        assert "other" not in parts
        assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
        assert parts["total"] == sum(p.numel() for p in model.parameters())
        assert parts["embedding"] == 37 * 12
        groups = model.param_groups(weight_decay=0.1)
        assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
        assert sum(p.numel() for g in groups for p in g["params"]) == parts["total"]
        assert all(p.dim() >= 2 for p in groups[0]["params"])
        assert all(p.dim() < 2 for p in groups[1]["params"])
        assert any(p is model.wte.weight for p in groups[0]["params"])


# -- initialisation ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_fresh_model_loss_is_close_to_ln_V(kind):
    V = 4096
    torch.manual_seed(0)
    config = dict(vocab_size=V, block_size=64, n_layer=4, n_head=4, n_embd=256, n_senses=16)
    if kind == "transformer":
        model = GPT(ModelConfig(**config))
    else:
        model = BackpackLM(ModelConfig(**config, sense_source=kind.split("/")[1]))
    idx = torch.randint(0, V, (4, 64))
    with torch.no_grad():
        _, loss = model(idx, torch.randint(0, V, (4, 64)))
    assert abs(loss.item() - math.log(V)) < 0.1


# -- configs -------------------------------------------------------------------------------


def read_params(name: str) -> dict:
    return read_params_file(name)  # a preset's values, its base: resolved


def test_seed_configs_load_and_differ_only_in_model_type_and_senses():
    backpack = read_params("train_europarl_scratch")
    transformer = read_params("train_europarl_transformer_baseline")
    identity = {"run_name", "out_dir"}
    differing = {
        key for key in (backpack.keys() | transformer.keys()) - identity
        if backpack.get(key) != transformer.get(key)
    }
    assert differing == {"model_type", "n_senses"}
    assert transformer["n_senses"] == 1  # the seed's value; the Transformer ignores it
    for params in (backpack, transformer):
        config = ModelConfig.from_params(params, vocab_size=100_277)
        with torch.device("meta"):
            model = build_model(params["model_type"], config)
        assert isinstance(model, BackpackLM if params["model_type"] == "backpack" else GPT)
        assert ModelConfig.from_dict(config.to_dict()) == config


def test_bad_config_lists_every_problem_in_one_error():
    params = {
        "model_type": "backpack", "n_embd": 100, "n_head": 3, "n_senses": 0,
        "sense_source": "bag", "dropout": 1.5, "bias": "no", "batch_size": 3,
    }
    with pytest.raises(ConfigError) as caught:
        ModelConfig.from_params(params, vocab_size=0)
    message = str(caught.value)
    assert isinstance(caught.value, UserError)
    for word in ["vocab_size", "n_head", "n_senses", "sense_source", "dropout", "bias"]:
        assert word in message, word
    assert "6 problems" in message


def test_senses_must_divide_width_only_for_the_backpack():
    params = {"model_type": "backpack", "n_embd": 12, "n_head": 2, "n_senses": 5}
    with pytest.raises(ConfigError, match="n_senses"):
        ModelConfig.from_params(params, vocab_size=10)
    config = ModelConfig.from_params({**params, "model_type": "transformer"}, vocab_size=10)
    GPT(config)  # the Transformer ignores n_senses
    with pytest.raises(ConfigError, match="divisible by n_senses"):
        BackpackLM(config)
    with pytest.raises(ConfigError, match="n_head"):
        ModelConfig(vocab_size=10, n_embd=12, n_head=5)
    with pytest.raises(UserError, match="model_type"):
        build_model("rnn", config)
    with pytest.raises(ConfigError, match="unknown key"):
        ModelConfig.from_dict({**config.to_dict(), "n_experts": 4})


def test_cli_prints_parts_and_rejects_unknown_config(capsys):
    models_cli(["--config", "train_europarl_scratch", "--vocab-size", "50257"])
    out = capsys.readouterr().out
    for text in ["sense_network", "sense_table", "41,620,608", "30,117,120", "339,191,808"]:
        assert text in out
    with pytest.raises(SystemExit) as caught:
        models_cli(["--config", "no_such_config", "--vocab-size", "50257"])
    assert caught.value.code == 2
    assert "no_such_config" in capsys.readouterr().err


# -- generation, mixed precision, compile --------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.slow
def test_generate_shape_and_token_range(kind):
    model = tiny_model(kind, dtype=torch.float32)
    idx = torch.randint(0, 37, (2, 5))
    out = model.generate(idx, max_new_tokens=14, temperature=0.8, top_k=5)  # past block_size
    assert out.shape == (2, 19)
    assert torch.equal(out[:, :5], idx)
    assert ((0 <= out) & (out < 37)).all()
    greedy = model.generate(idx, max_new_tokens=3, temperature=0)
    assert torch.equal(greedy, model.generate(idx, max_new_tokens=3, temperature=0))
    logits, loss = model(idx)
    assert logits.shape == (2, 1, 37) and loss is None


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_bfloat16_autocast_training_step(kind):
    model = tiny_model(kind, dtype=torch.float32).train()
    idx = torch.randint(0, 37, (2, 16))
    targets = torch.randint(0, 37, (2, 16))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        _, loss = model(idx, targets, loss_chunk_rows=10)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
    assert abs(loss.item() - math.log(37)) < 0.5


@pytest.mark.slow
def test_compiled_backpack_trains_and_keeps_state_dict_keys():
    model = tiny_model("backpack/network", dtype=torch.float32, n_layer=1).train()
    compiled = torch.compile(model)
    idx = torch.randint(0, 37, (2, 16))
    targets = torch.randint(0, 37, (2, 16))
    _, loss = compiled(idx, targets, loss_chunk_rows=16)  # two chunks, unrolled
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    stripped = {k.removeprefix("_orig_mod.") for k in compiled.state_dict()}
    assert stripped == set(model.state_dict())


# --- scale_attn_by_inverse_layer_idx (the released Backpack's GPT-2 option) ----------------


def _direct_transformer(t, x: torch.Tensor, n_head: int, inverse_layer: bool) -> torch.Tensor:
    """The causal Transformer written out with an explicit softmax: scores of layer l are
    q.k / sqrt(head size) / (l + 1) when ``inverse_layer``."""
    B, T, C = x.shape
    x = x + t.wpe(torch.arange(T))
    for layer, block in enumerate(t.h):
        q, k, v = block.attn.c_attn(block.ln_1(x)).split(C, dim=2)
        q, k, v = (z.view(B, T, n_head, C // n_head).transpose(1, 2) for z in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(C // n_head)
        if inverse_layer:
            scores = scores / (layer + 1)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + block.attn.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))
        x = x + block.mlp(block.ln_2(x))
    return t.ln_f(x)


@pytest.mark.parametrize("kind", ["transformer", "backpack"])
def test_scale_attn_by_inverse_layer_idx_float64(kind):
    config = tiny_config(n_layer=3, bias=True, dropout=0.0, scale_attn_by_inverse_layer_idx=True)
    torch.manual_seed(0)
    model = build_model(kind, config).double().eval()
    idx = torch.randint(0, config.vocab_size, (2, config.block_size))
    emb = model.wte(idx)
    with torch.no_grad():
        got = model.transformer(emb)
        want = _direct_transformer(model.transformer, emb, config.n_head, inverse_layer=True)
        plain = _direct_transformer(model.transformer, emb, config.n_head, inverse_layer=False)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
    assert (got - plain).abs().max() > 1e-5  # layers 1 and 2 really are rescaled (1e-12 above)
    # without the option the same weights give the plain scores
    model_plain = build_model(kind, tiny_config(n_layer=3, bias=True, dropout=0.0)).double().eval()
    model_plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(model_plain.transformer(emb), plain, atol=1e-12, rtol=0)
