"""Integrity and safety checks on the read path: hostile indexes, corrupt shards, failed downloads.

``DWMDataset`` / ``DWMStream`` (:mod:`dwm_stream.data.dataset`) call these; they are kept here so that the
rules are in one place and testable on their own. ``RELIABILITY.md`` lists the faults each one covers
and the tests that pin them.

* :func:`check_shard_paths`: every file an ``index.json`` names must stay inside the stream's
  ``local`` cache (no absolute paths, no ``..``), or the index is refused before anything is read.
* :func:`default_validate_hash`: the hash streaming checks on every download/decompression, when
  the user did not choose one: ``xxh64`` (or ``sha1``) if every shard of the index lists it.
* :func:`verify_raw_shard`: the decompressed shard's own hash, checked once per process and file
  before it is memory-mapped, so that a flipped byte in the local cache is named, never decoded.
* :func:`download_error`: a failed download after streaming's bounded retries, as an error that
  names the object URL and the endpoint (``S3_ENDPOINT_URL``), and never a credential.
* :func:`unsafe_types_error`: a pickle-typed column, refused unless ``allow_unsafe_types=True``.
* :func:`cache_error`: an ``OSError`` while writing the cache (read-only, disk full), naming the path.
* :func:`check_local_shards`: a dataset without ``remote`` must have every shard file its index lists, in a
  form streaming accepts, or it is refused at construction naming the missing files.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import posixpath
import re
import threading
from typing import Any, Iterable, Optional

import xxhash
from streaming.base.hashing import is_hash

__all__ = ['ShardIntegrityError', 'ObjectDownloadError', 'MissingCredentialsError', 'UnsafeIndexError',
           'check_shard_paths',
           'default_validate_hash', 'verify_raw_shard', 'download_error', 'endpoint_of', 'redact',
           'unsafe_types_error', 'cache_error', 'prepare_failed', 'check_local_shards', 'MissingShardError',
           'PREFERRED_HASHES', 'CACHE_ERRNOS']

# OSError numbers that mean "the cache cannot be written", not "the network failed".
CACHE_ERRNOS = frozenset({13, 1, 30, 28, 122, 27})  # EACCES EPERM EROFS ENOSPC EDQUOT EFBIG

# Fastest first: xxh64 hashes ~13 GB/s on one core here, sha1 ~1.2 GB/s.
PREFERRED_HASHES = ('xxh3_64', 'xxh64', 'xxh128', 'xxh3_128', 'xxh32', 'sha1', 'md5', 'sha256', 'blake2b')


class ShardIntegrityError(ValueError):
    """A shard's bytes do not match the hash its ``index.json`` entry records."""


class ObjectDownloadError(RuntimeError):
    """An object could not be downloaded after streaming's bounded retries."""


class UnsafeIndexError(ValueError):
    """An ``index.json`` that would read or write outside the cache, or decode with pickle."""


class MissingShardError(FileNotFoundError):
    """A shard file that ``index.json`` lists is missing from a dataset that has no ``remote`` to fetch it from."""


# ---------------------------------------------------------------------------------------- paths
def _shard_files(shard: Any) -> Iterable[str]:
    for raw, zipped in getattr(shard, 'file_pairs', []):
        for info in (raw, zipped):
            if info is not None:
                yield info.basename


def check_shard_paths(shards: list, index_file: str) -> None:
    """Refuse an index whose shard files are absolute or climb out of the cache with ``..``.

    Streaming joins ``local/split/<basename>`` for both the download target and the read, so a
    basename such as ``../../home/u/.bashrc`` or ``/etc/passwd`` would write or read outside the
    cache. Subdirectories (``parts/<slug>/shard.00000.mds``, as ``convert`` writes) are fine.
    """
    for i, shard in enumerate(shards):
        for name in _shard_files(shard):
            normal = posixpath.normpath(name.replace('\\', '/'))
            if (not name or name.startswith(('/', '\\')) or re.match(r'^[A-Za-z]:', name)
                    or normal == '..' or normal.startswith('../') or '/../' in f'/{normal}/'
                    or '\x00' in name):
                raise UnsafeIndexError(
                    f'{index_file}: shard {i} names the file {name!r}, which is outside the dataset '
                    f'directory (absolute or with ".."). Refusing this index: shard files must be '
                    f'relative paths inside the directory that holds index.json.')


