"""Zero-copy views of decompressed MDS shards whose columns are all fixed-size.

Why this exists (it replaces one piece of mosaicml-streaming): ``MDSReader.get_sample_data`` opens
the shard file, seeks and issues two ``read`` calls for every sample, then decodes each column into
a fresh object. For the fixed-size records that ``dwm-stream convert`` writes, a shard's sample
region is simply an array of records. We map the file once and view it as a numpy structured array;
a sample is then a row of that array and its token ids are a view into the page cache. Everything
else (download, hash validation, decompression, eviction, partitioning, shuffling, resumption)
stays with mosaicml-streaming. ``benchmarks/loader_throughput.py`` measures the difference.

MDS raw shard layout (``streaming/base/format/mds/writer.py``)::

    num_samples: u32 | offsets: u32 x (num_samples + 1) | config JSON | samples...

Columns are stored in sorted-name order; fixed-size columns have no per-sample size header.
"""

from __future__ import annotations

import mmap
import os
from typing import Optional

import numpy as np

__all__ = ['record_dtype', 'ShardView']


def _column_dtype(encoding: str) -> Optional[tuple]:
    """numpy (dtype, shape) of a fixed-size MDS encoding, or None if not representable."""
    scalar = {
        'uint8': 'u1', 'uint16': '<u2', 'uint32': '<u4', 'uint64': '<u8',
        'int8': 'i1', 'int16': '<i2', 'int32': '<i4', 'int64': '<i8',
        'float16': '<f2', 'float32': '<f4', 'float64': '<f8',
    }
    if encoding in scalar:
        return (scalar[encoding], ())
    parts = encoding.split(':')
    if parts[0] == 'ndarray' and len(parts) == 3 and parts[1] in scalar:
        shape = tuple(int(x) for x in parts[2].split(',') if x)
        return (scalar[parts[1]], shape)
    return None


def record_dtype(column_names: list[str], column_encodings: list[str],
                 column_sizes: list[Optional[int]]) -> Optional[np.dtype]:
    """A packed structured dtype for one MDS sample, or ``None`` if any column is variable-size.

    Args:
        column_names (list[str]): As in the shard's ``index.json`` entry (sorted order).
        column_encodings (list[str]): MDS encodings, aligned with names.
        column_sizes (list[int | None]): Fixed byte sizes (``None`` if variable).
    """
    names, formats, offsets = [], [], []
    offset = 0
    for name, encoding, size in zip(column_names, column_encodings, column_sizes):
        if size is None:
            return None
        spec = _column_dtype(encoding)
        if spec is None:
            return None
        dtype = np.dtype((spec[0], spec[1])) if spec[1] else np.dtype(spec[0])
        if dtype.itemsize != size:
            return None
        names.append(name)
        formats.append(dtype)
        offsets.append(offset)
        offset += size
    return np.dtype({'names': names, 'formats': formats, 'offsets': offsets, 'itemsize': offset})


class ShardView:
    """A memory-mapped, read-only view of one decompressed MDS shard.

    Args:
        filename (str): The raw (decompressed) ``.mds`` file.
        dtype (np.dtype): From :func:`record_dtype`.
        num_samples (int): Samples the index says the shard holds.

    Raises:
        ValueError: If the file's header disagrees with the index (a corrupt or foreign shard).
    """

    def __init__(self, filename: str, dtype: np.dtype, num_samples: int) -> None:
        self.filename = filename
        with open(filename, 'rb') as f:
            size = os.fstat(f.fileno()).st_size
            if size < 4:
                raise ValueError(f'shard {filename} is truncated ({size} bytes).')
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        header_n = int(np.frombuffer(self._mmap, np.uint32, 1, 0)[0])
        if header_n != num_samples:
            raise ValueError(f'shard {filename} holds {header_n} samples but its index entry says '
                             f'{num_samples}; the cache is stale or the shard is corrupt. Delete the '
                             f'local cache directory and retry.')
        offsets = np.frombuffer(self._mmap, np.uint32, num_samples + 1, 4)
        begin, end = int(offsets[0]), int(offsets[-1])
        if end > size or end - begin != num_samples * dtype.itemsize:
            raise ValueError(f'shard {filename}: sample region [{begin}, {end}) does not hold '
                             f'{num_samples} records of {dtype.itemsize} bytes (file size {size}); '
                             f'the shard is corrupt or not fixed-size.')
        self._begin = begin
        self.records = np.frombuffer(self._mmap, dtype, num_samples, begin)
        # Per-column views, so that a sample's fields are O(1) strided lookups.
        self.columns = {name: self.records[name] for name in dtype.names}

    def column_block(self, names: list[str]) -> Optional[np.ndarray]:
        """A zero-copy ``[num_samples, len(names)]`` view of same-dtype columns stored side by side.

        Returns ``None`` unless ``names`` are scalar columns of one dtype at consecutive offsets,
        in that order (e.g. the ``score_*`` columns, which MDS stores adjacently in sorted order).
        Then a sample's scores are ``block[row]``, a view, instead of a newly filled array.
        """
        if not names or any(name not in self.columns for name in names):
            return None
        fields = self.records.dtype.fields
        dtype, offset = fields[names[0]][0], fields[names[0]][1]
        if dtype.shape:
            return None
        for k, name in enumerate(names):
            if fields[name][0] != dtype or fields[name][1] != offset + k * dtype.itemsize:
                return None
        return np.ndarray((len(self.records), len(names)), dtype, buffer=self._mmap,
                          offset=self._begin + offset, strides=(self.records.dtype.itemsize, dtype.itemsize))

    def __len__(self) -> int:
        return len(self.records)
