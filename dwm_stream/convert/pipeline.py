"""Convert source documents into tokenized, packed MDS shards (the layout of ``shard_format``).

Pipeline, per source file (a ``.jsonl.zst``, WebDataset ``.tar`` or QuRatedPajama ``.parquet``
under SRC, see ``dwm_stream.convert.sources``):

1. documents are streamed, tokenized in batches with the fast tokenizer (special-token strings in
   the text are encoded as plain text), and EOS is appended to each;
2. tokens are packed per domain into samples of ``seq_len`` tokens. Samples never cross source
   files, so each file's final partial sample of each domain is padded with the pad id and
   ``num_tokens`` records its valid length: no token is dropped. A sample's score columns are the
   token-weighted mean of the scores of the documents it holds;
3. samples go to one ``MDSWriter`` per source file, into ``OUT/parts/<slug>/`` (zstd shards with
   ``sha1`` and ``xxh64`` hashes; uploaded straight to S3 when OUT is remote). The ``n``-th sample
   of source file ``relpath`` gets ``uid = make_uid(relpath, n)``; ``parts/<slug>/part.json`` is
   written last and marks the part complete.

Then the per-part indexes are merged into ``OUT/index.json`` (parts in sorted source order, shard
basenames prefixed with ``parts/<slug>/``), and ``OUT/dwm.json`` (``CorpusMeta``) and
``OUT/uids.npy`` are written. Because every part depends only on its own source file, the output is
byte-identical for any number of workers, and ``resume`` can skip finished parts.

Domain ids index the sorted list of all domain names in SRC, so a first, cheap pass over the sources
(no tokenization) collects them; ``OUT/parts/plan.json`` records that table and the settings, and a
resumed run must match it.

SRC and OUT are each a local directory or ``s3://bucket/prefix``, reached through
:mod:`dwm_stream.format.storage` (mosaicml-streaming's storage layer, honouring ``S3_ENDPOINT_URL``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import IO, Any, Iterator, Optional, Sequence

import numpy as np
from streaming import MDSWriter
from tokenizers import Tokenizer

from dwm_stream.convert.sources import BadRecordError, Document, is_source_file, iter_documents
from dwm_stream.convert.tokenizer import load_tokenizer
from dwm_stream.format import storage
from dwm_stream.format.shards import (COMPRESSION, DOMAIN, HASHES, META_BASENAME, NUM_TOKENS,
                                     SHARD_SIZE_LIMIT, TOKENS, UID, UID_ORDINAL_BITS, UIDS_BASENAME,
                                     CorpusMeta, make_uid, mds_columns, score_column, token_dtype_for)
from dwm_stream.parallel import map_tasks, worker_pool
from dwm_stream.progress import Progress

__all__ = ['convert', 'ConvertReport', 'PARTS_DIR', 'PLAN_BASENAME', 'PART_BASENAME', 'part_slug']

PARTS_DIR = 'parts'
PLAN_BASENAME = 'plan.json'
PART_BASENAME = 'part.json'
_BATCH_DOCS = 256
_BATCH_CHARS = 4 << 20
_LONG_TEXT_CHARS = 1 << 20  # documents longer than this are tokenized piece by piece
_PIECE_BOUNDARY = re.compile(r'\S (?=\S)')  # cut after the non-space: "x| y"
_MAX_BAD_EXAMPLES = 20
_PLAN_VERSION = 1


@dataclass
class ConvertReport:
    """What :func:`convert` did.

    Args:
        out (str): The output location.
        num_sources (int): Source files.
        parts_written (int): Parts converted in this run.
        parts_skipped (int): Complete parts kept by ``resume``.
        num_documents (int): Documents converted (in all parts, including skipped ones).
        num_samples (int): Samples in the output.
        num_tokens (int): Valid tokens in the output.
        tokens_per_domain (dict[str, int]): Valid tokens by domain.
        bad_records (int): Bad records skipped (``skip_bad``).
        bad_examples (list[str]): The first bad-record messages.
        seconds (float): Wall time.
    """
    out: str
    num_sources: int = 0
    parts_written: int = 0
    parts_skipped: int = 0
    num_documents: int = 0
    num_samples: int = 0
    num_tokens: int = 0
    tokens_per_domain: dict[str, int] = field(default_factory=dict)
    bad_records: int = 0
    bad_examples: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        lines = [f'converted {self.num_sources} source files to {self.out}: {self.num_samples} '
                 f'samples, {self.num_tokens} tokens, {self.num_documents} documents in '
                 f'{self.seconds:.1f}s ({self.tokens_per_second:,.0f} tokens/s); parts written '
                 f'{self.parts_written}, kept {self.parts_skipped}']
        if self.bad_records:
            lines.append(f'skipped {self.bad_records} bad records, e.g.:')
            lines += [f'  {m}' for m in self.bad_examples]
        return '\n'.join(lines)


def part_slug(relpath: str) -> str:
    """The part directory name of a source file: readable, filesystem-safe, unique per path."""
    readable = re.sub(r'[^A-Za-z0-9._-]', '_', relpath.replace('/', '__'))
    digest = hashlib.blake2b(relpath.encode('utf-8'), digest_size=4).hexdigest()
    return f'{readable}-{digest}'


# ----------------------------------------------------------------------------------------------
# Workers: a scan pass (domains and score names) and the convert pass, one task per source file.

_TOKENIZER_CACHE: dict[str, Any] = {}


def _load(name: str):
    if name not in _TOKENIZER_CACHE:
        _TOKENIZER_CACHE[name] = load_tokenizer(name)
    return _TOKENIZER_CACHE[name]


def _source_path(src: str, relpath: str) -> str:
    """Where source file ``relpath`` of SRC is: SRC itself when it is a local file."""
    if not storage.is_remote(src) and os.path.isfile(src):
        return src
    return storage.join(src, relpath)


class _Source:
    """Open a source file for :func:`iter_documents`, downloading only when seeking is needed."""

    def __init__(self, src_url: str, relpath: str) -> None:
        self.path = _source_path(src_url, relpath)
        self.relpath = relpath
        self.tmp: Optional[str] = None
        self.stream: Optional[IO[bytes]] = None

    def documents(self, skip_bad: bool, on_bad) -> Iterator[Document]:
        name = self.relpath
        if not storage.is_remote(self.path):
            return iter_documents(self.path, skip_bad=skip_bad, on_bad=on_bad, name=name)
        if self.relpath.endswith('.parquet'):
            self.tmp = tempfile.mkdtemp(prefix='dwm-convert-')
            local = os.path.join(self.tmp, 'source.parquet')
            storage.download_file(self.path, local)
            return iter_documents(local, skip_bad=skip_bad, on_bad=on_bad, name=name)
        self.stream = storage.open_read(self.path)
        return iter_documents(self.relpath, fileobj=self.stream, skip_bad=skip_bad, on_bad=on_bad,
                              name=name)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


class _BadLog:

    def __init__(self) -> None:
        self.count = 0
        self.examples: list[str] = []

    def __call__(self, err: BadRecordError) -> None:
        self.count += 1
        if len(self.examples) < _MAX_BAD_EXAMPLES:
            self.examples.append(str(err))


def _scan(task: dict[str, Any]) -> dict[str, Any]:
    src = _Source(task['src'], task['relpath'])
    domains: set[str] = set()
    scores: set[str] = set()
    try:
        for doc in src.documents(task['skip_bad'], None):
            domains.add(doc.domain)
            if doc.scores:
                scores.update(doc.scores)
    finally:
        src.close()
    return {'relpath': task['relpath'], 'domains': sorted(domains), 'score_names': sorted(scores)}


class _DomainPacker:
    """Packs one domain's token stream into fixed-length samples (with score means)."""

    def __init__(self, seq_len: int, num_scores: int) -> None:
        self.seq_len = seq_len
        self.num_scores = num_scores
        self.chunks: deque[tuple[np.ndarray, Optional[np.ndarray]]] = deque()
        self.offset = 0  # consumed tokens of chunks[0]
        self.count = 0  # buffered tokens

    def add(self, ids: np.ndarray, scores: Optional[np.ndarray]) -> None:
        if len(ids):
            self.chunks.append((ids, scores))
            self.count += len(ids)

    def _take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        parts = []
        weighted = np.zeros(self.num_scores, dtype=np.float64)
        need = n
        while need:
            ids, scores = self.chunks[0]
            k = min(need, len(ids) - self.offset)
            parts.append(ids[self.offset:self.offset + k])
            if self.num_scores:
                weighted += (scores if scores is not None else np.nan) * k
            self.offset += k
            need -= k
            if self.offset == len(ids):
                self.chunks.popleft()
                self.offset = 0
        self.count -= n
        return np.concatenate(parts), weighted / n

    def full_samples(self) -> Iterator[tuple[np.ndarray, int, np.ndarray]]:
        while self.count >= self.seq_len:
            tokens, scores = self._take(self.seq_len)
            yield tokens, self.seq_len, scores

    def final_sample(self, pad_id: int) -> Iterator[tuple[np.ndarray, int, np.ndarray]]:
        if self.count:
            n = self.count
            tokens, scores = self._take(n)
            padded = np.full(self.seq_len, pad_id, dtype=tokens.dtype)
            padded[:n] = tokens
            yield padded, n, scores


