"""LAMBADA-format validation batches for the upper level.

A file holds one JSON object per line, ``{"context": ..., "continuation": ...}``. The loss is taken on the
continuation tokens only (``labels`` is ``-100`` elsewhere), as lm-evaluation-harness scores LAMBADA. Use a
*validation* split (e.g. ``cimec/lambada``); ``lambada_openai`` is test data, for reporting only.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Optional

import torch

from algorithms.dwm.functional import IGNORE_INDEX

__all__ = ['read_lambada_jsonl', 'tokenize_lambada_example', 'build_validation_batches', 'ValidationBatches']


def read_lambada_jsonl(path: str | os.PathLike) -> list[dict[str, str]]:
    """Read and check a LAMBADA-format jsonl file.

    Args:
        path (str | os.PathLike): The file.

    Returns:
        list[dict[str, str]]: ``{"context", "continuation"}`` records, blank lines skipped.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: On a line that is not a JSON object with string ``context`` and non-empty ``continuation``
            (the message names the file and line), or on a file without records.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'LAMBADA-format file {path} does not exist' +
                                (' (it is a directory)' if os.path.isdir(path) else ''))
    records = []
    with open(path, encoding='utf-8') as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f'{path}:{lineno}: not valid JSON ({e.msg}); expected '
                                 '{"context": str, "continuation": str}') from e
            if not isinstance(obj, dict) or not isinstance(obj.get('context'), str) or not isinstance(
                    obj.get('continuation'), str):
                raise ValueError(f'{path}:{lineno}: expected an object with string fields "context" and '
                                 f'"continuation", got {line.strip()[:120]!r}')
            if not obj['continuation'].strip():
                raise ValueError(f'{path}:{lineno}: empty "continuation"; the loss is taken on it')
            records.append({'context': obj['context'], 'continuation': obj['continuation']})
    if not records:
        raise ValueError(f'{path}: no records; expected one {{"context", "continuation"}} JSON object per line')
    return records


def tokenize_lambada_example(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` (with the tokenizer's special tokens) and of ``continuation`` (without)."""
    context_ids = tokenizer(context, add_special_tokens=True)['input_ids']
    continuation_ids = tokenizer(continuation, add_special_tokens=False)['input_ids']
    return list(context_ids), list(continuation_ids)


def build_validation_batches(
    path: str | os.PathLike,
    tokenizer: Any,
    batch_size: int = 8,
    max_length: Optional[int] = None,
    pad_token_id: Optional[int] = None,
) -> list[dict[str, torch.Tensor]]:
    """Tokenize a LAMBADA-format file into padded batches.

    Each batch has ``input_ids`` and ``attention_mask`` (int64 ``[B, L]``, right-padded) and ``labels`` (``-100``
    except on the continuation tokens, HF convention: unshifted).

    Args:
        path (str | os.PathLike): The jsonl file.
        tokenizer (Any): A HuggingFace tokenizer (the LLM's).
        batch_size (int): Examples per batch; the last batch may be smaller. Default: ``8``.
        max_length (int, optional): Longest example; longer ones lose context tokens from the left (the
            continuation is always kept). Default: ``None`` (no limit).
        pad_token_id (int, optional): Padding id. Default: ``None`` (the tokenizer's pad, else eos, else 0).

    Returns:
        list[dict[str, torch.Tensor]]: The batches, in file order.

    Raises:
        ValueError: On a bad line (file and line named) or when a continuation yields no tokens.
    """
    records = read_lambada_jsonl(path)
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        pad_token_id = 0 if pad_token_id is None else pad_token_id
    examples = []
    for i, rec in enumerate(records):
        context_ids, continuation_ids = tokenize_lambada_example(tokenizer, rec['context'], rec['continuation'])
        if not continuation_ids:
            raise ValueError(f'{path}: record {i + 1}: continuation {rec["continuation"]!r} has no tokens')
        if max_length is not None:
            if len(continuation_ids) >= max_length:
                raise ValueError(f'{path}: record {i + 1}: continuation alone has {len(continuation_ids)} tokens, '
                                 f'max_length={max_length}; raise max_length')
            context_ids = context_ids[max(0, len(context_ids) + len(continuation_ids) - max_length):]
        examples.append((context_ids, continuation_ids))
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        length = max(len(c) + len(t) for c, t in chunk)
        input_ids = torch.full((len(chunk), length), pad_token_id, dtype=torch.long)
        labels = torch.full((len(chunk), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for row, (context_ids, continuation_ids) in enumerate(chunk):
            ids = context_ids + continuation_ids
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention_mask[row, :len(ids)] = 1
            labels[row, len(context_ids):len(ids)] = torch.tensor(continuation_ids)
        batches.append({'input_ids': input_ids, 'labels': labels, 'attention_mask': attention_mask})
    return batches


class ValidationBatches:
    """Re-iterable LAMBADA-format validation batches (built once, lazily).

    Args:
        path (str | os.PathLike): The jsonl file.
        tokenizer (Any): The LLM's HuggingFace tokenizer.
        batch_size (int): Examples per batch. Default: ``8``.
        max_length (int, optional): See :func:`build_validation_batches`. Default: ``None``.
    """

    def __init__(self, path: str | os.PathLike, tokenizer: Any, batch_size: int = 8, max_length: Optional[int] = None):
        self.path, self.tokenizer, self.batch_size, self.max_length = path, tokenizer, batch_size, max_length
        self._batches: Optional[list[dict[str, torch.Tensor]]] = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._batches is None:
            self._batches = build_validation_batches(self.path, self.tokenizer, self.batch_size, self.max_length)
        return iter(self._batches)

    def peek(self) -> dict[str, torch.Tensor]:
        """The first batch, without moving any iteration (``DWM`` checks its data with it at start-up)."""
        return next(iter(self))

    def __len__(self) -> int:
        return len(list(iter(self)))