def check_local_shards(shards: list, local_dir: str, index_file: str) -> None:
    """Refuse a dataset without ``remote`` whose ``index.json`` lists shard files that are not there.

    Streaming would fail only at the batch that reaches such a shard, with "path to remote dataset must be
    provided" and no file named. The forms streaming accepts without a remote: for a compressed shard, its
    compressed file(s) (streaming deletes a decompressed file whose compressed file is missing, so the raw file
    alone does not count); for an uncompressed shard, its raw file(s).

    Args:
        shards (list): The stream's shard readers (``file_pairs``, ``compression``).
        local_dir (str): ``local/split``, where the files must be.
        index_file (str): The index, for the message.

    Raises:
        MissingShardError: Naming the missing files (the first few) and what to do.
    """
    listing = set()
    for dirname, _, files in os.walk(local_dir):
        listing.update(os.path.join(dirname, name) for name in files)
    missing, raw_only = [], []
    for shard in shards:
        for raw, zipped in getattr(shard, 'file_pairs', []):
            info = zipped if getattr(shard, 'compression', None) and zipped is not None else raw
            if info is None or os.path.join(local_dir, info.basename) in listing:
                continue
            missing.append(info.basename)
            if info is zipped and raw is not None and os.path.join(local_dir, raw.basename) in listing:
                raw_only.append(raw.basename)
    if not missing:
        return
    local_dir = os.path.normpath(local_dir)
    note = (f' ({", ".join(raw_only[:3])}{" ..." if len(raw_only) > 3 else ""}, decompressed, is there, but '
            f'without its compressed file streaming deletes it when there is no `remote`)' if raw_only else '')
    fetch = '`remote` (where the dataset was written) so that streaming can download'
    if len(missing) == 1:
        raise MissingShardError(f'{os.path.join(local_dir, missing[0])}: missing (listed in {index_file}){note}; '
                                f'restore it, or give {fetch} it.')
    shown = ', '.join(missing[:5]) + (f' and {len(missing) - 5} more' if len(missing) > 5 else '')
    raise MissingShardError(f'{local_dir}: {len(missing)} shard files listed in {index_file} are missing '
                            f'({shown}){note}; restore them, or give {fetch} them.')


# ---------------------------------------------------------------------------------------- hashes
def default_validate_hash(shards: list) -> Optional[str]:
    """The fastest hash that every shard's compressed (or raw) file lists, or ``None``."""
    common: Optional[set] = None
    for shard in shards:
        for raw, zipped in getattr(shard, 'file_pairs', []):
            info = zipped if zipped is not None else raw
            names = set((getattr(info, 'hashes', None) or {}).keys())
            common = names if common is None else common & names
    if not common:
        return None
    for algo in PREFERRED_HASHES:
        if algo in common and is_hash(algo):
            return algo
    return None


_verified: dict[tuple, bool] = {}
_verified_lock = threading.Lock()


def _hasher(algo: str):
    if algo.startswith('xxh'):
        return getattr(xxhash, algo)()
    return hashlib.new(algo)


def verify_raw_shard(filename: str, raw_info: Any, where: str) -> Optional[str]:
    """Check a decompressed shard file against its index hash, once per process and file version.

    Args:
        filename (str): The local raw shard.
        raw_info (FileInfo): Its ``raw_data`` entry from ``index.json`` (``basename``, ``bytes``,
            ``hashes``).
        where (str): The stream (remote or local) for the message.

    Returns:
        str | None: The algorithm used (``None`` if the index lists no hash for raw data).

    Raises:
        ShardIntegrityError: Size or hash mismatch, naming the shard file and the stream.
    """
    hashes = getattr(raw_info, 'hashes', None) or {}
    algo = next((a for a in PREFERRED_HASHES if a in hashes), None)
    st = os.stat(filename)
    key = (filename, st.st_ino, st.st_size, st.st_mtime_ns)
    if _verified.get(key):
        return algo
    expected_bytes = getattr(raw_info, 'bytes', None)
    if expected_bytes is not None and st.st_size != expected_bytes:
        raise ShardIntegrityError(
            f'corrupt shard {filename} (stream {where}): {st.st_size} bytes, but index.json says '
            f'{expected_bytes}. Not decoding it. Delete this file from the local cache to re-fetch it, '
            f'or re-convert the shard if the remote copy is bad.')
    if algo is None:
        return None
    h = _hasher(algo)
    if st.st_size:
        with open(filename, 'rb') as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            h.update(m)
    digest = h.hexdigest()
    if digest != hashes[algo]:
        raise ShardIntegrityError(
            f'corrupt shard {filename} (stream {where}): its {algo} is {digest}, but index.json says '
            f'{hashes[algo]}. Not decoding it. Delete this file from the local cache to re-fetch it, '
            f'or re-convert the shard if the remote copy is bad.')
    with _verified_lock:
        _verified[key] = True
    return algo


# ---------------------------------------------------------------------------------------- errors
_SECRET_PATTERNS = [
    re.compile(r'(?i)(aws_secret_access_key|secret_access_key|aws_session_token|x-amz-security-token|'
               r'signature|credential)=([^&\s\'"]+)'),
    re.compile(r'(?i)(://[^/\s:@]+:)([^@\s/]+)(@)'),  # user:password@host
]


def redact(text: str) -> str:
    """``text`` with credentials in URLs/queries and the current AWS secret values masked."""
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + '***' + (m.group(3) if m.lastindex == 3 else ''), text)
    for var in ('AWS_SECRET_ACCESS_KEY', 'AWS_SESSION_TOKEN', 'AWS_ACCESS_KEY_ID'):
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, '***')
    return text


