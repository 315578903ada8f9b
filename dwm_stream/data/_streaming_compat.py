"""Every use of mosaicml-streaming's private API, in one place.

:class:`~dwm_stream.data.dataset.DWMDataset` keeps streaming's partitioning, shuffling, resumption
and shard preparation, but replaces the iterator and hardens the download and prepare paths. That
needs a few of streaming's private members (underscore names, and names from the internal
``streaming.base.*`` modules). Each is wrapped here by one small function, or one class where
streaming calls a private method that must be overridden, with a docstring naming what it wraps and
why; the rest of the package calls only these. ``tests/dwm_stream/test_streaming_compat.py`` fails if
any other module touches a streaming private name.

Written against mosaicml-streaming 0.12.0 (the version ``pyproject.toml`` admits and the tests run
against). When streaming is upgraded, this module is the part to read against the new release:
its ``StreamingDataset.__iter__``, ``prepare_shard``, ``_Iterator`` and ``Stream._download_file``.
"""

from __future__ import annotations

import atexit
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from threading import Event
from typing import Any, Iterator, Optional

import numpy as np
from streaming import Stream, StreamingDataset
from streaming.base.constant import TICK
from streaming.base.dataset import _Iterator, _IterState, _ShardState
from streaming.base.shared import SharedMemory
from streaming.base.shared import prefix as _prefix_module
from streaming.base.util import wait_for_file_to_exist
from streaming.base.world import World

__all__ = [
    'World', 'POLL_INTERVAL_S', 'SHARD_LOCAL', 'DownloadHookStream', 'EpochIterator', 'stream_arguments',
    'begin_epoch', 'start_epoch', 'background_executor', 'background_event', 'shard_states',
    'shard_access_times', 'release_failed_shard', 'wait_for_file', 'is_shm_prefix_race',
    'is_cache_limit_error', 'is_unsafe_type_error', 'release_shared_memory', 'make_fork_safe',
]

# `streaming.base.world.World`: the rank/worker topology streaming passes to `Stream.get_shards`
# (re-exported for type annotations; its attributes, e.g. `is_local_leader`, are public).

# `streaming.base.constant.TICK`: the interval at which streaming's own threads poll shared state.
# The prepare-ahead thread waits for the consumer at the same rate.
POLL_INTERVAL_S: float = TICK

# `streaming.base.dataset._ShardState.LOCAL` as a plain int, compared against `shard_states(...)`
# in the per-sample loop (an enum attribute lookup costs about 1 us).
SHARD_LOCAL: int = int(_ShardState.LOCAL)
_SHARD_PREPARING = int(_ShardState.PREPARING)
_SHARD_REMOTE = int(_ShardState.REMOTE)
_ITERATING = int(_IterState.ITERATING)


class DownloadHookStream(Stream):
    """A ``streaming.Stream`` whose downloads report their final failure through a public hook.

    Wraps the private ``Stream._download_file``, which streaming calls for ``index.json`` and for
    every shard file (after its own bounded retries). Overriding it is the only place where a final
    download failure can be turned into an error naming the object and the endpoint;
    :meth:`on_download_error` is that hook, and :meth:`download_to_cache` is the same download for
    files streaming does not know about (the corpus sidecars).
    """

    def _download_file(self, from_basename: str, to_basename: Optional[str] = None) -> str:
        try:
            return super()._download_file(from_basename, to_basename)
        except Exception as e:  # noqa: BLE001 - the hook returns the error to raise
            error = self.on_download_error(e, from_basename, to_basename)
            if error is e:
                raise
            raise error from e

    def download_to_cache(self, from_basename: str, to_basename: Optional[str] = None) -> str:
        """Download ``from_basename`` (beside ``index.json``) into the cache; returns its local path.

        Streaming's download with its ``download_retry`` and ``download_timeout``; a final failure goes
        through :meth:`on_download_error`.
        """
        return self._download_file(from_basename, to_basename)

    def on_download_error(self, error: Exception, from_basename: str, to_basename: Optional[str]) -> Exception:
        """The error to raise after a download of ``from_basename`` failed; default: ``error`` itself."""
        return error


