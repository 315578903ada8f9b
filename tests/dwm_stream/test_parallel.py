"""parallel: one pool set-up for convert and the selectors; results in task order, environment restored."""

from __future__ import annotations

import io
import os

from dwm_stream.parallel import parallel_map, worker_pool
from dwm_stream.progress import Progress


def _square_and_env(x: int) -> tuple[int, int, str]:
    return x * x, os.getpid(), os.environ.get('TOKENIZERS_PARALLELISM', '')


def test_results_in_task_order_from_worker_processes(monkeypatch):
    monkeypatch.delenv('TOKENIZERS_PARALLELISM', raising=False)
    stream = io.StringIO()
    results = list(parallel_map(_square_and_env, range(20), workers=2,
                                progress=Progress('squares', 20, interval=0.0, stream=stream)))
    assert [r[0] for r in results] == [x * x for x in range(20)]
    assert os.getpid() not in {r[1] for r in results}
    assert {r[2] for r in results} == {'false'}  # the children's tokenizers stay single-threaded
    assert 'TOKENIZERS_PARALLELISM' not in os.environ  # the parent's environment is as it was
    assert stream.getvalue().splitlines()[-1].startswith('squares: 20/20 tasks (100%)')


def test_one_worker_or_one_task_runs_here():
    for workers, tasks in ((1, 5), (4, 1)):
        with worker_pool(workers, tasks) as pool:
            assert pool is None
    assert [r[1] for r in parallel_map(_square_and_env, range(3))] == [os.getpid()] * 3
