"""The weighter's inputs beside the tokens (issue 18): the per-sample training loss and the reducible loss, how they
reach the weighter, and the regression fit that starts afresh (and once more from a zero head when it fails)."""

import json

import pytest
import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from dwm_testing import SEQ_LEN, ToyCorpus, composer_llama, loader, tiny_llama, val_batches
from torch.utils.data import DataLoader

from algorithms.dwm import DWM
from algorithms.dwm.config import DWMConfig, WeighterConfig
from algorithms.dwm.functional import log_weight_regression_loss, per_sample_loss, trust_region_target
from algorithms.dwm.inputs import (INPUTS_KEY, load_reference_losses, lookup_by_uid, sample_losses,
                                   standardize_inputs, weighter_inputs)
from algorithms.dwm.metrics import RefitDiagnostics
from algorithms.dwm.refit import _fit_to_targets, global_weights, make_weighter_optimizer
from algorithms.dwm.weighter import Weighter


def _weighter(inputs=(), seed=0):
    return Weighter(WeighterConfig(vocab_size=128, d_model=16, n_heads=2, n_layers=1, inputs=list(inputs), seed=seed))


def test_reference_losses_load_from_json_and_bad_files_are_named(tmp_path):
    good = tmp_path / 'il.json'
    good.write_text(json.dumps({'3': 2.5, '7': 1.0}))
    assert load_reference_losses(str(good)) == {3: 2.5, 7: 1.0}
    assert load_reference_losses({'4': 0.5}) == {4: 0.5}
    broken = tmp_path / 'broken.json'
    broken.write_text('{"1": 2.0,\n "2": }')
    with pytest.raises(ValueError, match=r'broken\.json, line 2: not JSON'):
        load_reference_losses(str(broken))
    listed = tmp_path / 'list.json'
    listed.write_text('[1, 2]')
    with pytest.raises(ValueError, match=r'list\.json: a JSON object'):
        load_reference_losses(str(listed))
    with pytest.raises(ValueError, match=r"entry 'x'"):
        load_reference_losses({'x': 1.0})
    with pytest.raises(ValueError, match='not finite'):
        load_reference_losses({'1': float('nan')})
    with pytest.raises(ValueError, match=r'missing\.json: cannot read'):
        load_reference_losses(str(tmp_path / 'missing.json'))
    with pytest.raises(ValueError, match=r'algorithms\.dwm\.reference_losses .*missing\.json'):
        DWM(reference_losses=str(tmp_path / 'missing.json'))


def test_lookup_by_uid_names_the_missing_uids():
    torch.testing.assert_close(lookup_by_uid({1: 0.5, 2: 1.5}, torch.tensor([2, 1, 2]), 'who'),
                               torch.tensor([1.5, 0.5, 1.5]))
    with pytest.raises(ValueError, match=r'who: no reference loss for sample uid\(s\) \[9\]'):
        lookup_by_uid({1: 0.5}, torch.tensor([1, 9]), 'who')


