"""The quality benchmark runs end to end (``--quick``), writes valid JSON, and RESULTS.md is made from it."""

import json
import math
import os
import shutil

import pytest
from bench_module import OTHER_SECTION, load_bench
from bench_module import quick_run as run_bench

from dwm_stream.data.selection import read_selection
from dwm_stream.demo.data import prepare_data

METHODS = ('uniform', 'dwm', 'static_domain', 'loss_reweighting')


def _load_bench():
    return load_bench('quality')


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('bench')
    return (*run_bench('quality', root, 'quality.json', ('--data-dir', str(root / 'data'))), OTHER_SECTION)


def _number(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow
def test_json_schema(quick_run):
    _, results, out, _, _ = quick_run
    assert results['benchmark'] == 'quality' and results['quick'] is True
    assert results['machine']['nproc'] > 0 and results['machine']['ram_gb'] > 0
    assert {'torch', 'mosaicml', 'mosaicml-streaming', 'transformers'} <= set(results['versions'])
    budget = results['budget']
    for key in ('steps', 'batch_size', 'seq_len', 'num_stages', 'refit_steps', 'evals'):
        assert budget[key] > 0, key
    domains = results['data']['domains']
    assert {'DegradedShuffledWords', 'DegradedRandomTokens', 'DegradedBoilerplate'} <= set(domains)
    assert results['data']['lambada_fit'] > 0 and results['data']['lambada_report'] > 0
    # The proxy run's static weights: one per domain, mean 1 over the training mix, at least lambda.
    proxy = results['proxy']
    assert set(proxy['weights']) == set(domains)
    assert sum(proxy['shares'][d] * proxy['weights'][d] for d in domains) == pytest.approx(1.0, rel=1e-6)
    assert min(proxy['weights'].values()) >= budget['mix_uniform'] - 1e-9
    runs = results['runs']
    assert sorted((r['method'], r['seed']) for r in runs) == sorted((m, 0) for m in METHODS)
    for r in runs:
        assert r['steps'] == budget['steps'] and r['tokens'] == budget['steps'] * budget['batch_size'] * budget['seq_len']
        steps = [p['step'] for p in r['curve']]
        assert steps[0] == 0 and steps[-1] == budget['steps'] and steps == sorted(set(steps))
        assert all(_number(p['clean']) and _number(p['all']) for p in r['curve'])
        assert r['curve'][-1]['clean'] < r['curve'][0]['clean']  # every method learns something
        assert 0.0 <= r['lambada']['accuracy'] <= 1.0 and r['lambada']['examples'] == results['data']['lambada_report']
        assert len(r['stage_weights']) == budget['num_stages']
        for stage in r['stage_weights']:
            assert all(w > 0 for w in stage.values())
        if r['method'] == 'uniform':
            assert all(w == 1.0 for stage in r['stage_weights'] for w in stage.values())
    dwm = next(r for r in runs if r['method'] == 'dwm')
    assert len(dwm['refit']['val_loss_before']) == budget['num_stages']
    analysis = results['analysis']
    assert set(analysis['methods']) == set(METHODS)
    uniform_reach = analysis['methods']['uniform']['reach_uniform_final'][0]
    assert uniform_reach['step'] == pytest.approx(budget['steps'])  # uniform reaches its own final loss at the end
    assert [t['met'] for t in analysis['targets']] == [
        analysis['targets'][0]['measured'] is not None and analysis['targets'][0]['measured'] <= 0.8,
        analysis['targets'][1]['measured'] <= 0.5]
    for png in ('quality_curves.png', 'quality_weights.png'):
        assert (out / png).stat().st_size > 1000


@pytest.mark.slow
def test_results_md_section_is_rendered_from_the_json(quick_run):
    bench, results, out, results_md, other = quick_run
    text = results_md.read_text()
    images = [os.path.relpath(out / p, results_md.parent) for p in ('quality_curves.png', 'quality_weights.png')]
    assert bench.read_section(str(results_md)) == bench.render_section(results, images)  # no hand-edited numbers
    assert 'stale 9.99' not in text and text.count(bench.BEGIN_MARK) == 1
    assert other in text and text.endswith('trailing text\n')  # other sections untouched
    section = bench.read_section(str(results_md))
    uni = results['analysis']['methods']['uniform']['final_clean']
    assert f'{uni["mean"]:.4f}' in section
    assert f'{results["machine"]["nproc"]} CPUs' in section and 'QUICK RUN' in section


def test_steps_to_reach_interpolates():
    bench = _load_bench()
    curve = [{'step': 0, 'clean': 7.0}, {'step': 10, 'clean': 6.0}, {'step': 20, 'clean': 5.0}]
    assert bench.steps_to_reach(curve, 5.5) == pytest.approx(15.0)
    assert bench.steps_to_reach(curve, 6.0) == pytest.approx(10.0)
    assert bench.steps_to_reach(curve, 7.5) == pytest.approx(0.0)
    assert bench.steps_to_reach(curve, 4.0) is None


@pytest.mark.slow
def test_investigation_runs_dwm_only_and_is_rendered_from_its_json(quick_run, tmp_path):
    """``--investigate`` re-runs DWM only (same seeds/budget), fits V1 on held-out samples the evaluation never reads,
    and its subsection of RESULTS.md is the one its JSON produces."""
    bench, results, out, _, _ = quick_run
    inv_out = tmp_path / 'results'
    shutil.copytree(out, inv_out)
    results_md = tmp_path / 'RESULTS.md'
    data_dir = out.parent / 'data'
    assert bench.main(['--investigate', 'heldout_val', '--out', str(inv_out), '--data-dir', str(data_dir),
                       '--results-md', str(results_md), '--jobs', '1']) == 0
    with open(inv_out / bench.INVESTIGATION_JSON) as f:
        inv = json.load(f)
    with open(inv_out / 'quality.json') as f:
        assert json.load(f) == results  # quality.json is not rewritten
    assert inv['quality_date'] == results['date'] and inv['seeds'] == results['analysis']['seeds']
    runs = inv['variant_runs']['heldout_val']
    assert [r['seed'] for r in runs] == inv['seeds'] and all(r['method'] == 'dwm' for r in runs)
    assert all(r['steps'] == results['budget']['steps'] for r in runs)
    assert inv['variant_info']['heldout_val']['settings'] == {'dwm_validation': 'heldout'}
    # The held-out split is disjoint from the evaluated samples.
    budget = bench.Budget.from_record(results['budget'])
    paths = prepare_data(str(data_dir), budget.data)
    eval_uids = {u for b in bench._eval_batches_uids(paths, budget) for u in b}
    sel = read_selection(inv['heldout_selection']['path'])
    assert len(sel) == inv['heldout_selection']['samples'] > 0 and not set(sel.uids.tolist()) & eval_uids
    a = inv['analysis']
    assert set(a) == {'baseline', 'heldout_val'}
    assert a['baseline']['per_seed'][0]['final_clean'] == pytest.approx(
        results['analysis']['methods']['dwm']['final_clean']['mean'])
    section = bench.read_section(str(results_md))
    assert section == bench.render_section(results, bench._images(str(inv_out), str(results_md)), inv)
    assert '### Investigation' in section and f'{a["heldout_val"]["diff_vs_uniform_mean"]:+.4f}' in section
    assert (inv_out / 'quality_investigation.png').stat().st_size > 1000


def test_investigation_is_not_rendered_against_another_quality_run():
    bench = _load_bench()
    lines = bench.render_investigation({'quality_date': 'then', 'command': 'x'}, {'date': 'now'})
    assert any('not this one' in line for line in lines) and not any(line.startswith('|') for line in lines)
