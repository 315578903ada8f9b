"""`dwm-stream bench all --quick --out DIR` runs every benchmark and each writes valid JSON under DIR."""

import json
import os
import subprocess
import sys
import time

import pytest

from dwm_stream.cli import _BENCHES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPECTED = {  # benchmark -> the JSON it writes under --out
    'loader': 'loader.json',
    'overhead': 'dwm_overhead.json',
    'convert': 'convert.json',
    'quality': 'quality.json',
}
# The issue asks `bench all --quick` to take under 5 minutes in CI. That is a budget, not an assertion: these
# machines are shared and noisy, so the test prints the time (see CI's log) instead of failing on it.


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_all_quick_writes_json_for_every_benchmark(tmp_path):
    assert set(_BENCHES) == set(EXPECTED) | {'gpu'}  # `all` is the CPU benchmarks; `bench gpu` runs alone
    out = tmp_path / 'results'
    results_md = tmp_path / 'RESULTS.md'
    results_md.write_text('# Benchmark results\n')
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, '-m', 'dwm_stream.cli', 'bench', 'all', '--quick', '--out', str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name, filename in EXPECTED.items():
        with open(out / filename) as f:
            results = json.load(f)  # valid JSON
        assert results, name
    assert not (out / 'gpu.json').exists()  # `all` leaves the GPU benchmark out
    # Results go beside --out, never into the repository's RESULTS.md.
    text = results_md.read_text()
    for mark in ('<!-- loader:begin -->', '<!-- dwm-overhead:begin -->', '<!-- convert:begin -->',
                 '<!-- quality:begin -->'):
        assert mark in text, mark
    per_bench = [line for line in proc.stdout.splitlines() if line.startswith('== bench ') and line.endswith('s ==')]
    print(f'bench all --quick: {seconds:.0f}s;', ' '.join(per_bench))
