"""The convert benchmark runs end to end (``--quick``), writes valid JSON beside ``--out``, and its RESULTS.md section
is made from it (another benchmark's section is kept)."""

import pytest
from bench_module import OTHER_SECTION
from bench_module import quick_run as run_bench


@pytest.mark.slow
def test_quick_run_writes_its_json_and_section(tmp_path):
    bench, results, out, results_md = run_bench('convert_throughput', tmp_path, 'convert.json')
    assert results['benchmark'] == 'convert' and results['quick'] is True
    assert results['ratios'] and all(r['median'] > 0 for r in results['ratios'])
    text = results_md.read_text()
    assert OTHER_SECTION in text and 'stale 9.99' not in text and text.rstrip().endswith('trailing text')
    assert bench.read_section(str(results_md)) == bench.render_section(results)
