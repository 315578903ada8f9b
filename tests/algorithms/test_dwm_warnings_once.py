"""DWM's refit warnings print once each (issue 16, item 6): a run's log held every one twice (``warnings.warn`` and a
``logging`` record of the same text), under Composer's and LLM Foundry's logging set-up alike."""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

SCRIPT = r'''
import logging, sys
sys.path.insert(0, sys.argv[1])
logging.basicConfig(level=logging.INFO, stream=sys.stderr)  # as python_log_level does
from test_dwm_refit_stability import _dwm, _fit
_fit(_dwm(refit_lr=0.0))  # the refit cannot move the weighter: "dead" at every refit
'''


def test_dead_weighter_warning_prints_once_per_refit():
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='default')
    proc = subprocess.run([sys.executable, '-c', SCRIPT, HERE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for refit in (1, 2, 3):
        assert proc.stderr.count(f'the weighter is dead at refit {refit} ') == 1, proc.stderr[-4000:]
