"""A user's corpus is read-only: what ``DWMDataset`` does with a ``local`` that already holds a complete corpus.

Streaming treats ``local`` as a download cache: it decompresses shards there, deletes a compressed file once
its decompressed one is written (unless ``keep_zip``), evicts files under ``cache_limit``, and, with a ``remote``,
serves the ``index.json`` it finds there whatever the remote holds. A directory the YAML names as data and that
holds a complete corpus (its ``index.json`` and every shard file as it was written: the compressed file of a
compressed shard, the raw file of an uncompressed one) must come out of a run byte-identical. So, for each
stream, before streaming sees it (:func:`protect`):

* ``local`` complete, no ``remote``: read in place when streaming would write nothing there (uncompressed shards,
  no ``cache_limit``); otherwise the corpus becomes the stream's ``remote`` and streaming decompresses into a cache
  of its own (:func:`cache_dir`), which is removed when the process that made it exits.
* ``local`` complete and a ``remote`` whose ``index.json`` is the same: the same, with the remote dropped (the
  corpus is all there).
* ``local`` complete and a ``remote`` whose ``index.json`` differs (or cannot be read): refused at start-up,
  naming both keys (:class:`CorpusConflictError`).

A ``local`` without ``index.json``, or with an incomplete corpus and a ``remote``, is a cache, and streaming's
rules apply as before.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Optional

from dwm_stream.format.storage import download_file

__all__ = ['CorpusConflictError', 'complete_corpus', 'protect', 'cache_dir']

log = logging.getLogger(__name__)

INDEX = 'index.json'
_made: list[str] = []  # cache directories this process made (removed at exit)
_count = [0]  # read-only caches made by this process so far: the same sequence on every rank of a node


class CorpusConflictError(ValueError):
    """A ``remote`` together with a ``local`` that holds a different complete corpus."""


def _written_files(index: dict[str, Any]) -> list[str]:
    """The basenames a corpus holds as written: each shard's compressed file if it has one, else its raw file."""
    names = []
    for shard in index.get('shards', []):
        zipped, raw = shard.get('zip_data'), shard.get('raw_data')
        info = zipped if shard.get('compression') and zipped else raw
        if info and info.get('basename'):
            names.append(info['basename'])
        if shard.get('format') != 'mds':  # split formats (xsv, json): the metadata file too
            meta_zip, meta_raw = shard.get('zip_meta'), shard.get('raw_meta')
            meta = meta_zip if shard.get('compression') and meta_zip else meta_raw
            if meta and meta.get('basename'):
                names.append(meta['basename'])
    return names


def _read_index(path: str) -> Optional[dict[str, Any]]:
    try:
        with open(path, 'rb') as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def complete_corpus(directory: str) -> Optional[dict[str, Any]]:
    """The parsed ``index.json`` of ``directory`` if it holds a complete corpus (every shard file as written), else
    ``None`` (no index, an unreadable one, or a file missing: a cache, or a damaged corpus that the dataset's own
    checks name)."""
    index = _read_index(os.path.join(directory, INDEX))
    if not isinstance(index, dict) or not isinstance(index.get('shards'), list):
        return None
    for name in _written_files(index):
        if not os.path.isfile(os.path.join(directory, name)):
            return None
    return index


def _writes_in_place(index: dict[str, Any], cache_limit: Any) -> bool:
    """Whether streaming, reading this corpus in place without a remote, would write or delete there."""
    compressed = any(shard.get('compression') for shard in index.get('shards', []))
    return compressed or bool(cache_limit)


def cache_dir(corpus: str) -> str:
    """A cache directory of its own for reading ``corpus`` (made once per dataset, removed at exit).

    The name is the same on every rank of a node (the corpus, the job's rendezvous and how many read-only caches
    this process made before), so that streaming's local leader prepares shards for all of them; two datasets over
    one corpus (train and refit) get two caches, as streaming requires of datasets with a remote.
    """
    job = (f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"
           if int(os.environ.get('WORLD_SIZE', '1')) > 1 else str(os.getpid()))
    _count[0] += 1
    digest = hashlib.blake2s(f'{os.path.abspath(corpus)}|{job}|{_count[0]}'.encode(), digest_size=8).hexdigest()
    root = os.environ.get('DWM_STREAM_CACHE') or os.path.join(tempfile.gettempdir(), 'dwm-stream-cache')
    path = os.path.join(root, f'{os.path.basename(os.path.normpath(corpus)) or "corpus"}-{digest}')
    if not os.path.exists(path):
        os.makedirs(path, exist_ok=True)
        _made.append(path)
    return path


@atexit.register
def _remove_caches() -> None:
    for path in _made:
        shutil.rmtree(path, ignore_errors=True)


def _remote_index(remote: str, split: Optional[str], timeout: float) -> Optional[dict[str, Any]]:
    """The remote's parsed ``index.json``; ``None`` if it cannot be read."""
    location = os.path.join(remote, split or '', INDEX)
    if '://' not in remote:
        return _read_index(location)
    with tempfile.TemporaryDirectory(prefix='dwm-index-') as scratch:
        target = os.path.join(scratch, INDEX)
        try:
            download_file(location, target, timeout)
        except Exception:  # noqa: BLE001 - reported by the caller, naming both keys
            return None
        return _read_index(target)


def _same(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def protect(stream_args: dict[str, Any], cache_limit: Any = None, where: str = '') -> dict[str, Any]:
    """A stream's constructor arguments, changed so that streaming never writes into a complete corpus.

    Args:
        stream_args (dict): ``remote``, ``local``, ``split``, ``keep_zip``, ... as ``streaming.Stream`` takes them.
        cache_limit (Any): The dataset's ``cache_limit`` (streaming evicts files under it).
        where (str): How the stream's keys are named in messages (``''``, or ``'streams.<name>.'``).

    Returns:
        dict: ``stream_args`` unchanged, or with the corpus as ``remote`` and a cache of its own as ``local``.

    Raises:
        CorpusConflictError: ``remote`` and a ``local`` holding a different complete corpus (or a remote whose
            ``index.json`` cannot be read to tell), naming both keys.
    """
    local, remote, split = stream_args.get('local'), stream_args.get('remote'), stream_args.get('split')
    if not local:
        return stream_args
    corpus = os.path.join(local, split or '')
    index = complete_corpus(corpus)
    if index is None:
        return stream_args
    if remote and '://' not in remote and _same(remote, local):
        remote = None
    if remote:
        theirs = _remote_index(remote, split, float(stream_args.get('download_timeout') or 60.0))
        if theirs != index:
            why = ('a different corpus' if theirs is not None else
                   f'a corpus, and {os.path.join(remote, split or "", INDEX)} could not be read to compare them')
            raise CorpusConflictError(
                f'`{where}remote` ({remote}) and `{where}local` ({local}): {corpus} already holds {why}; '
                f'streaming would use it as the download cache of `remote` and write into it or delete from it. '
                f'Give `local` alone to read that corpus, or `remote` with a `local` cache directory of its own '
                f'(or none).')
        log.info('%slocal (%s) already holds the corpus of %sremote (%s); reading it, read-only.',
                 where, local, where, remote)
    if not _writes_in_place(index, cache_limit):
        return {**stream_args, 'remote': None}
    cache = cache_dir(local)
    log.info('%slocal (%s) holds a complete corpus and is read-only; shards are decompressed into %s.',
             where, local, cache)
    # streaming's remote/split: the corpus is `local/split`; the cache keeps the same split below it.
    return {**stream_args, 'remote': local, 'local': cache}
