"""Datasets give back streaming's shared memory when they are freed, not at interpreter exit.

Streaming registers every shared-memory block it creates or attaches to with ``atexit``, so a
process that builds datasets one after another (a test session, a benchmark, a sweep) holds two
descriptors per block until it exits and runs out of them under the common ``ulimit -n 1024``.
These tests count the process's open ``/dev/shm`` descriptors: they are not timed.
"""

from __future__ import annotations

import os
import time

import pytest
from streaming import StreamingDataset

from dwm_stream.data.dataset import DWMDataset, release_shared_memory
from dwm_stream.testing.synthetic import write_synthetic_corpus

pytestmark = pytest.mark.skipif(not os.path.isdir('/proc/self/fd') or not os.path.isdir('/dev/shm'),
                                reason='counts descriptors through /proc/self/fd and /dev/shm')


def _shm_descriptors() -> list[str]:
    found = []
    for fd in os.listdir('/proc/self/fd'):
        try:
            target = os.readlink(f'/proc/self/fd/{fd}')
        except OSError:  # closed since listed
            continue
        if target.startswith('/dev/shm/'):
            found.append(target)
    return found


def _settled(limit: int, timeout_s: float = 10.0) -> int:
    """The descriptor count once it is at most ``limit`` (a prepare thread may drop the last reference).

    At most, not exactly: a collection during the test may free other tests' datasets too.
    """
    deadline = time.monotonic() + timeout_s
    while len(_shm_descriptors()) > limit and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(_shm_descriptors())


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('shm') / 'mds')
    write_synthetic_corpus(out, 64, seq_len=16, seed=3)
    return out


def test_datasets_built_one_after_another_hold_no_more_descriptors_than_one(corpus):
    base = len(_shm_descriptors())  # other tests' datasets, if any are still alive
    live = DWMDataset(local=corpus, batch_size=4)  # each new dataset probes this one's blocks
    list(live)
    before = len(_shm_descriptors())
    one = None
    for i in range(25):
        ds = DWMDataset(local=corpus, batch_size=4, shuffle=True, shuffle_seed=i)
        assert len(list(ds)) == 64
        list(ds)  # a second epoch
        if one is None:
            one = len(_shm_descriptors()) - before  # what a single live dataset holds
            assert one > 0
        del ds
    # Streaming alone would hold 25 datasets' blocks, plus the probes of `live`'s, until exit.
    assert _settled(before) <= before
    del live
    assert _settled(base) <= base


def test_a_freed_dataset_unlinks_its_blocks_and_a_live_one_keeps_them(corpus):
    before = set(_shm_descriptors())
    ds = DWMDataset(local=corpus, batch_size=4)
    names = sorted({os.path.basename(t) for t in set(_shm_descriptors()) - before})
    assert names and all(os.path.exists(os.path.join('/dev/shm', n)) for n in names)
    list(ds)
    assert all(os.path.exists(os.path.join('/dev/shm', n)) for n in names)  # in use: kept
    del ds
    _settled(len(before))
    assert not [n for n in names if os.path.exists(os.path.join('/dev/shm', n))]


def test_dataloader_worker_copies_leave_the_blocks_to_the_dataset(corpus):
    """Forked workers hold copies of the dataset; when they exit, the parent's blocks stay."""
    from torch.utils.data import DataLoader

    from dwm_stream.data.loader import collate_samples
    base = len(_shm_descriptors())
    ds = DWMDataset(local=corpus, batch_size=4, shuffle=True)
    for _ in range(2):  # each epoch forks new workers, which attach to the same blocks
        loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_samples)
        assert sum(len(b['uid']) for b in loader) == 64
        del loader
    names = {os.path.basename(t) for t in _shm_descriptors()}
    assert names and all(os.path.exists(os.path.join('/dev/shm', n)) for n in names)
    del ds
    assert _settled(base) <= base


def test_release_shared_memory_gives_back_a_plain_streaming_dataset(corpus):
    base = len(_shm_descriptors())
    plain = StreamingDataset(local=corpus, batch_size=4)
    assert len(list(plain)) == 64
    assert len(_shm_descriptors()) > base
    assert release_shared_memory(plain) > 0
    del plain
    assert _settled(base) <= base
