"""Weighter files get the same mode as the ``.json`` beside them (issue 16, item 6): safetensors wrote 0600."""

from __future__ import annotations

import os
import stat

from algorithms.dwm import Weighter, WeighterConfig
from algorithms.dwm.export import save_weighter


def test_stage_files_share_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        weights, config = save_weighter(Weighter(WeighterConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2)),
                                        tmp_path / 'stage_0', stage=0, start='0ba')
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(config).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(weights).st_mode) == 0o644
