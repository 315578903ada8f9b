"""convert: round trip (.jsonl.zst, .tar, .parquet), S3, workers, bad input, overwrite, resume."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from collections import defaultdict

import numpy as np
import pytest
import zstandard

from dwm_stream.convert.pipeline import PART_BASENAME, PARTS_DIR, convert, part_slug
from dwm_stream.format.shards import (META_BASENAME, UID_ORDINAL_BITS, UIDS_BASENAME, CorpusMeta,
                                     make_uid)
from dwm_stream.convert.sources import BadRecordError, iter_documents, write_tar_shards
from dwm_stream.demo.loopback_s3 import upload_dir

SEQ_LEN = 256


def _source_docs(src: str) -> dict[str, list]:
    """Source documents by file, relative to src, read with the same readers convert uses."""
    out = {}
    for path in sorted(glob.glob(f'{src}/**/*', recursive=True)):
        if path.endswith(('.jsonl.zst', '.tar', '.parquet')):
            out[os.path.relpath(path, src)] = list(iter_documents(path))
    return out


def _file_hashes(root: str) -> dict[str, str]:
    return {os.path.relpath(p, root): hashlib.sha256(open(p, 'rb').read()).hexdigest()
            for p in glob.glob(f'{root}/**/*', recursive=True) if os.path.isfile(p)}


def _assert_round_trip(out: str, docs_by_file: dict[str, list], tokenizer: str, read_mds) -> None:
    """Decode every sample and compare with the source documents, file by file, domain by domain."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(tokenizer, 'tokenizer.json'))
    with open(os.path.join(out, META_BASENAME)) as f:
        meta = CorpusMeta.from_json(f.read())
    samples = read_mds(out)
    assert len(samples) == meta.num_samples
    uids = np.load(os.path.join(out, UIDS_BASENAME))
    assert uids.dtype == np.int64
    assert uids.tolist() == [int(s['uid']) for s in samples]
    assert len(set(uids.tolist())) == len(uids)
    assert meta.sources == sorted(docs_by_file)
    file_of = {make_uid(r, 0) >> UID_ORDINAL_BITS: r for r in docs_by_file}

    streams: dict[tuple[str, str], list[np.ndarray]] = defaultdict(list)
    ordinals: dict[str, list[int]] = defaultdict(list)
    for s in samples:
        assert s['tokens'].dtype == np.dtype(meta.token_dtype) and len(s['tokens']) == SEQ_LEN
        relpath = file_of[int(s['uid']) >> UID_ORDINAL_BITS]
        ordinals[relpath].append(int(s['uid']) & ((1 << UID_ORDINAL_BITS) - 1))
        n = int(s['num_tokens'])
        assert (s['tokens'][n:] == meta.pad_token_id).all()
        streams[(relpath, meta.domains[int(s['domain'])])].append(s['tokens'][:n])
    for relpath, ords in ordinals.items():
        assert ords == list(range(len(ords))), f'{relpath}: ordinals are not 0..n-1 in order'

    tokens_per_domain: dict[str, int] = defaultdict(int)
    expected_keys = {(r, d.domain) for r, docs in docs_by_file.items() for d in docs}
    assert set(streams) == expected_keys
    for (relpath, domain), chunks in streams.items():
        assert all(len(c) == SEQ_LEN for c in chunks[:-1]), 'only the last sample may be partial'
        ids = np.concatenate(chunks)
        tokens_per_domain[domain] += len(ids)
        assert ids[-1] == meta.eos_token_id
        cuts = np.flatnonzero(ids == meta.eos_token_id)
        decoded = [tok.decode(ids[a + 1:b].tolist(), skip_special_tokens=False)
                   for a, b in zip(np.r_[-1, cuts[:-1]], cuts)]
        expected = [d.text for d in docs_by_file[relpath] if d.domain == domain]
        assert decoded == expected, f'{relpath} / {domain}: decoded samples differ from the source'
    assert dict(tokens_per_domain) == meta.tokens_per_domain
    assert sum(tokens_per_domain.values()) == meta.num_tokens


