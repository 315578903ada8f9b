"""LLM Foundry-converted corpora stream through DWMDataset and the loader without reconversion (issue 11).

Shards are written by streaming's ``MDSWriter`` in the column layouts of LLM Foundry 0.22's converters:
``{'tokens': 'ndarray:int32'}`` (``convert_dataset_hf``/``_json``/``convert_text_to_mds`` with ``--concat_tokens``),
``{'tokens': 'bytes'}`` (older corpora, decoded with ``token_encoding_type``) and ``{'text': 'str'}`` (without
``--concat_tokens``). Before issue 11 every one of them failed with ``KeyError: 'input_ids'`` at the first batch.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from streaming import MDSWriter, StreamingDataset

from dwm_stream.data.dataset import DWMDataset, DWMStream, release_shared_memory
from dwm_stream.data.loader import build_dataloader, build_dataset
from dwm_stream.format.foundry import STREAM_UID_SHIFT, stream_uid_base
from dwm_stream.format.shards import CorpusMeta
from dwm_stream.testing.synthetic import write_synthetic_corpus

N = 48
SEQ = 16
VOCAB = 50_000  # more than uint16 holds, as a real Foundry corpus (e.g. GPT-NeoX's 50,277)
SAMPLE_KEYS = {'input_ids', 'num_tokens', 'uid', 'domain', 'prior_weight'}  # what our own corpora give


def _tokens(i: int, length: int = SEQ) -> np.ndarray:
    return np.random.default_rng([11, i]).integers(0, VOCAB, length).astype(np.int64)


def _write(out: str, columns: dict[str, str], samples, compression='zstd') -> str:
    with MDSWriter(out=out, columns=columns, compression=compression, size_limit=1 << 10) as writer:
        for sample in samples:
            writer.write(sample)
    return out


def write_foundry(out: str, layout: str, n: int = N, lengths=None) -> str:
    """A Foundry-layout corpus of ``n`` samples; sample ``i`` holds ``_tokens(i, lengths[i])``."""
    lengths = lengths or [SEQ] * n
    toks = [_tokens(i, lengths[i]) for i in range(n)]
    if layout == 'bytes-int64':  # Foundry's legacy layout and StreamingTextDataset's default decoding
        return _write(out, {'tokens': 'bytes'}, [{'tokens': t.tobytes()} for t in toks])
    if layout == 'bytes-int32':
        return _write(out, {'tokens': 'bytes'}, [{'tokens': t.astype(np.int32).tobytes()} for t in toks])
    if layout == 'ndarray-int32':  # what Foundry 0.22's converters write
        return _write(out, {'tokens': 'ndarray:int32'}, [{'tokens': t.astype(np.int32)} for t in toks])
    if layout == 'ndarray-uint32-fixed':  # fixed shape: read through the zero-copy path
        return _write(out, {'tokens': f'ndarray:uint32:{SEQ}'}, [{'tokens': t.astype(np.uint32)} for t in toks])
    raise AssertionError(layout)


LAYOUTS = {'bytes-int64': {}, 'bytes-int32': {'token_encoding_type': 'int32'}, 'ndarray-int32': {},
           'ndarray-uint32-fixed': {}}


def _index_of(sample: dict, name: str) -> int:
    """The sample's index in its stream, from the uid DWMDataset synthesizes (stream hash + index)."""
    index = int(sample['uid']) - stream_uid_base(name)
    assert 0 <= index < 1 << STREAM_UID_SHIFT
    return index


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_every_foundry_layout_decodes_as_written(tmp_path, layout):
    root = write_foundry(str(tmp_path / 'c4'), layout)
    ds = DWMDataset(local=root, batch_size=4, shuffle=True, shuffle_seed=2, **LAYOUTS[layout])
    assert ds.domain_names == ['c4'] and ds.score_names == []
    samples = list(ds)
    assert len(samples) == N
    assert sorted(_index_of(s, 'c4') for s in samples) == list(range(N))  # each once, uid = stream + index
    for s in samples:
        assert set(s) == SAMPLE_KEYS
        np.testing.assert_array_equal(s['input_ids'], _tokens(_index_of(s, 'c4')))
        assert s['num_tokens'] == SEQ and s['domain'] == 0 and s['prior_weight'] == 1.0
    # Streaming's order, unchanged: the same sequence as plain StreamingDataset over the same shards.
    plain = StreamingDataset(local=root, batch_size=4, shuffle=True, shuffle_seed=2)
    expected = [np.frombuffer(p['tokens'], np.dtype(LAYOUTS[layout].get('token_encoding_type', 'int64')))
                if isinstance(p['tokens'], bytes) else p['tokens'] for p in plain]
    for ours, theirs in zip(samples, expected):
        np.testing.assert_array_equal(ours['input_ids'], theirs)
    assert sorted(int(s['uid']) for s in ds) == sorted(int(s['uid']) for s in samples)  # stable across epochs
    release_shared_memory(plain)


