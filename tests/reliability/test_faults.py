"""A flaky object store: the fault-injecting proxy (``dwm_stream.testing.fault_proxy``) in front of loopback S3.

* Each fault kind (500, 503, slow, connection reset, truncated body), injected at a high rate, still
  yields the exact sample sequence of a clean read.
* ``dwm-stream train`` (DWM, 2 workers) over the proxy trains on exactly the clean run's batches and
  ends with the clean run's weighter.
* A persistent failure stops, after bounded retries, with an error naming the object and the endpoint.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from dwm_stream.data.dataset import DWMDataset
from dwm_stream.testing.fault_proxy import FAULTS, FaultProxy
from dwm_stream.train.callbacks import committed_batches
from train_runs import TRAINED_SAMPLES, final_weighter, run_train, train_args, train_env

SEED = 7


def _uids(remote: str, local: str, **kwargs) -> list[int]:
    ds = DWMDataset(remote=remote, local=local, batch_size=4, shuffle=True, shuffle_seed=SEED, **kwargs)
    return [int(s['uid']) for s in ds]


@pytest.fixture(scope='module')
def clean_sequence(s3_train, tmp_path_factory) -> list[int]:
    return _uids(s3_train, str(tmp_path_factory.mktemp('clean') / 'cache'))


@pytest.mark.parametrize('faults', [(f,) for f in FAULTS] + [FAULTS], ids=list(FAULTS) + ['all'])
def test_each_fault_kind_gives_the_clean_sequence(faults, loopback_s3, s3_train, clean_sequence, tmp_path,
                                                  monkeypatch):
    with FaultProxy(loopback_s3.endpoint_url, rate=0.4, seed=SEED, faults=faults, slow_s=0.2) as proxy:
        monkeypatch.setenv('S3_ENDPOINT_URL', proxy.endpoint_url)
        got = _uids(s3_train, str(tmp_path / 'cache'), download_retry=6)
        stats = proxy.stats()
    print(f'faults {faults}: {stats}; {len(got)} samples, same sequence: {got == clean_sequence}')
    assert got == clean_sequence
    assert sum(stats[f] for f in faults) >= 3, stats  # faults were really injected...
    assert sum(stats[f] >= 1 for f in faults) >= min(3, len(faults)), stats  # ...of several kinds


@pytest.mark.slow
def test_training_over_a_flaky_store_matches_the_clean_run(loopback_s3, s3_train, reference_run, small_tokenizer,
                                                           small_corpus, tmp_path):
    """Exactly the clean run's batches (uid by uid, in order) and the clean run's final weighter."""
    root = str(tmp_path)
    with FaultProxy(loopback_s3.endpoint_url, rate=0.25, seed=SEED, slow_s=0.2) as proxy:
        run_train(train_args(root, s3_train, small_tokenizer, small_corpus.lambada_path), root,
                  train_env(endpoint=proxy.endpoint_url))
        stats = proxy.stats()
    print(f'training through the fault proxy: {stats}')
    assert sum(stats[f] for f in FAULTS) >= 3, stats
    flaky = committed_batches(os.path.join(root, 'run', TRAINED_SAMPLES))
    clean = committed_batches(os.path.join(reference_run, 'run', TRAINED_SAMPLES))
    assert list(flaky) == list(clean) == list(range(len(clean)))
    assert [r['uids'] for r in flaky.values()] == [r['uids'] for r in clean.values()]
    ours, theirs = final_weighter(root), final_weighter(reference_run)
    assert ours.keys() == theirs.keys()
    for stage in ours:
        for name in ours[stage]:
            assert torch.equal(ours[stage][name], theirs[stage][name]), (stage, name)


@pytest.mark.parametrize('target', ['shard', 'index'])
def test_persistent_failure_names_object_and_endpoint(target, loopback_s3, s3_train, converted_mds, tmp_path,
                                                      monkeypatch):
    with open(os.path.join(converted_mds, 'index.json')) as f:
        shard_file = json.load(f)['shards'][0]['zip_data']['basename']
    path = shard_file if target == 'shard' else 'train/index.json'
    with FaultProxy(loopback_s3.endpoint_url, rate=0.0, seed=SEED, fail_paths=[path]) as proxy:
        monkeypatch.setenv('S3_ENDPOINT_URL', proxy.endpoint_url)
        start = time.monotonic()
        with pytest.raises(Exception) as info:
            _uids(s3_train, str(tmp_path / 'cache'), download_retry=2)
        elapsed = time.monotonic() - start
        stats = proxy.stats()
    message = str(info.value)
    print(f'persistent failure of {target}: {elapsed:.1f} s, {stats["persistent"]} failed requests: {message}')
    assert f'{s3_train}/{path.split("/")[-1] if target == "index" else shard_file}' in message, message
    assert f'S3_ENDPOINT_URL={proxy.endpoint_url}' in message, message
    assert 'after 2 attempt(s)' in message, message
    # Bounded: 2 streaming attempts x 3 S3-client attempts, by at most the prepare thread and the
    # consumer (each fails on the HEAD before a GET).
    assert 1 <= stats['persistent'] <= 2 * 2 * 3, stats
    assert elapsed < 120, elapsed
