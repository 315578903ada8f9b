"""parallel: one pool set-up for convert and the selectors; results in task order, environment restored."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from dwm_stream.parallel import map_tasks, parallel_map, worker_pool
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


def _env_and_cwd(_: int) -> tuple[str, str]:
    return os.environ.get('DWM_PARALLEL_PROBE', ''), os.getcwd()


def test_workers_see_the_callers_environment_and_directory_as_they_are_now(monkeypatch, tmp_path):
    # The forkserver may have started in an earlier test, with another environment and directory.
    list(parallel_map(_square_and_env, range(2), workers=2))
    monkeypatch.setenv('DWM_PARALLEL_PROBE', 'set-after-the-server-started')
    monkeypatch.chdir(tmp_path)
    seen = set(parallel_map(_env_and_cwd, range(4), workers=2))
    assert seen == {('set-after-the-server-started', str(tmp_path))}


def _die_on_three(x: int) -> int:
    if x == 3:
        os._exit(9)  # as the OOM killer would: no Python error, no result
    return x


def test_a_worker_that_dies_fails_the_pass_instead_of_hanging():
    for ordered in (True, False):
        with pytest.raises(RuntimeError, match='worker process died.*--workers 1'):
            with worker_pool(2, 8) as pool:
                list(map_tasks(_die_on_three, list(range(8)), pool, ordered=ordered))


def _record_pid_then_sleep(path: str) -> None:
    with open(path, 'w') as f:
        f.write(str(os.getpid()))
    time.sleep(60)


def _gone(pid: int) -> bool:
    try:
        with open(f'/proc/{pid}/status') as f:
            return any(line.split() == ['State:', 'Z', '(zombie)'] for line in f)
    except FileNotFoundError:
        return True


def test_an_error_in_the_caller_kills_running_tasks_instead_of_waiting_for_them(tmp_path):
    paths = [str(tmp_path / f'pid{i}') for i in range(2)]
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with worker_pool(2, 2) as pool:
            for path in paths:
                pool.submit(_record_pid_then_sleep, path)
            while not all(os.path.exists(p) and os.path.getsize(p) for p in paths):
                assert time.monotonic() - start < 60, 'the workers never started'
                time.sleep(0.05)
            raise KeyboardInterrupt
    assert time.monotonic() - start < 50  # not the tasks' 60 s
    pids = [int(open(p).read()) for p in paths]
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(pid) for pid in pids)


def _parent_pid(_: int) -> int:
    return os.getppid()


def test_a_process_with_other_threads_does_not_fork_itself():
    release = threading.Event()
    other = threading.Thread(target=release.wait, daemon=True)
    other.start()
    try:
        parents = set(parallel_map(_parent_pid, range(4), workers=2))
    finally:
        release.set()
        other.join()
    assert os.getpid() not in parents  # children of the forkserver, not of this process


def test_a_single_threaded_process_forks_its_workers(tmp_path):
    script = tmp_path / 'probe.py'
    script.write_text(textwrap.dedent('''
        import os, threading
        from dwm_stream.parallel import parallel_map

        def parent(_):
            return os.getppid()

        if __name__ == '__main__':
            assert threading.active_count() == 1
            print(set(parallel_map(parent, range(4), workers=2)) == {os.getpid()})
    '''))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'True'


def test_forking_after_the_tokenizer_ran_prints_no_tokenizers_warning(tmp_path):
    script = tmp_path / 'probe.py'
    script.write_text(textwrap.dedent('''
        import os
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
        from dwm_stream.parallel import parallel_map

        def same(x):
            return x

        if __name__ == '__main__':
            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.Whitespace()
            tok.train_from_iterator(['hello world ' * 50] * 2000, trainers.BpeTrainer(vocab_size=100))
            tok.encode_batch(['hello world'] * 2000)  # the parent's tokenizer pool has run
            print(list(parallel_map(same, range(4), workers=2)), os.environ.get('TOKENIZERS_PARALLELISM'))
    '''))
    env = {k: v for k, v in os.environ.items() if k != 'TOKENIZERS_PARALLELISM'}  # earlier tests may set it
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '[0, 1, 2, 3] None'  # and the parent's environment is as it was
    assert 'huggingface/tokenizers' not in out.stderr
