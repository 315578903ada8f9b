"""The quality benchmark: end to end (``--quick``), on another SlimPajama-layout corpus (``--corpus``), and its parts
(method grammar, n-gram references, report split, noise floor, paired statistics and targets) on hand-made input."""

import json
import math
import os

import numpy as np
import pytest
import torch
from bench_module import OTHER_SECTION, load_bench
from bench_module import quick_run as run_bench

from algorithms.baselines import noise_floor_weights
from dwm_stream.demo.corpus import ALT_DEGRADED_DOMAINS, DEGRADED_DOMAINS


def _load_bench():
    return load_bench('quality')


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('bench')
    return (*run_bench('quality', root, 'quality.json', ('--data-dir', str(root / 'data'), '--rerun-check')),
            OTHER_SECTION)


def _number(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow
def test_json_schema(quick_run):
    bench, results, out, _, _ = quick_run
    assert results['benchmark'] == 'quality' and results['quick'] is True and results['schema'] == bench.SCHEMA
    assert results['methods'] == list(bench.DEFAULT_METHODS) and results['analysis']['seeds'] == [0]
    assert results['machine']['nproc'] > 0 and _number(results['seconds'])
    budget = results['budget']
    data = results['data']
    assert set(data['degraded_domains']) == set(DEGRADED_DOMAINS)
    assert set(data['real_domains']) == set(data['domains']) - set(DEGRADED_DOMAINS)
    # Balanced report set, disjoint from the held-out DWM target by construction (counts add up to the split).
    assert set(data['report_samples']) == set(data['domains'])
    for d, n in data['report_samples'].items():
        assert n == budget['report_per_domain'] or d in data['short_domains']
        if d in data['real_domains']:
            assert n + data['heldout_samples'][d] == data['validation_samples'][d]
    assert data['balanced_heldout_per_domain'] == min(data['heldout_samples'][d] for d in data['real_domains'])
    # Reference lines: the bigram is below the unigram on every real domain.
    refs = results['references']
    for d in data['real_domains']:
        assert 0 < refs['bigram']['by_domain'][d] < refs['unigram']['by_domain'][d] < math.log(budget['vocab_size'])
    assert results['proxy'] is not None  # static_domain is a default method: its proxy run is recorded
    runs = results['runs']
    assert sorted((r['method'], r['seed']) for r in runs) == sorted((m, 0) for m in bench.DEFAULT_METHODS)
    for r in runs:
        assert r['tokens'] == budget['steps'] * budget['batch_size'] * budget['seq_len']
        steps = [p['step'] for p in r['curve']]
        assert steps[0] == 0 and steps[-1] == budget['steps'] and steps == sorted(set(steps))
        assert all(_number(p['macro']) for p in r['curve'])
        assert r['final']['macro'] == pytest.approx(np.mean([r['final'][d] for d in data['real_domains']]))
        assert r['curve'][-1]['macro'] < r['curve'][0]['macro']  # every method learns something
        assert 0.0 <= r['lambada']['accuracy'] <= 1.0 and r['lambada']['examples'] == data['lambada_report']
        assert len(r['stage_weights']) == budget['num_stages']
        if r['method'] == 'uniform':
            assert all(w == 1.0 for stage in r['stage_weights'] for w in stage.values())
        if r['base'] in bench.DWM_BASES:
            assert len(r['refit']['refit/ess_min']) == budget['num_stages']
        if r['base'] == 'oracle' and r['method'] == 'oracle':  # weight 0 on every degraded domain, in every stage
            assert all(stage[d] == 0.0 for stage in r['stage_weights'] for d in data['degraded_domains'] if d in stage)
        if r['base'] == 'oracle_select':  # trains on clean samples only
            assert all(stage.get(d, 0.0) == 0.0 for stage in r['stage_weights'] for d in data['degraded_domains'])
    a = results['analysis']
    assert a['methods']['uniform']['delta_vs_uniform']['per_seed'] == [0.0]
    # Each method against its own null; the headroom check needs 5 seeds, so one seed never ranks anything.
    room = a['headroom']
    assert room['null'] == 'oracle/null' and room['holds'] is False and room['n'] == 1
    assert room['null_rms'] == pytest.approx(abs(a['methods']['oracle/null']['delta_vs_uniform']['mean']))
    assert a['select_headroom']['null'] == 'random_select'
    dwm = a['target_method']
    assert dwm == bench.DWM_DEFAULT
    assert a['methods'][dwm]['vs_null']['null'] == 'random_select'
    assert a['rerun_max_abs_diff'] == 0.0  # same seed, same machine: identical figures
    assert results['rerun']['method'] == dwm and results['rerun']['seed'] == 0
    targets = {t['name']: t for t in a['targets']}
    assert next(t for n, t in targets.items() if n.startswith('re-run'))['met'] is True
    assert not any(t['met'] for n, t in targets.items() if n.startswith(('headroom', dwm)) and 'ESS' not in n)
    for png in ('quality_curves.png', 'quality_weights.png'):
        assert (out / png).stat().st_size > 1000


@pytest.mark.slow
def test_balanced_target_mixes_the_real_domains_equally(quick_run, tmp_path_factory):
    """``dwm_validation=balanced``: the same number of held-out samples from every real domain, none reported, and
    shuffled, so that a batch mixes domains (``heldout`` runs in shard order, a batch mostly of one domain)."""
    import argparse
    bench, results, out = quick_run[:3]
    ctx = bench.prepare(argparse.Namespace(corpus=None, data_dir=str(out.parent / 'data'), corpus_seed=0,
                                           corruptions='standard', device='cpu'), bench.QUICK)  # cached by the run
    spec = {'paths': ctx['paths'], 'heldout_path': ctx['heldout_path'], 'balanced_path': ctx['balanced_path']}
    reported = {u for uids in ctx['report'].values() for u in uids}
    counts, mixed, batches = {}, 0, 0
    for batch in bench.validation_batches('balanced', spec, None, bench.QUICK):
        domains = [ctx['domains'][d] for d in batch['domain'].tolist()]
        assert not reported & set(batch['uid'].tolist()) and set(domains) <= set(ctx['real'])
        for d in domains:
            counts[d] = counts.get(d, 0) + 1
        mixed += len(set(domains)) > 1
        batches += 1
    per_domain = results['data']['balanced_heldout_per_domain']
    full = per_domain * len(ctx['real']) // bench.QUICK.val_batch_size * bench.QUICK.val_batch_size  # drop_last
    assert sum(counts.values()) == full and max(counts.values()) <= per_domain
    assert mixed == batches


@pytest.mark.slow
def test_irreducible_losses_cover_every_training_sample(quick_run):
    """The RHO rule's table has every training sample, the last partial batch too (a batch size that leaves one)."""
    import argparse

    from transformers import LlamaConfig, LlamaForCausalLM
    bench, results, out = quick_run[:3]
    ctx = bench.prepare(argparse.Namespace(corpus=None, data_dir=str(out.parent / 'data'), corpus_seed=0,
                                           corruptions='standard', device='cpu'), bench.QUICK)
    n = results['data']['train_samples']
    batch_size = next(b for b in range(7, 64) if n % b)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=ctx['vocab'], hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=bench.QUICK.seq_len))
    table = bench.irreducible_losses(lm, ctx['paths']['train'], batch_size)
    assert len(table) == n and all(math.isfinite(v) for v in table.values())


