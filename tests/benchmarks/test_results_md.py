"""``benchmarks/RESULTS.md`` is what the committed JSONs in ``benchmarks/results/`` render: no number in it is edited
by hand, and a change to a renderer that would change an existing section shows here."""

import json
import os

import pytest
from bench_module import OTHER_SECTION, ROOT, load_bench

BENCHMARKS = ['dwm_overhead', 'loader_throughput', 'convert_throughput', 'quality', 'gpu']

RESULTS_MD = os.path.join(ROOT, 'benchmarks', 'RESULTS.md')
RESULTS = os.path.join(ROOT, 'benchmarks', 'results')


def _json(name: str) -> dict:
    with open(os.path.join(RESULTS, name)) as f:
        return json.load(f)


def _rendered(name: str) -> str:
    bench = load_bench(name)
    if name == 'dwm_overhead':
        res = _json('dwm_overhead.json')
        return bench.render_section(res, res['command'])
    if name == 'loader_throughput':
        return bench.render_section(_json('loader.json'), 'results/loader.png')
    if name == 'gpu':
        return bench.render_section(_json('gpu.json'))
    if name == 'convert_throughput':
        return bench.render_section(_json('convert.json'))
    return bench.render_section(_json('quality.json'), bench._images(RESULTS, RESULTS_MD))


@pytest.mark.parametrize('name', BENCHMARKS)
def test_section_is_rendered_from_the_committed_json(name):
    assert load_bench(name).read_section(RESULTS_MD) == _rendered(name)


@pytest.mark.parametrize('name', BENCHMARKS)
def test_replace_section_appends_then_replaces_between_its_markers(name, tmp_path):
    bench = load_bench(name)
    path = tmp_path / 'RESULTS.md'
    path.write_text('# Benchmark results\n\n' + OTHER_SECTION + '\ntrailing\n')
    first = bench.BEGIN_MARK + '\n## Section\n\nfirst 1.00x\n' + bench.END_MARK
    bench.replace_section(str(path), first)
    assert path.read_text() == '# Benchmark results\n\n' + OTHER_SECTION + '\ntrailing\n\n' + first + '\n'
    assert bench.read_section(str(path)) == first
    second = first.replace('first 1.00x', 'second 2.00x')
    bench.replace_section(str(path), second)
    assert path.read_text() == '# Benchmark results\n\n' + OTHER_SECTION + '\ntrailing\n\n' + second + '\n'


def test_replace_section_creates_the_file(tmp_path):
    bench = load_bench('quality')
    path = tmp_path / 'RESULTS.md'
    bench.replace_section(str(path), bench.BEGIN_MARK + '\nfirst\n' + bench.END_MARK)
    assert path.read_text().startswith('# Benchmark results\n')
    assert bench.read_section(str(path)) == bench.BEGIN_MARK + '\nfirst\n' + bench.END_MARK
