"""Streaming readers for the document sources that ``convert`` accepts.

Every reader yields :class:`Document` records one at a time and holds at most one record (plus a
fixed-size read buffer or one parquet row group) in memory, so a multi-GB source file is never read
whole. Three layouts are understood:

``*.jsonl.zst`` (SlimPajama)
    One JSON object per line, ``{"text": str, "meta": {"redpajama_set_name": str, ...}}``, in a
    zstandard stream (one or more frames). Decompressed incrementally with ``zstandard``.

``*.tar`` (WebDataset)
    Each document is a pair of members sharing a key (the member name up to its first dot):

    * ``<key>.txt``: the document text, UTF-8;
    * ``<key>.json``: ``{"redpajama_set_name": str}`` and optionally ``"scores": {name: float}``.

    Keys must not contain dots. Read with ``webdataset``'s tar iterators; written by
    :func:`write_tar_shards`.

``*.parquet`` (QuRatedPajama)
    Already-tokenized rows: ``input_ids`` (list of int), ``source_domain`` (str), and rating
    columns ending in ``_average`` (QuRatedPajama has ``writing_style_average``,
    ``required_expertise_average``, ``facts_and_trivia_average``, ``educational_value_average``),
    kept as scores named without the suffix. Read with pyarrow, one row group batch at a time.

Bad input raises :class:`BadRecordError` (a ``ValueError``) naming the file and the line (1-based;
for tar the document's member key, for parquet the row, for a truncated ``.zst`` the byte offset).
With ``skip_bad=True`` a bad record is skipped and passed to ``on_bad`` instead; a truncated
``.zst`` ends that file's stream after the last complete line.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np
import pyarrow.parquet as pq
import zstandard

__all__ = [
    'Document', 'BadRecordError', 'SOURCE_SUFFIXES', 'DOMAIN_KEY', 'QURATING_SCORE_SUFFIX',
    'is_source_file', 'iter_documents', 'read_jsonl_zst', 'read_tar', 'read_parquet',
    'write_tar_shards', 'write_jsonl_zst',
]

SOURCE_SUFFIXES = ('.jsonl.zst', '.tar', '.parquet')
DOMAIN_KEY = 'redpajama_set_name'
QURATING_SCORE_SUFFIX = '_average'
_READ_CHUNK = 1 << 20  # compressed bytes read per step


@dataclass
class Document:
    """One source document.

    Args:
        text (str | None): The text; ``None`` for a pre-tokenized record.
        domain (str): Domain name, e.g. ``RedPajamaGithub``.
        source (str): The file it came from (as given to the reader).
        line (int): 1-based position in the file: the line of a ``.jsonl.zst``, the document of a
            ``.tar``, the row of a ``.parquet``.
        scores (dict[str, float] | None): Score columns, e.g. QuRating criteria. Default: ``None``.
        input_ids (np.ndarray | None): Token ids of a pre-tokenized record. Default: ``None``.
    """
    text: Optional[str]
    domain: str
    source: str
    line: int
    scores: Optional[dict[str, float]] = None
    input_ids: Optional[np.ndarray] = None


class BadRecordError(ValueError):
    """A record that cannot be read; the message names the file and line (or byte offset)."""

    def __init__(self, source: str, where: str, problem: str) -> None:
        self.source = source
        self.where = where
        self.problem = problem
        super().__init__(f'{source}:{where}: {problem}')

    def __reduce__(self):  # rebuild from the parts, so it crosses process boundaries intact
        return (BadRecordError, (self.source, self.where, self.problem))


OnBad = Optional[Callable[[BadRecordError], None]]


def is_source_file(path: str) -> bool:
    """Whether ``path`` has a suffix that :func:`iter_documents` reads."""
    return path.endswith(SOURCE_SUFFIXES)


def iter_documents(path: str,
                   fileobj: Optional[IO[bytes]] = None,
                   skip_bad: bool = False,
                   on_bad: OnBad = None,
                   name: Optional[str] = None) -> Iterator[Document]:
    """Stream the documents of one source file, dispatching on its suffix.

    Args:
        path (str): Local path, or the name used for suffix dispatch when ``fileobj`` is given.
        fileobj (IO[bytes] | None): An open binary stream to read instead of ``path`` (e.g. an S3
            body). Parquet needs a seekable one. Default: ``None``.
        skip_bad (bool): Skip bad records instead of raising. Default: ``False``.
        on_bad (Callable | None): Called with each skipped :class:`BadRecordError`. Default: ``None``.
        name (str | None): The name to use in documents and errors. Default: ``path``.
    """
    if path.endswith('.jsonl.zst'):
        return read_jsonl_zst(path, fileobj, skip_bad, on_bad, name)
    if path.endswith('.tar'):
        return read_tar(path, fileobj, skip_bad, on_bad, name)
    if path.endswith('.parquet'):
        return read_parquet(path, fileobj, skip_bad, on_bad, name)
    raise ValueError(f'{name or path}: unknown source type; expected one of {SOURCE_SUFFIXES}.')


def _bad(err: BadRecordError, skip_bad: bool, on_bad: OnBad) -> None:
    if not skip_bad:
        raise err
    if on_bad is not None:
        on_bad(err)


def _open(path: str, fileobj: Optional[IO[bytes]]):
    if fileobj is not None:
        return _NoClose(fileobj)
    return open(path, 'rb')


class _NoClose:
    """Context manager over a caller-owned stream."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f

    def __enter__(self) -> IO[bytes]:
        return self.f

    def __exit__(self, *exc) -> None:
        pass