class _Encoder:
    """Batch-encodes text with the fast backend, special-token strings encoded as plain text.

    A local tokenizer directory with ``tokenizer.json`` is loaded with ``tokenizers`` alone (worker
    processes then skip importing transformers); anything else goes through :func:`load_tokenizer`.
    """

    def __init__(self, name: str) -> None:
        self.tokenizer = None
        path = os.path.join(name, 'tokenizer.json')
        if os.path.isfile(path):
            self.backend: Any = Tokenizer.from_file(path)
        else:
            self.tokenizer = _load(name)
            backend = getattr(self.tokenizer, 'backend_tokenizer', None)
            self.backend = Tokenizer.from_str(backend.to_str()) if backend is not None else None
        if self.backend is not None:
            self.backend.encode_special_tokens = True
            self.backend.no_truncation()
            self.backend.no_padding()

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        if any(len(t) > _LONG_TEXT_CHARS for t in texts):  # bounded memory for huge documents
            return [self._encode_long(t) if len(t) > _LONG_TEXT_CHARS else self._encode([t])[0] for t in texts]
        return self._encode(texts)

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        if self.backend is not None:
            encode = getattr(self.backend, 'encode_batch_fast', self.backend.encode_batch)
            return [np.asarray(e.ids, dtype=np.uint32) for e in encode(texts, add_special_tokens=False)]
        ids = self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)['input_ids']
        return [np.asarray(x, dtype=np.uint32) for x in ids]

    def _encode_long(self, text: str) -> np.ndarray:
        """Encode a very long document piece by piece, so that memory stays O(its length).

        Tokenizing a 100 MB string in one call takes ~16 GB (every token becomes an object, then a
        Python int). Pieces of ~1M characters are cut just before a single space between two
        non-space characters (``x| y``), where byte-level BPE's pre-tokenizer (GPT-2's regex) splits
        anyway, so the ids are the same as one call's; ``tests/reliability/test_hostile_input.py``
        checks that. A document without such a boundary for 1M characters is cut there.
        """
        out = np.empty(0, np.uint32)
        pieces: list[np.ndarray] = []
        start, n = 0, len(text)
        while start < n:
            end = min(n, start + _LONG_TEXT_CHARS)
            if end < n:
                cut = _PIECE_BOUNDARY.search(text, end, min(n, end + _LONG_TEXT_CHARS))
                end = cut.start() + 1 if cut else end
            pieces.append(self._encode([text[start:end]])[0])
            start = end
        out = np.concatenate(pieces) if pieces else out
        return out


