"""Issue 12: the refit's trust region (``refit_kl``), the anti-collapse options (``embed_norm``,
``refit_backbone_lr_scale``), the refit diagnostics and warnings, and ``val_batches_per_step``."""

import math
import warnings

import pytest
import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from dwm_testing import ToyCorpus, composer_llama, loader, tiny_llama, val_batches
from torch.utils.data import DataLoader

from algorithms.dwm import DWM, Weighter, WeighterConfig
from algorithms.dwm.functional import kl_to_uniform, per_sample_loss_sums, refit_objective
from algorithms.dwm.refit import lookahead_functions
from algorithms.dwm.weighter import normalize_embeddings


def _batch(n=12, length=10, vocab=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[::3, 6:] = 0
    return ids, mask


# A 1-batch run has one stage (a boundary past max_duration is refused at FIT_START).
ONE_STAGE = {'stage_boundaries': None, 'num_stages': 1}


def _dwm(**kwargs):
    defaults = dict(stage_boundaries=['2ba', '3ba'], refit_steps=4, refit_lr=0.05, lookahead_lr=0.5,
                    refit_dataloader=DataLoader(ToyCorpus(64, seed=1), batch_size=8, shuffle=False),
                    val_dataloader=val_batches(), domain_names=['clean', 'noisy'],
                    weighter={'d_model': 16, 'n_heads': 2, 'n_layers': 1})
    defaults.update(kwargs)
    return DWM(**defaults)


def _fit(dwm, max_duration='4ba'):
    logger = InMemoryLogger()
    model = composer_llama()
    trainer = Trainer(model=model, train_dataloader=loader(64, 8, seed=0), max_duration=max_duration,
                      optimizers=torch.optim.Adam(model.parameters(), lr=3e-3), algorithms=[dwm], device='cpu',
                      seed=17, loggers=[logger], progress_bar=False, log_to_console=False)
    trainer.fit()
    return logger


# ------------------------------------------------------------------------------------------------- weighter
@pytest.mark.parametrize('embed_norm', ['none', 'layernorm', 'batch'])
def test_embed_norm_uniform_at_init_positive_mean_one(embed_norm):
    weighter = Weighter(WeighterConfig(vocab_size=64, d_model=32, embed_norm=embed_norm))
    ids, mask = _batch()
    w = weighter(ids, mask)
    assert torch.equal(w, torch.full_like(w, w[0].item()))
    torch.testing.assert_close(w, torch.ones_like(w), rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.manual_seed(7)
        weighter.score_head.weight.normal_(std=3.0)
    w = weighter(ids, mask)
    assert w.std() > 0.05 and (w >= weighter.config.mix_uniform - 1e-6).all()
    torch.testing.assert_close(w.mean(), torch.tensor(1.0), rtol=0, atol=1e-6)
    perm = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(weighter(ids[perm], mask[perm]), w[perm], rtol=1e-5, atol=1e-6)


def test_batch_norm_of_embeddings_cannot_shrink_the_spread():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=gen, dtype=torch.float64)
    common = torch.randn(1, 8, generator=gen, dtype=torch.float64) * 10
    # A collapsing backbone: every sample drifts to one shared vector, the differences shrink 1000x.
    collapsed = common + 1e-3 * x
    a = normalize_embeddings(x, 'batch', eps=0.0)
    b = normalize_embeddings(collapsed, 'batch', eps=0.0)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a.std(dim=0, unbiased=False), torch.ones(8, dtype=torch.float64))
    # Per-sample layer norm does not undo it: the normalised samples are (nearly) one vector.
    ln = normalize_embeddings(collapsed, 'layernorm')
    assert float((ln - ln.mean(0)).abs().max()) < 1e-2
    assert torch.equal(normalize_embeddings(x, 'none'), x)


def test_embed_norm_is_checked():
    with pytest.raises(ValueError, match='embed_norm'):
        WeighterConfig(embed_norm='l3')


