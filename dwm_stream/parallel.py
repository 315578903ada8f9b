"""Process pools for the offline passes (``convert``, DSIR, QuRating): one way to set them up.

A pool forks where the platform allows it, so the workers inherit the modules already imported
(mosaicml-streaming imports torch, which takes seconds per process under spawn); streaming and
tokenizers are imported once, before forking. The Rust tokenizer turns its own thread pool off in
a forked child, and ``TOKENIZERS_PARALLELISM=false`` is set for the children only, so that
one process per core does not oversubscribe the cores and tokenizers prints no fork warning.
Workers hold no state from the parent but these modules: tasks must be picklable, and functions
module-level.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional

import streaming  # noqa: F401 - imported before forking, so that workers inherit it
import tokenizers  # noqa: F401 - likewise

from dwm_stream.progress import Progress

__all__ = ['worker_pool', 'map_tasks', 'parallel_map']


def _worker_init() -> None:
    os.environ['TOKENIZERS_PARALLELISM'] = 'false'


@contextmanager
def worker_pool(workers: int, num_tasks: int) -> Iterator[Optional[multiprocessing.pool.Pool]]:
    """A pool of ``min(workers, num_tasks)`` processes, or ``None`` when one process is enough.

    The pool is terminated on exit (results not yet consumed are dropped).

    Args:
        workers (int): Processes asked for.
        num_tasks (int): Tasks to run; a pool is only made for two or more.
    """
    if workers <= 1 or num_tasks <= 1:
        yield None
        return
    method = 'fork' if 'fork' in multiprocessing.get_all_start_methods() else 'spawn'
    saved = os.environ.get('TOKENIZERS_PARALLELISM')
    os.environ['TOKENIZERS_PARALLELISM'] = 'false'  # for the children only
    try:
        pool = multiprocessing.get_context(method).Pool(min(workers, num_tasks), initializer=_worker_init)
    finally:
        if saved is None:
            os.environ.pop('TOKENIZERS_PARALLELISM', None)
        else:
            os.environ['TOKENIZERS_PARALLELISM'] = saved
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def map_tasks(fn: Callable[[Any], Any],
              tasks: list[Any],
              pool: Optional[multiprocessing.pool.Pool],
              ordered: bool = True) -> Iterator[Any]:
    """``fn(task)`` for every task: in this process without a pool, else in it.

    Args:
        fn (Callable): A module-level (picklable) function.
        tasks (list): Its arguments.
        pool (Pool, optional): From :func:`worker_pool`; ``None`` runs here.
        ordered (bool): Results in task order; ``False`` yields them as they complete. Default: ``True``.
    """
    if pool is None:
        return map(fn, tasks)
    return pool.imap(fn, tasks) if ordered else pool.imap_unordered(fn, tasks)


def parallel_map(fn: Callable[[Any], Any],
                 tasks: Iterable[Any],
                 workers: int = 1,
                 progress: Optional[Progress] = None) -> Iterator[Any]:
    """Yield ``fn(task)`` for every task, in task order, using ``workers`` processes.

    Args:
        fn (Callable): A module-level (picklable) function.
        tasks (Iterable): Its arguments.
        workers (int): Processes; ``1`` runs in this process. Default: ``1``.
        progress (Progress, optional): Counts one unit per finished task, and is closed at the end.
            Default: ``None``.
    """
    tasks = list(tasks)
    try:
        with worker_pool(workers, len(tasks)) as pool:
            for result in map_tasks(fn, tasks, pool):
                if progress is not None:
                    progress.update(1)
                yield result
    finally:
        if progress is not None:
            progress.close()