def stream_arguments(stream: Stream) -> dict[str, Any]:
    """The constructor arguments ``stream`` was given, to build an equivalent stream.

    Wraps ``Stream._proportion``, ``_repeat``, ``_choose``, ``_download_retry``,
    ``_download_timeout`` and ``_keep_zip``: streaming keeps the user's values there, because
    ``StreamingDataset`` overwrites the public ``proportion``/``repeat``/``choose`` (and fills in
    defaults) when it applies weights. A copy built from the public attributes would fail
    streaming's ``validate_weights`` (a stream may set only one of them).
    """
    return dict(remote=stream.remote, local=stream.local, split=stream.split or None,
                proportion=stream._proportion, repeat=stream._repeat, choose=stream._choose,
                download_retry=stream._download_retry, download_timeout=stream._download_timeout,
                validate_hash=stream.validate_hash, keep_zip=stream._keep_zip)


class EpochIterator(_Iterator):
    """Streaming's per-epoch ``_Iterator``, with its private state readable as a plain attribute.

    Wraps ``streaming.base.dataset._Iterator``: the object streaming's ``__iter__`` keeps in
    ``StreamingDataset._iterator`` so that starting a new epoch stops the previous one's threads.
    ``DWMDataset`` uses its public fields (``total``, ``prepare_index``, ``yield_index``) and methods
    (``exit``, ``non_blocking_exit``, ``on_exit``) as streaming's own threads do. Streaming writes the
    private ``_state`` (``ITERATING`` -> ``EXITING`` -> ``EXITED``); the setter mirrors it into
    ``running``, which the per-sample loop reads at the cost of one attribute lookup.

    Two threads exit through ``on_exit``: ``DWMDataset``'s prepare-ahead thread and its consumer
    (streaming's own are a prepare and a ready thread).
    """

    _num_threads_to_exit = 2
    running: bool

    @property
    def _state(self) -> int:
        return self._epoch_state

    @_state.setter
    def _state(self, value: int) -> None:
        self._epoch_state = value
        self.running = value == _ITERATING


def begin_epoch(dataset: StreamingDataset) -> np.ndarray:
    """Start an epoch of ``dataset`` as ``StreamingDataset.__iter__`` does; returns this worker's sample ids.

    Wraps the preamble of streaming's ``__iter__``: stop the previous epoch's threads
    (``_iterator.exit()``), create the thread pool and failure event (``_executor``, ``_event``),
    detect this worker (``_unique_worker_world``, ``_parallel_worker_world``), resume or advance the
    epoch (``_resume_incr_epoch``) and take this worker's partition (``_get_work``). Doing exactly
    this keeps streaming's partition, order, exactly-once delivery and resumption.

    Raises:
        RuntimeError: If a background thread of an earlier epoch failed.
    """
    if hasattr(dataset, '_iterator'):
        dataset._iterator.exit()
    if not hasattr(dataset, '_executor'):
        dataset._executor = ThreadPoolExecutor()
    if not hasattr(dataset, '_event'):
        dataset._event = Event()
    elif dataset._event.is_set():
        raise RuntimeError('Background thread failed. Check other traceback.')
    dataset._unique_worker_world = dataset._unique_rank_world.detect_workers()
    dataset._parallel_worker_world = dataset._parallel_rank_world.detect_workers()
    epoch, sample_in_epoch = dataset._resume_incr_epoch()
    return dataset._get_work(epoch, sample_in_epoch)


def start_epoch(dataset: StreamingDataset, sample_ids: np.ndarray) -> EpochIterator:
    """A new :class:`EpochIterator` over ``sample_ids``, registered as ``dataset``'s current epoch.

    Wraps ``StreamingDataset._iterator``, which the next :func:`begin_epoch` (and streaming) stops.
    """
    it = EpochIterator(sample_ids)
    dataset._iterator = it
    return it


def background_executor(dataset: StreamingDataset) -> ThreadPoolExecutor:
    """The thread pool of ``dataset``'s background threads.

    Wraps ``StreamingDataset._executor`` (created by :func:`begin_epoch`), so that the prepare-ahead
    thread shares the pool streaming's threads would use.
    """
    return dataset._executor