def test_standardize_inputs():
    x = torch.tensor([[1.0, 5.0], [2.0, 5.0], [6.0, 5.0]])
    z = standardize_inputs(x)
    torch.testing.assert_close(z[:, 0].mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert float(z[:, 0].pow(2).mean()) == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(z[:, 1], torch.zeros(3))  # a constant column carries nothing
    assert torch.allclose(standardize_inputs(10 * x + 3), z, atol=1e-4)  # only order and spread matter
    with pytest.raises(ValueError, match='not finite'):
        standardize_inputs(torch.tensor([[1.0], [float('nan')]]))


def test_weighter_config_checks_its_inputs():
    assert WeighterConfig(inputs=('loss',)).inputs == ['loss']
    with pytest.raises(ValueError, match='unknown'):
        WeighterConfig(inputs=['grad_norm'])
    with pytest.raises(ValueError, match='a repeat'):
        WeighterConfig(inputs=['loss', 'loss'])
    with pytest.raises(ValueError, match=r"the string 'loss'; write \[loss\]"):
        WeighterConfig(inputs='loss')
    assert DWMConfig(weighter={'inputs': ['loss', 'reducible_loss']}).weighter_config().inputs == [
        'loss', 'reducible_loss']


def test_a_weighter_with_inputs_starts_uniform_and_stays_permutation_equivariant():
    weighter = _weighter(['loss', 'reducible_loss'])
    ids = torch.randint(0, 128, (6, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    inputs = torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(weighter(ids, inputs=inputs), torch.ones(6))  # zero score head: uniform
    torch.nn.init.normal_(weighter.score_head.weight, std=1.0)
    weights = weighter(ids, inputs=inputs)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(weighter(ids[perm], inputs=inputs[perm]), weights[perm])
    assert not torch.allclose(weighter(ids, inputs=-inputs), weights)  # the inputs change the weights
    with pytest.raises(ValueError, match=r"takes the inputs \['loss', 'reducible_loss'\].*shape \[6, 2\], got None"):
        weighter(ids)
    with pytest.raises(ValueError, match=r'got \[6, 1\]'):
        weighter(ids, inputs=inputs[:, :1])
    assert 'input_proj.weight' not in weighter.backbone_parameter_names()  # batch-level: its gradient is global


def test_weighter_inputs_are_the_loss_and_the_loss_above_the_reference():
    lm = tiny_llama()
    batch = next(iter(loader(6, 6, seed=3)))
    with torch.no_grad():
        expected = per_sample_loss(lm(input_ids=batch['input_ids']).logits, batch['labels'])
    reference = {int(u): 0.25 * int(u) for u in batch['uid']}
    inputs = weighter_inputs(['loss', 'reducible_loss'], lm, batch, reference, chunk=4)  # two chunks
    torch.testing.assert_close(inputs[:, 0], expected)
    torch.testing.assert_close(inputs[:, 1], expected - 0.25 * batch['uid'].float())
    own = {**batch, 'reference_loss': torch.ones(6)}  # a loader's own field wins over the table
    torch.testing.assert_close(weighter_inputs(['reducible_loss'], lm, own, reference)[:, 0], expected - 1)
    assert lm.training  # put back as it was
    lm.eval()
    sample_losses(lm, batch)
    assert not lm.training
    with pytest.raises(ValueError, match=r'set algorithms\.dwm\.reference_losses'):
        weighter_inputs(['reducible_loss'], lm, batch)
    with pytest.raises(ValueError, match=r'uid\(s\) \[0, 1, 2, 3, 4\] and 1 more'):
        weighter_inputs(['reducible_loss'], lm, batch, {99: 1.0})


def _pool_with_input_targets(n_batches=4, n=16):
    """Batches whose samples have identical tokens and differ only by their input; each target is a function of that
    input alone, so only a weighter that sees the inputs can fit it."""
    gen = torch.Generator().manual_seed(0)
    pooled = []
    for _ in range(n_batches):
        x = torch.randn(n, generator=gen)
        batch = {'input_ids': torch.full((n, SEQ_LEN), 5), INPUTS_KEY: x[:, None]}
        pooled.append((batch, trust_region_target(-x, 0.5, 0.1)))
    return pooled


def _fit(weighter, pooled, steps, lr=3e-3):
    optimizer = make_weighter_optimizer(weighter, DWMConfig(refit_lr=lr))
    log = RefitDiagnostics(dead_tol=1e-6)

    def weigh(batch, grad=False):
        return global_weights(weighter, batch, grad=grad, use_prior_weight=False)

    def step_weighter(loss_fn):
        optimizer.zero_grad(set_to_none=False)
        with torch.enable_grad():
            loss = loss_fn()
            loss.backward()
        return loss

    _fit_to_targets(pooled, weigh, step_weighter, optimizer, weighter, steps, log)
    return log, optimizer


def test_only_a_weighter_with_the_inputs_fits_targets_that_depend_on_them():
    pooled = _pool_with_input_targets()
    with_inputs, _ = _fit(_weighter(['loss']), pooled, 120)
    tokens_only, _ = _fit(_weighter(), [({'input_ids': b['input_ids']}, t) for b, t in pooled], 120)
    assert with_inputs.fit_loss < 0.2 * with_inputs.fit_flat_loss, with_inputs
    assert tokens_only.fit_loss >= 0.9 * tokens_only.fit_flat_loss  # identical tokens: nothing to go on
    assert tokens_only.fit_restarted and not with_inputs.fit_restarted


def test_a_regression_fit_starts_with_fresh_moments_and_restarts_from_a_zero_head_when_it_fails():
    pooled = _pool_with_input_targets()
    weighter = _weighter(['loss'])
    log, optimizer = _fit(weighter, pooled, 40)
    log, optimizer = _fit(weighter, pooled, 7)  # continues from the fit above, its own Adam from step 0
    assert not log.fit_restarted and log.fit_loss < 0.5 * log.fit_flat_loss
    assert {int(s['step']) for s in optimizer.state.values()} == {7}
    # a weighter that points against its targets and cannot move (lr ~0) ends worse than a constant one: the fit
    # starts again from a zero score head (uniform: the flat loss) and keeps that, the better of the two
    reversed_pool = [(b, 1.0 / t) for b, t in pooled]
    before = log_weight_regression_loss(weighter(pooled[0][0]['input_ids'], inputs=pooled[0][0][INPUTS_KEY]),
                                        reversed_pool[0][1])
    stuck, _ = _fit(weighter, reversed_pool, 4, lr=1e-12)
    assert float(before) > stuck.fit_flat_loss
    assert stuck.fit_restarted
    assert stuck.fit_loss == pytest.approx(stuck.fit_flat_loss, rel=1e-4)
    assert float(weighter.score_head.weight.abs().max()) < 1e-9  # the restart's zero head, 4 steps of lr 1e-12 on


def _train(tmp_path, inputs, **kwargs):
    logger = InMemoryLogger()
    model = composer_llama()
    dwm = DWM(stage_boundaries=['3ba'], refit_steps=6, refit_lr=0.02, lookahead_lr=0.5, refit_fit='regression',
              refit_fit_steps=150, refit_kl=0.3, mode=kwargs.pop('mode', 'weight'),
              refit_dataloader=DataLoader(ToyCorpus(96, seed=1), batch_size=8, shuffle=False),
              val_dataloader=val_batches(), domain_names=['clean', 'noisy'],
              weighter={'d_model': 16, 'n_heads': 2, 'n_layers': 1, 'inputs': inputs}, **kwargs)
    trainer = Trainer(model=model, train_dataloader=loader(64, 8, seed=0), max_duration='4ba',
                      optimizers=torch.optim.Adam(model.parameters(), lr=3e-3), algorithms=[dwm], device='cpu',
                      seed=17, loggers=[logger], progress_bar=False, log_to_console=False)
    trainer.fit()
    return dwm, {k[len('dwm/refit/'):]: v[-1][1] for k, v in logger.data.items() if k.startswith('dwm/refit/')}


def test_dwm_feeds_the_loss_and_reducible_loss_to_the_weighter_in_a_real_trainer(tmp_path):
    """The toy's noisy samples have the higher loss; a reference table (uid -> loss) covers the training and the refit
    samples. The refit fits the weighter, whose input projection moves, and every weighed batch carried its inputs."""
    table = tmp_path / 'reference.json'
    table.write_text(json.dumps({str(u): 1.0 + (u % 3) for u in range(96)}))
    initial = _weighter(['loss', 'reducible_loss']).input_proj.weight.clone()
    dwm, metrics = _train(tmp_path, ['loss', 'reducible_loss'], reference_losses=str(table))
    assert metrics['target_reached'] >= 0.5 and metrics['fit_loss'] < metrics['fit_flat_loss'], metrics
    assert dwm.weighter.input_proj is not None and not torch.allclose(dwm.weighter.input_proj.weight, initial)
    assert dwm.last_weights is not None and bool(torch.isfinite(dwm.last_weights).all())
    assert dwm.last_weights.std() > 0.01  # the trained batches are weighted, not uniform


def test_dwm_in_select_mode_weighs_the_pool_with_its_inputs(tmp_path):
    dwm, metrics = _train(tmp_path, ['loss'], mode='select', select_factor=2)
    assert metrics['target_reached'] >= 0.5, metrics
    assert dwm.last_weights is not None and dwm.last_weights.numel() == 8  # the pool (8) was weighed, 4 trained


def test_reducible_loss_without_reference_losses_says_how_to_give_them(tmp_path):
    with pytest.raises(ValueError, match=r'set algorithms\.dwm\.reference_losses'):
        _train(tmp_path, ['reducible_loss'])