def _zst_lines(f: IO[bytes], name: str, skip_bad: bool, on_bad: OnBad) -> Iterator[bytes]:
    """Decompressed lines (without the newline) of a zstd stream, in bounded memory.

    A stream that ends inside a frame is truncated: reported with the compressed byte offset.
    """
    dctx = zstandard.ZstdDecompressor()
    dobj = dctx.decompressobj()
    pending: list[bytes] = []  # pieces of the current, unfinished line (joined once it ends)
    offset = 0  # compressed bytes consumed
    line_no = 0
    in_frame = False
    while True:
        chunk = f.read(_READ_CHUNK)
        if not chunk:
            break
        while chunk:
            try:
                out = dobj.decompress(chunk)
            except zstandard.ZstdError as e:
                _bad(BadRecordError(name, f'byte {offset}', f'corrupt zstd data ({e}); '
                                    're-download or re-create the file'), skip_bad, on_bad)
                return
            in_frame = not dobj.eof
            rest = dobj.unused_data if dobj.eof else b''
            offset += len(chunk) - len(rest)
            chunk = rest
            if dobj.eof:
                dobj = dctx.decompressobj()
            if out:
                # Only the new bytes are searched, so a 100 MB line costs O(its length), not O(length^2).
                newline = out.find(b'\n')
                if newline < 0:
                    pending.append(out)
                    continue
                pending.append(out[:newline])
                lines = out[newline + 1:].split(b'\n')
                first, pending = b''.join(pending), [lines.pop()]
                line_no += 1
                yield first
                for line in lines:
                    line_no += 1
                    yield line
    if in_frame:
        _bad(BadRecordError(name, f'byte {offset}',
                            f'truncated zstd stream: it ends inside a frame after line {line_no} '
                            '(the file is incomplete; re-download or re-create it)'), skip_bad, on_bad)
        return
    last = b''.join(pending)
    if last:
        yield last


def read_jsonl_zst(path: str,
                   fileobj: Optional[IO[bytes]] = None,
                   skip_bad: bool = False,
                   on_bad: OnBad = None,
                   name: Optional[str] = None) -> Iterator[Document]:
    """Stream SlimPajama ``{"text", "meta": {"redpajama_set_name"}}`` lines from a ``.jsonl.zst``.

    Args: as :func:`iter_documents`.
    """
    name = name or path
    with _open(path, fileobj) as f:
        for line_no, raw in enumerate(_zst_lines(f, name, skip_bad, on_bad), start=1):
            if not raw.strip():
                continue
            doc = _parse_jsonl_line(raw, name, line_no, skip_bad, on_bad)
            if doc is not None:
                yield doc


