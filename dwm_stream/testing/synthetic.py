"""A synthetic corpus in the converted MDS format, for loader benchmarks and dataset tests.

Token ids are seeded random numbers, so a reader's output can be checked exactly against
:func:`expected_tokens` without a tokenizer. Real text goes through ``dwm-stream convert``; this
exists so that loader throughput can be measured at any ``seq_len`` and sample count, and so that
the dataset's partitioning and resumption can be tested independently of conversion.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
from streaming import MDSWriter

from dwm_stream.format.shards import (COMPRESSION, DOMAIN, HASHES, META_BASENAME, NUM_TOKENS, TOKENS, UID,
                                      UIDS_BASENAME, CorpusMeta, make_uid, mds_columns, score_column,
                                      token_dtype_for)

__all__ = ['write_synthetic_corpus', 'expected_tokens', 'SYNTHETIC_DOMAINS']

SYNTHETIC_DOMAINS = ['RedPajamaWikipedia', 'RedPajamaGithub', 'RedPajamaCommonCrawl']


def expected_tokens(seed: int, ordinal: int, seq_len: int, vocab_size: int) -> np.ndarray:
    """The token ids of synthetic sample ``ordinal``."""
    rng = np.random.default_rng([seed, ordinal])
    return rng.integers(0, vocab_size, seq_len, dtype=np.uint32).astype(token_dtype_for(vocab_size))


def write_synthetic_corpus(out: str,
                           num_samples: int,
                           seq_len: int = 64,
                           vocab_size: int = 4096,
                           seed: int = 0,
                           size_limit: int = 1 << 20,
                           score_names: tuple[str, ...] = ('quality',),
                           compression: Optional[str] = COMPRESSION,
                           num_sources: int = 4) -> CorpusMeta:
    """Write ``num_samples`` samples to ``out`` (local dir) with ``dwm.json`` and ``uids.npy``.

    Sample ``i`` comes from source ``i % num_sources``; its domain is ``i % 3``; its score
    ``quality`` is ``i / num_samples``; the last sample of each source is half padding. Shards are
    written as ``convert`` writes them (:mod:`dwm_stream.format.shards`: columns, token dtype,
    hashes), except that ``size_limit`` and ``compression`` can be chosen.
    """
    token_dtype = token_dtype_for(vocab_size)
    columns = mds_columns(seq_len, token_dtype, tuple(score_names))
    uids = []
    per_source = [0] * num_sources
    last_of_source = {max(i for i in range(num_samples) if i % num_sources == s)
                      for s in range(num_sources) if s < num_samples}
    tokens_per_domain = {name: 0 for name in SYNTHETIC_DOMAINS}
    total_tokens = 0
    with MDSWriter(out=out, columns=columns, compression=compression, hashes=HASHES,
                   size_limit=size_limit) as writer:
        for i in range(num_samples):
            source = i % num_sources
            uid = make_uid(f'synthetic/source_{source}.jsonl.zst', per_source[source])
            per_source[source] += 1
            n = seq_len // 2 if i in last_of_source else seq_len
            tokens = expected_tokens(seed, i, seq_len, vocab_size)
            sample = {TOKENS: tokens, NUM_TOKENS: n, UID: uid, DOMAIN: i % 3}
            for name in score_names:
                sample[score_column(name)] = np.float32(i / num_samples)
            writer.write(sample)
            uids.append(uid)
            tokens_per_domain[SYNTHETIC_DOMAINS[i % 3]] += n
            total_tokens += n
    np.save(os.path.join(out, UIDS_BASENAME), np.array(uids, np.int64), allow_pickle=False)
    meta = CorpusMeta(domains=list(SYNTHETIC_DOMAINS), seq_len=seq_len, token_dtype=token_dtype,
                      tokenizer='synthetic', eos_token_id=0, pad_token_id=0,
                      score_names=list(score_names), num_samples=num_samples, num_tokens=total_tokens,
                      tokens_per_domain=tokens_per_domain,
                      sources=[f'synthetic/source_{s}.jsonl.zst' for s in range(num_sources)])
    with open(os.path.join(out, META_BASENAME), 'w') as f:
        f.write(meta.to_json())
    return meta
