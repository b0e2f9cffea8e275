"""Every performance lever computes the same thing as the plain path: logits, loss and
gradients in float64 (senses once per distinct token, the two mixing kernels, the chunked
loss with gradients in forward, activation checkpointing), and the sparse table updates
match dense ones where they should (gradients, clipping, the first Adam step)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from backpack_nb import optim
from backpack_nb.models import ModelConfig, build_model, linear_cross_entropy
from backpack_nb.models.loss import chunk_loss_and_grad
from backpack_nb.models.mixing import Senses, distinct_tokens, weighted_sum_of_senses

V = 41


def tiny(kind: str = "backpack", seed: int = 0, **overrides):
    values = dict(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=12, n_senses=3)
    torch.manual_seed(seed)
    return build_model(kind, ModelConfig(**{**values, **overrides})).double()


def batch(B: int = 2, T: int = 32, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    # a small id range so that tokens repeat within the batch (what deduplication exploits)
    return (torch.randint(0, 9, (B, T), generator=gen),
            torch.randint(0, V, (B, T), generator=gen))


def loss_and_grads(model, idx, targets, **kwargs):
    model.zero_grad(set_to_none=True)
    logits, loss = model(idx, targets, all_logits=True, **kwargs)
    loss.backward()
    grads = {n: p.grad.to_dense() if p.grad.is_sparse else p.grad.clone()
             for n, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


def assert_same(a, b, atol=1e-12):
    (la, lossa, ga), (lb, lossb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=0, atol=atol)
    torch.testing.assert_close(lossa, lossb, rtol=0, atol=atol)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=0, atol=atol, msg=name)


# -- senses once per distinct token ----------------------------------------------------


@pytest.mark.parametrize("mixing", ["einsum", "sdpa"])
@pytest.mark.parametrize("source", ["network", "table"])
def test_deduplicated_senses_equal_per_position_senses(source, mixing):
    model = tiny(sense_source=source).eval()
    model.mixing = mixing
    idx, targets = batch()
    assert len(torch.unique(idx)) < idx.numel()  # there is something to deduplicate
    model.dedup_senses = False
    plain = loss_and_grads(model, idx, targets)
    model.dedup_senses = True
    assert_same(loss_and_grads(model, idx, targets), plain)


# -- the mixing kernels ----------------------------------------------------------------


def test_mixing_kernels_equal_the_einsum_reference():
    model = tiny().eval()
    idx, targets = batch()
    model.mixing = "einsum"
    plain = loss_and_grads(model, idx, targets)
    model.mixing = "sdpa"
    assert_same(loss_and_grads(model, idx, targets), plain)


@pytest.mark.parametrize("mixing", ["sdpa", "einsum"])
@pytest.mark.parametrize("by_type", [True, False], ids=["senses-by-type", "senses-by-position"])
def test_the_one_mixing_call_equals_a_direct_sum_for_every_kernel(mixing, by_type):
    torch.manual_seed(0)
    B, k, T, d, U = 2, 3, 16, 6, 5
    q = torch.randn(B, k, T, d // k, dtype=torch.float64, requires_grad=True)
    key = torch.randn(B, k, T, d // k, dtype=torch.float64, requires_grad=True)
    if by_type:  # U distinct tokens, each position pointing at its token's row
        per_type = torch.randn(U, k * d, dtype=torch.float64, requires_grad=True)
        where = torch.randint(0, U, (B, T))
        C = per_type[where].view(B, T, k, d)
    else:
        per_type = torch.randn(B * T, k * d, dtype=torch.float64, requires_grad=True)
        where = None
        C = per_type.view(B, T, k, d)
    grad_o = torch.randn(B, T, d, dtype=torch.float64)

    # o_i = sum_l sum_{j <= i} alpha_l[i, j] C(x_j)_l with alpha's softmax written out
    scores = torch.exp(q @ key.transpose(-1, -2) / math.sqrt(d / k))  # (B, k, T, T)
    scores = scores * torch.ones(T, T, dtype=torch.float64).tril()
    alpha = scores / scores.sum(-1, keepdim=True)
    ref = sum(alpha[:, l] @ C[:, :, l] for l in range(k))  # (B, T, d)
    ref_grads = torch.autograd.grad(ref, (q, key, per_type), grad_o)

    out = weighted_sum_of_senses(q, key, Senses(per_type, where, (B, T, k, d)), mixing)
    grads = torch.autograd.grad(out, (q, key, per_type), grad_o)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)


def test_an_unknown_mixing_kernel_is_refused_by_name():
    model = tiny()
    model.mixing = "blocked"  # a kernel this code once had
    with pytest.raises(ValueError, match="unknown mixing 'blocked': use one of sdpa, einsum"):
        model(*batch())


@pytest.mark.parametrize("mixing", ["sdpa", "einsum"])
def test_mixing_under_bfloat16_autocast_gives_float32_gradients(mixing):
    model = tiny().float().train()
    model.mixing = mixing
    idx, targets = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, targets)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def test_distinct_tokens_pad_to_a_few_sizes_by_repeating_the_last_id():
    idx = torch.randint(0, 5000, (4, 256), generator=torch.Generator().manual_seed(0))
    exact, where = torch.unique(idx, return_inverse=True)
    types, where_b = distinct_tokens(idx)
    n = len(exact)  # about 950 distinct: steps of 64
    assert len(types) % 64 == 0 and n <= len(types) < n + 64
    assert torch.equal(types[:n], exact) and (types[n:] == exact[-1]).all()
    assert torch.equal(where_b, where) and torch.equal(types[where_b], idx)
    small = torch.tensor([[3, 1, 3]])
    assert distinct_tokens(small)[0].tolist() == [1, 3] + [3] * 62
    assert distinct_tokens(small, bucket=False)[0].tolist() == [1, 3]


@pytest.mark.parametrize("source", ["network", "table", "sparse table"])
def test_distinct_tokens_found_ahead_give_the_same_loss_and_gradients(source):
    model = tiny(sense_source=source.split()[-1]).eval()
    if source == "sparse table":  # the padding must add no row to the sparse gradient
        optim.set_sparse_table(model)
    idx, targets = batch()
    plain = loss_and_grads(model, idx, targets)
    if source == "sparse table":
        model.zero_grad(set_to_none=True)
        model(idx, targets, distinct=distinct_tokens(idx))[1].backward()
        rows = model.sense_table.weight.grad.coalesce().indices()
        assert torch.equal(rows[0], torch.unique(idx))
    ahead = loss_and_grads(model, idx, targets, distinct=distinct_tokens(idx))  # padded
    assert_same(ahead, plain)


# -- the chunked loss: gradients computed in forward -----------------------------------


def test_chunked_loss_without_grad_computes_no_gradients_and_the_same_value():
    torch.manual_seed(0)
    h = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    W = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (10,))
    with torch.no_grad():
        value = linear_cross_entropy(h, W, y, chunk_rows=3)
    assert value.grad_fn is None
    torch.testing.assert_close(value, F.cross_entropy(h.detach() @ W.detach().T, y))


def test_chunked_loss_gradients_for_one_input_only_and_twice_with_retain_graph():
    torch.manual_seed(0)
    h = torch.randn(10, 4, dtype=torch.float64)  # no grad: only W's is computed
    W = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (10,))
    loss = linear_cross_entropy(h, W, y, chunk_rows=4)
    (g1,) = torch.autograd.grad(3.0 * loss, W, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, W)
    (ref,) = torch.autograd.grad(F.cross_entropy(h @ W.T, y), W)
    torch.testing.assert_close(g1, 3.0 * ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(g2, ref, rtol=0, atol=1e-12)


def test_chunked_loss_under_autocast_returns_float32_weight_gradients():
    torch.manual_seed(0)
    h = torch.randn(12, 8, requires_grad=True)
    W = (torch.randn(9, 8) * 0.1).requires_grad_()
    y = torch.randint(0, 9, (12,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, W, y, chunk_rows=5)
    loss.backward()
    assert loss.dtype == torch.float32
    assert W.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    ref = F.cross_entropy(h.detach() @ W.detach().T, y)
    assert abs(loss.item() - ref.item()) < 0.05


@pytest.mark.slow  # compiles
def test_fused_loss_chunks_equal_the_eager_chunks_in_float64():
    # ignored rows and an uneven last chunk (70 = 32 + 32 + 6 rows): two compiled shapes
    torch.manual_seed(0)
    h = torch.randn(70, 16, dtype=torch.float64, requires_grad=True)
    W = torch.randn(53, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 53, (70,))
    y[[3, 40]] = -100
    runs = []
    for fused in (False, True):
        h.grad = W.grad = None
        loss = linear_cross_entropy(h, W, y, chunk_rows=32, fused=fused)
        loss.backward()
        runs.append((loss.detach(), h.grad.clone(), W.grad.clone()))
    for eager, fused in zip(*runs):
        torch.testing.assert_close(fused, eager, rtol=0, atol=1e-13)
    ref = F.cross_entropy(h.detach() @ W.detach().T, y)
    torch.testing.assert_close(runs[1][0], ref, rtol=0, atol=1e-13)
    # the function the compiler fuses runs eagerly too (dynamo may fall back to it)
    logits = (h @ W.T).detach()[:32]
    ok = y[:32] != -100
    row_loss, grad = chunk_loss_and_grad(logits, torch.where(ok, y[:32], 0), ok.double(),
                                         torch.float64, torch.float64)
    ref_rows = F.cross_entropy(logits, y[:32], reduction="none")
    torch.testing.assert_close(row_loss[ok], ref_rows[ok], rtol=0, atol=1e-13)
    assert grad.dtype == torch.float64 and (grad[~ok] == 0).all()


@pytest.mark.slow  # compiles
@pytest.mark.parametrize("kind", ["transformer", "backpack"])
def test_fused_loss_lever_gives_the_models_same_loss_and_gradients(kind):
    model = tiny(kind).eval()
    idx, targets = batch()
    plain = loss_and_grads(model, idx, targets, loss_chunk_rows=32)
    model.fused_loss = True
    assert_same(loss_and_grads(model, idx, targets, loss_chunk_rows=32), plain, atol=1e-12)


# -- activation checkpointing ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["transformer", "backpack"])
def test_activation_checkpointing_gives_the_same_gradients_with_dropout(kind):
    model = tiny(kind, dropout=0.2).train()
    idx, targets = batch()
    torch.manual_seed(5)
    plain = loss_and_grads(model, idx, targets)
    model.set_activation_checkpointing(True)
    torch.manual_seed(5)  # the same dropout masks; the recomputation replays them
    assert_same(loss_and_grads(model, idx, targets), plain)
    assert model.transformer.checkpoint_blocks


# -- sparse updates of a sense table ---------------------------------------------------


def test_sparse_table_gradients_equal_dense_ones_and_clip_the_same():
    model = tiny(sense_source="table").eval()
    idx, targets = batch()
    dense = loss_and_grads(model, idx, targets)
    optim.set_sparse_table(model)
    model.zero_grad(set_to_none=True)
    _, loss = model(idx, targets)
    loss.backward()
    table = model.sense_table.weight
    assert table.grad.is_sparse
    assert table.grad.coalesce()._nnz() == len(torch.unique(idx))  # U rows, not B*T
    torch.testing.assert_close(table.grad.to_dense(), dense[2]["sense_table.weight"],
                               rtol=0, atol=1e-12)
    # clipping: the same norm and the same scaled gradients as torch's on dense ones
    params = list(model.parameters())
    norm = optim.clip_grad_norm_(params, 0.01)
    dense_grads = [dense[2][n].clone() for n, _ in model.named_parameters()]
    ref_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in dense_grads]))
    torch.testing.assert_close(norm.double(), ref_norm, rtol=1e-6, atol=0)
    scale = 0.01 / (ref_norm + 1e-6)
    torch.testing.assert_close(table.grad.to_dense(),
                               dense[2]["sense_table.weight"] * scale, rtol=1e-6, atol=1e-12)


def test_sparse_table_optimizer_first_step_equals_dense_adam_without_decay():
    idx, targets = batch()
    models = []
    for sparse in (False, True):
        model = tiny(sense_source="table").eval()
        # eps enters the two differently (SparseAdam adds it before the bias correction)
        opt = optim.make_optimizer(model, lr=0.01, weight_decay=0.0, eps=1e-30,
                                   sparse_table=sparse)
        _, loss = model(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        models.append(model)
    dense, sparse = (dict(m.named_parameters()) for m in models)
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], rtol=0, atol=1e-12, msg=name)


def test_sparse_table_optimizer_state_dict_round_trip_and_grad_scaler():
    model = tiny(sense_source="table").float()
    opt = optim.make_optimizer(model, lr=1e-3, sparse_table=True)
    assert isinstance(opt, optim.SparseTableAdamW)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters()}
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    idx, targets = batch()
    for _ in range(2):
        _, loss = model(idx, targets)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        optim.clip_grad_norm_(list(model.parameters()), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    state = opt.state_dict()
    assert set(state) == {"dense", "sparse"}
    fresh = optim.make_optimizer(model, lr=1e-3, sparse_table=True)
    fresh.load_state_dict(state)
    table = model.sense_table.weight
    torch.testing.assert_close(fresh.state[table]["exp_avg"], opt.state[table]["exp_avg"])
    with pytest.raises(ValueError, match="sparse-table"):
        fresh.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


def test_sparse_table_needs_a_table_backpack():
    with pytest.raises(ValueError, match="table"):
        optim.make_optimizer(tiny(), lr=1e-3, sparse_table=True)
    assert isinstance(optim.make_optimizer(tiny("transformer"), lr=1e-3), torch.optim.AdamW)
