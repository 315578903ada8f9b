"""The signal screen (``benchmarks.signal_screen``): its statistics on hand-made input, and its quick run end to end
(the JSON's structure, the sanity signal's AUC of exactly 1, and identical figures from two runs of the same seed)."""

import json
import math

import numpy as np
import pytest
from bench_module import load_bench


def _bench():
    return load_bench('signal_screen')


def test_auc_orientation_and_ties():
    bench = _bench()
    positive = np.array([True, True, False, False])
    assert bench.auc(np.array([3.0, 4.0, 1.0, 2.0]), positive) == 1.0
    assert bench.auc(np.array([1.0, 2.0, 3.0, 4.0]), positive) == 0.0
    assert bench.auc(np.array([1.0, 1.0, 1.0, 1.0]), positive) == 0.5  # ties count one half
    assert bench.auc(np.array([2.0, 1.0, 1.0, 0.0]), positive) == pytest.approx(0.875)
    assert bench.auc(np.array([1.0, 2.0]), np.array([True, True])) is None  # one class only


def test_domain_variance_share_and_selection():
    bench = _bench()
    domains = np.array([0, 0, 1, 1])
    assert bench.domain_variance_share(np.array([1.0, 1.0, 3.0, 3.0]), domains) == pytest.approx(1.0)
    assert bench.domain_variance_share(np.array([1.0, 3.0, 1.0, 3.0]), domains) == pytest.approx(0.0)
    degraded = np.array([False, True, False, True])
    batch = np.array([0, 0, 1, 1])
    # Top half of each batch by preference: the real sample of each batch.
    assert bench.top_share_degraded(np.array([2.0, 1.0, 5.0, 0.0]), degraded, batch, 0.5) == 0.0
    assert bench.top_share_degraded(np.array([1.0, 2.0, 0.0, 5.0]), degraded, batch, 0.5) == 1.0


def test_trust_region_weights_favour_low_h():
    bench = _bench()
    h = np.array([-1.0, 1.0, -2.0, 2.0])
    w = bench.trust_region_weights(h, np.array([0, 0, 1, 1]), beta=3.0, mix_uniform=0.1)
    assert w[:2].mean() == pytest.approx(1.0) and w[2:].mean() == pytest.approx(1.0)  # mean 1 per batch
    # Each batch's h is RMS-normalised first: both batches get the same weights.
    assert w[0] > 1.0 > w[1] and w[0] == pytest.approx(w[2]) and w[1] == pytest.approx(w[3])


def _figures(results):
    """Everything measured (not the date, timings or machine)."""
    return json.dumps({'per_seed': [{k: v for k, v in run.items() if k != 'seconds'} for run in results['per_seed']],
                       'aggregate': results['aggregate']}, sort_keys=True)


@pytest.mark.slow
def test_quick_run_is_sane_and_deterministic(tmp_path):
    bench = _bench()
    runs = []
    for name in ('a', 'b'):
        out = tmp_path / name
        assert bench.main(['--quick', '--seeds', '0', '--out', str(out), '--data-dir', str(tmp_path / 'data')]) == 0
        with open(out / 'signal.json') as f:
            runs.append(json.load(f))
        assert (out / 'signal.md').read_text().startswith('# Signal screen')
    results = runs[0]
    assert results['benchmark'] == 'signal_screen' and results['quick'] is True
    assert results['corpus'] == {'kind': 'embedded', 'corpus_seed': 1, 'corruptions': 'standard'}  # development
    assert results['seeds'] == [0] and results['signals'] == list(bench.SIGNALS)
    steps = results['budget']['steps']
    assert [c['step'] for c in results['aggregate']] == [round(steps / 3), round(2 * steps / 3), steps]
    for checkpoint in results['per_seed'][0]['checkpoints']:
        assert checkpoint['samples'] == bench.QUICK_REFIT_BATCHES * results['budget']['batch_size']
        assert 0.0 < checkpoint['pool_degraded_share'] < 1.0
        # The JVP hypergradient agrees with the one rebuilt from per-sample gradients.
        assert checkpoint['h_jvp_vs_per_sample_grad_rel_err'] < 1e-3
        for name, fig in checkpoint['signals'].items():
            assert 0.0 <= fig['auc'] <= 1.0 and 0.0 <= fig['top_degraded_share'] <= 1.0
            assert all(math.isfinite(v) for v in fig['mean_by_domain'].values())
            if name in bench.H_SIGNALS:
                assert fig['weight_ratio'] > 0.0
        sanity = checkpoint['signals']['domain_is_real']
        assert sanity['auc'] == 1.0 and sanity['domain_variance_share'] == pytest.approx(1.0)
        assert set(sanity['auc_by_degraded_domain'].values()) == {1.0}
        assert set(sanity['auc_by_degraded_domain']) <= set(results['data']['degraded_domains'])
        assert sanity['top_degraded_share'] <= checkpoint['pool_degraded_share']
    for c in results['aggregate']:
        assert c['signals']['domain_is_real']['auc'] == {'mean': 1.0, 'min': 1.0, 'max': 1.0, 'n': 1,
                                                         'seeds_above_half': 1}
    assert _figures(runs[0]) == _figures(runs[1])  # same seed, same machine: identical figures
    # --render-only re-aggregates the JSON's per-seed figures into the same tables.
    table = (tmp_path / 'a' / 'signal.md').read_text()
    assert bench.main(['--render-only', '--out', str(tmp_path / 'a')]) == 0
    assert (tmp_path / 'a' / 'signal.md').read_text() == table


def test_select_share_follows_beta():
    """DWM's Gumbel selection at its refit target: a sharp target (small beta) keeps the signal's ranking, a flat
    one is close to a random subset."""
    bench = load_bench('signal_screen')
    rng = np.random.default_rng(0)
    degraded = np.tile(np.r_[np.ones(32, bool), np.zeros(32, bool)], 8)
    batch = np.repeat(np.arange(8), 64)
    h = np.where(degraded, 1.0, -1.0) + rng.normal(0, 0.5, degraded.size)  # degraded: higher h, lower weight
    shares = [bench.select_degraded_share(h, degraded, batch, beta, 0.25) for beta in (30.0, 3.0, 0.3, 0.03)]
    assert shares == sorted(shares, reverse=True)
    assert abs(shares[0] - 0.5) < 0.05 and shares[-1] < 0.02
    assert bench.select_degraded_share(h, degraded, batch, 3.0, 0.25) == shares[1]  # a fixed seed
