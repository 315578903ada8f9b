"""The two baselines: their weight functions, and that they reweight the loss exactly as DWM's weights do."""

import math

import pytest
import torch
from composer import Trainer

from algorithms.baselines import (LossReweighting, StaticDomainWeighting, batch_domain_weights,
                                  domain_weights_from_alignment, linupper_weights)
from tests.algorithms.dwm_testing import composer_llama, loader


def test_linupper_weights_mean_one_monotone_and_bounded():
    losses = torch.tensor([3.0, 1.0, 2.0, 5.0, 4.0, 4.5])
    w = linupper_weights(losses)
    assert w.mean().item() == pytest.approx(1.0) and (w > 0).all()
    order = torch.argsort(losses)
    assert (w[order][1:] >= w[order][:-1] - 1e-7).all()  # non-decreasing in the loss
    assert w.max() / w.min() <= math.e + 1e-5  # r = 1: at most e between weights
    # Flat above the batch's mid-range loss (3.0 here): the upper half is not boosted further.
    upper = losses >= 3.0
    assert torch.allclose(w[upper], w[upper][0].expand(int(upper.sum())))
    # Sharper with a smaller r; uniform when every loss is equal.
    assert linupper_weights(losses, r=0.25).max() > w.max()
    assert torch.equal(linupper_weights(torch.full((4,), 2.0)), torch.ones(4))


def test_domain_weights_from_alignment():
    shares = {'good': 0.5, 'bad': 0.3, 'ok': 0.2}
    w = domain_weights_from_alignment({'good': 2.0, 'bad': -1.0, 'ok': 1.0}, shares, mix_uniform=0.1)
    assert sum(shares[d] * w[d] for d in w) == pytest.approx(1.0)
    assert w['bad'] == pytest.approx(0.1) and w['good'] > w['ok'] > w['bad']
    assert domain_weights_from_alignment({'a': -1.0, 'b': -2.0}, {'a': 1, 'b': 1}) == {'a': 1.0, 'b': 1.0}
    with pytest.raises(ValueError, match='no training share'):
        domain_weights_from_alignment({'a': 1.0}, {})


def test_batch_domain_weights_mean_one():
    w = batch_domain_weights(torch.tensor([0, 1, 1, 2]), [2.0, 0.5, 1.0])
    assert w.mean().item() == pytest.approx(1.0)
    assert w[0] / w[1] == pytest.approx(4.0)
    with pytest.raises(ValueError, match='domain id 3'):
        batch_domain_weights(torch.tensor([3]), [1.0, 1.0])


def _train(algorithms, steps=3):
    model = composer_llama(seed=0)
    trainer = Trainer(model=model, train_dataloader=loader(64, 8), max_duration=f'{steps}ba', algorithms=algorithms,
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.1), device='cpu', seed=0,
                      progress_bar=False, log_to_console=False)
    trainer.fit()
    return [p.detach().clone() for p in model.parameters()], trainer


@pytest.mark.parametrize('algorithm', [
    lambda: StaticDomainWeighting([1.0, 1.0]),                 # equal domain weights
    lambda: LossReweighting(warmup='10ba'),                    # still in its uniform warm-up
])
def test_neutral_weights_train_exactly_like_plain(algorithm):
    plain, _ = _train([])
    weighted, _ = _train([algorithm()])
    for a, b in zip(plain, weighted):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_static_domain_weighting_downweights_a_domain_and_changes_training():
    plain, _ = _train([])
    weighted, trainer = _train([StaticDomainWeighting({'clean': 1.0, 'noisy': 0.1}, domain_names=['clean', 'noisy'])])
    batch = trainer.state.batch
    w = batch['dwm_weight']
    assert w.mean().item() == pytest.approx(1.0)
    assert (w[batch['domain'] == 1] < w[batch['domain'] == 0].min()).all()
    assert any(not torch.allclose(a, b) for a, b in zip(plain, weighted))


def test_loss_reweighting_weights_follow_the_batch_losses():
    _, trainer = _train([LossReweighting(warmup='0ba')])
    batch = trainer.state.batch
    w = batch['dwm_weight']
    assert w.shape == (8,) and w.mean().item() == pytest.approx(1.0, rel=1e-5)
    # Noisy (random-token) samples have the higher loss, so at least the same weight as clean ones on average.
    assert w[batch['domain'] == 1].mean() >= w[batch['domain'] == 0].mean()
