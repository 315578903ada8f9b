"""The K-step look-ahead hypergradient (first order beyond K = 1) against reverse mode through K create_graph
steps (float64)."""

import pytest
import torch
from dwm_testing import clean_sequence, hypergradient_autograd, noisy_sequence
from test_hypergradient import TinyCausalLM
from torch.func import functional_call

from algorithms.dwm.functional import loss_contributions, per_sample_loss_sums
from algorithms.dwm.hypergradient import hypergradient, hypergradient_multistep


def _problem(k_steps, seed=0):
    model = TinyCausalLM(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.stack([clean_sequence(gen, 8) if i % 2 else noisy_sequence(gen, 8) for i in range(4)])
               for _ in range(k_steps)]
    val_ids = torch.stack([clean_sequence(gen, 8) for _ in range(3)])
    params = {k: p.detach() for k, p in model.named_parameters()}

    def contributions(ids):
        def fn(p):
            logits = functional_call(model, p, args=(), kwargs={'input_ids': ids}).logits
            return loss_contributions(*per_sample_loss_sums(logits, ids))
        return fn

    def val_loss_fn(p):
        logits = functional_call(model, p, args=(), kwargs={'input_ids': val_ids}).logits
        loss_sum, count = per_sample_loss_sums(logits, val_ids)
        return loss_sum.sum() / count.sum()

    gen_w = torch.Generator().manual_seed(seed + 1)
    weights = [0.5 + torch.rand(4, generator=gen_w, dtype=torch.float64) for _ in range(k_steps)]
    return params, [contributions(ids) for ids in batches], val_loss_fn, weights


def _cos(a, b):
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def test_one_step_is_the_exact_hypergradient_bit_for_bit():
    params, fns, val_loss_fn, weights = _problem(1)
    multi = hypergradient_multistep(fns, val_loss_fn, params, weights, 0.5)
    one = hypergradient(fns[0], val_loss_fn, params, weights[0], 0.5)
    assert torch.equal(multi.hypergradients[0], one.hypergradient)
    assert multi.val_loss == one.val_loss


@pytest.mark.parametrize('k_steps', [2, 3])
def test_first_order_k_steps_match_reverse_mode_for_small_steps(k_steps):
    """The dropped Hessian terms are O(eta * ||H||): at a small eta the first-order hypergradient agrees with
    reverse mode through the K steps; at a large eta it still points the same way but measurably differs (the test
    can tell the two apart)."""
    params, fns, val_loss_fn, weights = _problem(k_steps)
    small = hypergradient_multistep(fns, val_loss_fn, params, weights, 1e-3).hypergradients
    exact_small = hypergradient_autograd(fns, val_loss_fn, params, weights, 1e-3)
    for h, ref in zip(small, exact_small):
        assert torch.allclose(h, ref, rtol=5e-3, atol=1e-12)
    large = hypergradient_multistep(fns, val_loss_fn, params, weights, 2.0).hypergradients
    exact_large = hypergradient_autograd(fns, val_loss_fn, params, weights, 2.0)
    first = torch.cat(large)
    exact = torch.cat(exact_large)
    assert _cos(first, exact) > 0.5
    assert not torch.allclose(first, exact, rtol=1e-3)


def test_last_step_is_exact_and_k1_is_the_one_step_hypergradient():
    """The last step's hypergradient has no later step to skip: it is exact at any eta. With K = 1 the K-step
    hypergradient is the exact one-step one."""
    params, fns, val_loss_fn, weights = _problem(2)
    first_order = hypergradient_multistep(fns, val_loss_fn, params, weights, 1.0).hypergradients
    exact = hypergradient_autograd(fns, val_loss_fn, params, weights, 1.0)
    assert torch.allclose(first_order[-1], exact[-1], rtol=1e-8, atol=1e-14)
    one = hypergradient_multistep(fns[:1], val_loss_fn, params, weights[:1], 1.0).hypergradients[0]
    assert torch.allclose(one, hypergradient_autograd(fns[0], val_loss_fn, params, weights[0], 1.0), rtol=1e-8,
                          atol=1e-14)


def test_lengths_must_match():
    params, fns, val_loss_fn, weights = _problem(2)
    with pytest.raises(ValueError, match='one weight vector per step'):
        hypergradient_multistep(fns, val_loss_fn, params, weights[:1], 0.5)