@pytest.mark.slow
def test_results_md_section_is_rendered_from_the_json(quick_run):
    bench, results, out, results_md, other = quick_run
    text = results_md.read_text()
    images = [os.path.relpath(out / p, results_md.parent) for p in ('quality_curves.png', 'quality_weights.png')]
    assert bench.read_section(str(results_md)) == bench.render_section(results, images)  # no hand-edited numbers
    assert 'stale 9.99' not in text and text.count(bench.BEGIN_MARK) == 1
    assert other in text and text.endswith('trailing text\n')  # other sections untouched
    section = bench.read_section(str(results_md))
    assert f'{results["analysis"]["methods"]["uniform"]["final_macro"]["mean"]:.4f}' in section
    assert f'{results["references"]["bigram"]["macro"]:.4f}' in section
    assert f'{results["machine"]["nproc"]} CPUs' in section and 'QUICK RUN' in section


@pytest.mark.slow
def test_runs_on_another_slimpajama_corpus_without_lambada(tmp_path):
    """``--write-corpus`` (other corruption types), then ``--corpus`` on it: the domains come from the records,
    ``--degraded`` names the excluded ones, and without ``--lambada`` DWM's target is the held-out samples."""
    bench = _load_bench()
    corpus = tmp_path / 'alt'
    assert bench.main(['--quick', '--write-corpus', str(corpus), '--corruptions', 'alt']) == 0
    assert (corpus / 'lambada.jsonl').is_file() and (corpus / 'validation').is_dir()
    out = tmp_path / 'results'
    assert bench.main(['--quick', '--corpus', str(corpus), '--degraded', ','.join(ALT_DEGRADED_DOMAINS),
                       '--methods', 'uniform', 'dwm:refit_kl=1', '--out', str(out), '--data-dir',
                       str(tmp_path / 'data'), '--results-md', str(tmp_path / 'RESULTS.md')]) == 0
    with open(out / 'quality.json') as f:
        results = json.load(f)
    assert results['corpus']['kind'] == 'external' and results['corpus']['lambada'] is None
    assert set(results['data']['degraded_domains']) == set(ALT_DEGRADED_DOMAINS)
    assert results['data']['lambada_fit'] is None and results['method_budgets']['dwm:refit_kl=1'] == {'refit_kl': 1.0}
    assert all(r['lambada'] is None for r in results['runs'])
    assert 'dwm:refit_kl=1' in results['analysis']['methods'] and results['analysis']['target_method'] == 'dwm:refit_kl=1'
    with pytest.raises(SystemExit):
        bench.main(['--quick', '--corpus', str(corpus), '--degraded', 'NoSuchDomain', '--methods', 'uniform',
                    '--out', str(out), '--data-dir', str(tmp_path / 'data')])


