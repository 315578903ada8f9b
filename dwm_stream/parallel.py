"""Process pools for the offline passes (``convert``, DSIR, QuRating): one way to set them up.

A process that runs one thread forks its workers (they inherit the imported modules: no start-up).
A process that runs more (a loopback S3 server, an S3 client's transfer pool, a logger's flusher)
does not fork itself, because a child forked while another thread holds a lock hangs on its
first use of it; its workers come from a *forkserver* instead (else spawn): a single-threaded
process, started once per caller, that imports the task's module (and with it mosaicml-streaming
and torch) once, so that each worker is a cheap fork of it. Starting it costs that import, once per
caller (measured on the 2-core dev machine: 5.1 s for the first pool of ``convert``'s workers, 0.05 s
for the next). As with any multiprocessing code that does not fork, a script that calls these from
a thread-holding process must guard its entry point with ``if __name__ == '__main__':``.

A forkserver child would inherit the forkserver's environment, working directory and
``sys.path``, frozen when it started; each worker is therefore given the caller's, as they are
when the pool is made. ``TOKENIZERS_PARALLELISM=false`` is set in the workers, so that one
process per core does not oversubscribe the cores, and in the caller only while it forks them, so
that tokenizers prints no fork warning when the caller has used its own tokenizer pool.

``concurrent.futures`` is used rather than ``multiprocessing.Pool`` because a worker that dies (a
segfault, the OOM killer) raises ``BrokenProcessPool`` in the caller; ``Pool`` replaces the worker
and waits for its lost task forever. Tasks must be picklable, and functions module-level.
"""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from dwm_stream.progress import Progress

__all__ = ['worker_pool', 'map_tasks', 'parallel_map', 'stop_process']


def _worker_init(environ: dict[str, str], cwd: str, path: list[str]) -> None:
    os.environ.clear()
    os.environ.update(environ)
    os.environ['TOKENIZERS_PARALLELISM'] = 'false'
    os.chdir(cwd)
    sys.path[:] = path


def _context(preload: Sequence[str]) -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    if 'fork' in methods and threading.active_count() == 1:
        return multiprocessing.get_context('fork')  # no other thread can hold a lock at the fork
    if 'forkserver' not in methods:
        return multiprocessing.get_context('spawn')
    ctx = multiprocessing.get_context('forkserver')
    # Takes effect when this process starts its forkserver (its first pool); later pools reuse it,
    # and their workers import any other task module on their first task.
    ctx.set_forkserver_preload([m for m in preload if m != '__main__'])
    return ctx


def _stop(executor: ProcessPoolExecutor) -> None:
    """Stop the workers now: tasks still running are killed, not waited for."""
    terminate = getattr(executor, 'terminate_workers', None)  # Python >= 3.14
    if terminate is not None:
        terminate()
        return
    # Before 3.14: kill its processes, then shut down (which forgets them, so take them first).
    for p in list((executor._processes or {}).values()):
        p.terminate()
    executor.shutdown(wait=True, cancel_futures=True)


@contextmanager
def worker_pool(workers: int, num_tasks: int, preload: Sequence[str] = ()) -> Iterator[Optional[Executor]]:
    """A pool of ``min(workers, num_tasks)`` processes, or ``None`` when one process is enough.

    On a normal exit the pool is shut down; on an error (or a consumer that stops early) its
    workers are terminated, so no task outlives the pass.

    Args:
        workers (int): Processes asked for.
        num_tasks (int): Tasks to run; a pool is only made for two or more.
        preload (Sequence[str]): Modules the forkserver imports before it forks workers: the
            modules that define the tasks. Default: none.
    """
    if workers <= 1 or num_tasks <= 1:
        yield None
        return
    environ = dict(os.environ)
    saved = os.environ.get('TOKENIZERS_PARALLELISM')
    os.environ['TOKENIZERS_PARALLELISM'] = 'false'  # in the parent only while its workers are forked:
    try:  # a fork after this process used the tokenizer otherwise prints tokenizers' warning in every child
        executor = ProcessPoolExecutor(max_workers=min(workers, num_tasks),
                                       mp_context=_context(['dwm_stream.parallel', *preload]),
                                       initializer=_worker_init,
                                       initargs=(environ, os.getcwd(), list(sys.path)))
        executor.submit(int)  # a forking pool starts all its workers on its first task: now
    finally:
        if saved is None:
            os.environ.pop('TOKENIZERS_PARALLELISM', None)
        else:
            os.environ['TOKENIZERS_PARALLELISM'] = saved
    try:
        yield executor
    except BaseException:  # an error, or GeneratorExit from a consumer that stopped early
        _stop(executor)
        raise
    executor.shutdown(wait=True)


def map_tasks(fn: Callable[[Any], Any],
              tasks: list[Any],
              pool: Optional[Executor],
              ordered: bool = True) -> Iterator[Any]:
    """``fn(task)`` for every task: in this process without a pool, else in it.

    Args:
        fn (Callable): A module-level (picklable) function.
        tasks (list): Its arguments.
        pool (Executor, optional): From :func:`worker_pool`; ``None`` runs here.
        ordered (bool): Results in task order; ``False`` yields them as they complete. Default: ``True``.
    """
    if pool is None:
        return map(fn, tasks)
    if ordered:
        return _named_failures(pool.map(fn, tasks))
    futures = [pool.submit(fn, task) for task in tasks]
    return _named_failures(future.result() for future in as_completed(futures))


def _named_failures(results: Iterator[Any]) -> Iterator[Any]:
    try:
        yield from results
    except BrokenProcessPool as e:
        raise RuntimeError(f'a worker process died without a Python error ({e}); the usual cause is '
                           'running out of memory: rerun with fewer --workers, or --workers 1 to '
                           'run the pass in one process') from e


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
        with worker_pool(workers, len(tasks), preload=[fn.__module__]) as pool:
            for result in map_tasks(fn, tasks, pool):
                if progress is not None:
                    progress.update(1)
                yield result
    finally:
        if progress is not None:
            progress.close()


def stop_process(proc: 'subprocess.Popen') -> None:
    """Stop a child process (a server the caller started): terminate it, give it 10 s, then kill it."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
