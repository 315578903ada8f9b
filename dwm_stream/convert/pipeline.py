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

SRC and OUT are each a local directory or ``s3://bucket/prefix``; S3 is reached with boto3 (and
mosaicml-streaming's uploader) honouring ``S3_ENDPOINT_URL``.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import IO, Any, Iterator, Optional, Sequence

import numpy as np

from dwm_stream.format.shards import (DOMAIN, META_BASENAME, NUM_TOKENS, TOKENS, UID,
                                     UID_ORDINAL_BITS, UIDS_BASENAME, CorpusMeta, make_uid,
                                     mds_columns, score_column, token_dtype_for)
from dwm_stream.convert.sources import BadRecordError, Document, is_source_file, iter_documents

__all__ = ['convert', 'ConvertReport', 'PARTS_DIR', 'PLAN_BASENAME', 'PART_BASENAME', 'HASHES',
           'part_slug']

PARTS_DIR = 'parts'
PLAN_BASENAME = 'plan.json'
PART_BASENAME = 'part.json'
HASHES = ['sha1', 'xxh64']
COMPRESSION = 'zstd'
SHARD_SIZE_LIMIT = 1 << 26
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


# ----------------------------------------------------------------------------------------------
# Storage: a local directory or an s3://bucket/prefix, behind the few operations convert needs.


class _Location:

    def __init__(self, url: str) -> None:
        self.url = url.rstrip('/') if url.startswith('s3://') else url
        self.remote = url.startswith('s3://')
        if self.remote:
            m = re.fullmatch(r's3://([^/]+)/?(.*)', self.url)
            if not m:
                raise ValueError(f'{url}: expected s3://bucket/prefix.')
            self.bucket, self.prefix = m.group(1), m.group(2).strip('/')
        else:
            self.path = os.path.abspath(os.path.expanduser(url))

    def _client(self):
        import boto3
        return boto3.session.Session().client('s3', endpoint_url=os.environ.get('S3_ENDPOINT_URL'))

    def _key(self, rel: str) -> str:
        return f'{self.prefix}/{rel}' if self.prefix else rel

    def join(self, rel: str) -> str:
        return f'{self.url}/{rel}' if self.remote else os.path.join(self.path, rel)

    def is_file(self) -> bool:
        return not self.remote and os.path.isfile(self.path)

    def list_files(self) -> list[str]:
        """Relative paths of every file below the location, sorted."""
        if not self.remote:
            if os.path.isfile(self.path):
                return [os.path.basename(self.path)]
            out = []
            for d, dirs, files in os.walk(self.path):
                out += [os.path.relpath(os.path.join(d, f), self.path) for f in files]
            return sorted(p.replace(os.sep, '/') for p in out)
        client = self._client()
        prefix = f'{self.prefix}/' if self.prefix else ''
        out = []
        for page in client.get_paginator('list_objects_v2').paginate(Bucket=self.bucket,
                                                                     Prefix=prefix):
            out += [obj['Key'][len(prefix):] for obj in page.get('Contents', [])]
        return sorted(out)

    def exists(self, rel: str) -> bool:
        if not self.remote:
            return os.path.isfile(self.join(rel))
        try:
            self._client().head_object(Bucket=self.bucket, Key=self._key(rel))
            return True
        except Exception:  # noqa: BLE001 - botocore ClientError 404
            return False

    def read_bytes(self, rel: str) -> bytes:
        if not self.remote:
            with open(self.join(rel), 'rb') as f:
                return f.read()
        return self._client().get_object(Bucket=self.bucket, Key=self._key(rel))['Body'].read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        if not self.remote:
            path = self.join(rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = path + '.tmp'
            with open(tmp, 'wb') as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            self._client().put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)

    def delete(self, rel_prefix: str = '') -> None:
        """Delete every file under ``rel_prefix`` (everything when empty)."""
        if not self.remote:
            target = self.join(rel_prefix) if rel_prefix else self.path
            if os.path.isdir(target):
                if rel_prefix:
                    shutil.rmtree(target)
                else:
                    for name in os.listdir(target):
                        p = os.path.join(target, name)
                        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
            elif os.path.isfile(target):
                os.remove(target)
            return
        client = self._client()
        prefix = self._key(rel_prefix.rstrip('/') + '/') if rel_prefix else (
            f'{self.prefix}/' if self.prefix else '')
        keys = []
        for page in client.get_paginator('list_objects_v2').paginate(Bucket=self.bucket,
                                                                     Prefix=prefix):
            keys += [{'Key': obj['Key']} for obj in page.get('Contents', [])]
        for i in range(0, len(keys), 1000):
            client.delete_objects(Bucket=self.bucket, Delete={'Objects': keys[i:i + 1000]})

    def open(self, rel: str) -> IO[bytes]:
        """A sequential binary stream of one file (an S3 object is streamed, not downloaded)."""
        if not self.remote:
            return open(self.join(rel) if not self.is_file() else self.path, 'rb')
        return self._client().get_object(Bucket=self.bucket, Key=self._key(rel))['Body']

    def download(self, rel: str, dest: str) -> None:
        self._client().download_file(self.bucket, self._key(rel), dest)


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
        from dwm_stream.convert.tokenizer import load_tokenizer
        _TOKENIZER_CACHE[name] = load_tokenizer(name)
    return _TOKENIZER_CACHE[name]


