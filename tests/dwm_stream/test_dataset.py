"""DWMDataset against real shards, real processes and a real (loopback) S3 endpoint."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from streaming import StreamingDataset
from torch.utils.data import DataLoader

from dwm_stream.data.dataset import DWMDataset, DWMStream, release_shared_memory
from dwm_stream.data.loader import collate_samples, widen_batch
from dwm_stream.demo.loopback_s3 import LoopbackS3, upload_dir
from dwm_stream.data.selection import read_selection, write_selection
from dwm_stream.testing.synthetic import SYNTHETIC_DOMAINS, expected_tokens

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, 'dataset_worker.py')
N = 600
SEQ_LEN = 32


@pytest.fixture(scope='module')
def corpus(synthetic_mds):
    return synthetic_mds('synthetic', N, seq_len=SEQ_LEN, vocab_size=5000, seed=7, size_limit=1 << 13)


@pytest.fixture(scope='module')
def uid_to_ordinal(corpus):
    uids = np.load(os.path.join(corpus, 'uids.npy'))
    return {int(u): i for i, u in enumerate(uids)}


def _uids(dataset):
    return [s['uid'] for s in dataset]


def _run_worker(jobs, out_prefix, nproc=1, timeout=300):
    """Run ``jobs`` one after another in one fresh process (or under ``composer -n nproc``); per job, per rank, what
    it delivered."""
    if nproc == 1:
        cmd = [sys.executable, WORKER, json.dumps(jobs), out_prefix]
    else:
        composer = os.path.join(os.path.dirname(sys.executable), 'composer')
        cmd = [composer, '-n', str(nproc), '--stdout', out_prefix + '.stdout{rank}',
               WORKER, json.dumps(jobs), out_prefix]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = []
    for job in range(len(jobs)):
        results.append([])
        for rank in range(nproc):
            with open(f'{out_prefix}.job{job}.rank{rank}.json') as f:
                results[-1].append(json.load(f))
    return results


def test_decodes_every_sample_as_written(corpus, uid_to_ordinal):
    dataset = DWMDataset(local=corpus, shuffle=False, batch_size=4)
    assert dataset.domain_names == SYNTHETIC_DOMAINS
    assert dataset.score_names == ['quality'] and dataset.seq_len == SEQ_LEN
    seen = 0
    for sample in dataset:
        i = uid_to_ordinal[sample['uid']]
        np.testing.assert_array_equal(sample['input_ids'], expected_tokens(7, i, SEQ_LEN, 5000))
        assert sample['input_ids'].dtype == np.uint16
        assert sample['domain'] == i % 3
        assert sample['prior_weight'] == 1.0
        assert sample['scores'][0] == pytest.approx(i / N)
        assert sample['num_tokens'] in (SEQ_LEN, SEQ_LEN // 2)
        seen += 1
    assert seen == N


def test_max_seq_len_truncates_a_converted_corpus(corpus, uid_to_ordinal):
    """LLM Foundry's dataset key: samples longer than max_seq_len are cut (a view), num_tokens with them."""
    dataset = DWMDataset(local=corpus, shuffle=False, batch_size=4, max_seq_len=20)
    assert dataset.seq_len == 20
    samples = list(dataset)
    assert len(samples) == N
    for sample in samples:
        i = uid_to_ordinal[sample['uid']]
        np.testing.assert_array_equal(sample['input_ids'], expected_tokens(7, i, SEQ_LEN, 5000)[:20])
        # the last sample of each of the 4 synthetic sources is half padding: 16 real tokens, under the cut
        assert sample['num_tokens'] == (SEQ_LEN // 2 if i >= N - 4 else 20)
    assert DWMDataset(local=corpus, batch_size=4, max_seq_len=4 * SEQ_LEN).seq_len == SEQ_LEN  # never padded


@pytest.mark.parametrize('seed', [0, 17])
def test_same_sequence_as_plain_streaming_dataset(corpus, seed):
    """The fast path keeps streaming's partitioning and shuffle order exactly, across epochs."""
    ours = DWMDataset(local=corpus, shuffle=True, shuffle_seed=seed, batch_size=4)
    plain = StreamingDataset(local=corpus, shuffle=True, shuffle_seed=seed, batch_size=4)
    for _ in range(2):  # two epochs: streaming reshuffles per epoch
        assert _uids(ours) == [int(s['uid']) for s in plain]
    release_shared_memory(plain)


def test_random_access_matches_iteration(corpus):
    dataset = DWMDataset(local=corpus, shuffle=False, batch_size=4)
    iterated = _uids(dataset)
    assert [dataset[i]['uid'] for i in range(len(iterated))] == iterated


def test_collate_and_widen(corpus):
    dataset = DWMDataset(local=corpus, shuffle=False, batch_size=8)
    batch = next(iter(DataLoader(dataset, batch_size=8, collate_fn=collate_samples)))
    assert str(batch['input_ids'].dtype) == 'torch.uint16'  # narrow across processes
    batch = widen_batch(batch)
    assert str(batch['input_ids'].dtype) == 'torch.int64'
    for row, n in enumerate(batch['num_tokens'].tolist()):
        assert (batch['labels'][row, :n] == batch['input_ids'][row, :n]).all()
        assert (batch['labels'][row, n:] == -100).all()


def test_dataloader_two_workers_exactly_once(corpus):
    dataset = DWMDataset(local=corpus, shuffle=True, shuffle_seed=3, batch_size=10)
    loader = DataLoader(dataset, batch_size=10, num_workers=2, collate_fn=collate_samples)
    uids = [u for batch in loader for u in batch['uid'].tolist()]
    assert sorted(uids) == sorted(np.load(os.path.join(corpus, 'uids.npy')).tolist())


def test_iterated_here_then_by_forked_workers(corpus):
    """A dataset read in this process (a check, a peek), then by DataLoader workers forked afterwards.

    Streaming's file locks, created on the first epoch here, would be inherited by the workers, and
    filelock refuses an inherited lock (or, in older versions, the worker hangs).
    """
    dataset = DWMDataset(local=corpus, shuffle=True, shuffle_seed=3, batch_size=10)
    everything = sorted(np.load(os.path.join(corpus, 'uids.npy')).tolist())
    assert sorted(int(s['uid']) for s in dataset) == everything
    loader = DataLoader(dataset, batch_size=10, num_workers=2, collate_fn=collate_samples,
                        multiprocessing_context='fork')
    for _ in range(2):  # new workers each epoch
        assert sorted(u for batch in loader for u in batch['uid'].tolist()) == everything
    assert sorted(int(s['uid']) for s in dataset) == everything  # and here again


# ---------------------------------------------------------------------------- selection overlay
@pytest.fixture(scope='module')
def selection_file(corpus, tmp_path_factory):
    uids = np.load(os.path.join(corpus, 'uids.npy'))
    rng = np.random.default_rng(0)
    chosen = rng.permutation(uids)[:N // 2]
    path = str(tmp_path_factory.mktemp('sel') / 'half.parquet')
    prior = (np.abs(chosen) % 7 + 1).astype(np.float32) / 4
    write_selection(path, chosen, prior_weight=prior, scores={'dsir': (chosen % 100).astype(np.float32)},
                    info={'selector': 'test'})
    return path


def test_selection_streams_exactly_the_selected_samples(corpus, selection_file, uid_to_ordinal):
    selection = read_selection(selection_file)
    expected_prior = dict(zip(selection.uids.tolist(), selection.prior_weight.tolist()))
    dataset = DWMDataset(local=corpus, selection=selection_file, shuffle=True, shuffle_seed=5, batch_size=4)
    assert dataset.score_names == ['quality', 'dsir']
    assert len(dataset) == len(selection)
    samples = list(dataset)
    assert sorted(s['uid'] for s in samples) == sorted(expected_prior)
    for s in samples:
        i = uid_to_ordinal[s['uid']]
        np.testing.assert_array_equal(s['input_ids'], expected_tokens(7, i, SEQ_LEN, 5000))
        assert s['prior_weight'] == pytest.approx(expected_prior[s['uid']])
        assert s['scores'][0] == pytest.approx(i / N)
        assert s['scores'][1] == pytest.approx(s['uid'] % 100)


def test_selection_with_streams_and_proportions(corpus, selection_file, tmp_path):
    """A selected stream mixed with the full corpus: streaming's proportions apply on top.

    Streaming requires one local cache per stream, so the same corpus is read as two remotes.
    """
    dataset = DWMDataset(streams=[DWMStream(remote=corpus, local=str(tmp_path / 'a'),
                                            selection=selection_file, proportion=0.5),
                                  DWMStream(remote=corpus, local=str(tmp_path / 'b'), proportion=0.5)],
                         epoch_size=400, shuffle=True, batch_size=4)
    samples = list(dataset)
    assert len(samples) == 400
    selected = set(read_selection(selection_file).uids.tolist())
    from_sel = sum(1 for s in samples if s['prior_weight'] != 1.0 or s['uid'] in selected)
    assert from_sel >= 200  # the first stream contributes half, all of it selected


@pytest.mark.parametrize('problem', ['unknown', 'duplicate', 'bad_prior'])
def test_selection_errors_name_the_file(corpus, tmp_path, problem):
    uids = np.load(os.path.join(corpus, 'uids.npy'))[:10].copy()
    path = str(tmp_path / f'{problem}.parquet')
    if problem == 'unknown':
        uids[3] = 123456789
        write_selection(path, uids)
        with pytest.raises(ValueError, match=r'unknown\.parquet: 1 of 10 selected uid\(s\) are not in'):
            DWMDataset(local=corpus, selection=path, batch_size=2)
        return
    if problem == 'duplicate':
        uids[3] = uids[4]
        pq.write_table(pa.table({'uid': uids}), path)
        match = r'duplicate\.parquet: 1 uid\(s\) appear more than once'
    else:
        pq.write_table(pa.table({'uid': uids, 'prior_weight': np.r_[np.ones(9), -1.0]}), path)
        match = r'bad_prior\.parquet: column `prior_weight` must be finite and > 0; row 9'
    with pytest.raises(ValueError, match=match):
        DWMDataset(local=corpus, selection=path, batch_size=2)


# ---------------------------------------------------------------------------- resumption
@pytest.mark.slow
def test_resume_in_a_new_process_continues_the_sequence(corpus, selection_file, tmp_path):
    """Without and with a selection: the whole epoch and its first ``k`` samples (with the state there) in one
    process, the rest from that state in another; the two parts are the epoch."""
    k = 96
    configs = [{'local': corpus, 'shuffle': True, 'shuffle_seed': 11, 'batch_size': 6},
               {'local': corpus, 'shuffle': True, 'shuffle_seed': 11, 'batch_size': 6, 'selection': selection_file}]
    states = [str(tmp_path / f'state{i}.json') for i in range(len(configs))]
    first = _run_worker([job for ds_cfg, state in zip(configs, states)
                         for job in ({'dataset': ds_cfg, 'batch_size': 6},
                                     {'dataset': ds_cfg, 'batch_size': 6, 'take': k, 'state_out': state})],
                        str(tmp_path / 'first'))
    tails = _run_worker([{'dataset': ds_cfg, 'batch_size': 6, 'state_in': state}
                         for ds_cfg, state in zip(configs, states)], str(tmp_path / 'tail'))
    for i in range(len(configs)):
        full, head, tail = first[2 * i][0]['uids'], first[2 * i + 1][0]['uids'], tails[i][0]['uids']
        assert head == full[:k]
        assert tail == full[k:]


# ---------------------------------------------------------------------------- distributed
@pytest.mark.slow
def test_exactly_once_composer_two_ranks_two_workers(corpus, selection_file, tmp_path):
    """Without and with a selection (one `composer -n 2` launch): every sample once across the ranks."""
    ds_cfg = {'local': corpus, 'shuffle': True, 'shuffle_seed': 2, 'batch_size': 5}
    expected = [np.load(os.path.join(corpus, 'uids.npy')).tolist(), read_selection(selection_file).uids.tolist()]
    jobs = [{'dataset': cfg, 'batch_size': 5, 'num_workers': 2}
            for cfg in (ds_cfg, {**ds_cfg, 'selection': selection_file})]
    for job, want in zip(_run_worker(jobs, str(tmp_path / 'ddp'), nproc=2), expected):
        per_rank = [r['uids'] for r in job]
        assert all(r['world_size'] == 2 for r in job)
        assert len(per_rank[0]) == len(per_rank[1])  # equal work per rank: no DDP hang
        delivered = per_rank[0] + per_rank[1]
        # Streaming pads the last global batch by repeating samples only when the count does not divide
        # evenly; with these sizes it divides, so delivery is exactly once.
        assert len(want) % 10 == 0
        assert sorted(delivered) == sorted(want)


# ---------------------------------------------------------------------------- storage
@pytest.mark.slow
def test_s3_streams_the_same_sequence_as_local(corpus, selection_file, tmp_path):
    with LoopbackS3(buckets=['corpus']) as s3:
        client = s3.client()
        upload_dir(client, corpus, 'corpus', 'mds')
        client.upload_file(selection_file, 'corpus', 'sel/half.parquet')
        for selection in (None, 's3://corpus/sel/half.parquet'):
            local_sel = selection_file if selection else None
            local = DWMDataset(local=corpus, selection=local_sel, shuffle=True, shuffle_seed=4, batch_size=4)
            remote = DWMDataset(remote='s3://corpus/mds', local=str(tmp_path / f'cache{bool(selection)}'),
                                selection=selection, shuffle=True, shuffle_seed=4, batch_size=4)
            assert _uids(remote) == _uids(local)
