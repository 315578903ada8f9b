"""The column layouts ``DWMDataset`` reads: its own (``dwm-stream convert``) and LLM Foundry's.

LLM Foundry 0.22's conversion scripts (``convert_dataset_hf``, ``convert_dataset_json``,
``convert_text_to_mds``) write MDS with one column:

* ``tokens: ndarray:int32`` (with ``--concat_tokens``): token ids, one sample per row;
* ``text: str`` (without): raw text, tokenized by Foundry's ``StreamingTextDataset`` while training.

Older Foundry corpora stored ``tokens`` as ``bytes``, which ``StreamingTextDataset`` decodes with its
``token_encoding_type`` (default ``int64``); ``DWMDataset`` takes the same option with the same meaning.

How a stream is read (:func:`check_columns` enforces it at construction, before any sample):

* With ``dwm.json`` and dwm-stream's columns (``tokens``, ``num_tokens``, ``uid``, ``domain``, ``score_*``): as
  written by ``convert``; ``dwm.json`` must agree with ``index.json`` (sample count, ``seq_len``, token dtype).
* Without ``dwm.json``, with a ``tokens`` column (any integer ``ndarray`` dtype, ``bytes``, or the decoded values of
  ``pkl``/``json`` columns): an LLM Foundry corpus. Its domain is the stream's name, its uids are
  :func:`stream_uid_base` + the sample's index in the stream; ``num_tokens`` is the sample's length, ``prior_weight``
  is 1 and it has no scores (NaN where another stream has them). A Foundry corpus may also carry a ``dwm.json``
  (e.g. to name its domain or declare score columns); the shards' missing columns are filled in the same way.
* A ``domain`` column without ``dwm.json``: a dwm-stream corpus that lost its sidecar. Its domain ids cannot be
  named, so this is an error, never a silent guess.
* ``text`` and no ``tokens``: an error that says to tokenize it with ``dwm-stream convert``.
"""

from __future__ import annotations

import hashlib
from typing import Any

from dwm_stream.format.shards import DOMAIN, META_BASENAME, TOKENS, CorpusMeta

__all__ = [
    'STREAM_UID_SHIFT',
    'TEXT',
    'TOKEN_ENCODING_TYPES',
    'TokensEncoding',
    'check_columns',
    'check_token_encoding_type',
    'meta_fix',
    'stream_uid_base',
    'tokens_encoding',
]

# llmfoundry.data.data.SUPPORTED_MDS_ENCODING_TYPES (LLM Foundry 0.22), the values of `token_encoding_type`.
TOKEN_ENCODING_TYPES = ('int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32', 'uint64')
TEXT = 'text'
_INT_DTYPES = frozenset(TOKEN_ENCODING_TYPES)

# A synthesized uid is (23-bit hash of the stream's name) << 40 | the sample's index in the stream: up to 1.1e12
# samples per stream, and every uid a positive int64.
STREAM_UID_SHIFT = 40
_STREAM_HASH_BITS = 23


class TokensEncoding:
    """How the ``tokens`` column of a stream is stored.

    Attributes:
        kind (str): ``'ndarray'``, ``'bytes'`` or ``'object'`` (``pkl``/``json``: a decoded list of ints).
        dtype (str | None): The ndarray's element dtype (``None`` unless ``kind == 'ndarray'``).
        length (int | None): Tokens per sample when the ndarray has a fixed shape (``ndarray:uint16:2048``).
    """

    __slots__ = ('dtype', 'kind', 'length')

    def __init__(self, kind: str, dtype: str | None = None, length: int | None = None) -> None:
        self.kind, self.dtype, self.length = kind, dtype, length


def tokens_encoding(encoding: str) -> TokensEncoding | None:
    """The :class:`TokensEncoding` of an MDS encoding string, or ``None`` if it cannot hold token ids."""
    if encoding == 'bytes':
        return TokensEncoding('bytes')
    if encoding in ('pkl', 'json'):
        return TokensEncoding('object')
    parts = encoding.split(':')
    if parts[0] != 'ndarray':
        return None
    dtype = parts[1] if len(parts) > 1 and parts[1] else None
    if dtype is not None and dtype not in _INT_DTYPES:
        return None
    length = None
    if len(parts) > 2 and parts[2]:
        shape = [int(x) for x in parts[2].split(',') if x]
        if len(shape) != 1:
            return None
        length = shape[0]
    return TokensEncoding('ndarray', dtype, length)