def _worker_init() -> None:
    # One process per core already: keep the Rust tokenizer from oversubscribing threads.
    os.environ['TOKENIZERS_PARALLELISM'] = 'false'


class _Source:
    """Open a source file for :func:`iter_documents`, downloading only when seeking is needed."""

    def __init__(self, src_url: str, relpath: str) -> None:
        self.loc = _Location(src_url)
        self.relpath = relpath
        self.tmp: Optional[str] = None
        self.stream: Optional[IO[bytes]] = None

    def documents(self, skip_bad: bool, on_bad) -> Iterator[Document]:
        name = self.relpath
        if not self.loc.remote:
            path = self.loc.path if self.loc.is_file() else self.loc.join(self.relpath)
            return iter_documents(path, skip_bad=skip_bad, on_bad=on_bad, name=name)
        if self.relpath.endswith('.parquet'):
            self.tmp = tempfile.mkdtemp(prefix='dwm-convert-')
            local = os.path.join(self.tmp, 'source.parquet')
            self.loc.download(self.relpath, local)
            return iter_documents(local, skip_bad=skip_bad, on_bad=on_bad, name=name)
        self.stream = self.loc.open(self.relpath)
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
        from tokenizers import Tokenizer
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
    from streaming import MDSWriter
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
    out = _Location(task['out'])
    part_rel = f'{PARTS_DIR}/{task["slug"]}'
    tmp = None
    if out.remote:
        tmp = tempfile.mkdtemp(prefix='dwm-convert-part-')
        writer_out: Any = (tmp, out.join(part_rel))
    else:
        shutil.rmtree(out.join(part_rel), ignore_errors=True)
        writer_out = out.join(part_rel)
    writer = MDSWriter(out=writer_out,
                       columns=mds_columns(seq_len, plan['token_dtype'], tuple(score_names)),
                       compression=COMPRESSION,
                       hashes=HASHES,
                       size_limit=SHARD_SIZE_LIMIT,
                       keep_local=False,
                       exist_ok=True)
    packers = {d: _DomainPacker(seq_len, len(score_names)) for d in plan['domains']}
    bad = _BadLog()
    stats = {'num_documents': 0, 'num_samples': 0, 'tokens_per_domain': {}}
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
    out.write_bytes(f'{part_rel}/{PART_BASENAME}',
                    json.dumps(record, indent=2, sort_keys=True).encode())
    return record


# ----------------------------------------------------------------------------------------------
# The driver.


