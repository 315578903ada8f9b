"""The loader benchmark runs end to end (``--quick``), writes valid JSON, and RESULTS.md is made from it."""

import os
import re

import pytest
from bench_module import OTHER_SECTION
from bench_module import quick_run as run_bench


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    return (*run_bench('loader_throughput', tmp_path_factory.mktemp('bench'), 'loader.json'), OTHER_SECTION)


def _positive(x):
    return isinstance(x, (int, float)) and x > 0


@pytest.mark.slow
def test_json_schema(quick_run):
    _, results, out, _, _ = quick_run
    assert results['benchmark'] == 'loader' and results['quick'] is True
    machine = results['machine']
    assert _positive(machine['nproc']) and _positive(machine['ram_gb'])
    assert {'mosaicml-streaming', 'webdataset', 'torch', 'numpy'} <= set(results['versions'])
    settings = results['settings']
    for key in ('samples', 'seq_len', 'batch_size', 'reps', 'selected_samples', 'mds_shards', 'wds_shards'):
        assert _positive(settings[key]), key
    groups = results['groups']
    assert {'direct', 'dataloader', 'collate', 'selection', 'workers', 'seq_len', 's3'} <= set(groups)
    assert {'dwm', 'streaming', 'webdataset', 'memmap', 'nothing'} <= set(groups['direct']['configs'])
    for w in (0, 2):
        for kind in ('dwm', 'streaming', 'webdataset', 'memmap', 'nothing'):
            assert f'{kind}@{w}w' in groups['dataloader']['configs']
    assert {f'dwm@{w}w' for w in (1, 2, 4)} <= set(groups['workers']['configs'])
    assert {f'dwm@{n}' for n in (512, 2048, 8192)} <= set(groups['seq_len']['configs'])
    assert {'dwm@direct:cold', 'dwm@direct:warm', 'streaming@2w:cold', 'streaming@2w:warm'} <= \
        set(groups['s3']['configs'])
    for group in groups.values():
        for name, config in group['configs'].items():
            assert _positive(config['samples']), name
            assert len(config['runs_samples_per_s']) == settings['reps'], name
            for metric in ('samples_per_s', 'tokens_per_s', 'ttfb_s'):
                s = config[metric]
                assert s['min'] <= s['median'] <= s['max'], (name, metric)
                assert _positive(s['min']), (name, metric)
            assert config['tokens_per_s']['median'] == pytest.approx(
                config['samples_per_s']['median'] * config['seq_len'])
    names = {r['name'] for r in results['ratios']}
    for needed in ('direct: DWMDataset / StreamingDataset', 'direct: DWMDataset / WebDataset',
                   '2 workers: DWMDataset / do-nothing ceiling',
                   'selection overlay / materialised subset, direct'):
        assert needed in names
    for r in results['ratios']:
        assert _positive(r['min']) and r['min'] <= r['median'] <= r['max'], r['name']
        assert r['a'] in groups[r['group']]['configs'] and r['b'] in groups[r['group']]['configs']
        if 'target' in r:
            assert r['met'] == (r['median'] <= r['target'] if r['target_kind'] == '<=' else
                                r['median'] >= r['target'])
    assert (out / 'loader.png').stat().st_size > 1000


@pytest.mark.slow
def test_ratios_are_recomputed_from_the_runs(quick_run):
    """Each ratio is the per-repetition quotient of the two configs' own measurements."""
    _, results, _, _, _ = quick_run
    for r in results['ratios']:
        a = results['groups'][r['group']]['configs'][r['a']]['runs_samples_per_s']
        b = results['groups'][r['group']]['configs'][r['b']]['runs_samples_per_s']
        expected = [y / x if r['metric'].startswith('cost') else x / y for x, y in zip(a, b)]
        assert r['runs'] == pytest.approx(expected)
        assert r['median'] == pytest.approx(sorted(expected)[len(expected) // 2])


@pytest.mark.slow
def test_results_md_section_is_rendered_from_the_json(quick_run):
    bench, results, out, results_md, other = quick_run
    text = results_md.read_text()
    section = bench.read_section(str(results_md))
    image = os.path.relpath(out / 'loader.png', results_md.parent)
    assert section == bench.render_section(results, image)  # no hand-edited numbers
    assert 'stale 9.99' not in text
    assert other in text and text.endswith('trailing text\n')  # other sections untouched
    assert text.count(bench.BEGIN_MARK) == 1
    # The table's figures are the JSON's.
    direct = results['groups']['direct']['configs']['dwm']['samples_per_s']
    assert f'{direct["median"]:,.0f} ({direct["min"]:,.0f}–{direct["max"]:,.0f})' in section
    for r in results['ratios']:
        assert re.search(re.escape(f'| {r["name"]} |') + r'[^\n]*' + re.escape(f'| {r["median"]:.2f} |'), section)
    m = results['machine']
    assert f'{m["nproc"]} CPUs' in section and f'{results["settings"]["reps"]} repetitions' in section
