"""`dwm-stream demo` end to end, as a user runs it: a real subprocess, real loopback S3. The test runs `--tiny`, the
smallest budget that still goes through every step (corpus, tokenizer, shards, S3, both trainings with DWM's 3 stages
and refits, the held-out evaluation, the table and the plot); `--quick` and the full demo differ only in sizes."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_prints_its_table_and_writes_its_plot(tmp_path):
    out = tmp_path / 'demo'
    cli = os.path.join(os.path.dirname(sys.executable), 'dwm-stream')
    proc = subprocess.run([cli, 'demo', '--tiny', '--out', str(out)], capture_output=True, text=True,
                          timeout=1200, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    text = proc.stdout
    for step in ('[1/6]', '[2/6]', '[3/6]', '[4/6]', '[5/6]', '[6/6]'):
        assert step in text
    assert 'Held-out quality (lower loss is better' in text
    assert 'Mean DWM weight per domain in each stage' in text
    assert 'Verdict (this run, one seed):' in text
    assert 'Verdict across seeds (benchmarks/RESULTS.md' in text  # the committed quality.json is read
    summary = json.loads((out / 'demo.json').read_text())
    assert set(summary['runs']) == {'uniform', 'DWM'}
    for run in summary['runs'].values():
        assert 0 < run['heldout']['all'] < 20
        assert 0 <= run['lambada']['accuracy'] <= 1 and run['lambada']['examples'] > 0
    stages = summary['dwm_weight_by_stage']
    assert len(stages) == 3  # --tiny (as --quick) runs 3 stages
    # After the first refit the weights are no longer exactly uniform.
    later = stages[max(stages)]
    assert any(abs(w - 1.0) > 1e-4 for w in later.values())
    assert set(summary['degraded_domains']) <= set(later)
    png = out / 'demo.png'
    assert png.exists() and png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def _analysis(deltas, met, room=True):
    headroom = {'holds': room, 'gain_mean': 0.2, 'seeds_met': 5 if room else 1, 'n': 5, 'null_rms': 0.01}
    return {'analysis': {'target_method': 'dwm', 'headroom': headroom,
                         'methods': {'dwm': {'delta_vs_uniform': {'mean': sum(deltas) / len(deltas), 'n': len(deltas),
                                                                  'better': sum(d < 0 for d in deltas)},
                                             'vs_null': {'seeds': 3, 'n': 5}}},
                         'targets': [{'name': f't{i}', 'met': m} for i, m in enumerate(met)]}}


def test_bench_verdict_follows_the_quality_json(tmp_path):
    from dwm_stream.demo.run import QUALITY_JSON, bench_verdict
    path = tmp_path / 'quality.json'
    path.write_text(json.dumps(_analysis([-0.01, 0.02, -0.03, 0.0, 0.01], [True, False, True])))
    (line,) = [x for x in bench_verdict(str(path)) if x]
    assert 'does not reliably beat uniform' in line and '-0.0020' in line and 'lower in 2 of 5 seeds' in line
    assert 'the bench has headroom (oracle gain +0.2000, 5 of 5 seeds' in line, line and 'targets met: 2 of 3' in line
    assert 'below its own null in 3 of 5' in line
    path.write_text(json.dumps(_analysis([0.03, -0.01, 0.05, 0.02, 0.01], [True, False])))
    assert 'DWM (dwm) does not beat uniform: held-out macro loss change +0.0200' in bench_verdict(str(path))[1]
    path.write_text(json.dumps(_analysis([-0.05] * 5, [True, True])))
    assert 'DWM (dwm) beats uniform' in bench_verdict(str(path))[1]
    path.write_text(json.dumps(_analysis([-0.05] * 5, [True, True], room=False)))
    line = bench_verdict(str(path))[1]
    assert 'has NO headroom' in line and 'cannot be ranked against uniform' in line
    assert 'no quality-bench record' in bench_verdict(str(tmp_path / 'missing.json'))[1]
    # The committed records are what the demo quotes: the CPU bench, and the same bench bigger on a GPU, labelled.
    assert 'no quality-bench record' not in bench_verdict(QUALITY_JSON)[1]
    from dwm_stream.demo.run import ALT_QUALITY_JSON, GPU_QUALITY_JSON
    alt = bench_verdict(ALT_QUALITY_JSON, 'CPU bench, other corruptions')[1]
    assert alt.startswith('Verdict across seeds (benchmarks/RESULTS.md, CPU bench, other corruptions, 5 seeds): the '
                          'bench has headroom'), alt
    gpu = bench_verdict(GPU_QUALITY_JSON, 'on one H200')[1]
    assert gpu.startswith('Verdict across seeds (benchmarks/RESULTS.md, on one H200, 5 seeds): the bench has')