@pytest.mark.slow
def test_dwm_with_the_reducible_loss_input_waits_for_the_irreducible_loss_model_and_reruns_identically(tmp_path):
    """A DWM whose weighter takes ``reducible_loss`` gets the RHO rule's reference losses, its re-run (the target
    DWM's) too, and the re-run gives the same figures; ``oracle_keep`` lets the selection oracle keep one degraded
    domain."""
    dwm = 'dwm_select:refit_fit=regression,refit_kl=0.3,weighter.inputs=loss+reducible_loss'
    kept = DEGRADED_DOMAINS[0]
    keep = f'oracle_select:oracle_keep={kept}'  # a diagnostic oracle that keeps one degraded domain as if real
    bench, results = run_bench('quality', tmp_path, 'quality.json', (
        '--data-dir', str(tmp_path / 'data'), '--rerun-check', '--methods', 'uniform', dwm, keep))[:2]
    assert bench.uses_reference_losses(dwm) and not bench.uses_reference_losses('dwm_select')
    assert [r['method'] for r in results['runs']] == ['uniform', dwm, keep]
    trained = next(r for r in results['runs'] if r['method'] == keep)['stage_weights']
    assert all(stage.get(kept, 0.0) > 0 for stage in trained)
    assert all(stage.get(d, 0.0) == 0.0 for stage in trained for d in DEGRADED_DOMAINS[1:])
    assert results['rerun']['method'] == dwm and results['analysis']['rerun_max_abs_diff'] == 0.0
    refit = next(r for r in results['runs'] if r['method'] == dwm)['refit']
    assert all(math.isfinite(x) for x in refit['refit/fit_loss']) and 'refit/fit_restarted' in refit


