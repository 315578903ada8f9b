"""Storage: a local path or an object-store URL (``s3://bucket/key``), behind the few operations dwm-stream needs.

This is the one module that reads and writes corpora on object storage. It goes through
mosaicml-streaming's storage layer, configured as streaming configures it (``S3_ENDPOINT_URL``,
``S3_CANNED_ACL``, requester-pays buckets): files are downloaded with its ``CloudDownloader`` and
uploaded with its ``CloudUploader``; what that layer has no call for (whether one object exists,
listing with sizes, a streamed read, deleting a prefix) uses the S3 client of streaming's
``S3Uploader``, so those work on ``s3://`` only.

Every function takes a full location: a local path, or a URL. :func:`exists` tells "not found"
(``False``) from every other failure (an unreachable endpoint, a missing bucket, no permission),
which it raises as :class:`StorageError` naming the location.

mosaicml-streaming moved from functions (``download_file``) to downloader classes (``CloudDownloader``);
both are supported here, in one place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.parse
from contextlib import contextmanager
from typing import IO, Any, Iterator

from streaming.base.storage import CloudUploader

try:  # older mosaicml-streaming: module-level functions
    from streaming.base.storage import download_file as _streaming_download_file
except ImportError:  # newer: downloader classes
    from streaming.base.storage import CloudDownloader

    def _streaming_download_file(remote: str, local: str, timeout: float) -> None:
        CloudDownloader.get(remote).download(remote, local, timeout)


__all__ = ['StorageError', 'is_remote', 'join', 'download_file', 'exists', 'file_sizes', 'list_files',
           'read_bytes', 'write_bytes', 'delete_all', 'open_read']

_NOT_FOUND_CODES = {'404', 'NoSuchKey', 'NotFound'}


class StorageError(OSError):
    """An object store answered with an error other than "not found"; the message names the location."""


def is_remote(path: str) -> bool:
    """Whether ``path`` is a URI (``s3://...``) rather than a local path."""
    return '://' in path


def join(root: str, rel: str) -> str:
    """``root/rel`` for a local directory or a URL prefix (``rel`` uses ``/``)."""
    return f'{root.rstrip("/")}/{rel}' if is_remote(root) else os.path.join(root, rel)


def download_file(remote: str, local: str, timeout: float = 60.0) -> None:
    """Download one object to a local path (atomically: via ``local + '.tmp'`` then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    tmp = local + '.tmp'
    _streaming_download_file(remote, tmp, timeout)
    os.replace(tmp, local)


# ----------------------------------------------------------------------------------------------
# Object stores, through streaming's uploader.


def _split(url: str) -> tuple[str, str, str]:
    """``(scheme, bucket, key)`` of a URL; the key has no leading or trailing ``/``."""
    parsed = urllib.parse.urlparse(url)
    if not parsed.netloc:
        raise ValueError(f'{url}: expected scheme://bucket/prefix, e.g. s3://bucket/prefix.')
    return parsed.scheme, parsed.netloc, parsed.path.strip('/')


@contextmanager
def _uploader(url: str) -> Iterator[Any]:
    """Streaming's ``CloudUploader`` for the bucket of ``url``, with an empty scratch directory of its own."""
    scheme, bucket, _ = _split(url)
    with tempfile.TemporaryDirectory(prefix='dwm-storage-') as scratch:
        try:
            uploader = CloudUploader.get((scratch, f'{scheme}://{bucket}'), exist_ok=True)
        except Exception as e:  # noqa: BLE001 - botocore and friends raise many types; re-raised naming the URL
            raise StorageError(f'{url}: cannot reach bucket {bucket!r} ({type(e).__name__}: {e}).') from e
        yield uploader


def _s3_client(uploader: Any, url: str) -> Any:
    client = getattr(uploader, 's3', None)
    if client is None:
        raise ValueError(f'{url}: only s3:// locations support this operation.')
    return client


def _error_code(e: Exception) -> str:
    response = getattr(e, 'response', None)
    return str(response.get('Error', {}).get('Code', '')) if isinstance(response, dict) else ''


def exists(path: str) -> bool:
    """Whether the file (or object) ``path`` exists.

    Raises:
        StorageError: The store could not say (unreachable, missing bucket, no permission); the
            message names ``path``.
    """
    if not is_remote(path):
        try:
            os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return os.path.isfile(path)
    _, bucket, key = _split(path)
    with _uploader(path) as uploader:
        try:
            _s3_client(uploader, path).head_object(Bucket=bucket, Key=key)
        except Exception as e:  # noqa: BLE001 - botocore's ClientError; everything but 404 is re-raised
            if _error_code(e) in _NOT_FOUND_CODES:
                return False
            raise StorageError(f'{path}: cannot tell whether it exists ({type(e).__name__}: {e}).') from e
    return True


def file_sizes(root: str) -> dict[str, int]:
    """Bytes of every file below ``root``, by path relative to it (with ``/``), in sorted order.

    One listing, however many files. A local file lists as its own basename; a location that does
    not exist lists as empty.

    Raises:
        StorageError: The store could not list ``root`` (unreachable, missing bucket, no permission).
    """
    if not is_remote(root):
        if os.path.isfile(root):
            return {os.path.basename(root): os.path.getsize(root)}
        found = {}
        for d, _, files in os.walk(root):
            for f in files:
                path = os.path.join(d, f)
                found[os.path.relpath(path, root).replace(os.sep, '/')] = os.path.getsize(path)
        return dict(sorted(found.items()))
    _, bucket, prefix = _split(root)
    prefix = f'{prefix}/' if prefix else ''
    found = {}
    with _uploader(root) as uploader:
        try:
            pages = _s3_client(uploader, root).get_paginator('list_objects_v2').paginate(Bucket=bucket, Prefix=prefix)
            for page in pages:
                found.update((obj['Key'][len(prefix):], int(obj['Size'])) for obj in page.get('Contents', []))
        except Exception as e:  # noqa: BLE001 - re-raised naming the URL
            raise StorageError(f'{root}: cannot list ({type(e).__name__}: {e}).') from e
    return dict(sorted(found.items()))


def list_files(root: str) -> list[str]:
    """Paths (with ``/``) of every file below ``root``, relative to it, sorted (see :func:`file_sizes`)."""
    return list(file_sizes(root))


def read_bytes(path: str) -> bytes:
    """The whole content of a (small) file or object."""
    if not is_remote(path):
        with open(path, 'rb') as f:
            return f.read()
    with tempfile.TemporaryDirectory(prefix='dwm-storage-') as tmp:
        local = os.path.join(tmp, 'object')
        download_file(path, local)
        with open(local, 'rb') as f:
            return f.read()


def write_bytes(path: str, data: bytes) -> None:
    """Write a file or object whole (a local file atomically, via ``path + '.tmp'``)."""
    if not is_remote(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + '.tmp'
        with open(tmp, 'wb') as f:
            f.write(data)
        os.replace(tmp, path)
        return
    _, _, key = _split(path)
    with _uploader(path) as uploader:
        local = os.path.join(uploader.local, key)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with open(local, 'wb') as f:
            f.write(data)
        uploader.upload_file(key)


def delete_all(root: str) -> None:
    """Delete every file below ``root`` (a local directory is kept, emptied; a local file is removed)."""
    if not is_remote(root):
        if os.path.isdir(root):
            for name in os.listdir(root):
                p = os.path.join(root, name)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        elif os.path.isfile(root):
            os.remove(root)
        return
    _, bucket, prefix = _split(root)
    keys = [f'{prefix}/{rel}' if prefix else rel for rel in list_files(root)]
    with _uploader(root) as uploader:
        client = _s3_client(uploader, root)
        for i in range(0, len(keys), 1000):
            client.delete_objects(Bucket=bucket, Delete={'Objects': [{'Key': k} for k in keys[i:i + 1000]]})


def open_read(path: str) -> IO[bytes]:
    """A sequential binary stream of one file; an object is streamed, not downloaded first."""
    if not is_remote(path):
        return open(path, 'rb')
    _, bucket, key = _split(path)
    with _uploader(path) as uploader:
        return _s3_client(uploader, path).get_object(Bucket=bucket, Key=key)['Body']