def _run(fn, tasks: list[dict[str, Any]], pool, pbar, weights: Sequence[int]):
    """Yield fn(task) in completion order: in-process without a pool, else in the pool."""
    weight = {t['relpath']: w for t, w in zip(tasks, weights)}
    results = map(fn, tasks) if pool is None else pool.imap_unordered(fn, tasks)
    for result in results:
        if pbar is not None:
            pbar.update(weight[result['relpath']])
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
            progress: bool = True) -> ConvertReport:
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
        progress (bool): Show a progress bar. Default: ``True``.

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
    src_loc, out_loc = _Location(src), _Location(out)
    if not src_loc.remote and not os.path.exists(src_loc.path):
        raise FileNotFoundError(f'--src {src}: no such file or directory.')
    sources = [p for p in src_loc.list_files() if is_source_file(p)]
    if not sources:
        raise FileNotFoundError(f'--src {src}: no source files (*.jsonl.zst, *.tar, *.parquet).')

    existing = out_loc.list_files()
    if existing and overwrite:
        out_loc.delete()
    elif existing and not resume:
        raise FileExistsError(f'--out {out} already holds {len(existing)} files (e.g. '
                              f'{existing[0]}); pass --overwrite to replace them, or --resume to '
                              'finish an interrupted conversion.')

    ident = _tokenizer_identity(tokenizer)
    size_of = _source_sizes(src_loc, sources)
    pbar = pool = None
    if progress:
        from tqdm import tqdm
        pbar = tqdm(total=2 * sum(size_of), unit='B', unit_scale=True, desc='convert')
    if workers > 1 and len(sources) > 1:
        # fork where available: workers inherit the imported modules (streaming imports torch,
        # seconds per process under spawn). The Rust tokenizer turns its own thread pool off in
        # a forked child, and the workers hold no state from the parent but these modules.
        import streaming  # noqa: F401 - imported once, before forking
        import tokenizers  # noqa: F401
        method = 'fork' if 'fork' in multiprocessing.get_all_start_methods() else 'spawn'
        saved = os.environ.get('TOKENIZERS_PARALLELISM')
        os.environ['TOKENIZERS_PARALLELISM'] = 'false'  # for the children only (no fork warning)
        try:
            pool = multiprocessing.get_context(method).Pool(min(workers, len(sources)),
                                                            initializer=_worker_init)
        finally:
            if saved is None:
                os.environ.pop('TOKENIZERS_PARALLELISM', None)
            else:
                os.environ['TOKENIZERS_PARALLELISM'] = saved
    try:
        scan_tasks = [{'src': src, 'relpath': r, 'skip_bad': skip_bad} for r in sources]
        if pbar is not None:
            pbar.set_description('convert (scan)')
        scans = {r['relpath']: r for r in _run(_scan, scan_tasks, pool, pbar, size_of)}
        domains = sorted({d for r in scans.values() for d in r['domains']})
        score_names = sorted({s for r in scans.values() for s in r['score_names']})
        if len(domains) > np.iinfo(np.int16).max:
            raise ValueError(f'--src {src}: {len(domains)} domains do not fit the int16 domain '
                             'column.')
        plan = {'version': _PLAN_VERSION, 'sources': sources, 'domains': domains,
                'score_names': score_names, 'seq_len': int(seq_len), **ident}
        plan_bytes = json.dumps(plan, indent=2, sort_keys=True).encode()
        plan_hash = hashlib.sha256(plan_bytes).hexdigest()
        plan_rel = f'{PARTS_DIR}/{PLAN_BASENAME}'
        if existing and resume and out_loc.exists(plan_rel):
            old = json.loads(out_loc.read_bytes(plan_rel))
            if old != plan:
                changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
                raise ValueError(f'--resume: {out} was started with different settings or sources '
                                 f'({", ".join(changed)} differ); pass --overwrite to start over.')
        out_loc.write_bytes(plan_rel, plan_bytes)

        done: dict[str, dict[str, Any]] = {}
        if resume:
            for r in sources:
                rel = f'{PARTS_DIR}/{part_slug(r)}/{PART_BASENAME}'
                if out_loc.exists(rel):
                    record = json.loads(out_loc.read_bytes(rel))
                    if record.get('plan_hash') == plan_hash:
                        done[r] = record
        todo = [r for r in sources if r not in done]
        if pbar is not None:
            pbar.set_description('convert')
            pbar.update(sum(s for r, s in zip(sources, size_of) if r in done))
        tasks = [{'src': src, 'out': out, 'relpath': r, 'slug': part_slug(r), 'plan': plan,
                  'plan_hash': plan_hash, 'skip_bad': skip_bad} for r in todo]
        weights = [s for r, s in zip(sources, size_of) if r not in done]
        records = dict(done)
        for record in _run(_convert_part, tasks, pool, pbar, weights):
            records[record['relpath']] = record
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if pbar is not None:
            pbar.close()

    report = _merge(out_loc, sources, records, plan)
    report.parts_written = len(todo)
    report.parts_skipped = len(done)
    report.seconds = time.perf_counter() - start
    return report


def _source_sizes(loc: _Location, sources: list[str]) -> list[int]:
    if loc.remote:
        client = loc._client()
        return [client.head_object(Bucket=loc.bucket, Key=loc._key(r))['ContentLength']
                for r in sources]
    if loc.is_file():
        return [os.path.getsize(loc.path)]
    return [os.path.getsize(loc.join(r)) for r in sources]


def _merge(out_loc: _Location, sources: list[str], records: dict[str, dict[str, Any]],
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
    report = ConvertReport(out=out_loc.url)
    tokens_per_domain: dict[str, int] = {}
    for r in sources:
        record = records[r]
        part_rel = f'{PARTS_DIR}/{record["slug"]}'
        index = json.loads(out_loc.read_bytes(f'{part_rel}/index.json'))
        count = 0
        for shard in index['shards']:
            for key in ('raw_data', 'zip_data', 'raw_meta', 'zip_meta'):
                if shard.get(key):
                    shard[key]['basename'] = f'{part_rel}/{shard[key]["basename"]}'
            count += shard['samples']
            shards.append(shard)
        if count != record['num_samples']:
            raise ValueError(f'{out_loc.join(part_rel)}: index.json lists {count} samples but '
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
        raise ValueError(f'{out_loc.url}: duplicate uids in the merged output; re-run with '
                         '--overwrite.')
    tokens_per_domain = dict(sorted(tokens_per_domain.items()))
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
                      sources=sources)
    buf = io.BytesIO()
    np.save(buf, all_uids)
    # index.json last: a reader that sees it sees a complete corpus.
    out_loc.write_bytes(UIDS_BASENAME, buf.getvalue())
    out_loc.write_bytes(META_BASENAME, meta.to_json().encode())
    out_loc.write_bytes('index.json', json.dumps({'version': 2, 'shards': shards},
                                                 sort_keys=True).encode())
    report.num_sources = len(sources)
    report.num_samples = meta.num_samples
    report.num_tokens = meta.num_tokens
    report.tokens_per_domain = tokens_per_domain
    return report
