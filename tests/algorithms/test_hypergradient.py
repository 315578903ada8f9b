"""The exact one-step hypergradient against create_graph autograd and central finite differences (float64)."""

import pytest
import torch
from dwm_testing import clean_sequence, hypergradient_autograd, noisy_sequence, tiny_llama
from torch.func import functional_call

from algorithms.dwm.hypergradient import (adam_preconditioner, directional_derivative_fd, eager_attention, hypergradient,
                                          jvp_attention, lookahead)
from algorithms.dwm.functional import loss_contributions, per_sample_loss_sums

LR = 0.5


class TinyCausalLM(torch.nn.Module):
    """A causal LM that is float64 end to end (HF Llama computes RMSNorm and RoPE in float32, which limits central
    finite differences to ~1e-4): embedding, one causal attention layer, a tanh MLP, an output head."""

    def __init__(self, vocab=128, d=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(0.1 * torch.randn(32, d))
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.Tanh(), torch.nn.Linear(2 * d, d))
        self.head = torch.nn.Linear(d, vocab)
        self.double()

    def forward(self, input_ids):
        x = self.embed(input_ids) + self.pos[:input_ids.shape[1]]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = x + torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.mlp(x)
        return type('Out', (), {'logits': self.head(x)})()


def _problem(seed=0, llama=False):
    if llama:
        model = tiny_llama(hidden=16, layers=1, seed=seed, dtype=torch.float64)
    else:
        model = TinyCausalLM(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    train_ids = torch.stack([clean_sequence(gen, 8) if i % 2 else noisy_sequence(gen, 8) for i in range(4)])
    val_ids = torch.stack([clean_sequence(gen, 8) for _ in range(3)])
    val_labels = val_ids.clone()
    val_labels[:, :4] = -100
    params = {k: p.detach() for k, p in model.named_parameters()}

    def contributions_fn(p):
        logits = functional_call(model, p, args=(), kwargs={'input_ids': train_ids}).logits
        return loss_contributions(*per_sample_loss_sums(logits, train_ids))

    def val_loss_fn(p):
        logits = functional_call(model, p, args=(), kwargs={'input_ids': val_ids}).logits
        loss_sum, count = per_sample_loss_sums(logits, val_labels)
        return loss_sum.sum() / count.sum()

    weights = torch.tensor([0.5, 1.5, 1.2, 0.8], dtype=torch.float64)
    return model, params, contributions_fn, val_loss_fn, weights


def _adam_precond(model, contributions_fn):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-8)
    for _ in range(2):
        opt.zero_grad()
        contributions_fn(dict(model.named_parameters())).sum().backward()
        opt.step()
    precond = adam_preconditioner(opt, dict(model.named_parameters()))
    return precond


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _fd_in_w(params, contributions_fn, val_loss_fn, weights, precond, h=1e-5):
    out = torch.zeros_like(weights)
    for i in range(weights.numel()):
        e = torch.zeros_like(weights)
        e[i] = h
        plus = val_loss_fn(lookahead(contributions_fn, params, weights + e, LR, precond))
        minus = val_loss_fn(lookahead(contributions_fn, params, weights - e, LR, precond))
        out[i] = (plus - minus) / (2 * h)
    return out


@pytest.mark.parametrize('look', ['sgd', 'adam'])
def test_jvp_matches_create_graph_and_finite_differences(look):
    model, params, contributions_fn, val_loss_fn, weights = _problem()
    precond = _adam_precond(model, contributions_fn) if look == 'adam' else None
    if look == 'adam':
        assert precond is not None and not all(torch.all(p == 1) for p in precond.values())
        params = {k: p.detach() for k, p in model.named_parameters()}
    exact = hypergradient(contributions_fn, val_loss_fn, params, weights, LR, precond, method='jvp').hypergradient
    reference = hypergradient_autograd(contributions_fn, val_loss_fn, params, weights, LR, precond)
    fd_w = _fd_in_w(params, contributions_fn, val_loss_fn, weights, precond)
    fd_dir = hypergradient(contributions_fn, val_loss_fn, params, weights, LR, precond, method='fd',
                           fd_eps=1e-4).hypergradient
    assert reference.abs().max() > 1e-4  # a non-trivial problem
    assert _rel(exact, reference) <= 1e-6
    assert _rel(exact, fd_w) <= 1e-6  # oracle (b): central differences in each w_i
    # The 'fd' method (one central difference along u = P * grad L_val) is itself an approximation: O(h^2)
    # truncation against roundoff; ~1e-6 here at its best step.
    assert _rel(fd_dir, reference) <= 1e-5