_ENCODERS: dict[str, _Encoder] = {}


def _convert_part(task: dict[str, Any]) -> dict[str, Any]:
    plan = task['plan']
    relpath = task['relpath']
    seq_len = plan['seq_len']
    eos, pad = plan['eos_token_id'], plan['pad_token_id']
    vocab = plan['vocab_size']
    dtype = np.dtype(plan['token_dtype'])
    domain_ids = {d: i for i, d in enumerate(plan['domains'])}
    score_names = plan['score_names']
    if plan['tokenizer'] not in _ENCODERS:
        _ENCODERS[plan['tokenizer']] = _Encoder(plan['tokenizer'])
    encoder = _ENCODERS[plan['tokenizer']]
    part_dir = storage.join(task['out'], f'{PARTS_DIR}/{task["slug"]}')
    tmp = None
    if storage.is_remote(part_dir):
        tmp = tempfile.mkdtemp(prefix='dwm-convert-part-')
        writer_out: Any = (tmp, part_dir)
    else:
        shutil.rmtree(part_dir, ignore_errors=True)
        writer_out = part_dir
    writer = MDSWriter(out=writer_out,
                       columns=mds_columns(seq_len, plan['token_dtype'], tuple(score_names)),
                       compression=COMPRESSION,
                       hashes=HASHES,
                       size_limit=SHARD_SIZE_LIMIT,
                       keep_local=False,
                       exist_ok=True)
    packers = {d: _DomainPacker(seq_len, len(score_names)) for d in plan['domains']}
    bad = _BadLog()
    stats = {'num_documents': 0, 'num_samples': 0, 'tokens_per_domain': {}, 'max_token_id': -1}
    uid_base = make_uid(relpath, 0)

    def write(domain: str, samples: Iterator[tuple[np.ndarray, int, np.ndarray]]) -> None:
        for tokens, n, scores in samples:
            ordinal = stats['num_samples']
            if ordinal >= (1 << UID_ORDINAL_BITS):
                make_uid(relpath, ordinal)  # raises with the file named
            sample = {TOKENS: tokens.astype(dtype, copy=False), NUM_TOKENS: n,
                      UID: uid_base | ordinal, DOMAIN: domain_ids[domain]}
            for name, value in zip(score_names, scores):
                sample[score_column(name)] = float(value)
            writer.write(sample)
            stats['num_samples'] += 1
            if len(tokens):
                stats['max_token_id'] = max(stats['max_token_id'], int(tokens.max()))
            stats['tokens_per_domain'][domain] = stats['tokens_per_domain'].get(domain, 0) + n

    def flush(batch: list[Document]) -> None:
        texts = [d.text for d in batch if d.input_ids is None]
        encoded = iter(encoder(texts)) if texts else iter(())
        for doc in batch:
            if doc.input_ids is None:
                ids = next(encoded)
            else:
                ids = np.asarray(doc.input_ids, dtype=np.uint32)
                if len(ids) and int(ids.max()) >= vocab:
                    err = BadRecordError(doc.source, f'row {doc.line}', f'token id {int(ids.max())} '
                                         f'is outside the tokenizer vocabulary ({vocab}); convert '
                                         'with the tokenizer the file was made with')
                    if not task['skip_bad']:
                        raise err
                    bad(err)
                    continue
            if doc.domain not in domain_ids:
                raise ValueError(f'{doc.source}:{doc.line}: domain {doc.domain!r} was not seen by '
                                 'the scan pass; the source changed during conversion.')
            scores = None
            if score_names:
                scores = np.array([(doc.scores or {}).get(s, np.nan) for s in score_names])
            packer = packers[doc.domain]
            packer.add(np.append(ids, np.uint32(eos)), scores)
            stats['num_documents'] += 1
            write(doc.domain, packer.full_samples())

    src = _Source(task['src'], relpath)
    try:
        batch: list[Document] = []
        chars = 0
        for doc in src.documents(task['skip_bad'], bad):
            batch.append(doc)
            chars += len(doc.text) if doc.text is not None else 4 * len(doc.input_ids)
            if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
                flush(batch)
                batch, chars = [], 0
        if batch:
            flush(batch)
        for domain in sorted(packers):
            write(domain, packers[domain].final_sample(pad))
        writer.finish()
    except BaseException:
        writer.cancel_future_jobs()
        raise
    finally:
        src.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    record = {'relpath': relpath, 'slug': task['slug'], 'plan_hash': task['plan_hash'],
              'bad_records': bad.count, 'bad_examples': bad.examples, **stats}
    storage.write_bytes(storage.join(part_dir, PART_BASENAME),
                        json.dumps(record, indent=2, sort_keys=True).encode())
    return record


