"""Shared fixtures: a loopback S3 server, a small embedded corpus, its tokenizer and its MDS output.

All are session-scoped and built once; tests must not modify them (copy first).
"""

from __future__ import annotations

import gc
import json
import os
import resource
from typing import Any

# The tests' models are tiny: one thread per process runs them faster than two, and uses a third of the CPU time
# (two threads spin-wait on each other, the more so on a shared machine). Before numpy and torch are imported, so that
# their thread pools, and every process a test starts, take it.
os.environ.setdefault('OMP_NUM_THREADS', '1')

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SMALL_CORPUS_SIZE = '1.5MB'
SMALL_VOCAB = 2048
SMALL_SEQ_LEN = 256


@pytest.fixture(autouse=True)
def _bounded_descriptors():
    """Collect cyclic garbage after a test once the session holds half its descriptor limit.

    A Composer ``Trainer`` holds its loaders, and so their datasets' shared memory, in reference
    cycles that only a full collection frees; a long process would run one eventually. Doing it
    here, only when needed, keeps the session well under ``ulimit -n 1024`` (CI's limit).
    """
    yield
    if os.path.isdir('/proc/self/fd'):
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if len(os.listdir('/proc/self/fd')) > soft // 2:
            gc.collect()


@pytest.fixture(scope='session')
def loopback_s3():
    """moto's S3 server on 127.0.0.1 with a ``dwm-test`` bucket; S3_ENDPOINT_URL points at it."""
    from dwm_stream.demo.loopback_s3 import LoopbackS3
    with LoopbackS3(buckets=['dwm-test']) as s3:
        yield s3


@pytest.fixture(scope='session')
def small_corpus(tmp_path_factory):
    """A ~1.5 MB embedded SlimPajama-format corpus (``CorpusInfo``; ``.out_dir`` is its root)."""
    from dwm_stream.demo.corpus import build_corpus
    return build_corpus(str(tmp_path_factory.mktemp('corpus') / 'slimpajama'),
                        size=SMALL_CORPUS_SIZE, seed=0, progress=False)


@pytest.fixture(scope='session')
def small_tokenizer(small_corpus, tmp_path_factory) -> str:
    """A byte-level BPE (vocab 2048) trained on ``small_corpus``; the path of its directory."""
    from dwm_stream.convert.tokenizer import train_tokenizer
    return train_tokenizer(small_corpus.out_dir, str(tmp_path_factory.mktemp('tokenizer') / 'bpe'),
                           vocab_size=SMALL_VOCAB, progress=False)


@pytest.fixture(scope='session')
def converted_mds(small_corpus, small_tokenizer, tmp_path_factory) -> str:
    """``small_corpus``'s train split converted to MDS (seq_len 256, 1 worker); the directory."""
    from dwm_stream.convert.pipeline import convert
    out = str(tmp_path_factory.mktemp('mds') / 'train')
    convert(small_corpus.train_dir, out, small_tokenizer, SMALL_SEQ_LEN, progress=False)
    return out


def read_mds_samples(root: str) -> list[dict[str, Any]]:
    """Every sample of a local MDS directory, in index order, read without StreamingDataset."""
    import zstandard
    from streaming.base.format.mds.reader import MDSReader
    with open(os.path.join(root, 'index.json')) as f:
        index = json.load(f)
    samples = []
    for shard in index['shards']:
        reader = MDSReader.from_json(root, None, shard)
        zip_info = shard['zip_data']
        with open(os.path.join(root, zip_info['basename']), 'rb') as f:
            raw = zstandard.ZstdDecompressor().decompress(f.read())
        n = shard['samples']
        offsets = np.frombuffer(raw[4:4 * (n + 2)], np.uint32)
        for i in range(n):
            samples.append(reader.decode_sample(raw[offsets[i]:offsets[i + 1]]))
    return samples


@pytest.fixture(scope='session')
def synthetic_mds(tmp_path_factory):
    """``synthetic_mds(name, n, **kwargs) -> path``: a synthetic MDS corpus of ``n`` samples in a fresh directory
    (``write_synthetic_corpus``'s keyword arguments)."""
    from dwm_stream.testing.synthetic import write_synthetic_corpus

    def make(name: str, n: int, **kwargs: Any) -> str:
        out = str(tmp_path_factory.mktemp(name) / 'mds')
        write_synthetic_corpus(out, n, **kwargs)
        return out
    return make


@pytest.fixture(scope='session')
def read_mds():
    """``read_mds(root) -> list[dict]``: decode every sample of a local MDS directory."""
    return read_mds_samples