@pytest.mark.parametrize('look', ['sgd', 'adam'])
def test_jvp_matches_create_graph_on_llama(look):
    """The same on a HF Llama (eager attention) run through ``functional_call``, as DWM uses it."""
    model, params, contributions_fn, val_loss_fn, weights = _problem(llama=True)
    precond = _adam_precond(model, contributions_fn) if look == 'adam' else None
    params = {k: p.detach() for k, p in model.named_parameters()}
    exact = hypergradient(contributions_fn, val_loss_fn, params, weights, LR, precond, method='jvp').hypergradient
    reference = hypergradient_autograd(contributions_fn, val_loss_fn, params, weights, LR, precond)
    assert reference.abs().max() > 1e-5
    assert _rel(exact, reference) <= 1e-6


def test_adam_preconditioner_formula():
    model, params, contributions_fn, _, _ = _problem()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-6)
    assert adam_preconditioner(opt, dict(model.named_parameters())) is None  # no state yet: SGD look-ahead
    for _ in range(3):
        opt.zero_grad()
        contributions_fn(dict(model.named_parameters())).sum().backward()
        opt.step()
    precond = adam_preconditioner(opt, dict(model.named_parameters()))
    name, p = next(iter(model.named_parameters()))
    st = opt.state[p]
    expected = 1 / ((st['exp_avg_sq'] / (1 - 0.95**3)).sqrt() + 1e-6)
    torch.testing.assert_close(precond[name], expected)


