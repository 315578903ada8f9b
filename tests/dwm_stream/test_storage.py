"""format.storage: the same operations on a local directory and on S3; "not found" is not "cannot tell"."""

from __future__ import annotations

import os
import uuid

import pytest

from dwm_stream.format import storage


def _roundtrip(root: str) -> None:
    assert storage.list_files(root) == []
    assert not storage.exists(storage.join(root, 'a/b.json'))
    storage.write_bytes(storage.join(root, 'a/b.json'), b'{"x": 1}')
    storage.write_bytes(storage.join(root, 'c.bin'), b'\0' * 10)
    assert storage.exists(storage.join(root, 'a/b.json'))
    assert not storage.exists(storage.join(root, 'a/b.jso'))  # a prefix of a file is not the file
    assert storage.list_files(root) == ['a/b.json', 'c.bin']
    assert storage.read_bytes(storage.join(root, 'a/b.json')) == b'{"x": 1}'
    assert storage.file_sizes(root) == {'a/b.json': 8, 'c.bin': 10}
    with storage.open_read(storage.join(root, 'a/b.json')) as f:
        assert f.read() == b'{"x": 1}'
    storage.delete_all(root)
    assert storage.list_files(root) == []


def test_local(tmp_path):
    root = str(tmp_path / 'root')
    os.makedirs(root)
    _roundtrip(root)
    assert storage.list_files(str(tmp_path / 'missing')) == []


def test_local_exists_reraises_what_is_not_not_found(tmp_path, monkeypatch):
    def denied(path, *args, **kwargs):
        raise PermissionError(13, 'Permission denied', path)

    path = str(tmp_path / 'x.json')
    with monkeypatch.context() as m:
        m.setattr(os, 'stat', denied)
        with pytest.raises(PermissionError, match='x.json'):
            storage.exists(path)


@pytest.mark.slow
def test_s3(loopback_s3):
    _roundtrip(f's3://dwm-test/storage-{uuid.uuid4().hex[:8]}')


@pytest.mark.slow
def test_s3_exists_names_the_location_when_the_store_cannot_tell(loopback_s3):
    """A missing bucket is an error, not "no such file"."""
    with pytest.raises(storage.StorageError, match='s3://no-such-bucket-dwm/x/part.json'):
        storage.exists('s3://no-such-bucket-dwm/x/part.json')
    with pytest.raises(storage.StorageError, match='s3://no-such-bucket-dwm/x'):
        storage.list_files('s3://no-such-bucket-dwm/x')
