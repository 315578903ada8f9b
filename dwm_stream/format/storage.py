"""Object-storage helpers, all through mosaicml-streaming's storage layer.

mosaicml-streaming moved from functions (``download_file``, 0.12) to downloader classes
(``CloudDownloader``, 0.13); LLM Foundry 0.22 pins < 0.13, so both are supported here, in one place.
"""

from __future__ import annotations

import os

__all__ = ['download_file', 'is_remote']


def is_remote(path: str) -> bool:
    """Whether ``path`` is a URI (``s3://...``) rather than a local path."""
    return '://' in path


def download_file(remote: str, local: str, timeout: float = 60.0) -> None:
    """Download one object to a local path (atomically: via ``local + '.tmp'`` then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    tmp = local + '.tmp'
    try:
        from streaming.base.storage import download_file as _download  # streaming 0.12
        _download(remote, tmp, timeout)
    except ImportError:
        from streaming.base.storage import CloudDownloader  # streaming 0.13
        CloudDownloader.get(remote).download(remote, tmp, timeout)
    os.replace(tmp, local)
