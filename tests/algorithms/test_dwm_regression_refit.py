"""``refit_fit='regression'`` (issue 18): the weighter is fit to the pooled trust-region targets of a refit's batches,
and goes much further toward them than the same number of gradient refit steps; the pure pieces behind it."""

import math

import pytest
import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from dwm_testing import ToyCorpus, composer_llama, loader, val_batches
from torch.utils.data import DataLoader

from algorithms.dwm import DWM
from algorithms.dwm.functional import (domain_means, log_weight_regression_loss, refit_objective,
                                       remembered_domain_means, spread_reached, trust_region_target)
from algorithms.dwm.refit import global_weights


def test_trust_region_target_minimises_the_refit_objective():
    h = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    beta = 2.0
    target = trust_region_target(h, beta)
    assert target.mean().item() == pytest.approx(1.0) and (target > 0).all()
    assert int(target.argmax()) == 1 and int(target.argmin()) == 4  # lowest hypergradient, highest weight

    def objective(w):
        return float(refit_objective(h, w, w, beta)[0])

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):  # every other mean-1 weighting nearby does worse
        other = (target * torch.exp(0.1 * torch.randn(5, generator=gen, dtype=torch.float64)))
        other = other / other.mean()
        assert objective(other) > objective(target)
    mixed = trust_region_target(h, beta, mix_uniform=0.1)
    torch.testing.assert_close(mixed, 0.9 * target + 0.1)
    with pytest.raises(ValueError, match='beta must be > 0'):
        trust_region_target(h, 0.0)


def test_regression_loss_and_spread_reached():
    t = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    assert float(log_weight_regression_loss(t * 3.0, t)) == pytest.approx(0.0, abs=1e-12)  # scale-free
    assert float(log_weight_regression_loss(torch.ones(3, dtype=torch.float64), t)) > 0
    assert spread_reached(t, t) == pytest.approx(1.0)
    assert spread_reached(torch.ones(3), t) == pytest.approx(0.0)
    assert spread_reached(1 + 0.5 * (t - 1), t) == pytest.approx(0.5)
    assert math.isnan(spread_reached(t, torch.ones(3)))


def _refit_metrics(refit_fit, memory=None, **kwargs):
    logger = InMemoryLogger()
    model = composer_llama()
    dwm = DWM(stage_boundaries=['3ba'], refit_steps=6, refit_lr=0.02, lookahead_lr=0.5, refit_fit=refit_fit,
              refit_dataloader=DataLoader(ToyCorpus(96, seed=1), batch_size=8, shuffle=False),
              val_dataloader=val_batches(), domain_names=['clean', 'noisy'],
              weighter={'d_model': 16, 'n_heads': 2, 'n_layers': 1}, **kwargs)
    dwm.domain_memory = dict(memory or {})  # as if earlier refits had left these domain means
    trainer = Trainer(model=model, train_dataloader=loader(64, 8, seed=0), max_duration='4ba',
                      optimizers=torch.optim.Adam(model.parameters(), lr=3e-3), algorithms=[dwm], device='cpu',
                      seed=17, loggers=[logger], progress_bar=False, log_to_console=False)
    trainer.fit()
    metrics = {k[len('dwm/refit/'):]: v[-1][1] for k, v in logger.data.items() if k.startswith('dwm/refit/')}
    # the refit weighter on samples it never saw: its mean weight by domain (0 clean, 1 noisy) and the spread within
    held_out = next(iter(DataLoader(ToyCorpus(64, seed=99), batch_size=64)))
    with torch.no_grad():
        weights, _, _ = global_weights(dwm.weighter, held_out, use_prior_weight=False)
    by_domain = [weights[held_out['domain'] == d] for d in (0, 1)]
    metrics['domain_weight_ratio'] = float(by_domain[0].mean() / by_domain[1].mean())
    metrics['within_domain_std'] = float(sum(w.std() for w in by_domain) / 2)
    metrics['memory'] = dict(dwm.domain_memory)
    metrics['refits'] = dwm.refits_done
    metrics['state_memory'] = dwm.state_dict()['domain_memory']
    return metrics


def test_regression_refit_reaches_its_targets_and_gradient_refit_reports_how_far_it_got():
    regression = _refit_metrics('regression', refit_fit_steps=150)
    gradient = _refit_metrics('gradient')
    assert regression['target_std'] > 0.05  # the targets ask for a real spread
    assert regression['target_reached'] >= 0.5, regression
    assert regression['target_reached'] > gradient['target_reached'] + 0.2, (regression, gradient)
    assert regression['weight_std_after'] > 0.02 and regression['ess_after'] >= 0.5
    assert not math.isnan(regression['fit_loss']) and math.isnan(gradient['fit_loss'])