def _parse_jsonl_line(raw: bytes, name: str, line_no: int, skip_bad: bool,
                      on_bad: OnBad) -> Optional[Document]:
    where = str(line_no)
    try:
        line = raw.decode('utf-8')
    except UnicodeDecodeError as e:
        _bad(BadRecordError(name, where, f'not valid UTF-8 (byte {e.start} of the line)'), skip_bad,
             on_bad)
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        _bad(BadRecordError(name, where, f'malformed JSON ({e.msg} at column {e.colno})'), skip_bad,
             on_bad)
        return None
    if not isinstance(obj, dict):
        _bad(BadRecordError(name, where, f'expected a JSON object, got {type(obj).__name__}'),
             skip_bad, on_bad)
        return None
    text = obj.get('text')
    if not isinstance(text, str):
        problem = 'missing "text"' if text is None else f'"text" is {type(text).__name__}, not a string'
        _bad(BadRecordError(name, where, problem), skip_bad, on_bad)
        return None
    meta = obj.get('meta')
    domain = meta.get(DOMAIN_KEY) if isinstance(meta, dict) else None
    if not isinstance(domain, str) or not domain:
        _bad(BadRecordError(name, where, f'missing "meta.{DOMAIN_KEY}"'), skip_bad, on_bad)
        return None
    return Document(text=text, domain=domain, source=name, line=line_no)


def read_tar(path: str,
             fileobj: Optional[IO[bytes]] = None,
             skip_bad: bool = False,
             on_bad: OnBad = None,
             name: Optional[str] = None) -> Iterator[Document]:
    """Stream documents from a WebDataset ``.tar`` of ``<key>.txt`` + ``<key>.json`` members.

    Args: as :func:`iter_documents`.
    """
    # webdataset imports torch (seconds); only tar sources need it, so it is imported here.
    from webdataset.tariterators import group_by_keys, tar_file_iterator
    name = name or path
    with _open(path, fileobj) as f:
        files = ({**member, '__url__': name} for member in tar_file_iterator(f))
        try:
            for ordinal, sample in enumerate(group_by_keys(files), start=1):
                doc = _parse_tar_sample(sample, name, ordinal, skip_bad, on_bad)
                if doc is not None:
                    yield doc
        except tarfile.TarError as e:
            _bad(BadRecordError(name, 'tar', f'corrupt or truncated tar ({e})'), skip_bad, on_bad)