def check_token_encoding_type(value: Any, key: str = 'token_encoding_type') -> str:
    """``token_encoding_type`` as LLM Foundry's ``StreamingTextDataset`` accepts it."""
    if value not in TOKEN_ENCODING_TYPES:
        raise ValueError(f'{key}: {value!r} is not a token dtype; use one of {list(TOKEN_ENCODING_TYPES)} '
                         f'(the dtype the `bytes` tokens were written with; LLM Foundry\'s default is int64).')
    return value


def stream_uid_base(key: str) -> int:
    """The uid of sample 0 of a stream without a ``uid`` column; sample ``i`` gets ``base + i``."""
    digest = hashlib.blake2b(key.encode('utf-8'), digest_size=8).digest()
    return (int.from_bytes(digest, 'little') & ((1 << _STREAM_HASH_BITS) - 1)) << STREAM_UID_SHIFT


def meta_fix(ours: bool, location: str) -> str:
    """What to do about a damaged ``dwm.json``: of a dwm-stream corpus (``ours``), or beside a Foundry corpus."""
    if ours:
        return f'restore the {META_BASENAME} written with these shards, or re-run `dwm-stream convert`'
    return f'fix it, or delete it to stream {location} as an LLM Foundry corpus (domain = the stream name)'


def check_columns(columns: dict[str, str], meta: CorpusMeta | None, num_samples: int, location: str,
                  index_file: str, meta_file: str) -> None:
    """Refuse, at construction, a stream that ``DWMDataset`` cannot read correctly; see the module docstring.

    Args:
        columns (dict[str, str]): Column name -> MDS encoding, as ``index.json`` lists them.
        meta (CorpusMeta | None): The stream's ``dwm.json``, if it has one.
        num_samples (int): Samples ``index.json`` lists (before any selection).
        location (str): The stream (remote or local directory), for messages.
        index_file (str): Its ``index.json``, for messages.
        meta_file (str): Where its ``dwm.json`` is (or would be), for messages.

    Raises:
        ValueError: Naming the file and what to do.
    """
    ours = DOMAIN in columns
    if TOKENS not in columns:
        if TEXT in columns:
            raise ValueError(
                f'{location}: a text corpus (column `text`, no `tokens`), e.g. from LLM Foundry\'s conversion '
                f'without --concat_tokens; DWM trains on token ids: tokenize the source documents with '
                f'`dwm-stream convert --src SOURCE --out OUT --tokenizer TOKENIZER --seq-len N` (or Foundry\'s '
                f'converter with --concat_tokens N) and stream OUT.')
        raise ValueError(f'{index_file}: no `tokens` column (columns: {sorted(columns)}); DWMDataset reads '
                         f'corpora written by `dwm-stream convert` or by LLM Foundry\'s converters with '
                         f'--concat_tokens.')
    encoding = tokens_encoding(columns[TOKENS])
    if encoding is None:
        raise ValueError(f'{index_file}: column `tokens` is encoded as {columns[TOKENS]!r}, which does not hold '
                         f'token ids; write it as `ndarray:<int dtype>` (LLM Foundry writes ndarray:int32) or '
                         f'`bytes` (decoded with token_encoding_type).')
    if meta is None:
        if ours:
            raise ValueError(f'{meta_file}: missing, but the shards have dwm-stream\'s `domain` column, whose ids '
                             f'only {META_BASENAME} names; restore the {META_BASENAME} written with these shards, '
                             f'or re-run `dwm-stream convert`.')
        return
    fix = meta_fix(ours, location)
    if meta.num_samples and meta.num_samples != num_samples:
        raise ValueError(f'{meta_file}: says {meta.num_samples} samples, but {index_file} lists {num_samples} '
                         f'(it belongs to another conversion); {fix}.')
    if encoding.length is not None and encoding.length != meta.seq_len:
        raise ValueError(f'{meta_file}: seq_len {meta.seq_len}, but the shards hold {encoding.length} tokens per '
                         f'sample ({columns[TOKENS]}); {fix}.')
    if encoding.dtype is not None and meta.token_dtype != encoding.dtype:
        raise ValueError(f'{meta_file}: token_dtype {meta.token_dtype!r}, but the shards store {encoding.dtype} '
                         f'({columns[TOKENS]}); {fix}.')
    if not meta.domains and num_samples:
        raise ValueError(f'{meta_file}: `domains` is empty, but {index_file} lists {num_samples} samples; {fix}.')
    if not ours and len(meta.domains) > 1:
        raise ValueError(f'{meta_file}: lists {len(meta.domains)} domains, but the shards have no `domain` '
                         f'column to choose among them; list one domain, or delete it to stream {location} as an '
                         f'LLM Foundry corpus (domain = the stream name).')
