"""Readers of .jsonl.zst, WebDataset .tar and QuRatedPajama .parquet: content and bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import zstandard

from dwm_stream.convert import sources
from dwm_stream.convert.sources import (BadRecordError, Document, iter_documents, read_jsonl_zst,
                                read_parquet, read_tar, write_jsonl_zst, write_tar_shards)


def _docs(n: int = 7) -> list[Document]:
    return [Document(text=f'doc {i} ' + 'ünïcode\n' * i + ('x' * (i * 1000)), domain=f'D{i % 3}',
                     source='mem', line=i + 1) for i in range(n)]


def _zst_lines(path, lines: list[bytes]) -> str:
    with open(path, 'wb') as f:
        f.write(zstandard.ZstdCompressor().compress(b'\n'.join(lines) + b'\n'))
    return str(path)


GOOD = json.dumps({'text': 'fine', 'meta': {'redpajama_set_name': 'RedPajamaC4'}}).encode()


def test_jsonl_zst_round_trip_with_tiny_read_chunks(tmp_path, monkeypatch):
    docs = _docs()
    path = str(tmp_path / 'a.jsonl.zst')
    write_jsonl_zst(docs, path)
    monkeypatch.setattr(sources, '_READ_CHUNK', 7)  # lines straddle many reads
    got = list(read_jsonl_zst(path))
    assert [(d.text, d.domain) for d in got] == [(d.text, d.domain) for d in docs]
    assert [d.line for d in got] == list(range(1, len(docs) + 1))


def test_jsonl_zst_reads_concatenated_frames(tmp_path):
    cctx = zstandard.ZstdCompressor()
    path = tmp_path / 'multi.jsonl.zst'
    path.write_bytes(cctx.compress(GOOD + b'\n') + cctx.compress(GOOD + b'\n' + GOOD + b'\n'))
    assert len(list(read_jsonl_zst(str(path)))) == 3


@pytest.mark.parametrize('bad_line, problem', [
    (b'{"text": "oops", "meta": ', 'malformed JSON'),
    (json.dumps({'meta': {'redpajama_set_name': 'X'}}).encode(), 'missing "text"'),
    (json.dumps({'text': 'no meta'}).encode(), 'missing "meta.redpajama_set_name"'),
    (json.dumps({'text': 't', 'meta': {'other': 1}}).encode(), 'missing "meta.redpajama_set_name"'),
    (b'{"text": "caf\xe9", "meta": {"redpajama_set_name": "X"}}', 'not valid UTF-8'),
])
def test_jsonl_zst_bad_line_names_file_and_line(tmp_path, bad_line, problem):
    path = _zst_lines(tmp_path / 'bad.jsonl.zst', [GOOD, GOOD, bad_line, GOOD])
    with pytest.raises(BadRecordError, match=rf'bad\.jsonl\.zst:3: {problem}'):
        list(read_jsonl_zst(path))
    skipped: list[BadRecordError] = []
    got = list(read_jsonl_zst(path, skip_bad=True, on_bad=skipped.append))
    assert [d.line for d in got] == [1, 2, 4]
    assert len(skipped) == 1 and skipped[0].where == '3'


def test_truncated_zst_names_byte_offset(tmp_path):
    rng = np.random.default_rng(0)
    lines = [json.dumps({'text': rng.bytes(100).hex(), 'meta': {'redpajama_set_name': 'X'}}).encode()
             for _ in range(4000)]  # ~1 MB of incompressible text: several zstd blocks
    full = zstandard.ZstdCompressor().compress(b'\n'.join(lines) + b'\n')
    path = tmp_path / 'cut.jsonl.zst'
    path.write_bytes(full[:len(full) // 2])
    with pytest.raises(BadRecordError, match=r'cut\.jsonl\.zst:byte \d+: truncated zstd'):
        list(read_jsonl_zst(str(path)))
    skipped: list[BadRecordError] = []
    got = list(read_jsonl_zst(str(path), skip_bad=True, on_bad=skipped.append))
    assert 0 < len(got) < 4000 and len(skipped) == 1
    assert [d.text for d in got] == [json.loads(x)['text'] for x in lines[:len(got)]]


def test_corrupt_zst_is_reported(tmp_path):
    path = tmp_path / 'junk.jsonl.zst'
    path.write_bytes(b'this is not zstd at all' * 10)
    with pytest.raises(BadRecordError, match=r'junk\.jsonl\.zst:byte 0: corrupt zstd'):
        list(read_jsonl_zst(str(path)))


def test_tar_round_trip(tmp_path):
    docs = _docs(25)
    docs[3].scores = {'quality': 0.5}
    paths = write_tar_shards(docs, str(tmp_path / 'tars'), docs_per_shard=10)
    assert [os.path.basename(p) for p in paths] == [f'shard-{i:06d}.tar' for i in range(3)]
    got = [d for p in paths for d in read_tar(p)]
    assert [(d.text, d.domain) for d in got] == [(d.text, d.domain) for d in docs]
    assert got[3].scores == {'quality': 0.5}
    # byte-identical when written again
    again = write_tar_shards(docs, str(tmp_path / 'tars2'), docs_per_shard=10)
    assert [open(p, 'rb').read() for p in paths] == [open(p, 'rb').read() for p in again]


def test_tar_bad_members(tmp_path):
    from webdataset import TarWriter
    path = str(tmp_path / 'bad.tar')
    with TarWriter(path, encoder=False) as w:
        w.write({'__key__': 'a', 'txt': b'ok', 'json': b'{"redpajama_set_name": "X"}'})
        w.write({'__key__': 'b', 'txt': b'no json member'})
        w.write({'__key__': 'c', 'txt': b'bad', 'json': b'{"redpajama_set_name": '})
        w.write({'__key__': 'd', 'txt': b'no domain', 'json': b'{}'})
    with pytest.raises(BadRecordError, match=r'bad\.tar:2 \(member b\): missing member b\.json'):
        list(read_tar(path))
    skipped: list[BadRecordError] = []
    got = list(read_tar(path, skip_bad=True, on_bad=skipped.append))
    assert [d.text for d in got] == ['ok']
    assert [e.where for e in skipped] == ['2 (member b)', '3 (member c)', '4 (member d)']


def _qurating_parquet(path, rows: int = 50, with_domain: bool = True) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(0)
    data = {
        'input_ids': [rng.integers(1, 200, size=rng.integers(5, 40)).tolist() for _ in range(rows)],
        'writing_style_average': rng.normal(size=rows).tolist(),
        'required_expertise_average': rng.normal(size=rows).tolist(),
        'facts_and_trivia_average': rng.normal(size=rows).tolist(),
        'educational_value_average': rng.normal(size=rows).tolist(),
    }
    if with_domain:
        data['source_domain'] = [['arxiv', 'github'][i % 2] for i in range(rows)]
    pq.write_table(pa.table(data), str(path), row_group_size=16)
    return data


def test_parquet_reads_ids_domains_and_scores(tmp_path):
    data = _qurating_parquet(tmp_path / 'q.parquet')
    got = list(read_parquet(str(tmp_path / 'q.parquet'), batch_rows=7))
    assert len(got) == 50
    assert all(d.text is None for d in got)
    assert [d.input_ids.tolist() for d in got] == data['input_ids']
    assert [d.domain for d in got] == data['source_domain']
    assert set(got[0].scores) == {'writing_style', 'required_expertise', 'facts_and_trivia',
                                  'educational_value'}
    assert got[9].scores['educational_value'] == pytest.approx(data['educational_value_average'][9])
    assert [d.line for d in got] == list(range(1, 51))


def test_parquet_missing_column(tmp_path):
    _qurating_parquet(tmp_path / 'nodomain.parquet', with_domain=False)
    with pytest.raises(BadRecordError, match=r"nodomain\.parquet:schema: missing column "
                       r"'source_domain'"):
        list(read_parquet(str(tmp_path / 'nodomain.parquet')))


def test_iter_documents_rejects_unknown_suffix():
    with pytest.raises(ValueError, match='unknown source type'):
        iter_documents('x.csv')