@pytest.mark.parametrize('layout', ['bytes-int64', 'ndarray-int32', 'ndarray-uint32-fixed'])
def test_truncates_to_max_seq_len_as_foundry_does(tmp_path, layout):
    """Longer samples are cut to max_seq_len, exactly as LLM Foundry's StreamingTextDataset cuts them."""
    text_data = pytest.importorskip('llmfoundry.data.text_data')
    root = write_foundry(str(tmp_path / 'c4'), layout)
    ours = DWMDataset(local=root, batch_size=4, max_seq_len=10)
    theirs = text_data.StreamingTextDataset(tokenizer=None, max_seq_len=10, local=root, batch_size=4)
    assert ours.seq_len == 10
    for i in (0, 7, N - 1):
        sample = ours[i]
        assert sample['num_tokens'] == 10
        np.testing.assert_array_equal(sample['input_ids'], theirs[i].numpy())
    release_shared_memory(theirs)


def test_variable_length_samples_are_padded_per_batch_and_masked(tmp_path):
    lengths = [4 + (i * 5) % 17 for i in range(N)]  # 4..20 tokens
    root = write_foundry(str(tmp_path / 'books'), 'ndarray-int32', lengths=lengths)
    spec = build_dataloader({'local': root, 'max_seq_len': 12}, 8)
    for batch in spec.dataloader:
        batch = spec.batch_transforms(batch)
        assert batch['input_ids'].dtype == torch.int64 and batch['input_ids'].shape[1] <= 12
        for row in range(batch['input_ids'].shape[0]):
            index = int(batch['uid'][row]) - stream_uid_base('books')
            n = min(lengths[index], 12)
            assert int(batch['num_tokens'][row]) == n
            np.testing.assert_array_equal(batch['input_ids'][row, :n].numpy(), _tokens(index, lengths[index])[:n])
            assert (batch['labels'][row, n:] == -100).all() and (batch['labels'][row, :n] >= 0).all()


def test_foundry_corpus_with_dwm_json_takes_its_domain_name(tmp_path):
    root = write_foundry(str(tmp_path / 'part-0'), 'ndarray-int32')
    meta = CorpusMeta(domains=['RedPajamaWikipedia'], seq_len=SEQ, token_dtype='int32', tokenizer='gpt-neox',
                      eos_token_id=0, pad_token_id=0, num_samples=N)
    with open(os.path.join(root, 'dwm.json'), 'w') as f:
        f.write(meta.to_json())
    ds = DWMDataset(local=root, batch_size=4)
    assert ds.domain_names == ['RedPajamaWikipedia']
    assert {s['domain'] for s in ds} == {0}


def _batches(spec, limit=None):
    out = []
    for i, batch in enumerate(spec.dataloader):
        if limit is not None and i == limit:
            break
        out.append(spec.batch_transforms(batch))
    return out


@pytest.mark.parametrize('num_workers', [0, 1])
def test_named_streams_through_the_loader(tmp_path, num_workers):
    """Streams as a mapping name -> config (Foundry's YAML layout): the names are the domains; batches carry
    the same keys as our own corpora's, and DWM's per-domain metrics can tell the streams apart."""
    a = write_foundry(str(tmp_path / 'a'), 'bytes-int64')
    b = write_foundry(str(tmp_path / 'b'), 'ndarray-int32', n=24)
    spec = build_dataloader({'streams': {'wiki': {'local': a}, 'arxiv': {'local': b}}, 'shuffle': True}, 8,
                            num_workers=num_workers)
    assert spec.dataloader.dataset.domain_names == ['wiki', 'arxiv']
    batches = _batches(spec)
    assert sum(len(b['uid']) for b in batches) == N + 24
    assert set(batches[0]) == SAMPLE_KEYS | {'labels'}
    uids = torch.cat([b['uid'] for b in batches]).tolist()
    assert len(set(uids)) == len(uids)
    per_domain = {0: [], 1: []}
    for batch in batches:
        for row in range(len(batch['uid'])):
            per_domain[int(batch['domain'][row])].append(row)
            name = ('wiki', 'arxiv')[int(batch['domain'][row])]
            index = int(batch['uid'][row]) - stream_uid_base(name)
            np.testing.assert_array_equal(batch['input_ids'][row].numpy(), _tokens(index))
    assert len(per_domain[0]) == N and len(per_domain[1]) == 24