def test_hypergradient_sign_prefers_helpful_samples():
    """Upweighting a copy of the validation data lowers the look-ahead validation loss: negative hypergradient."""
    model = tiny_llama(hidden=16, layers=1, seed=1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    val_ids = torch.stack([clean_sequence(gen, 8) for _ in range(2)])
    train_ids = torch.cat([val_ids, torch.stack([noisy_sequence(gen, 8) for _ in range(2)])])
    params = {k: p.detach() for k, p in model.named_parameters()}

    def contributions_fn(p):
        return loss_contributions(*per_sample_loss_sums(
            functional_call(model, p, args=(), kwargs={'input_ids': train_ids}).logits, train_ids))

    def val_loss_fn(p):
        loss_sum, count = per_sample_loss_sums(
            functional_call(model, p, args=(), kwargs={'input_ids': val_ids}).logits, val_ids)
        return loss_sum.sum() / count.sum()

    hyper = hypergradient(contributions_fn, val_loss_fn, params, torch.ones(4, dtype=torch.float64),
                          LR).hypergradient
    assert hyper[:2].max() < hyper[2:].min()


def test_lookahead_does_not_touch_model_grads():
    model, params, contributions_fn, val_loss_fn, weights = _problem()
    hypergradient(contributions_fn, val_loss_fn, params, weights, LR)
    assert all(p.grad is None for p in model.parameters())


def test_fd_zero_direction():
    _, params, contributions_fn, _, _ = _problem()
    zero = {k: torch.zeros_like(v) for k, v in params.items()}
    assert torch.equal(directional_derivative_fd(contributions_fn, params, zero), torch.zeros(4, dtype=torch.float64))


def _mixed_batch(gen, padding=()):
    """Four 8-token sequences, noisy and clean in turn, and their mask, padded from ``(row, start)`` on."""
    ids = torch.stack([clean_sequence(gen, 8) if i % 2 else noisy_sequence(gen, 8) for i in range(4)])
    mask = torch.ones_like(ids)
    for row, start in padding:
        mask[row, start:] = 0
    return ids, mask


@pytest.mark.parametrize('padded', [False, True])
def test_jvp_through_sdpa_math_backend(padded):
    """DWM's JVP on an ``sdpa`` Llama keeps SDPA on its math backend (the fused CPU kernel has no forward-mode rule),
    with and without a padding mask; it equals the create_graph reference and the eager-attention JVP."""

    model = tiny_llama(hidden=16, layers=1, seed=3, dtype=torch.float64, attn='sdpa')
    gen = torch.Generator().manual_seed(3)
    train_ids, mask = _mixed_batch(gen, ((1, 5), (3, 6)) if padded else ())
    labels = train_ids.masked_fill(mask == 0, -100)
    val_ids = torch.stack([clean_sequence(gen, 8) for _ in range(3)])
    params = {k: p.detach() for k, p in model.named_parameters()}

    def contributions_fn(p):
        logits = functional_call(model, p, args=(), kwargs={'input_ids': train_ids, 'attention_mask': mask}).logits
        return loss_contributions(*per_sample_loss_sums(logits, labels))

    def val_loss_fn(p):
        logits = functional_call(model, p, args=(), kwargs={'input_ids': val_ids}).logits
        return per_sample_loss_sums(logits, val_ids)[0].sum() / (val_ids.numel() - 3)

    weights = torch.tensor([0.5, 1.5, 1.2, 0.8], dtype=torch.float64)
    with pytest.raises(NotImplementedError):  # the fused kernel: why the context is needed at all
        hypergradient(contributions_fn, val_loss_fn, params, weights, LR)
    exact = hypergradient(contributions_fn, val_loss_fn, params, weights, LR,
                          jvp_context=lambda: jvp_attention(model)).hypergradient
    eager = hypergradient(contributions_fn, val_loss_fn, params, weights, LR,
                          jvp_context=lambda: eager_attention(model)).hypergradient
    with jvp_attention(model):  # double backward through the fused kernel is not implemented either
        reference = hypergradient_autograd(contributions_fn, val_loss_fn, params, weights, LR)
    assert model.config._attn_implementation == 'sdpa'
    assert reference.abs().max() > 1e-5
    assert _rel(exact, reference) <= 1e-6
    assert _rel(exact, eager) <= 1e-6


def test_lookahead_in_place_buffers_with_aliased_gradients():
    """Gradients that autograd returns as expanded views or shared storages are copied before the in-place look-ahead
    step, so each parameter gets its own, correct, theta'."""
    a = torch.tensor([1.0, 2.0], dtype=torch.float64)
    b = torch.tensor([3.0, 4.0], dtype=torch.float64)
    c = torch.tensor(5.0, dtype=torch.float64)

    def contributions_fn(p):
        shared = p['a'] + p['b']  # d/da and d/db may be the same tensor
        return torch.stack([shared.sum(), p['c'].expand(3).sum()])  # d/dc of an expand: a stride-0 view

    weights = torch.tensor([2.0, 1.0], dtype=torch.float64)
    precond = {'a': torch.full((2,), 0.5, dtype=torch.float64), 'b': torch.ones(2, dtype=torch.float64),
               'c': torch.tensor(2.0, dtype=torch.float64)}
    out = lookahead(contributions_fn, {'a': a, 'b': b, 'c': c}, weights, 0.1, precond)
    torch.testing.assert_close(out['a'], a - 0.1 * 0.5 * 2.0)
    torch.testing.assert_close(out['b'], b - 0.1 * 1.0 * 2.0)
    torch.testing.assert_close(out['c'], c - 0.1 * 2.0 * 3.0)
    assert torch.equal(a, torch.tensor([1.0, 2.0], dtype=torch.float64))  # theta itself untouched


# ------------------------------------------------------------------------------------------------ chunked JVP attention
def _jvp_of(model, ids, mask, direction_seed=0, context=jvp_attention):
    """``<grad c_i, u>`` for a random direction ``u``, through DWM's ``jvp_attention`` context (or ``context``)."""
    from algorithms.dwm.hypergradient import directional_derivative_jvp
    params = {k: p.detach() for k, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(direction_seed)
    direction = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}
    labels = ids.masked_fill(mask == 0, -100)

    def contributions_fn(p):
        logits = functional_call(model, p, args=(), kwargs={'input_ids': ids, 'attention_mask': mask}).logits
        return loss_contributions(*per_sample_loss_sums(logits, labels))

    with context(model):
        return directional_derivative_jvp(contributions_fn, params, direction)


@pytest.mark.parametrize('attn', ['sdpa', 'eager'])
@pytest.mark.parametrize('padded', [False, True])
def test_chunked_jvp_attention_equals_unchunked(attn, padded, monkeypatch):
    """The JVP through attention over blocks of query rows (3 rows, uneven: 8 = 3 + 3 + 2) equals the one-block JVP
    (block >= T) and the eager-attention JVP, with and without padding; the model's attention is restored after."""
    from algorithms.dwm import hypergradient as hg
    model = tiny_llama(hidden=16, layers=2, seed=5, dtype=torch.float64, attn=attn)
    ids, mask = _mixed_batch(torch.Generator().manual_seed(5), ((1, 5), (2, 6)) if padded else ())
    monkeypatch.setattr(hg, 'JVP_QUERY_BLOCK', 3)
    chunked = _jvp_of(model, ids, mask)
    monkeypatch.setattr(hg, 'JVP_QUERY_BLOCK', 64)
    whole = _jvp_of(model, ids, mask)
    eager = _jvp_of(model, ids, mask, context=eager_attention)
    assert model.config._attn_implementation == attn
    assert eager.abs().max() > 1e-6
    assert _rel(chunked, whole) <= 1e-10
    assert _rel(chunked, eager) <= 1e-6  # HF's eager softmax runs in float32


def test_chunked_attention_is_what_the_jvp_runs(monkeypatch):
    """Inside ``jvp_attention`` a Llama runs :func:`chunked_attention`, one SDPA call per block of query rows: with
    T = 8 and blocks of 3, three calls per layer, each with at most 3 query rows."""
    from algorithms.dwm import hypergradient as hg
    model = tiny_llama(hidden=16, layers=2, seed=5, dtype=torch.float64, attn='sdpa')
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        calls.append(query.shape[2])
        return real(query, *args, **kwargs)

    monkeypatch.setattr(hg, 'JVP_QUERY_BLOCK', 3)
    monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention', spy)
    gen = torch.Generator().manual_seed(1)
    ids = torch.stack([clean_sequence(gen, 8) for _ in range(2)])
    _jvp_of(model, ids, torch.ones_like(ids))
    assert calls == [3, 3, 2] * 2


def test_jvp_query_block_keeps_the_scores_under_the_lm_head():
    """Blocks of ``V // H`` rows (a multiple of 64): the scores of a block (``B x H x rows x T``) are never larger
    than the logits (``B x T x V``), so a vocabulary of 50k with 16 heads runs T = 2048 in one block."""
    from algorithms.dwm.hypergradient import jvp_query_block
    assert jvp_query_block(50304, 16) == 3136 >= 2048
    assert jvp_query_block(1024, 4) == 256
    assert jvp_query_block(100, 16) == 64  # at least 64 rows
    for vocab, heads in ((50304, 16), (32000, 32), (1024, 4), (151936, 14)):
        assert jvp_query_block(vocab, heads) * heads <= vocab


def test_chunked_attention_default_block_follows_the_model(monkeypatch):
    """Without JVP_QUERY_BLOCK, a Llama with vocab 128 and 4 heads runs the JVP's attention in blocks of 64 rows: a
    sequence of 80 is 2 blocks (64 + 16) per layer."""
    model = tiny_llama(hidden=16, layers=1, seed=5, dtype=torch.float64, attn='sdpa')
    model.config.max_position_embeddings = 128
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        calls.append(query.shape[2])
        return real(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention', spy)
    gen = torch.Generator().manual_seed(2)
    ids = torch.stack([clean_sequence(gen, 80) for _ in range(2)])
    _jvp_of(model, ids, torch.ones_like(ids))
    assert calls == [64, 16]