def test_method_grammar():
    bench = _load_bench()
    assert bench.parse_method('dwm') == ('dwm', {})
    assert bench.parse_method('dwm:refit_kl=10,weighter.embed_norm=batch') == \
        ('dwm', {'refit_kl': 10.0, 'weighter.embed_norm': 'batch'})
    assert bench.parse_method('dwm:refit=false,lookahead_lr=None') == ('dwm', {'refit': False, 'lookahead_lr': None})
    assert bench.parse_method('dwm_select:select_factor=2') == ('dwm_select', {'select_factor': 2})
    assert bench.method_budget(bench.QUICK, 'dwm_paper').dwm.refit_kl == 0.0
    assert bench.method_budget(bench.QUICK, 'dwm_paper:refit_kl=1').dwm.refit_kl == 1.0
    assert bench.method_budget(bench.QUICK, 'dwm').dwm.refit_kl == bench.QUICK.dwm.refit_kl == 3.0
    # DWM's own config: every option of DWM, the weighter's as weighter.FIELD, checked by DWMConfig itself
    changed = bench.method_budget(bench.QUICK, 'dwm:weighter.embed_norm=batch,lookahead=adam')
    assert (changed.dwm.weighter.embed_norm, changed.dwm.lookahead) == ('batch', 'adam')
    assert changed.dwm.weighter.max_seq_len == bench.QUICK.seq_len  # the weighter's context is the data's
    assert bench.Budget.from_record(changed.record()) == changed
    inputs = bench.method_budget(bench.QUICK, 'dwm:weighter.inputs=loss+reducible_loss')
    assert inputs.dwm.weighter.inputs == ['loss', 'reducible_loss']
    assert bench.Budget.from_record(inputs.record()) == inputs
    with pytest.raises(ValueError, match="lookahead must be 'sgd' or 'adam'"):
        bench.method_budget(bench.QUICK, 'dwm:lookahead=newton')
    for bad, match in (('dwm:nosuch=1', 'nosuch'), ('dwm:refit_kl', 'refit_kl'), ('dwm:refit_kl=abc', 'float'),
                       ('dwm:refit=maybe', 'bool'), ('dwm:corpus_size=1MB', 'shared by every method')):
        with pytest.raises(ValueError, match=match) as err:
            bench.parse_method(bad)
        assert repr(bad) in str(err.value)


def test_bad_method_is_refused_by_name(capsys):
    bench = _load_bench()
    with pytest.raises(SystemExit):
        bench.parse_args(['--methods', 'uniform', 'dwmm:refit_kl=1'])
    assert "'dwmm:refit_kl=1'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(['--corpus', 'x'])  # --degraded is required with --corpus


def test_ngram_references_by_hand():
    """Train ``0 1 0 1`` (V = 3): unigram add-one p = (3/7, 3/7, 1/7); bigrams (0,1) x2, (1,0) x1, so
    p(1|0) = (2 + 1 * 3/7) / (2 + 1) = 17/21 and p(2|1) = (0 + 1 * 1/7) / (1 + 1) = 1/14; an unseen history (2)
    falls back to the unigram."""
    bench = _load_bench()
    train = [np.array([0, 1, 0, 1])]
    report = {'A': [np.array([0, 1])], 'B': [np.array([1, 2, 0])]}
    refs = bench.ngram_references(train, report, 3, real=['A', 'B'])
    assert refs['unigram']['by_domain']['A'] == pytest.approx(-math.log(3 / 7))
    assert refs['unigram']['by_domain']['B'] == pytest.approx(-(math.log(1 / 7) + math.log(3 / 7)) / 2)
    assert refs['bigram']['by_domain']['A'] == pytest.approx(-math.log(17 / 21))
    assert refs['bigram']['by_domain']['B'] == pytest.approx(-(math.log(1 / 14) + math.log(3 / 7)) / 2)
    assert refs['bigram']['macro'] == pytest.approx((refs['bigram']['by_domain']['A'] +
                                                     refs['bigram']['by_domain']['B']) / 2)
    assert bench.ngram_references(train, report, 3, real=['A'])['unigram']['macro'] == pytest.approx(-math.log(3 / 7))