# ------------------------------------------------------------------------------------------------- objective
def test_kl_to_uniform():
    assert float(kl_to_uniform(torch.ones(5))) == pytest.approx(0.0, abs=1e-7)
    w = torch.tensor([3.0, 1.0, 0.0, 0.0])
    p = w / w.sum()
    expected = sum(float(q) * math.log(float(q) * 4) for q in p if q > 0)
    assert float(kl_to_uniform(w)) == pytest.approx(expected, rel=1e-6)


def test_refit_objective_beta_zero_is_linear_and_gibbs_is_its_minimiser():
    h = torch.tensor([0.5, -1.0, 2.0, 0.1, -0.3], dtype=torch.float64)
    scores = torch.randn(5, dtype=torch.float64, requires_grad=True)
    w = 5 * torch.softmax(scores, 0)
    loss, _ = refit_objective(h, w, w, 0.0)
    torch.testing.assert_close(loss, (h * w).sum())
    beta = 3.0
    # Stationary point of sum h w + beta n KL over scores: w ∝ exp(-h / beta).
    s = (-h / beta).clone().requires_grad_(True)
    w = 5 * torch.softmax(s, 0)
    loss, kl = refit_objective(h, w, w, beta)
    (grad,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-12)
    assert float(kl) > 0


# ------------------------------------------------------------------------------------------------- DWM in a Trainer
def test_refit_kl_keeps_ess_high_and_metrics_are_logged():
    bounds = ['2ba', '3ba']  # the last stage (batch 4) ends at FIT_END, not at a boundary
    free = _dwm(refit_lr=0.3, refit_steps=6, refit_kl=0.0, stage_boundaries=bounds)  # the paper's objective
    kl = _dwm(refit_lr=0.3, refit_steps=6, refit_kl=10.0, stage_boundaries=bounds)
    log_free, log_kl = _fit(free), _fit(kl)
    for key in ('ess_min', 'ess_mean', 'weight_std', 'lookahead_gain', 'kl', 'grad_norm', 'dead', 'dead_refits',
                'ess_out_of_band', 'ess_after', 'weight_std_after', 'val_loss_before', 'val_loss_after'):
        assert f'dwm/refit/{key}' in log_kl.data, key
    for key in ('ess_min', 'ess_mean', 'ess_out_of_band'):
        assert len(log_kl.data[f'dwm/stage/{key}']) == 3, key  # every stage, the last one at FIT_END
    ess_free = min(float(v) for _, v in log_free.data['dwm/weight/ess'])
    ess_kl = min(float(v) for _, v in log_kl.data['dwm/weight/ess'])
    assert ess_free < 1.0 and ess_kl < 1.0  # both moved off uniform
    assert ess_kl > ess_free  # the trust region keeps the weights nearer uniform
    gains = [float(v) for _, v in log_kl.data['dwm/refit/lookahead_gain']]
    assert all(math.isfinite(g) for g in gains)


def test_dead_weighter_is_counted_and_warned():
    dwm = _dwm(refit_lr=0.0)  # the refit cannot move the (uniform) weighter
    with pytest.warns(UserWarning, match='dead'):
        logger = _fit(dwm)
    assert dwm.dead_refits == dwm.refits_done == 3
    assert [float(v) for _, v in logger.data['dwm/refit/dead']] == [1.0, 1.0, 1.0]


def test_ess_band_warning():
    with pytest.warns(UserWarning, match='ESS share'):
        _fit(_dwm(refit_lr=0.3, ess_band=(0.999999, 1.0)))
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        dwm = _dwm(refit_lr=0.3, ess_band=(0.0, 1.0))
        try:
            _fit(dwm)
        except UserWarning as e:  # only the ESS/dead warnings are under test
            assert 'ESS' not in str(e) and 'dead' not in str(e), e


