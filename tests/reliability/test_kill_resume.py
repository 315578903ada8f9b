"""``kill -9`` a ``dwm-stream train`` run (DWM on, 2 DataLoader workers) at 3 seeded random points, resume
each time with ``autoresume=true``; nothing is lost and nothing repeated, and the weighter ends identical.

How the trained multiset is derived (``dwm_stream.train.callbacks``): the ``trained_samples`` callback
appends ``{"event": "batch", "batch": b, "uids": [...]}`` at every ``BATCH_END`` (before any checkpoint
that includes batch ``b`` is written; here ``save_interval=3ba``) and ``{"event": "fit_start", "batch": B}`` when a
run starts at batch ``B``. Records after a killed run's last checkpoint were lost with the process; the
resumed run's ``fit_start`` at the checkpoint's batch ``B`` drops every earlier record with batch ``>= B``
(:func:`committed_batches`). What remains after the last run completes is one record per batch
``0..N-1``: the history the final model was trained on. Its uids are the trained multiset.

A kill point is (batch ``k``, delay ``d``): the run is ``SIGKILL``-ed (its whole process group: the
trainer and its DataLoader workers, as a preemption does) ``d`` seconds after its record of batch ``k``
appears, so kills land mid-step, mid-checkpoint or mid-refit.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

from dwm_stream.train.callbacks import committed_batches, read_records
from train_runs import (NUM_BATCHES, TRAINED_SAMPLES, final_weighter, latest_checkpoint_weighter, run_train,
                        train_args, train_env)

pytestmark = pytest.mark.slow

KILL_SEED = 2025
SAVE_EVERY = 3
NUM_KILLS = 3


def kill_points(seed: int = KILL_SEED) -> list[tuple[int, float]]:
    rng = random.Random(seed)
    batches = sorted(rng.sample(range(1, NUM_BATCHES - 1), NUM_KILLS))
    return [(b, round(rng.uniform(0.0, 0.15), 3)) for b in batches]


def _batches_written_since(path: str, offset: int) -> list[int]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        f.seek(offset)
        text = f.read()
    return [int(b) for b in re.findall(r'\{"event": "batch", "batch": (\d+),', text)]


def test_kill9_three_times_loses_and_repeats_nothing(tmp_path, loopback_s3, s3_train, reference_run,
                                                     small_tokenizer, small_corpus):
    root = str(tmp_path)
    # Checkpoints every 3 batches (the reference run: every batch), so that a kill usually throws away
    # trained-but-uncommitted batches, which the resumed run must train again exactly once.
    args = train_args(root, s3_train, small_tokenizer, small_corpus.lambada_path, save_interval=f'{SAVE_EVERY}ba')
    env = train_env()
    log = os.path.join(root, 'run', TRAINED_SAMPLES)
    killed_at = []
    for segment, (batch, delay) in enumerate(kill_points()):
        offset = os.path.getsize(log) if os.path.exists(log) else 0
        with open(os.path.join(root, f'segment{segment}.log'), 'w') as out:
            proc = subprocess.Popen(args + (['autoresume=true'] if segment else []), cwd=root, env=env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + 300
            while not any(b >= batch for b in _batches_written_since(log, offset)):
                assert proc.poll() is None, f'segment {segment} exited (rc {proc.returncode}) before batch {batch}'
                assert time.monotonic() < deadline, f'segment {segment} never reached batch {batch}'
                time.sleep(0.02)
            time.sleep(delay)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        killed_at.append(max(_batches_written_since(log, offset)))
    run_train(args + ['autoresume=true'], root, env)

    # Each resumption restarted from a checkpoint (a fit_start at B > 0 after the first).
    starts = [r['batch'] for r in read_records(log) if r['event'] == 'fit_start']
    assert len(starts) == NUM_KILLS + 1 and starts[0] == 0, starts
    assert all(b % SAVE_EVERY == 0 for b in starts), starts

    ours = committed_batches(log)
    reference = committed_batches(os.path.join(reference_run, 'run', TRAINED_SAMPLES))
    assert list(ours) == list(reference) == list(range(NUM_BATCHES))
    trained = Counter(u for r in ours.values() for u in r['uids'])
    expected = Counter(u for r in reference.values() for u in r['uids'])
    lost, repeated = expected - trained, trained - expected
    assert not lost and not repeated, (lost, repeated)
    assert all(n == 1 for n in trained.values())  # within the run too: no uid twice
    # Stronger: the same batches in the same order, with the same DWM weights.
    assert [r['uids'] for r in ours.values()] == [r['uids'] for r in reference.values()]
    assert [r['weights'] for r in ours.values()] == [r['weights'] for r in reference.values()]

    # The final weighter equals the uninterrupted run's: every exported stage, and the checkpointed state.
    a, b = final_weighter(root), final_weighter(reference_run)
    assert a.keys() == b.keys() and len(a) == 2
    for stage in a:
        assert all(torch.equal(a[stage][k], b[stage][k]) for k in a[stage]), stage
    ca, cb = latest_checkpoint_weighter(root), latest_checkpoint_weighter(reference_run)
    assert all(torch.equal(ca[k], cb[k]) for k in cb)

    # Record for RELIABILITY.md: how much work the kills threw away (re-executed, not repeated).
    replayed = sum(1 for r in read_records(log) if r['event'] == 'batch') - NUM_BATCHES
    print(f'kill points (batch, delay s): {kill_points()}; last batch recorded before each kill: {killed_at}; '
          f'resumed at: {starts[1:]}; batches re-executed after rollback: {replayed}')


# ------------------------------------------------------------------------------------ conversion
def _file_hashes(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, 'rb') as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_kill9_during_convert_then_resume_gives_identical_shards(small_corpus, small_tokenizer, converted_mds,
                                                                  tmp_path):
    """SIGKILL ``dwm-stream convert --workers 2`` once some parts are written (seeded delay), then
    ``--resume``: byte-identical output (same shard hashes in index.json) to a clean conversion."""
    dwm = os.path.join(os.path.dirname(sys.executable), 'dwm-stream')
    out = str(tmp_path / 'out')
    args = [dwm, 'convert', '--src', small_corpus.train_dir, '--out', out, '--tokenizer', small_tokenizer,
            '--seq-len', '256', '--workers', '2', '--no-progress']
    delay = random.Random(KILL_SEED).uniform(0.0, 0.3)
    killed = False
    for attempt in range(5):  # if the whole conversion beat the kill, start over and kill sooner
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen(args, env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.monotonic() + 300
        while not _parts_done(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay / (attempt + 1))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # The kill must land while parts are still missing: after the last part, and before index.json is
        # written, there is nothing left for --resume to do, so that counts as too late as well.
        if not os.path.exists(os.path.join(out, 'index.json')) and _parts_done(out) < len(small_corpus.train_files):
            killed = True
            break
    assert killed, 'the conversion finished before every kill'
    done_before = _parts_done(out)
    total = len(small_corpus.train_files)
    assert done_before < total
    proc = subprocess.run(args + ['--resume'], env=train_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'kept {done_before}' in proc.stdout, proc.stdout
    assert _file_hashes(out) == _file_hashes(converted_mds)
    with open(os.path.join(out, 'index.json')) as a, open(os.path.join(converted_mds, 'index.json')) as b:
        assert [s['zip_data']['hashes'] for s in json.load(a)['shards']] == \
            [s['zip_data']['hashes'] for s in json.load(b)['shards']]
    print(f'convert killed after {done_before}/{total} parts (+{delay:.3f} s); --resume kept them and wrote the rest')


def _parts_done(out: str) -> int:
    parts = os.path.join(out, 'parts')
    if not os.path.isdir(parts):
        return 0
    return sum(os.path.exists(os.path.join(parts, p, 'part.json')) for p in os.listdir(parts))