def background_event(dataset: StreamingDataset) -> Event:
    """The event that is set when a background thread of ``dataset`` failed.

    Wraps ``StreamingDataset._event`` (created by :func:`begin_epoch`): streaming's ``get_item`` and
    ``__iter__`` check it, so setting it stops every reader of the dataset, not only ours.
    """
    return dataset._event


def shard_states(dataset: StreamingDataset) -> np.ndarray:
    """Each shard's preparation state (compare with :data:`SHARD_LOCAL`), shared by every process on the node.

    Wraps ``StreamingDataset._shard_states`` (a ``SharedArray``; this is its numpy view, read without
    the cache lock as streaming's own threads do). The read path needs it to skip shards that are
    already local and to notice shards that ``cache_limit`` evicted.
    """
    return dataset._shard_states.numpy()


def shard_access_times(dataset: StreamingDataset) -> np.ndarray:
    """Each shard's last access time (``time.time_ns()``), shared by every process on the node.

    Wraps ``StreamingDataset._shard_access_times`` (numpy view of a ``SharedArray``): streaming evicts
    the least recently accessed shard first when ``cache_limit`` is set, so the read path touches a
    shard when it enters it, as streaming's ``get_item`` does.
    """
    return dataset._shard_access_times.numpy()


def release_failed_shard(dataset: StreamingDataset, shard_id: int) -> None:
    """After ``StreamingDataset.prepare_shard`` raised: put shard ``shard_id`` back to ``REMOTE``.

    Wraps ``StreamingDataset._cache_filelock`` and ``_shard_states`` with ``_ShardState.PREPARING``/
    ``REMOTE``. Streaming sets a shard to ``PREPARING`` before downloading it and never resets it when
    the download or decompression raises, so every process waiting on it would spin forever; a later
    attempt starts over from ``REMOTE``. The cache lock, which eviction may still hold, is released.
    """
    lock = getattr(dataset, '_cache_filelock', None)  # created lazily by prepare_shard
    if lock is None:
        return
    lock.acquire()
    try:
        if dataset._shard_states[shard_id] == _SHARD_PREPARING:
            dataset._shard_states[shard_id] = _SHARD_REMOTE
    finally:
        lock.release(force=True)


def wait_for_file(filename: str, timeout_s: float, message: str) -> None:
    """Wait until ``filename`` exists (written by another process), polling every 50 ms.

    Wraps ``streaming.base.util.wait_for_file_to_exist``, the wait streaming's non-leader ranks use
    for files the local leader downloads.

    Raises:
        RuntimeError: After ``timeout_s``, with ``message`` and the time waited.
    """
    wait_for_file_to_exist(filename, 0.05, timeout_s, message)


def is_shm_prefix_race(error: FileExistsError) -> bool:
    """Whether ``error`` is streaming losing a race for a shared-memory prefix.

    ``StreamingDataset.__init__`` picks the first free prefix (``get_shm_prefix``), then creates the
    ``<prefix>_locals`` block: two jobs starting at once can pick the same prefix, and the loser gets
    this ``FileExistsError``. Retrying picks the next prefix.
    """
    return str(error.filename or '').endswith('_locals')


def is_cache_limit_error(error: ValueError) -> bool:
    """Whether ``error`` is ``StreamingDataset.__init__`` refusing a ``cache_limit`` too small for a shard."""
    return 'cache limit' in str(error).lower()


def is_unsafe_type_error(error: ValueError) -> bool:
    """Whether ``error`` is ``Stream.get_shards`` refusing a pickle-typed column (``allow_unsafe_types``)."""
    return 'unsafe type' in str(error)


class _AttachWithoutExitHold(SharedMemory):
    """``streaming.base.shared.SharedMemory`` that holds a block it only *attaches to* no longer than it is used.

    Installed as ``streaming.base.shared.prefix.SharedMemory`` (below). Streaming's ``get_shm_prefix``
    attaches to the blocks of every prefix another live dataset holds, to probe or read them, and
    drops the object; but each attachment is registered with ``atexit`` and so keeps its mapping and
    two descriptors until the process exits: every dataset built then leaks about a dozen descriptors
    per other live dataset. Blocks this process creates keep streaming's ``atexit`` cleanup, which
    unlinks them; attaching never unlinks, so dropping the hold loses nothing.
    """

    def __init__(self, name: Optional[str] = None, create: Optional[bool] = None, size: int = 0,
                 auto_cleanup: bool = True) -> None:
        super().__init__(name, create, size, auto_cleanup=auto_cleanup and create is not False)