def test_foundry_stream_mixed_with_a_converted_corpus(tmp_path):
    """A dwm-stream corpus (uint16, domains and scores from dwm.json) and a Foundry one (int32, ids > 65535) in
    one batch: ids are stored in a dtype that holds both, the Foundry samples get NaN scores."""
    ours = str(tmp_path / 'ours')
    write_synthetic_corpus(ours, 32, seq_len=SEQ, vocab_size=5000, seed=1, size_limit=1 << 12)
    theirs = write_foundry(str(tmp_path / 'theirs'), 'ndarray-int32', n=32)
    ds = DWMDataset(streams={'web': DWMStream(local=ours), 'code': DWMStream(local=theirs)}, batch_size=64,
                    shuffle=True)
    assert ds.domain_names[-1] == 'code' and ds.score_names == ['quality']
    spec = build_dataloader({'streams': {'web': {'local': ours}, 'code': {'local': theirs}}, 'shuffle': True}, 64)
    batch = _batches(spec)[0]
    code = ds.domain_names.index('code')
    rows = (batch['domain'] == code).nonzero().flatten().tolist()
    assert len(rows) == 32 and batch['input_ids'].dtype == torch.int64
    for row in rows:
        index = int(batch['uid'][row]) - stream_uid_base('code')
        np.testing.assert_array_equal(batch['input_ids'][row].numpy(), _tokens(index))
        assert torch.isnan(batch['scores'][row]).all()
    assert not torch.isnan(batch['scores'][[r for r in range(64) if r not in rows]]).any()


def test_remote_foundry_corpus_without_dwm_json(tmp_path):
    remote = write_foundry(str(tmp_path / 'remote' / 'c4'), 'ndarray-int32')
    ds = build_dataset({'remote': remote, 'local': str(tmp_path / 'cache'), 'split': None}, 4)
    assert ds.domain_names == ['c4']
    assert sorted(_index_of(s, 'c4') for s in ds) == list(range(N))


# ---------------------------------------------------------------------------------------------- refused
def test_text_only_corpus_is_refused_at_construction(tmp_path):
    root = _write(str(tmp_path / 'text'), {'text': 'str'}, [{'text': f'document {i}'} for i in range(8)])
    for build in (lambda: DWMDataset(local=root, batch_size=4),
                  lambda: build_dataloader({'streams': {'c4': {'local': root}}}, 4)):
        with pytest.raises(ValueError) as info:
            build()
        message = str(info.value)
        assert message.startswith(f'{root}: a text corpus (column `text`, no `tokens`)'), message
        assert '`dwm-stream convert --src SOURCE --out OUT --tokenizer TOKENIZER --seq-len N`' in message


def test_wrong_token_encoding_type_is_named(tmp_path):
    root = _write(str(tmp_path / 'odd'), {'tokens': 'bytes'},
                  [{'tokens': np.arange(3, dtype=np.int32).tobytes()} for _ in range(4)])
    with pytest.raises(ValueError, match=r"token_encoding_type: 'int24' is not a token dtype; use one of"):
        DWMDataset(local=root, batch_size=2, token_encoding_type='int24')
    ds = DWMDataset(local=root, batch_size=2)  # 12 bytes are not int64 ids
    with pytest.raises(ValueError, match=r'shard\.00000\.mds: sample 0: `tokens` is 12 bytes, not a whole number '
                                         r'of int64 ids; set token_encoding_type'):
        ds[0]
    np.testing.assert_array_equal(DWMDataset(local=root, batch_size=2, token_encoding_type='int32')[0]['input_ids'],
                                  [0, 1, 2])


def test_tokens_that_are_not_token_ids_are_refused(tmp_path):
    root = _write(str(tmp_path / 'floats'), {'tokens': 'ndarray:float32'},
                  [{'tokens': np.zeros(4, np.float32)} for _ in range(4)])
    with pytest.raises(ValueError, match=r"index\.json: column `tokens` is encoded as 'ndarray:float32', which "
                                         r'does not hold token ids'):
        DWMDataset(local=root, batch_size=2)


def test_meta_sidecar_and_index_are_checked_together(tmp_path):
    """A dwm.json beside a Foundry corpus must match it; the message says it can simply be deleted."""
    root = write_foundry(str(tmp_path / 'c4'), 'ndarray-int32')
    meta = CorpusMeta(domains=['a', 'b'], seq_len=SEQ, token_dtype='int32', tokenizer='t', eos_token_id=0,
                      pad_token_id=0, num_samples=N)
    with open(os.path.join(root, 'dwm.json'), 'w') as f:
        json.dump(json.loads(meta.to_json()), f)
    with pytest.raises(ValueError, match=r'dwm\.json: lists 2 domains, but the shards have no `domain` column') as info:
        DWMDataset(local=root, batch_size=4)
    assert 'delete it to stream' in str(info.value)


def test_selection_on_a_foundry_corpus_is_refused(tmp_path):
    from dwm_stream.data.selection import write_selection
    root = write_foundry(str(tmp_path / 'c4'), 'ndarray-int32')
    selection = str(tmp_path / 'sel.parquet')
    write_selection(selection, np.arange(4, dtype=np.int64))
    with pytest.raises(ValueError, match=rf'^{root}: `selection` picks samples by uid, and this corpus has none'):
        DWMDataset(local=root, selection=selection, batch_size=4)