def test_backbone_lr_scale_zero_freezes_the_backbone():
    dwm = _dwm(refit_backbone_lr_scale=0.0, refit_lr=0.3, **ONE_STAGE)
    _fit(dwm, max_duration='1ba')  # one refit, at FIT_START
    assert dwm.refits_done == 1 and len(dwm.weighter_optimizer.param_groups) == 2
    fresh = dict(Weighter(dwm.weighter_config).named_parameters())  # the same seed: the initial weighter
    backbone = dwm.weighter.backbone_parameter_names()
    assert backbone
    for n, p in dwm.weighter.named_parameters():
        if n in backbone:
            assert torch.equal(p, fresh[n]), n
    assert not torch.equal(dwm.weighter.score_head.weight, fresh['score_head.weight'])


def test_val_batches_per_step_is_the_token_mean_over_all_batches():
    lm = tiny_llama()
    vals = val_batches(n_batches=3, batch_size=4)
    vals[1]['labels'][:, -2:] = -100  # different token counts per batch
    refit = {k: v for k, v in ToyCorpus(8, seed=1)[0].items()}
    refit = {'input_ids': refit['input_ids'][None], 'labels': refit['labels'][None]}
    params = {k: p.detach() for k, p in lm.named_parameters()}
    _, val_fn = lookahead_functions(lm, refit, vals)
    sums, counts = 0.0, 0.0
    for b in vals:
        s, c = per_sample_loss_sums(lm(input_ids=b['input_ids']).logits, b['labels'])
        sums, counts = sums + float(s.sum()), counts + float(c.sum())
    assert float(val_fn(params)) == pytest.approx(sums / counts, rel=1e-5)
    _, one = lookahead_functions(lm, refit, vals[0])
    _, one_list = lookahead_functions(lm, refit, [vals[0]])
    assert torch.equal(one(params), one_list(params))
    dwm = _dwm(val_batches_per_step=2, **ONE_STAGE)
    _fit(dwm, max_duration='1ba')
    assert dwm.refits_done == 1 and dwm.val_batches.drawn == 2 * dwm.config.refit_steps


def test_lookahead_steps_use_k_refit_batches_per_step_and_move_the_weighter():
    """K = 2: each refit step draws two refit batches (one per virtual step) and one validation batch; the weighter
    moves off uniform and the two-step look-ahead gain is logged."""
    dwm = _dwm(lookahead_steps=2, refit_lr=0.3, refit_kl=1.0, **ONE_STAGE)
    logger = _fit(dwm, max_duration='1ba')
    assert dwm.refits_done == 1
    assert dwm.refit_batches.drawn == 2 * dwm.config.refit_steps and dwm.val_batches.drawn == dwm.config.refit_steps
    assert math.isfinite(float(logger.data['dwm/refit/lookahead_gain'][0][1]))
    assert float(logger.data['dwm/refit/ess_after'][0][1]) < 1.0


@pytest.mark.parametrize('kwargs,match', [({'refit_kl': -1.0}, 'refit_kl'),
                                          ({'refit_backbone_lr_scale': -0.1}, 'backbone'),
                                          ({'val_batches_per_step': 0}, 'val_batches_per_step'),
                                          ({'lookahead_steps': 0}, 'lookahead_steps'),
                                          ({'ess_band': (0.9, 0.5)}, 'ess_band')])
def test_option_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _dwm(**kwargs)


def test_refit_is_bit_identical_across_runs():
    runs = []
    for _ in range(2):
        dwm = _dwm(refit_lr=0.3, refit_kl=3.0, weighter={'d_model': 16, 'n_heads': 2, 'n_layers': 1,
                                                          'embed_norm': 'batch'})
        logger = _fit(dwm)
        runs.append((dwm, logger))
    (a, log_a), (b, log_b) = runs
    for (name, p), (_, q) in zip(a.weighter.named_parameters(), b.weighter.named_parameters()):
        assert torch.equal(p, q), name
    for key in ('dwm/refit/ess_min', 'dwm/refit/lookahead_gain', 'loss/train/total'):
        assert [float(v) for _, v in log_a.data[key]] == [float(v) for _, v in log_b.data[key]], key