def test_split_report_is_balanced_disjoint_and_says_when_short():
    bench = _load_bench()
    names = ['Real', 'Small', 'Bad']
    samples = ([{'uid': i, 'domain': 0} for i in range(20)] + [{'uid': 100 + i, 'domain': 1} for i in range(5)] +
               [{'uid': 200 + i, 'domain': 2} for i in range(3)])
    split = bench.split_report(samples, names, real=['Real', 'Small'], per_domain=4)
    assert {d: len(u) for d, u in split['report'].items()} == {'Real': 4, 'Small': 2, 'Bad': 3}
    assert split['short'] == ['Bad', 'Small'] and set(split['heldout']) == {'Real', 'Small'}
    assert len(split['heldout']['Real']) == 16 and not set(split['report']['Real']) & set(split['heldout']['Real'])
    assert split == bench.split_report(samples, names, real=['Real', 'Small'], per_domain=4)  # deterministic


def test_noise_floor_weights():
    g = torch.Generator().manual_seed(0)
    w = torch.cat([noise_floor_weights(16, 0.02, g) for _ in range(500)]).view(500, 16)
    assert torch.allclose(w.mean(dim=1), torch.ones(500), atol=1e-6) and bool((w > 0).all())
    assert float(w.std()) == pytest.approx(0.02, rel=0.1)
    again = noise_floor_weights(16, 0.02, torch.Generator().manual_seed(0))
    assert torch.equal(again, w[0])
    assert torch.equal(noise_floor_weights(4, 0.0, g), torch.ones(4))


def test_paired_statistics_headroom_and_targets():
    bench = _load_bench()
    seeds = [0, 1, 2, 3, 4]
    uniform = {s: 5.0 + 0.1 * s for s in seeds}

    def around(deltas):
        return {s: uniform[s] + d for s, d in zip(seeds, deltas)}

    values = {
        'uniform': uniform,
        'oracle': around([-0.10, -0.12, -0.09, -0.11, 0.01]),       # 4 of 5 seeds beyond 3 x the null's RMS
        'oracle/null': around([0.02, 0.03, 0.02, 0.03, 0.025]),     # its spread costs effective batch size
        'dwm': around([-0.06, -0.05, -0.07, -0.06, -0.06]),
        'dwm/null': around([0.01, 0.0, 0.02, 0.01, 0.01]),
        'loss_reweighting': around([-0.01, 0.01, -0.01, -0.01, -0.03]),
    }
    deltas = bench.paired_deltas(values, seeds)
    assert deltas['dwm']['per_seed'] == pytest.approx([-0.06, -0.05, -0.07, -0.06, -0.06])
    assert deltas['dwm']['mean'] == pytest.approx(-0.06) and deltas['dwm']['better'] == 5
    assert deltas['loss_reweighting']['better'] == 4 and deltas['uniform']['mean'] == 0.0
    room = bench.headroom(deltas)
    null_rms = math.sqrt(sum(d * d for d in [0.02, 0.03, 0.02, 0.03, 0.025]) / 5)
    assert room['null_rms'] == pytest.approx(null_rms) and room['bound'] == pytest.approx(3 * null_rms)
    assert room['seeds_met'] == 4 and room['seeds_needed'] == 4 and room['holds'] is True
    assert room['gain_mean'] == pytest.approx(0.082)
    vs_null = bench.beats_null(deltas, 'dwm')
    assert vs_null['seeds'] == 5 and vs_null['null'] == 'dwm/null'
    assert bench.beats_null(deltas, 'loss_reweighting') is None  # no null measured: no claim
    rows = bench.targets(deltas, 'dwm', room, {'ess_min': 0.93, 'dead': 0}, 0.0)
    met = {r['name'].split(':')[0].split(' ')[0] + str(i): r['met'] for i, r in enumerate(rows)}
    assert [r['met'] for r in rows] == [True, True, True, True, False, True, True]  # no rho run: not met
    assert rows[1]['bound'] == pytest.approx(0.5 * 0.082) and rows[3]['bound'] == pytest.approx(0.01)
    assert rows[4]['measured'] == pytest.approx(0.06) and rows[4]['bound'] is None and met
    # Without headroom nothing is ranked, however good the numbers look.
    values['oracle'] = around([-0.05, -0.12, -0.09, -0.11, 0.01])
    deltas = bench.paired_deltas(values, seeds)
    room = bench.headroom(deltas)
    assert room['seeds_met'] == 3 and room['holds'] is False
    rows = bench.targets(deltas, 'dwm', room, {'ess_min': 0.93, 'dead': 0}, 0.0)
    assert [r['met'] for r in rows][:5] == [False] * 5
    # Fewer than 5 seeds never hold, and a run without the oracle has no headroom to show.
    two = bench.paired_deltas({m: {s: v[s] for s in (0, 1)} for m, v in values.items()}, [0, 1])
    assert bench.headroom(two)['holds'] is False and bench.headroom({'uniform': deltas['uniform']}) is None
    assert bench.paired_t(deltas['dwm']) == pytest.approx(-0.06 / (deltas['dwm']['sd'] / math.sqrt(5)))
    assert bench.paired_t(deltas['uniform']) is None and bench.paired_t(None) is None


