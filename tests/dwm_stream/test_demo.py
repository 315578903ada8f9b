"""`dwm-stream demo --quick` end to end, as a user runs it: a real subprocess, real loopback S3."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_quick_prints_its_table_and_writes_its_plot(tmp_path):
    out = tmp_path / 'demo'
    cli = os.path.join(os.path.dirname(sys.executable), 'dwm-stream')
    proc = subprocess.run([cli, 'demo', '--quick', '--out', str(out)], capture_output=True, text=True,
                          timeout=1200, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    text = proc.stdout
    for step in ('[1/6]', '[2/6]', '[3/6]', '[4/6]', '[5/6]', '[6/6]'):
        assert step in text
    assert 'Held-out quality (lower loss is better' in text
    assert 'Mean DWM weight per domain in each stage' in text
    assert 'Verdict:' in text
    summary = json.loads((out / 'demo.json').read_text())
    assert set(summary['runs']) == {'uniform', 'DWM'}
    for run in summary['runs'].values():
        assert 0 < run['heldout']['all'] < 20
        assert 0 <= run['lambada']['accuracy'] <= 1 and run['lambada']['examples'] > 0
    stages = summary['dwm_weight_by_stage']
    assert len(stages) == 3  # --quick runs 3 stages
    # After the first refit the weights are no longer exactly uniform.
    later = stages[max(stages)]
    assert any(abs(w - 1.0) > 1e-4 for w in later.values())
    assert set(summary['degraded_domains']) <= set(later)
    png = out / 'demo.png'
    assert png.exists() and png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
