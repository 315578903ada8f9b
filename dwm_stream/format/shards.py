"""The on-storage contract between `convert` (writer) and `DWMDataset` (reader).

A converted corpus is an ordinary mosaicml-streaming MDS directory (``index.json`` plus zstd
shards with hashes) with two sidecar files beside ``index.json``:

* ``dwm.json``: :class:`CorpusMeta`, the domain-name table, sequence length, token dtype,
  tokenizer and score-column names.
* ``uids.npy``: int64 array, the ``uid`` of every sample in the order of the shards listed in
  ``index.json``. It lets a selection overlay map uids to (shard, row) without downloading shards.

Every MDS column is fixed-size, so a decompressed shard is one array of fixed-size records and the
reader can view it zero-copy (see ``dwm_stream.format.view``):

=============== ============================ =============================================
column          MDS encoding                 meaning
=============== ============================ =============================================
``tokens``      ``ndarray:uint16:<seq_len>`` token ids (``uint32`` if the vocab needs it)
``num_tokens``  ``int32``                    valid tokens; the rest of ``tokens`` is padding
``uid``         ``int64``                    stable id: source file hash and position
``domain``      ``int16``                    index into ``CorpusMeta.domains``
``score_<n>``   ``float32``                  one per score column (e.g. QuRating criteria)
=============== ============================ =============================================
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field
from typing import Any, Optional

import numpy as np

__all__ = [
    'TOKENS', 'NUM_TOKENS', 'UID', 'DOMAIN', 'SCORE_PREFIX', 'META_BASENAME', 'UIDS_BASENAME',
    'FORMAT_VERSION', 'UID_ORDINAL_BITS', 'COMPRESSION', 'HASHES', 'SHARD_SIZE_LIMIT', 'CorpusMeta',
    'token_dtype_for', 'mds_columns', 'make_uid', 'score_column',
]

TOKENS = 'tokens'
NUM_TOKENS = 'num_tokens'
UID = 'uid'
DOMAIN = 'domain'
SCORE_PREFIX = 'score_'
META_BASENAME = 'dwm.json'
UIDS_BASENAME = 'uids.npy'
FORMAT_VERSION = 1
# How every writer (convert, materialize) writes shards: zstd, hashed, at most 64 MiB raw per shard.
COMPRESSION = 'zstd'
HASHES = ['sha1', 'xxh64']
SHARD_SIZE_LIMIT = 1 << 26

# uid = (40-bit hash of the source file's relative path) << 23 | ordinal of the sample in that file.
# 23 bits allow 8.4M samples per source file (a SlimPajama file holds ~60k documents); 40 bits make
# a path-hash collision among SlimPajama's ~59k files unlikely (p ~ 2e-3), and `convert` checks for
# collisions and fails loudly if one happens.
UID_ORDINAL_BITS = 23
_UID_HASH_BITS = 40


def token_dtype_for(vocab_size: int) -> str:
    """The narrowest token dtype for a vocabulary: ``uint16`` when it fits, else ``uint32``."""
    return 'uint16' if vocab_size <= np.iinfo(np.uint16).max + 1 else 'uint32'


def score_column(name: str) -> str:
    """The MDS column name of a score, e.g. ``score_column('dsir') == 'score_dsir'``."""
    return SCORE_PREFIX + name


def mds_columns(seq_len: int, token_dtype: str, score_names: tuple[str, ...] = ()) -> dict[str, str]:
    """MDS ``columns`` for ``MDSWriter``: all fixed-size, so shards can be viewed zero-copy."""
    if token_dtype not in ('uint16', 'uint32'):
        raise ValueError(f'token dtype must be uint16 or uint32, got {token_dtype!r}')
    columns = {
        TOKENS: f'ndarray:{token_dtype}:{seq_len}',
        NUM_TOKENS: 'int32',
        UID: 'int64',
        DOMAIN: 'int16',
    }
    for name in score_names:
        columns[score_column(name)] = 'float32'
    return columns


def make_uid(source_relpath: str, ordinal: int) -> int:
    """Stable sample id from the source file's relative path and the sample's ordinal in it."""
    if not 0 <= ordinal < (1 << UID_ORDINAL_BITS):
        raise ValueError(f'{source_relpath}: sample ordinal {ordinal} does not fit in '
                         f'{UID_ORDINAL_BITS} bits; split the source file or raise --seq-len.')
    digest = hashlib.blake2b(source_relpath.encode('utf-8'), digest_size=8).digest()
    file_hash = int.from_bytes(digest, 'little') & ((1 << _UID_HASH_BITS) - 1)
    return (file_hash << UID_ORDINAL_BITS) | ordinal


@dataclass
class CorpusMeta:
    """Contents of ``dwm.json``.

    Args:
        domains (list[str]): Domain names; the ``domain`` column indexes this list.
        seq_len (int): Tokens per sample.
        token_dtype (str): ``uint16`` or ``uint32``.
        tokenizer (str): Tokenizer name or path used to convert.
        eos_token_id (int): Appended after every document.
        pad_token_id (int): Fills ``tokens`` past ``num_tokens``.
        score_names (list[str]): Score columns, without the ``score_`` prefix.
        num_samples (int): Samples in the corpus.
        num_tokens (int): Valid tokens in the corpus.
        tokens_per_domain (dict[str, int]): Valid tokens by domain name.
        sources (list[str]): Source files converted, relative to the source root.
        version (int): Format version. Default: ``FORMAT_VERSION``.
        max_token_id (int, optional): The largest id in ``tokens`` (padding included), checked at start-up against
            the model's and the weighter's vocabulary. Default: ``None`` (a corpus converted before it was
            recorded: not checked).
    """
    domains: list[str]
    seq_len: int
    token_dtype: str
    tokenizer: str
    eos_token_id: int
    pad_token_id: int
    score_names: list[str] = field(default_factory=list)
    num_samples: int = 0
    num_tokens: int = 0
    tokens_per_domain: dict[str, int] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    version: int = FORMAT_VERSION
    max_token_id: Optional[int] = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: Optional[str] = None,
                  fix: str = 're-run `dwm-stream convert`') -> 'CorpusMeta':
        """Parse ``dwm.json``; every error names ``where`` (the file) and ``fix`` (what to do).

        Raises:
            ValueError: Not JSON (e.g. truncated), not an object, unknown or missing keys, a value of the
                wrong type, or a format version newer than this package reads.
        """
        where = where or META_BASENAME
        try:
            obj: dict[str, Any] = json.loads(text)
        except json.JSONDecodeError as e:
            what = 'empty' if not text.strip() else f'not valid JSON, truncated or damaged ({e})'
            raise ValueError(f'{where}: {what}; {fix}.') from e
        if not isinstance(obj, dict):
            raise ValueError(f'{where}: expected a JSON object, got {type(obj).__name__}; {fix}.')  # noqa: TRY004
        known = set(cls.__dataclass_fields__)
        unknown = set(obj) - known
        if unknown:
            raise ValueError(f'{where}: unknown keys {sorted(unknown)}; valid keys are {sorted(known)}.')
        required = [name for name, f in cls.__dataclass_fields__.items()
                    if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in obj]
        if missing:
            raise ValueError(f'{where}: missing keys {missing}; {fix}.')
        version = obj.get('version', FORMAT_VERSION)
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise ValueError(f'{where}: format version {obj["version"]} is newer than this dwm-stream '
                             f'understands ({FORMAT_VERSION}); upgrade dwm-stream.')
        for key, ok, expected in _META_TYPES:
            if key in obj and not ok(obj[key]):
                raise ValueError(f'{where}: `{key}` must be {expected}, got {obj[key]!r}; {fix}.')
        return cls(**obj)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_str_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


# (key, check, what the message says it must be) for every field of dwm.json.
_META_TYPES = [
    ('domains', _is_str_list, 'a list of domain names'),
    ('seq_len', lambda x: _is_int(x) and x > 0, 'a positive int'),
    ('token_dtype', lambda x: isinstance(x, str), 'a numpy integer dtype name such as "uint16"'),
    ('tokenizer', lambda x: isinstance(x, str), 'a string'),
    ('eos_token_id', lambda x: x is None or _is_int(x), 'an int'),
    ('pad_token_id', lambda x: x is None or _is_int(x), 'an int'),
    ('score_names', _is_str_list, 'a list of score names'),
    ('num_samples', lambda x: _is_int(x) and x >= 0, 'an int >= 0'),
    ('num_tokens', lambda x: _is_int(x) and x >= 0, 'an int >= 0'),
    ('tokens_per_domain', lambda x: isinstance(x, dict), 'an object of domain name -> tokens'),
    ('sources', _is_str_list, 'a list of source paths'),
    ('version', _is_int, 'an int'),
    ('max_token_id', lambda x: x is None or (_is_int(x) and x >= 0), 'an int >= 0'),
]
