"""`dwm-stream bench`: which benchmarks it runs and with which options. Each benchmark's own quick run (and that it
writes its JSON under ``--out`` and its section into the RESULTS.md beside it) is tested once, in its own test file
(``test_loader_bench``, ``test_dwm_overhead_bench``, ``test_convert_bench``, ``test_quality_bench``); here the
benchmarks are stand-ins that record how they were called."""

import pytest

from dwm_stream import cli

EXPECTED = {  # `dwm-stream bench NAME` -> the module it runs, `python -m benchmarks.<module>`
    'loader': 'loader_throughput',
    'overhead': 'dwm_overhead',
    'convert': 'convert_throughput',
    'quality': 'quality',
    'gpu': 'gpu',
}


@pytest.fixture
def calls(monkeypatch):
    recorded = []
    monkeypatch.setattr(cli, '_run_benchmark', lambda module, argv: recorded.append((module, argv)) or 0)
    return recorded


def test_bench_all_runs_every_cpu_benchmark_with_quick_and_out(calls, tmp_path, capsys):
    assert cli._BENCHES == EXPECTED
    out = str(tmp_path / 'results')
    assert cli.main(['bench', 'all', '--quick', '--out', out]) == 0
    # `all` is the CPU benchmarks, each with --quick and --out; `bench gpu` runs alone.
    assert calls == [(EXPECTED[name], ['--quick', '--out', out]) for name in ('loader', 'overhead', 'convert',
                                                                               'quality')]
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith('== bench ') and line.endswith('s ==')], lines  # CI's log


def test_bench_passes_other_options_to_the_benchmark(calls):
    assert cli.main(['bench', 'quality', '--seeds', '0', '1']) == 0
    assert calls == [('quality', ['--seeds', '0', '1'])]  # without --out: benchmarks/results and its RESULTS.md


def test_a_failing_benchmark_fails_the_command(monkeypatch):
    monkeypatch.setattr(cli, '_run_benchmark', lambda module, argv: int(module == 'convert_throughput'))
    assert cli.main(['bench', 'loader', 'convert']) == 1


def test_every_benchmark_module_has_a_main_taking_quick_and_out():
    from bench_module import load_bench
    for module in EXPECTED.values():
        bench = load_bench(module)
        assert callable(bench.main), module
        assert bench.BEGIN_MARK.startswith('<!--') and bench.END_MARK.startswith('<!--'), module