def test_round_trip_jsonl_zst(small_corpus, small_tokenizer, converted_mds, read_mds):
    _assert_round_trip(converted_mds, _source_docs(small_corpus.train_dir), small_tokenizer, read_mds)
    with open(os.path.join(converted_mds, META_BASENAME)) as f:
        meta = CorpusMeta.from_json(f.read())
    assert meta.token_dtype == 'uint16' and meta.seq_len == SEQ_LEN
    assert set(meta.domains) == set(small_corpus.docs_per_domain)


def test_round_trip_tar(small_corpus, small_tokenizer, tmp_path, read_mds):
    docs = _source_docs(small_corpus.train_dir)
    tars = str(tmp_path / 'tars')
    for relpath, file_docs in docs.items():
        write_tar_shards(file_docs, os.path.join(tars, relpath.removesuffix('.jsonl.zst')),
                         docs_per_shard=40)
    tar_docs = {}
    for path in sorted(glob.glob(f'{tars}/**/*.tar', recursive=True)):
        relpath = os.path.relpath(path, tars)
        stem = os.path.dirname(relpath) + '.jsonl.zst'
        index = int(os.path.basename(path).split('-')[1].split('.')[0])
        tar_docs[relpath] = docs[stem][index * 40:(index + 1) * 40]
    assert len(tar_docs) > len(docs)
    out = str(tmp_path / 'mds')
    report = convert(tars, out, small_tokenizer, SEQ_LEN, progress=False)
    assert report.num_documents == sum(len(v) for v in docs.values())
    _assert_round_trip(out, tar_docs, small_tokenizer, read_mds)


def test_parquet_keeps_scores(small_tokenizer, tmp_path, read_mds):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(1)
    rows = 40
    ids = [rng.integers(1, 2048, size=int(rng.integers(20, 300))).tolist() for _ in range(rows)]
    names = ['writing_style', 'required_expertise', 'facts_and_trivia', 'educational_value']
    scores = {n: rng.normal(size=rows) for n in names}
    domains = [['arxiv', 'book'][i % 2] for i in range(rows)]
    src = tmp_path / 'qurated'
    src.mkdir()
    pq.write_table(pa.table({'input_ids': ids, 'source_domain': domains,
                             **{f'{n}_average': scores[n] for n in names}}),
                   str(src / 'part-0.parquet'), row_group_size=8)
    out = str(tmp_path / 'mds')
    convert(str(src), out, small_tokenizer, SEQ_LEN, progress=False)
    meta = CorpusMeta.from_json(open(os.path.join(out, META_BASENAME)).read())
    assert meta.score_names == sorted(names)
    samples = read_mds(out)
    # tokens: each row + EOS, packed per domain
    for d, domain in enumerate(meta.domains):
        rows_d = [i for i in range(rows) if domains[i] == domain]
        expected = np.concatenate([np.r_[ids[i], meta.eos_token_id] for i in rows_d])
        got = np.concatenate([s['tokens'][:s['num_tokens']] for s in samples if s['domain'] == d])
        assert got.tolist() == expected.tolist()
        # score of the first sample = token-weighted mean of the rows it holds
        first = next(s for s in samples if s['domain'] == d)
        weights, left = [], SEQ_LEN
        for i in rows_d:
            take = min(left, len(ids[i]) + 1)
            weights.append(take)
            left -= take
            if not left:
                break
        for n in names:
            want = np.dot(weights, [scores[n][i] for i in rows_d[:len(weights)]]) / sum(weights)
            assert first[f'score_{n}'] == pytest.approx(want, rel=1e-5)


