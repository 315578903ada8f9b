"""The nulls and oracles of the quality benchmark (``algorithms/baselines/null.py``), through a real Trainer."""

import pytest
import torch
from composer import Trainer
from composer.core import Algorithm, Event

from algorithms.baselines import (DomainSelection, LossReweighting, PermutedWeights, StaticDomainWeighting,
                                  permute_within_batch)
from tests.algorithms.dwm_testing import composer_llama, loader


class _Record(Algorithm):
    """Keeps every trained batch's domains and weights (runs at BATCH_END, after the methods)."""

    def __init__(self):
        self.batches = []

    def match(self, event, state):
        return event == Event.BATCH_END

    def apply(self, event, state, logger):
        self.batches.append({'domain': state.batch['domain'].clone(),
                             'weight': state.batch['dwm_weight'].clone() if 'dwm_weight' in state.batch else None,
                             'input_ids': state.batch['input_ids'].clone()})


def _train(algorithms, steps=4, batch_size=8, size=64):
    model = composer_llama(seed=0)
    record = _Record()
    trainer = Trainer(model=model, train_dataloader=loader(size, batch_size), max_duration=f'{steps}ba',
                      algorithms=[*algorithms, record], optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
                      device='cpu', seed=0, progress_bar=False, log_to_console=False)
    trainer.fit()
    return [p.detach().clone() for p in model.parameters()], record.batches


def test_permute_within_batch_keeps_the_multiset_and_moves_the_weights():
    w = torch.arange(1.0, 9.0)
    p = permute_within_batch(w, torch.Generator().manual_seed(0))
    assert sorted(p.tolist()) == w.tolist() and not torch.equal(p, w)
    assert torch.equal(p, permute_within_batch(w, torch.Generator().manual_seed(0)))  # seeded


def test_permuted_oracle_keeps_the_spread_but_not_the_domains():
    oracle = {'clean': 1.0, 'noisy': 0.0}
    _, plain = _train([StaticDomainWeighting(oracle, domain_names=['clean', 'noisy'])])
    params_null, null = _train([PermutedWeights(StaticDomainWeighting(oracle, domain_names=['clean', 'noisy']),
                                                seed=3)])
    for a, b in zip(plain, null):
        assert torch.equal(a['domain'], b['domain'])  # the same samples
        assert sorted(a['weight'].tolist()) == pytest.approx(sorted(b['weight'].tolist()))  # the same weights
        assert (a['weight'][a['domain'] == 1] == 0).all()  # the oracle drops every noisy sample
    # ... but the null puts some of its zeros on clean samples (over 4 batches of 8, all but impossible otherwise)
    assert any((b['weight'][b['domain'] == 0] == 0).any() for b in null)
    params_oracle, _ = _train([StaticDomainWeighting(oracle, domain_names=['clean', 'noisy'])])
    assert any(not torch.allclose(a, b) for a, b in zip(params_oracle, params_null))


def test_permuted_loss_reweighting_is_the_same_weights_in_another_order():
    _, rule = _train([LossReweighting(warmup='0ba')])
    _, null = _train([LossReweighting(warmup='0ba', permute_seed=0)])
    # The first batch sees the same model in both runs: the same weights, in another order.
    assert sorted(rule[0]['weight'].tolist()) == pytest.approx(sorted(null[0]['weight'].tolist()), rel=1e-5)
    assert not torch.allclose(rule[0]['weight'], null[0]['weight'])


def test_oracle_selection_trains_on_clean_samples_only_and_its_null_on_a_random_subset():
    _, oracle = _train([DomainSelection(['clean'], select_factor=4, domain_names=['clean', 'noisy'], seed=0)],
                       batch_size=32, size=256)
    _, null = _train([DomainSelection(None, select_factor=4, seed=0)], batch_size=32, size=256)
    for b in oracle:
        assert b['input_ids'].shape[0] == 8 and (b['domain'] == 0).all() and (b['weight'] == 1).all()
    assert all(b['input_ids'].shape[0] == 8 for b in null)
    assert any((b['domain'] == 1).any() for b in null)  # a random subset keeps noisy samples too