def endpoint_of(remote: Optional[str]) -> str:
    """The endpoint a remote URI is fetched from, for error messages (credentials removed)."""
    if not remote or '://' not in remote:
        return 'local filesystem'
    scheme = remote.split('://', 1)[0]
    if scheme == 's3':
        url = os.environ.get('S3_ENDPOINT_URL')
        return f'S3_ENDPOINT_URL={redact(url)}' if url else 'the default AWS S3 endpoint (S3_ENDPOINT_URL unset)'
    return f'{scheme}:// (its default endpoint)'


class MissingCredentialsError(ObjectDownloadError, ValueError):
    """An object store refused for want of credentials: what to set, in one message."""


_CREDENTIAL_ERRORS = ('NoCredentialsError', 'PartialCredentialsError', 'ProfileNotFound')


def _missing_credentials(error: Optional[BaseException]) -> bool:
    seen = 0
    while error is not None and seen < 16:
        if type(error).__name__ in _CREDENTIAL_ERRORS or 'Unable to locate credentials' in str(error):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def download_error(remote: Optional[str], local: str, attempts: int, error: BaseException) -> ObjectDownloadError:
    """An error naming the object and the endpoint after ``attempts`` failed attempts; for missing credentials, a
    :class:`MissingCredentialsError` that says what to set."""
    if remote and remote.startswith('s3://') and _missing_credentials(error):
        return MissingCredentialsError(
            f'{remote}: no S3 credentials for {endpoint_of(remote)}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY '
            '(or AWS_PROFILE for a profile in ~/.aws/credentials), and S3_ENDPOINT_URL for an endpoint other than '
            'AWS S3 (R2, MinIO, a loopback server).')
    cause = redact(f'{type(error).__name__}: {error}')
    return ObjectDownloadError(
        f'could not download {remote} from {endpoint_of(remote)} to {local} after {attempts} '
        f'attempt(s) (download_retry={attempts}; each attempt also retries inside the S3 client): '
        f'{cause}')


def unsafe_types_error(index_file: str, error: BaseException) -> UnsafeIndexError:
    return UnsafeIndexError(
        f'{index_file}: refusing a shard with a pickle-typed column ({error}). Decoding pickle runs '
        f'arbitrary code from whoever wrote the shards. If you trust this dataset, opt in explicitly '
        f'with `allow_unsafe_types=True` (YAML: `dataset: {{allow_unsafe_types: true}}`).')


def cache_error(path: str, what: str, error: OSError) -> OSError:
    """An ``OSError`` that names the cache path and says what to check."""
    hint = {
        errno.ENOSPC: 'the disk holding the cache is full; free space, point `local` elsewhere, or set '
                      'a smaller `cache_limit`',
        errno.EDQUOT: 'the disk quota of the cache is exhausted',
        errno.EFBIG: 'a file in the cache exceeds the allowed file size (disk full or a file-size limit)',
        errno.EACCES: 'the cache is not writable by this user; fix its permissions or point `local` elsewhere',
        errno.EPERM: 'the cache is not writable by this user; fix its permissions or point `local` elsewhere',
        errno.EROFS: 'the cache is on a read-only filesystem; point `local` at a writable directory',
    }.get(error.errno, 'check that the cache directory exists, is writable and has free space')
    err = OSError(error.errno, f'{what}: cannot write the local cache at {path}: {hint} '
                               f'({redact(str(error))})')
    return err


def prepare_failed(dataset: Any, shard_id: int, stream: Any, where: str, error: Exception) -> Exception:
    """After ``StreamingDataset.prepare_shard`` raised: name the failure. Returns the error to raise.

    The caller has already put the shard back to ``REMOTE`` (``_streaming_compat.release_failed_shard``:
    streaming never resets a shard whose preparation raised, so processes waiting on it would spin).
    A compressed file that failed its hash is deleted when it came from a remote, so that a retry
    downloads it again instead of failing on the same bad bytes.
    """
    shard = dataset.shards[shard_id]
    local_dir = os.path.join(stream.local, stream.split or '')
    message = str(error)
    if isinstance(error, ValueError) and message.startswith('Checksum failure:'):
        bad = message.split(':', 1)[1].strip()
        info = next((z for r, z in shard.file_pairs if z is not None and bad.endswith(z.basename)), None) or \
            next((r for r, _ in shard.file_pairs if bad.endswith(r.basename)), None)
        algo = getattr(stream, 'validate_hash', None)
        if stream.remote and os.path.isfile(bad):
            os.remove(bad)  # a retry downloads it again
        err: Exception = ShardIntegrityError(
            f'corrupt shard {bad} (stream {where}, shard {shard_id}): its {algo} hash does not match '
            f'index.json ({getattr(info, "hashes", {}).get(algo, "?") if info else "?"}). Not decoding it. '
            f'If the remote copy is bad, re-convert the shard.')
    elif isinstance(error, OSError) and error.errno in CACHE_ERRNOS:
        err = cache_error(local_dir, f'preparing shard {shard_id} of {where}', error)
    elif type(error).__name__ == 'ZstdError' or 'decompress' in message.lower():
        err = ShardIntegrityError(f'shard {shard_id} of {where} could not be decompressed ({error}); the '
                                  f'compressed file is truncated or corrupt. Not decoding it.')
    else:
        return error
    err.__cause__ = error
    return err