# ----------------------------------------------------------------------------------------------
# The driver.


def _run(fn, tasks: list[dict[str, Any]], pool, meter: Progress, weights: Sequence[int]):
    """Yield fn(task) in completion order, counting each file's bytes as it completes."""
    weight = {t['relpath']: w for t, w in zip(tasks, weights)}
    for result in map_tasks(fn, tasks, pool, ordered=False):
        meter.update(weight[result['relpath']])
        yield result


def _tokenizer_identity(name: str) -> dict[str, Any]:
    tok = _load(name)
    eos = tok.eos_token_id
    if eos is None:
        raise ValueError(f'tokenizer {name!r} has no EOS token; convert appends EOS to every '
                         'document, so pick a tokenizer with one.')
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    backend = getattr(tok, 'backend_tokenizer', None)
    digest = hashlib.sha256((backend.to_str() if backend is not None else repr(tok.get_vocab()))
                            .encode()).hexdigest()
    vocab = len(tok)
    return {'tokenizer': os.path.abspath(name) if os.path.isdir(name) else name,
            'tokenizer_sha256': digest, 'vocab_size': vocab, 'eos_token_id': int(eos),
            'pad_token_id': int(pad), 'token_dtype': token_dtype_for(vocab)}


def convert(src: str,
            out: str,
            tokenizer: str,
            seq_len: int,
            workers: int = 1,
            skip_bad: bool = False,
            overwrite: bool = False,
            resume: bool = False,
            progress: bool = False) -> ConvertReport:
    """Convert source documents under SRC to packed, tokenized MDS shards under OUT.

    Args:
        src (str): Local directory or file, or ``s3://bucket/prefix``, holding ``*.jsonl.zst``,
            ``*.tar`` or ``*.parquet`` sources (searched recursively; uids use paths relative to it).
        out (str): Local directory or ``s3://bucket/prefix`` to write.
        tokenizer (str): Local tokenizer directory or HF name.
        seq_len (int): Tokens per sample.
        workers (int): Processes, each converting whole source files. Default: ``1``.
        skip_bad (bool): Skip and count bad records instead of stopping at the first.
            Default: ``False``.
        overwrite (bool): Delete an existing output first. Default: ``False``.
        resume (bool): Keep complete parts of an interrupted run with the same settings and
            convert the rest. Default: ``False``.
        progress (bool): Report progress on stderr (:class:`~dwm_stream.progress.Progress`).
            Default: ``False``.

    Returns:
        ConvertReport: Counts, bad records and timing.

    Raises:
        BadRecordError: (a ``ValueError``) a bad record, naming file and line, unless ``skip_bad``.
        FileExistsError: OUT is not empty and neither ``overwrite`` nor ``resume`` is given.
        FileNotFoundError: SRC holds no source files.
        ValueError: bad settings, a resume that does not match the first run, a uid collision.
    """
    start = time.perf_counter()
    if seq_len < 1:
        raise ValueError(f'--seq-len {seq_len}: must be a positive number of tokens.')
    if overwrite and resume:
        raise ValueError('--overwrite and --resume contradict each other; pass one.')
    workers = max(1, int(workers))
    src_root, out_root = _root(src), _root(out)
    if not storage.is_remote(src_root) and not os.path.exists(src_root):
        raise FileNotFoundError(f'--src {src}: no such file or directory.')
    sizes = storage.file_sizes(src_root)
    sources = [p for p in sizes if is_source_file(p)]
    if not sources:
        raise FileNotFoundError(f'--src {src}: no source files (*.jsonl.zst, *.tar, *.parquet).')

    existing = storage.list_files(out_root)
    if existing and overwrite:
        storage.delete_all(out_root)
    elif existing and not resume:
        raise FileExistsError(f'--out {out} already holds {len(existing)} files (e.g. '
                              f'{existing[0]}); pass --overwrite to replace them, or --resume to '
                              'finish an interrupted conversion.')

    ident = _tokenizer_identity(tokenizer)
    size_of = [sizes[r] for r in sources]
    # Each source is read twice (scan, then convert): the meter counts its bytes once per pass.
    with Progress('convert (scan)', 2 * sum(size_of), unit='B', enabled=progress) as meter, \
            worker_pool(workers, len(sources), preload=[__name__]) as pool:
        scan_tasks = [{'src': src_root, 'relpath': r, 'skip_bad': skip_bad} for r in sources]
        scans = {r['relpath']: r for r in _run(_scan, scan_tasks, pool, meter, size_of)}
        domains = sorted({d for r in scans.values() for d in r['domains']})
        score_names = sorted({s for r in scans.values() for s in r['score_names']})
        if len(domains) > np.iinfo(np.int16).max:
            raise ValueError(f'--src {src}: {len(domains)} domains do not fit the int16 domain '
                             'column.')
        plan = {'version': _PLAN_VERSION, 'sources': sources, 'domains': domains,
                'score_names': score_names, 'seq_len': int(seq_len), **ident}
        plan_bytes = json.dumps(plan, indent=2, sort_keys=True).encode()
        plan_hash = hashlib.sha256(plan_bytes).hexdigest()
        plan_path = storage.join(out_root, f'{PARTS_DIR}/{PLAN_BASENAME}')
        if existing and resume and storage.exists(plan_path):
            old = json.loads(storage.read_bytes(plan_path))
            if old != plan:
                changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
                raise ValueError(f'--resume: {out} was started with different settings or sources '
                                 f'({", ".join(changed)} differ); pass --overwrite to start over.')
        storage.write_bytes(plan_path, plan_bytes)

        done: dict[str, dict[str, Any]] = {}
        if resume:
            for r in sources:
                part_path = storage.join(out_root, f'{PARTS_DIR}/{part_slug(r)}/{PART_BASENAME}')
                if storage.exists(part_path):
                    record = json.loads(storage.read_bytes(part_path))
                    if record.get('plan_hash') == plan_hash:
                        done[r] = record
        todo = [r for r in sources if r not in done]
        meter.set_description('convert')
        meter.update(sum(s for r, s in zip(sources, size_of) if r in done))
        tasks = [{'src': src_root, 'out': out_root, 'relpath': r, 'slug': part_slug(r), 'plan': plan,
                  'plan_hash': plan_hash, 'skip_bad': skip_bad} for r in todo]
        weights = [s for r, s in zip(sources, size_of) if r not in done]
        records = dict(done)
        for record in _run(_convert_part, tasks, pool, meter, weights):
            records[record['relpath']] = record

    report = _merge(out_root, sources, records, plan)
    report.out = out.rstrip('/') if storage.is_remote(out) else out
    report.parts_written = len(todo)
    report.parts_skipped = len(done)
    report.seconds = time.perf_counter() - start
    return report


