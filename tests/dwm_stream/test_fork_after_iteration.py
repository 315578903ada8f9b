"""A dataset iterated in this process, then by forked DataLoader workers, never hangs (issue 16, item 5).

The cause: a forked worker inherited ``DWMDataset._iterator``, the parent's epoch, whose two threads (the consumer
and the prepare-ahead thread) are not in the child. When either had not called ``on_exit`` at the fork (a generator
suspended after a peek; a prepare thread still finishing on a loaded machine), the worker's ``begin_epoch`` waited in
streaming's ``_Iterator.exit`` for threads that would never exit. Each scenario runs in a subprocess with a bounded
timeout, so a hang fails the test instead of the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCENARIO = r'''
import sys
import numpy as np
from torch.utils.data import DataLoader
from dwm_stream.data.dataset import DWMDataset
from dwm_stream.data.loader import collate_samples

corpus, mode, tries = sys.argv[1], sys.argv[2], int(sys.argv[3])
everything = sorted(np.load(corpus + '/uids.npy').tolist())
dataset = DWMDataset(local=corpus, shuffle=True, shuffle_seed=3, batch_size=10)
# timeout: a worker that hangs fails its try (DataLoader raises after 60 s without a batch)
loader = DataLoader(dataset, batch_size=10, num_workers=2, collate_fn=collate_samples, multiprocessing_context='fork',
                    timeout=60)
for _ in range(tries):  # each try forks new workers
    if mode == 'peek':  # the epoch here is still open (its consumer suspended) when the workers fork
        here = iter(dataset)
        next(here)
    else:  # read to the end here: the prepare thread may still be finishing when the workers fork
        assert sorted(int(s['uid']) for s in dataset) == everything
    assert sorted(u for batch in loader for u in batch['uid'].tolist()) == everything
print('ok')
'''


def _run(corpus: str, mode: str, timeout: float, tries: int = 2, one_core: bool = False) -> None:
    env = dict(os.environ, TOKENIZERS_PARALLELISM='false', OMP_NUM_THREADS='1')
    # one_core: the scenario and the workers it forks share one core (affinity is inherited), so more processes are
    # runnable than there are cores, as on a loaded machine, without burning another core to get there.
    pin = (lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})) if one_core else None
    try:
        proc = subprocess.run([sys.executable, '-c', SCENARIO, corpus, mode, str(tries)], env=env,
                              capture_output=True, text=True, timeout=timeout, preexec_fn=pin)
    except subprocess.TimeoutExpired:
        pytest.fail(f'{mode}: forked DataLoader workers hung (no result in {timeout:.0f} s)')
    assert proc.returncode == 0 and proc.stdout.strip().endswith('ok'), proc.stdout[-2000:] + proc.stderr[-4000:]


def test_workers_forked_while_an_epoch_is_open_here(converted_mds):
    _run(converted_mds, 'peek', timeout=120)


@pytest.mark.slow
def test_workers_forked_after_iterating_here_under_load(converted_mds):
    """The scenario of ``test_dataset.py::test_iterated_here_then_by_forked_workers``, 24 times (new workers forked
    each time), on a loaded core: the scenario and its two DataLoader workers pinned to one core, three runnable
    processes on it (this replaced a CPU burner per core, which cost as much CPU as the rest of the test). Each try
    is bounded by the DataLoader's 60 s timeout, and each process of 12 tries by 300 s."""
    for _ in range(2):
        _run(converted_mds, 'full', timeout=300, tries=12, one_core=True)
