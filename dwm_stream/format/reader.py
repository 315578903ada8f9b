"""Read a converted corpus shard by shard, outside ``StreamingDataset``: for selectors and ``materialize``.

Selectors (DSIR, QuRating, annotation) and ``materialize`` visit every sample once, in shard order,
with no shuffling, partitioning or caching, so they read shards directly: the zip shard is
downloaded (when remote), decompressed in memory and viewed as a numpy structured array (every
column of a converted corpus is fixed-size, see :mod:`dwm_stream.format.shards`). One shard at a
time is held per process, so memory is bounded by the shard size (``convert`` caps it at 64 MiB).

A reader is picklable: the passes hand it to worker processes (:mod:`dwm_stream.parallel`).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np
from streaming.base.compression import decompress

from dwm_stream.format.shards import META_BASENAME, UIDS_BASENAME, CorpusMeta
from dwm_stream.format.storage import download_file, is_remote, join
from dwm_stream.format.view import record_dtype

__all__ = ['CorpusReader']


class CorpusReader:
    """A converted MDS corpus (local directory or ``s3://`` prefix), read shard by shard.

    Picklable: worker processes receive it and read their own shards.

    Args:
        location (str): The corpus root, holding ``index.json``, ``dwm.json`` and ``uids.npy``.

    Attributes:
        meta (CorpusMeta): ``dwm.json``.
        uids (np.ndarray): int64 uid of every sample, in shard order.
        samples_per_shard (np.ndarray): int64 samples per shard.
        shard_starts (np.ndarray): int64 global index of each shard's first sample (plus the total).

    Raises:
        FileNotFoundError: If the location, ``index.json``, ``dwm.json`` or ``uids.npy`` is missing.
        ValueError: If the sidecars disagree with the index.
    """

    def __init__(self, location: str) -> None:
        self.location = location.rstrip('/') if is_remote(location) else os.path.abspath(location)
        self.remote = is_remote(location)
        if not self.remote and not os.path.isdir(self.location):
            raise FileNotFoundError(f'corpus {location}: no such directory; give the output of '
                                    '`dwm-stream convert`.')
        with tempfile.TemporaryDirectory(prefix='dwm-corpus-') as tmp:
            index = json.loads(self._read_small('index.json', tmp))
            meta_text = self._read_small(META_BASENAME, tmp)
            uids_path = self._fetch(UIDS_BASENAME, tmp)
            self.uids = np.load(uids_path, allow_pickle=False).astype(np.int64)
        self.meta = CorpusMeta.from_json(meta_text, where=self._join(META_BASENAME))
        self.shards: list[dict[str, Any]] = index['shards']
        self.samples_per_shard = np.array([int(s['samples']) for s in self.shards], np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(self.samples_per_shard)]).astype(np.int64)
        if len(self.uids) != int(self.shard_starts[-1]):
            raise ValueError(f'corpus {location}: {UIDS_BASENAME} lists {len(self.uids)} samples but '
                             f'index.json has {int(self.shard_starts[-1])}; re-run `dwm-stream convert`.')

    def __len__(self) -> int:
        return len(self.uids)

    def __repr__(self) -> str:
        return f'CorpusReader({self.location!r}, {len(self.shards)} shards, {len(self)} samples)'

    # ------------------------------------------------------------------ files
    def _join(self, rel: str) -> str:
        return join(self.location, rel)

    def _fetch(self, rel: str, tmp: str) -> str:
        """A local path of ``rel``: itself when local, else downloaded into ``tmp``."""
        if not self.remote:
            path = self._join(rel)
            if not os.path.exists(path):
                raise FileNotFoundError(f'{path} does not exist; is {self.location} the output of '
                                        '`dwm-stream convert`?')
            return path
        local = os.path.join(tmp, rel.replace('/', '__'))
        try:
            download_file(self._join(rel), local)
        except Exception as e:  # noqa: BLE001 - re-raised with the object named
            raise FileNotFoundError(f'{self._join(rel)}: could not be fetched ({type(e).__name__}: {e}); '
                                    f'is {self.location} the output of `dwm-stream convert`?') from e
        return local

    def _read_small(self, rel: str, tmp: str) -> str:
        with open(self._fetch(rel, tmp), encoding='utf-8') as f:
            return f.read()

    # ------------------------------------------------------------------ shards
    def shard_dtype(self, shard_index: int) -> np.dtype:
        shard = self.shards[shard_index]
        dtype = record_dtype(shard['column_names'], shard['column_encodings'], shard['column_sizes'])
        if dtype is None:
            raise ValueError(f'corpus {self.location}: shard {shard_index} has variable-size columns '
                             f'({shard["column_encodings"]}); selectors read corpora written by '
                             '`dwm-stream convert`.')
        return dtype

    def read_shard(self, shard_index: int) -> np.ndarray:
        """All records of one shard as a structured array (fields: the MDS column names)."""
        shard = self.shards[shard_index]
        zip_info, raw_info = shard.get('zip_data'), shard.get('raw_data')
        info = zip_info or raw_info
        with tempfile.TemporaryDirectory(prefix='dwm-shard-') as tmp:
            with open(self._fetch(info['basename'], tmp), 'rb') as f:
                data = f.read()
        if zip_info:
            data = decompress(shard['compression'], data)
        n = int(shard['samples'])
        header = np.frombuffer(data, np.uint32, n + 2, 0)
        if int(header[0]) != n:
            raise ValueError(f'corpus {self.location}: shard {info["basename"]} holds {int(header[0])} '
                             f'samples but index.json says {n}; the corpus is corrupt, re-convert it.')
        dtype = self.shard_dtype(shard_index)
        begin, end = int(header[1]), int(header[n + 1])
        if end - begin != n * dtype.itemsize:
            raise ValueError(f'corpus {self.location}: shard {info["basename"]} is not {n} fixed-size '
                             f'records of {dtype.itemsize} bytes; the corpus is corrupt, re-convert it.')
        return np.frombuffer(data, dtype, n, begin)

    def column_names(self) -> list[str]:
        return list(self.shards[0]['column_names']) if self.shards else []

    def valid_tokens(self, records: np.ndarray) -> list[np.ndarray]:
        """Each record's token ids up to ``num_tokens``."""
        return [row[:int(n)] for row, n in zip(records['tokens'], records['num_tokens'])]