def _root(location: str) -> str:
    """A location as convert uses it: a URL without a trailing ``/``, or an absolute local path."""
    if storage.is_remote(location):
        return location.rstrip('/')
    return os.path.abspath(os.path.expanduser(location))


def _merge(out_root: str, sources: list[str], records: dict[str, dict[str, Any]],
           plan: dict[str, Any]) -> ConvertReport:
    """Write OUT/index.json, OUT/uids.npy and OUT/dwm.json from the complete parts."""
    file_hashes: dict[int, str] = {}
    for r in sources:
        h = make_uid(r, 0) >> UID_ORDINAL_BITS
        if h in file_hashes:
            raise ValueError(f'uid collision: source files {file_hashes[h]!r} and {r!r} hash to the '
                             'same uid prefix; rename one of them.')
        file_hashes[h] = r
    shards: list[dict[str, Any]] = []
    uids: list[np.ndarray] = []
    report = ConvertReport(out=out_root)
    tokens_per_domain: dict[str, int] = {}
    for r in sources:
        record = records[r]
        part_rel = f'{PARTS_DIR}/{record["slug"]}'
        index = json.loads(storage.read_bytes(storage.join(out_root, f'{part_rel}/index.json')))
        count = 0
        for shard in index['shards']:
            for key in ('raw_data', 'zip_data', 'raw_meta', 'zip_meta'):
                if shard.get(key):
                    shard[key]['basename'] = f'{part_rel}/{shard[key]["basename"]}'
            count += shard['samples']
            shards.append(shard)
        if count != record['num_samples']:
            raise ValueError(f'{storage.join(out_root, part_rel)}: index.json lists {count} samples but '
                             f'{PART_BASENAME} says {record["num_samples"]}; re-run with --overwrite.')
        uids.append(make_uid(r, 0) + np.arange(count, dtype=np.int64))
        report.num_documents += record['num_documents']
        report.bad_records += record['bad_records']
        room = _MAX_BAD_EXAMPLES - len(report.bad_examples)
        report.bad_examples += record['bad_examples'][:max(room, 0)]
        for d, n in record['tokens_per_domain'].items():
            tokens_per_domain[d] = tokens_per_domain.get(d, 0) + n
    all_uids = np.concatenate(uids) if uids else np.zeros(0, dtype=np.int64)
    if len(np.unique(all_uids)) != len(all_uids):
        raise ValueError(f'{out_root}: duplicate uids in the merged output; re-run with '
                         '--overwrite.')
    tokens_per_domain = dict(sorted(tokens_per_domain.items()))
    # A part converted before max_token_id was recorded leaves it unknown (None: not checked at start-up).
    part_max = [records[r].get('max_token_id') for r in sources]
    max_token_id = None if None in part_max else max([m for m in part_max if m >= 0], default=None)
    meta = CorpusMeta(domains=plan['domains'],
                      seq_len=plan['seq_len'],
                      token_dtype=plan['token_dtype'],
                      tokenizer=plan['tokenizer'],
                      eos_token_id=plan['eos_token_id'],
                      pad_token_id=plan['pad_token_id'],
                      score_names=plan['score_names'],
                      num_samples=int(len(all_uids)),
                      num_tokens=int(sum(tokens_per_domain.values())),
                      tokens_per_domain=tokens_per_domain,
                      sources=sources,
                      max_token_id=max_token_id)
    buf = io.BytesIO()
    np.save(buf, all_uids)
    # index.json last: a reader that sees it sees a complete corpus.
    storage.write_bytes(storage.join(out_root, UIDS_BASENAME), buf.getvalue())
    storage.write_bytes(storage.join(out_root, META_BASENAME), meta.to_json().encode())
    storage.write_bytes(storage.join(out_root, 'index.json'),
                        json.dumps({'version': 2, 'shards': shards}, sort_keys=True).encode())
    report.num_sources = len(sources)
    report.num_samples = meta.num_samples
    report.num_tokens = meta.num_tokens
    report.tokens_per_domain = tokens_per_domain
    return report