def test_null_and_family_of_each_method():
    bench = _load_bench()
    assert bench.parse_method('oracle/null') == ('oracle', {'null': 1})
    assert bench.parse_method('dwm:refit_kl=1/null') == ('dwm', {'null': 1, 'refit_kl': 1.0})
    assert bench.null_of('dwm') == 'dwm/null' and bench.null_of('dwm:refit_kl=1') == 'dwm:refit_kl=1/null'
    assert bench.null_of('dwm_select') == bench.null_of('oracle_select') == 'random_select'
    assert bench.null_of('uniform') is None and bench.null_of('oracle/null') is None
    for bad in ('uniform/null', 'dwm_select/null', 'random_select/null'):
        with pytest.raises(ValueError, match='no weights to permute'):
            bench.parse_method(bad)
    assert bench.family_headroom('dwm_select', 'w', 's') == 's' and bench.family_headroom('dwm', 'w', 's') == 'w'
    assert bench.file_name('dwm:refit_kl=1/null-seed0') == 'dwm~refit_kl~1~null-seed0'
    budget = bench.apply_overrides(bench.QUICK, ['steps=7', 'degraded_share=0.4', 'lr=0.01'])
    assert (budget.steps, budget.data.degraded_share, budget.lr) == (7, 0.4, 0.01)
    with pytest.raises(ValueError, match='nosuch'):
        bench.apply_overrides(bench.QUICK, ['nosuch=1'])
    with pytest.raises(ValueError, match="'x' is not a int"):
        bench.apply_overrides(bench.QUICK, ['steps=x'])


def test_device_names_map_to_composer():
    """``--device cuda`` trains on Composer's ``gpu`` device (Composer refuses the torch name ``cuda``)."""
    bench = _load_bench()
    from composer.utils import get_device
    assert [bench.composer_device(d) for d in ('cpu', 'cuda', 'cuda:0', 'gpu')] == ['cpu', 'gpu', 'gpu', 'gpu']
    assert type(get_device(bench.composer_device('cpu'))).__name__ == 'DeviceCPU'
    with pytest.raises(ValueError, match='must be one of'):
        get_device('cuda')  # why the mapping exists


def test_run_cache_key_follows_the_data(tmp_path):
    """The run cache's digest changes when the corpus's shards change (a rebuilt corpus is never served stale runs)."""
    bench = _load_bench()
    (tmp_path / 'train').mkdir()
    (tmp_path / 'validation').mkdir()
    paths = {'train': str(tmp_path / 'train'), 'validation': str(tmp_path / 'validation')}
    (tmp_path / 'train' / 'index.json').write_text('{"shards": [1]}')
    first = bench.code_digest(paths)
    assert bench.code_digest(paths) == first
    (tmp_path / 'train' / 'index.json').write_text('{"shards": [2]}')
    assert bench.code_digest(paths) != first


def test_long_method_names_wrap_after_commas_in_plot_titles():
    from benchmarks.quality.report import _wrap_method
    name = ('dwm_select:refit_fit=regression,dwm_validation=balanced,val_batches_per_step=16,refit_kl=0.3,'
            'refit_target=domain')
    lines = _wrap_method(name).split('\n')
    assert len(lines) == 3 and all(len(line) <= 48 for line in lines)
    assert ''.join(lines) == name  # nothing dropped or added but the breaks
    assert _wrap_method('uniform') == 'uniform'