def _parse_tar_sample(sample: dict[str, Any], name: str, ordinal: int, skip_bad: bool,
                      on_bad: OnBad) -> Optional[Document]:
    key = sample['__key__']
    where = f'{ordinal} (member {key})'
    if 'txt' not in sample or 'json' not in sample:
        missing = '.txt' if 'txt' not in sample else '.json'
        _bad(BadRecordError(name, where, f'missing member {key}{missing}'), skip_bad, on_bad)
        return None
    try:
        text = sample['txt'].decode('utf-8')
    except UnicodeDecodeError as e:
        _bad(BadRecordError(name, where, f'{key}.txt is not valid UTF-8 (byte {e.start})'), skip_bad,
             on_bad)
        return None
    try:
        meta = json.loads(sample['json'].decode('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        _bad(BadRecordError(name, where, f'{key}.json: malformed JSON ({e})'), skip_bad, on_bad)
        return None
    domain = meta.get(DOMAIN_KEY) if isinstance(meta, dict) else None
    if not isinstance(domain, str) or not domain:
        _bad(BadRecordError(name, where, f'{key}.json: missing "{DOMAIN_KEY}"'), skip_bad, on_bad)
        return None
    scores = meta.get('scores')
    if scores is not None:
        scores = {str(k): float(v) for k, v in scores.items()}
    return Document(text=text, domain=domain, source=name, line=ordinal, scores=scores)


def read_parquet(path: str,
                 fileobj: Optional[IO[bytes]] = None,
                 skip_bad: bool = False,
                 on_bad: OnBad = None,
                 name: Optional[str] = None,
                 batch_rows: int = 1024) -> Iterator[Document]:
    """Stream pre-tokenized QuRatedPajama rows from a ``.parquet`` file, one batch at a time.

    Args:
        batch_rows (int): Rows per pyarrow batch. Default: ``1024``.
        Others: as :func:`iter_documents`.
    """
    name = name or path
    try:
        pf = pq.ParquetFile(fileobj if fileobj is not None else path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise BadRecordError(name, 'file', f'not a readable parquet file ({e})') from e
    columns = pf.schema_arrow.names
    for needed in ('input_ids', 'source_domain'):
        if needed not in columns:
            raise BadRecordError(name, 'schema', f'missing column {needed!r}; a QuRatedPajama-layout '
                                 f'file has input_ids, source_domain and *_average columns '
                                 f'(found {columns})')
    score_cols = sorted(c for c in columns if c.endswith(QURATING_SCORE_SUFFIX))
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=['input_ids', 'source_domain'] +
                                 score_cols):
        ids_col = batch.column(0)
        domains = batch.column(1).to_pylist()
        scores = {c[:-len(QURATING_SCORE_SUFFIX)]: batch.column(2 + i).to_numpy(zero_copy_only=False)
                  for i, c in enumerate(score_cols)}
        offsets = ids_col.offsets.to_numpy()
        values = ids_col.values.to_numpy(zero_copy_only=False)
        for i in range(len(batch)):
            row += 1
            domain = domains[i]
            if not isinstance(domain, str) or not domain:
                _bad(BadRecordError(name, f'row {row}', 'missing source_domain'), skip_bad, on_bad)
                continue
            if ids_col.is_null()[i].as_py():
                _bad(BadRecordError(name, f'row {row}', 'missing input_ids'), skip_bad, on_bad)
                continue
            ids = values[offsets[i]:offsets[i + 1]]
            yield Document(text=None,
                           domain=domain,
                           source=name,
                           line=row,
                           scores={k: float(v[i]) for k, v in scores.items()},
                           input_ids=ids)


def write_tar_shards(documents: Iterable[Document],
                     out_dir: str,
                     docs_per_shard: int = 1000,
                     prefix: str = 'shard') -> list[str]:
    """Write documents as WebDataset tar shards in the layout :func:`read_tar` reads.

    Shards are ``<out_dir>/<prefix>-000000.tar``, ...; keys are ``d<ordinal:09d>``; member times are
    fixed so the same documents give byte-identical tars.

    Args:
        documents (Iterable[Document]): Documents with text.
        out_dir (str): Directory to create the shards in.
        docs_per_shard (int): Documents per tar. Default: ``1000``.
        prefix (str): Shard file name prefix. Default: ``'shard'``.

    Returns:
        list[str]: The shard paths written.
    """
    from webdataset import TarWriter  # lazy: see read_tar
    os.makedirs(out_dir, exist_ok=True)
    paths: list[str] = []
    writer = None
    for ordinal, doc in enumerate(documents):
        if doc.text is None:
            raise ValueError(f'{doc.source}:{doc.line}: a pre-tokenized document cannot go in a tar')
        if ordinal % docs_per_shard == 0:
            if writer is not None:
                writer.close()
            paths.append(os.path.join(out_dir, f'{prefix}-{len(paths):06d}.tar'))
            writer = TarWriter(paths[-1], mtime=0.0, encoder=False)
        meta: dict[str, Any] = {DOMAIN_KEY: doc.domain}
        if doc.scores:
            meta['scores'] = doc.scores
        writer.write({
            '__key__': f'd{ordinal:09d}',
            'txt': doc.text.encode('utf-8'),
            'json': json.dumps(meta, sort_keys=True).encode('utf-8'),
        })
    if writer is not None:
        writer.close()
    return paths


def write_jsonl_zst(documents: Iterable[Union[Document, dict[str, Any]]],
                    path: str,
                    level: int = 3) -> int:
    """Write documents as a SlimPajama ``.jsonl.zst`` file (deterministic bytes).

    Args:
        documents (Iterable[Document | dict]): Documents, or ready ``{"text", "meta"}`` dicts.
        path (str): Output file.
        level (int): zstd level. Default: ``3``.

    Returns:
        int: Uncompressed bytes written.
    """
    buf = io.BytesIO()
    for doc in documents:
        obj = doc if isinstance(doc, dict) else {'text': doc.text, 'meta': {DOMAIN_KEY: doc.domain}}
        buf.write(json.dumps(obj, ensure_ascii=False).encode('utf-8'))
        buf.write(b'\n')
    raw = buf.getvalue()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(zstandard.ZstdCompressor(level=level, write_checksum=True).compress(raw))
    return len(raw)