_prefix_module.SharedMemory = _AttachWithoutExitHold


def _shared_memory_in(obj: Any, depth: int = 3) -> Iterator[SharedMemory]:
    if isinstance(obj, SharedMemory):
        yield obj
    elif depth and type(obj).__module__.startswith('streaming.base.shared') and hasattr(obj, '__dict__'):
        for value in vars(obj).values():
            yield from _shared_memory_in(value, depth - 1)


def release_shared_memory(dataset: StreamingDataset) -> int:
    """Give back the shared memory that ``dataset`` created, now rather than at interpreter exit.

    Wraps ``streaming.base.shared.SharedMemory``: the blocks a ``StreamingDataset`` creates (its
    ``<prefix>_locals``, barrier, epoch counter, cache usage, shard states and access times, and a
    resume block) are each registered with ``atexit``, so they, and two file descriptors each, live
    until the process exits even after the dataset is gone. A process that builds datasets one after
    another (a test session, a benchmark, a sweep) runs out of descriptors (``OSError: [Errno 24]
    Too many open files`` after about 80 datasets under the common limit of 1024). This drops the
    ``atexit`` hold and unlinks the blocks' names; each block's mapping and descriptors then close
    when the last object using it (the dataset, a numpy view) is freed. Call it only from the process
    and for the object that created them, once nothing else attaches to them by name.

    Returns:
        int: How many blocks were released.
    """
    found = {id(m): m for value in vars(dataset).values() for m in _shared_memory_in(value)}
    for memory in found.values():
        atexit.unregister(memory.cleanup)
        for block in memory.created_shms:
            try:
                block.unlink()
            except FileNotFoundError:  # already gone (another process cleaned it up)
                pass
    return len(found)


_FORK_SAFE: 'weakref.WeakSet[StreamingDataset]' = weakref.WeakSet()


def _drop_inherited_locks() -> None:
    for dataset in list(_FORK_SAFE):
        barrier = getattr(dataset, '_shared_barrier', None)
        if barrier is not None and hasattr(barrier, 'lock'):
            del barrier.lock
        if hasattr(dataset, '_cache_filelock'):
            del dataset._cache_filelock
        # The parent's epoch: its threads (and its pool's threads) do not exist here. Streaming's
        # `_Iterator.exit()` waits for `_num_threads_to_exit` threads to call `on_exit`; a child that
        # inherits an epoch whose consumer or prepare thread had not exited yet (a generator suspended
        # after a peek, or a prepare thread still finishing on a loaded machine) would wait forever in
        # `begin_epoch`, and its `_lock` may have been held at the fork. The inherited thread pool counts
        # the parent's idle threads as its own and may never run a task. Both are made afresh here.
        for name in ('_iterator', '_executor'):
            if name in dataset.__dict__:
                del dataset.__dict__[name]


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


def make_fork_safe(dataset: StreamingDataset) -> None:
    """Let ``dataset`` be iterated in this process and then in forked workers (a DataLoader's).

    Wraps ``StreamingDataset._shared_barrier.lock`` and ``_cache_filelock``: streaming creates these
    ``filelock.FileLock`` objects lazily, on the first epoch or eviction in a process, and keeps them.
    A DataLoader worker forked after the dataset was iterated here inherits them, and ``filelock``
    refuses an inherited lock (``RuntimeError: ... was inherited across fork``; older versions
    could hang). In a forked child each registered dataset drops them, and streaming creates its own
    on first use, on the same lock files. It also drops the parent's epoch (``_iterator``) and thread
    pool (``_executor``): their threads are not in the child, and ``_iterator.exit()`` would wait for
    them forever.
    """
    _FORK_SAFE.add(dataset)
