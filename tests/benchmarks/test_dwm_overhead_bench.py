"""The DWM overhead benchmark runs end to end (``--quick``), writes valid JSON, and its RESULTS.md section is the one
the JSON produces (no hand-edited numbers); other sections of RESULTS.md are left alone."""

import json
import math

import pytest
from bench_module import load_bench


LOADER_SECTION = '<!-- loader:begin -->\n## Loader throughput\n\nkeep me 1.23\n<!-- loader:end -->\n'


def _load_bench():
    return load_bench('dwm_overhead')


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    bench = _load_bench()
    root = tmp_path_factory.mktemp('bench')
    results_md = root / 'RESULTS.md'
    # An old, unmarked section (as written before the markers existed) followed by another benchmark's section.
    results_md.write_text('# Benchmark results\n\n## DWM overhead\n\nstale 9.99x\n\n' + LOADER_SECTION)
    out = root / 'dwm_overhead.json'
    assert bench.main(['--quick', '--out', str(out), '--results-md', str(results_md)]) == 0
    with open(out) as f:
        results = json.load(f)
    return bench, results, results_md


def _summary_ok(s, n=None):
    assert s['min'] <= s['median'] <= s['max']
    assert all(math.isfinite(x) for x in s['all'])
    if n is not None:
        assert s['n'] == n == len(s['all'])


@pytest.mark.slow
def test_json_schema(quick_run):
    bench, res, _ = quick_run
    assert res['benchmark'] == 'dwm_overhead' and res['schema_version'] == bench.SCHEMA_VERSION
    assert res['quick'] is True and res['command'] == 'python benchmarks/dwm_overhead.py --quick'
    machine = res['machine']
    assert machine['nproc'] > 0 and machine['ram_gib'] > 0 and machine['torch_threads'] >= 1
    assert len(machine['load_avg_start']) == 3 and len(machine['load_avg_end']) == 3
    assert {'python', 'torch', 'composer', 'transformers'} <= set(res['versions'])
    settings = res['settings']
    reps = settings['reps']
    assert reps >= 2 and settings['steps_per_rep'] >= 1 and settings['memory_reps'] >= 2
    assert {(c['ratio_target'], c['batch']) for c in res['configs']} == {(0.25, 8), (0.25, 32), (1.0, 8), (1.0, 32)}
    for cfg in res['configs']:
        assert 0.15 < cfg['weighter']['param_ratio'] < 0.4 if cfg['ratio_target'] == 0.25 else \
            0.7 < cfg['weighter']['param_ratio'] < 1.4
        assert 0 < cfg['flops']['weighter_forward_share'] < 1
        assert cfg['flops']['refit_over_plain_flops'] > 3
        for clock in ('wall', 'cpu'):
            for arm in ('plain', 'dwm'):
                _summary_ok(cfg['step_time_s'][arm][clock], reps)
                assert cfg['step_time_s'][arm][clock]['min'] > 0
            for arm in ('plain', 'jvp'):
                _summary_ok(cfg['refit_time_s'][arm][clock], reps)
            for name in ('weighting_overhead', 'refit_over_plain'):
                _summary_ok(cfg['ratios'][name][clock], reps)
    main = [c for c in res['configs'] if 'weighting_overhead_two_ce' in c['ratios']]
    assert len(main) == 1 and (main[0]['ratio_target'], main[0]['batch']) == (0.25, 8)
    for name in ('weighting_overhead_two_ce', 'refit_over_plain_jvp_eager', 'refit_over_plain_fd'):
        _summary_ok(main[0]['ratios'][name]['cpu'], reps)
    vocab = res['vocab_ablation']
    assert vocab['vocab'] > settings['llm']['vocab']
    for name in ('weighting_overhead', 'weighting_overhead_two_ce'):
        _summary_ok(vocab['ratios'][name]['cpu'], reps)
    names = [m['name'] for m in res['memory']]
    assert {c['name'] for c in res['configs']} < set(names) and len(names) == 6
    for mem in res['memory']:
        assert len(mem['plain_step']) == len(mem['refit_step']) == settings['memory_reps']
        for key in ('transient_ratio', 'peak_ratio', 'plain_transient_mib', 'refit_transient_mib'):
            _summary_ok(mem[key])
        assert mem['plain_transient_mib']['median'] > 0 and mem['peak_ratio']['median'] > 0.5
    assert [t['name'] for t in res['targets']] == [c['name'] for c in res['configs']]
    for t in res['targets']:
        assert t['overhead_ok'] == (t['weighting_overhead'] <= t['overhead_bound'])
        assert t['refit_ok'] == (t['refit_over_plain'] <= 4.0)
        assert t['memory_ok'] == (t['transient_memory_ratio'] <= 1.5)
        cfg = next(c for c in res['configs'] if c['name'] == t['name'])
        assert t['weighting_overhead'] == cfg['ratios']['weighting_overhead']['cpu']['median']


@pytest.mark.slow
def test_results_md_is_made_from_the_json(quick_run):
    bench, res, results_md = quick_run
    text = results_md.read_text()
    section = bench.read_section(results_md)
    assert section == bench.render_section(res, res['command'])
    assert 'stale 9.99x' not in text and text.count('## DWM overhead') == 1
    assert text.endswith(LOADER_SECTION)  # the other benchmark's section, markers included, untouched
    # Every number of the targets table comes from the JSON.
    for t in res['targets']:
        assert f'{100 * t["weighting_overhead"]:+.1f}%' in section
        assert f'{t["refit_over_plain"]:.2f}x' in section


def test_update_results_section_between_markers(tmp_path):
    bench = _load_bench()
    path = tmp_path / 'RESULTS.md'
    path.write_text('# Benchmark results\n\n' + LOADER_SECTION + '\ntrailing\n')
    first = bench.BEGIN_MARK + '\n## DWM overhead\n\nfirst 1.00x\n' + bench.END_MARK + '\n'
    bench.update_results_section(path, first)
    assert path.read_text() == '# Benchmark results\n\n' + LOADER_SECTION + '\ntrailing\n\n' + first
    second = first.replace('first 1.00x', 'second 2.00x')
    bench.update_results_section(path, second)
    assert path.read_text() == '# Benchmark results\n\n' + LOADER_SECTION + '\ntrailing\n\n' + second
    assert bench.read_section(path) == second