def test_domain_means_pool_each_domain():
    values = torch.tensor([1.0, 2.0, 10.0, 3.0, 20.0], dtype=torch.float64)
    domains = torch.tensor([4, 4, 7, 4, 7])
    torch.testing.assert_close(domain_means(values, domains),
                               torch.tensor([2.0, 2.0, 15.0, 2.0, 15.0], dtype=torch.float64))
    with pytest.raises(ValueError, match='differ'):
        domain_means(values, domains[:3])


def test_domain_target_fits_one_weight_per_domain_and_prefers_the_clean_one():
    """Pooled by domain, every refit target is one weight per domain: after the fit the weighter's weights vary far
    less within a domain than between the two, and the clean domain (the validation set's) gets the larger weight."""
    sample = _refit_metrics('regression', refit_fit_steps=150, refit_kl=0.3)
    pooled = _refit_metrics('regression', refit_fit_steps=150, refit_kl=0.3, refit_target='domain')
    assert pooled['target_reached'] >= 0.5, pooled
    # the toy's per-domain weights (domain 0 clean, 1 noisy) after the refit
    assert pooled['domain_weight_ratio'] > 1.0, pooled
    assert pooled['within_domain_std'] < 0.5 * sample['within_domain_std'], (pooled, sample)


def test_remembered_domain_means_average_over_refits():
    values = torch.tensor([1.0, 2.0, 10.0, 3.0, 20.0], dtype=torch.float64)
    domains = torch.tensor([4, 4, 7, 4, 7])
    memory = {4: 0.0, 9: 5.0}
    out, new = remembered_domain_means(values, domains, memory, keep=0.5)
    # domain 4: 0.5 * 0 + 0.5 * 2; domain 7 is new and takes its own mean; domain 9, not seen now, is carried over
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0, 15.0, 1.0, 15.0], dtype=torch.float64))
    assert new == {4: 1.0, 7: 15.0, 9: 5.0} and memory == {4: 0.0, 9: 5.0}
    out0, _ = remembered_domain_means(values, domains, memory, keep=0.0)
    torch.testing.assert_close(out0, domain_means(values, domains))
    with pytest.raises(ValueError, match='keep must be in'):
        remembered_domain_means(values, domains, memory, keep=1.0)


def test_target_memory_carries_earlier_refits_into_the_targets():
    """``refit_target_memory``: a refit fits the average of the earlier refits' domain means and its own. Earlier
    means that favour the noisy domain (a lower hypergradient is a higher weight) outweigh the refits' evidence for
    the clean one at 0.9; the memory is that running average, and it is in the checkpoint."""
    against = {0: 3.0, 1: -3.0}
    fresh = _refit_metrics('regression', refit_fit_steps=150, refit_kl=0.3, refit_target='domain',
                           refit_target_memory=0.9)
    held = _refit_metrics('regression', memory=against, refit_fit_steps=150, refit_kl=0.3, refit_target='domain',
                          refit_target_memory=0.9)
    assert fresh['domain_weight_ratio'] > 1.0 and held['domain_weight_ratio'] < 1.0, (fresh, held)
    this_refit = fresh['memory']  # from no memory, a refit remembers its own means
    assert set(this_refit) == {0, 1} and this_refit[0] < this_refit[1]  # clean: the lower hypergradient
    # two refits (at the start and at 3ba) leave 0.9 ** 2 of the earlier means, plus 0.19 of the refits' own (a domain
    # mean of RMS-normalised hypergradients, below 1.5 in size with two domains of about half the samples each)
    assert held['refits'] == 2
    for d in (0, 1):
        assert abs(held['memory'][d] - 0.81 * against[d]) <= 0.19 * 1.5, held['memory']
    assert held['state_memory'] == held['memory']


def test_regression_refit_needs_a_trust_region():
    with pytest.raises(ValueError, match='refit_kl must be > 0'):
        DWM(refit_fit='regression', refit_kl=0.0)
    with pytest.raises(ValueError, match="refit_fit must be 'gradient' or 'regression'"):
        DWM(refit_fit='sgd')
    with pytest.raises(ValueError, match='set refit_fit: regression'):
        DWM(refit_target='domain')
    with pytest.raises(ValueError, match="refit_target must be 'sample' or 'domain'"):
        DWM(refit_fit='regression', refit_target='batch')
    with pytest.raises(ValueError, match='set refit_target: domain'):
        DWM(refit_fit='regression', refit_target_memory=0.5)
    with pytest.raises(ValueError, match=r'refit_target_memory must be in \[0, 1\)'):
        DWM(refit_fit='regression', refit_target='domain', refit_target_memory=1.0)