def test_parquet_ids_outside_vocab(small_tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    src = tmp_path / 'q'
    src.mkdir()
    pq.write_table(pa.table({'input_ids': [[1, 2], [5, 99999]], 'source_domain': ['a', 'a']}),
                   str(src / 'x.parquet'))
    with pytest.raises(BadRecordError, match=r'x\.parquet:row 2: token id 99999 is outside'):
        convert(str(src), str(tmp_path / 'mds'), small_tokenizer, SEQ_LEN, progress=False)


def test_streaming_dataset_reads_the_output(converted_mds, tmp_path):
    from streaming import StreamingDataset

    from dwm_stream.data.dataset import release_shared_memory
    local = str(tmp_path / 'copy')  # StreamingDataset decompresses shards in place
    shutil.copytree(converted_mds, local)
    meta = CorpusMeta.from_json(open(os.path.join(converted_mds, META_BASENAME)).read())
    ds = StreamingDataset(local=local, shuffle=False, batch_size=1)
    assert len(ds) == meta.num_samples
    uids = np.load(os.path.join(converted_mds, UIDS_BASENAME))
    assert [int(ds[i]['uid']) for i in (0, len(ds) // 2, len(ds) - 1)] == \
        [int(uids[i]) for i in (0, len(ds) // 2, len(ds) - 1)]
    release_shared_memory(ds)


@pytest.mark.slow
def test_two_workers_give_identical_output(small_corpus, small_tokenizer, converted_mds, tmp_path):
    out = str(tmp_path / 'mds2')
    convert(small_corpus.train_dir, out, small_tokenizer, SEQ_LEN, workers=2, progress=False)
    assert _file_hashes(out) == _file_hashes(converted_mds)


@pytest.mark.slow
def test_s3_source_and_output_match_local(small_corpus, small_tokenizer, converted_mds,
                                          loopback_s3):
    client = loopback_s3.client()
    upload_dir(client, small_corpus.train_dir, 'dwm-test', 'corpus/train', include=lambda name: name.endswith('.jsonl.zst'))
    report = convert('s3://dwm-test/corpus/train', 's3://dwm-test/mds/train', small_tokenizer,
                     SEQ_LEN, workers=2, progress=False)
    local = _file_hashes(converted_mds)
    assert report.num_samples == CorpusMeta.from_json(
        open(os.path.join(converted_mds, META_BASENAME)).read()).num_samples
    remote = {}
    for page in client.get_paginator('list_objects_v2').paginate(Bucket='dwm-test',
                                                                 Prefix='mds/train/'):
        for obj in page.get('Contents', []):
            body = client.get_object(Bucket='dwm-test', Key=obj['Key'])['Body'].read()
            remote[obj['Key'][len('mds/train/'):]] = hashlib.sha256(body).hexdigest()
    assert remote == local
    with pytest.raises(FileExistsError, match='--overwrite'):
        convert('s3://dwm-test/corpus/train', 's3://dwm-test/mds/train', small_tokenizer, SEQ_LEN,
                progress=False)


def _zst(path, lines: list[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress(b'\n'.join(lines) + b'\n'))


GOOD = json.dumps({'text': 'A fine document.', 'meta': {'redpajama_set_name': 'RedPajamaC4'}})


@pytest.mark.parametrize('bad, problem', [
    (b'{"text": "truncated json', 'malformed JSON'),
    (b'{"meta": {"redpajama_set_name": "RedPajamaC4"}}', 'missing "text"'),
    (b'{"text": "no domain", "meta": {}}', 'missing "meta.redpajama_set_name"'),
    (b'{"text": "\xff\xfe", "meta": {"redpajama_set_name": "RedPajamaC4"}}', 'not valid UTF-8'),
])
def test_bad_line_stops_with_file_and_line_unless_skipped(small_tokenizer, tmp_path, bad, problem):
    src = tmp_path / 'src'
    _zst(src / 'chunk1' / 'good.jsonl.zst', [GOOD.encode()] * 3)
    _zst(src / 'chunk1' / 'bad.jsonl.zst', [GOOD.encode(), GOOD.encode(), GOOD.encode(), bad])
    with pytest.raises(BadRecordError, match=rf'chunk1/bad\.jsonl\.zst:4: {problem}'):
        convert(str(src), str(tmp_path / 'out'), small_tokenizer, SEQ_LEN, progress=False)
    report = convert(str(src), str(tmp_path / 'out2'), small_tokenizer, SEQ_LEN, skip_bad=True,
                     progress=False)
    assert report.bad_records == 1 and report.num_documents == 6
    assert 'chunk1/bad.jsonl.zst:4' in report.bad_examples[0] and 'skipped 1 bad' in str(report)


@pytest.mark.slow
def test_bad_line_in_a_worker_process_keeps_file_and_line(small_tokenizer, tmp_path):
    src = tmp_path / 'src'
    for k in range(3):
        _zst(src / f'f{k}.jsonl.zst', [GOOD.encode()] * 2 + ([b'{"text": 1}'] if k == 2 else []))
    with pytest.raises(BadRecordError, match=r'f2\.jsonl\.zst:3: "text" is int, not a string'):
        convert(str(src), str(tmp_path / 'out'), small_tokenizer, SEQ_LEN, workers=2,
                progress=False)


def test_truncated_zst_names_byte_offset(small_corpus, small_tokenizer, tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    data = open(os.path.join(small_corpus.out_dir, small_corpus.train_files[0]), 'rb').read()
    (src / 'cut.jsonl.zst').write_bytes(data[:len(data) * 2 // 3])
    with pytest.raises(BadRecordError, match=r'cut\.jsonl\.zst:byte \d+: truncated zstd'):
        convert(str(src), str(tmp_path / 'out'), small_tokenizer, SEQ_LEN, progress=False)
    report = convert(str(src), str(tmp_path / 'out2'), small_tokenizer, SEQ_LEN, skip_bad=True,
                     progress=False)
    assert report.bad_records == 1 and report.num_documents > 0


def test_refuses_existing_output_unless_overwrite(small_corpus, small_tokenizer, converted_mds,
                                                  tmp_path):
    out = str(tmp_path / 'copy')
    shutil.copytree(converted_mds, out)
    with pytest.raises(FileExistsError, match='--overwrite'):
        convert(small_corpus.train_dir, out, small_tokenizer, SEQ_LEN, progress=False)
    with open(os.path.join(out, 'stray.txt'), 'w') as f:
        f.write('left over')
    convert(small_corpus.train_dir, out, small_tokenizer, SEQ_LEN, overwrite=True, progress=False)
    assert _file_hashes(out) == _file_hashes(converted_mds)
    with pytest.raises(ValueError, match='contradict'):
        convert(small_corpus.train_dir, out, small_tokenizer, SEQ_LEN, overwrite=True, resume=True)


def test_resume_after_partial_run_is_identical(small_corpus, small_tokenizer, converted_mds,
                                               tmp_path):
    out = str(tmp_path / 'partial')
    shutil.copytree(converted_mds, out)
    # Simulate a crash: two parts never finished (one with a half-written shard), no merged index.
    unfinished = [part_slug(r) for r in CorpusMeta.from_json(
        open(os.path.join(out, META_BASENAME)).read()).sources[1:3]]
    for slug in unfinished:
        os.remove(os.path.join(out, PARTS_DIR, slug, PART_BASENAME))
    shard = sorted(glob.glob(os.path.join(out, PARTS_DIR, unfinished[0], 'shard.*')))[0]
    with open(shard, 'r+b') as f:
        f.truncate(os.path.getsize(shard) // 2)
    for name in ('index.json', META_BASENAME, UIDS_BASENAME):
        os.remove(os.path.join(out, name))
    report = convert(small_corpus.train_dir, out, small_tokenizer, SEQ_LEN, resume=True,
                     progress=False)
    assert report.parts_written == 2 and report.parts_skipped == len(small_corpus.train_files) - 2
    assert _file_hashes(out) == _file_hashes(converted_mds)
    with pytest.raises(ValueError, match='seq_len'):
        convert(small_corpus.train_dir, out, small_tokenizer, SEQ_LEN * 2, resume=True,
                progress=False)


def test_clear_errors_for_bad_arguments(small_tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match='no such file'):
        convert(str(tmp_path / 'missing'), str(tmp_path / 'o'), small_tokenizer, SEQ_LEN)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='no source files'):
        convert(str(tmp_path / 'empty'), str(tmp_path / 'o'), small_tokenizer, SEQ_LEN)
    with pytest.raises(ValueError, match='seq-len'):
        convert(str(tmp_path / 'empty'), str(tmp_path / 'o'), small_tokenizer, 0)
