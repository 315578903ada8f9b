"""From a dataset config to a Composer ``DataSpec``: collation, late widening, token counts.

Token ids cross DataLoader worker processes in their narrow storage dtype (uint16 for vocabularies
up to 65,536) and are widened to int64 in the main process by :func:`widen_batch`, Composer's
``batch_transforms`` hook, which also derives ``labels`` (``-100`` on padding past
``num_tokens``). That halves or quarters the bytes that cross process boundaries.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import torch
from composer.core import DataSpec
from streaming import StreamingDataLoader

from dwm_stream.data.dataset import DWMDataset, DWMStream

__all__ = ['collate_samples', 'widen_batch', 'num_tokens_in_batch', 'build_dataset', 'build_dataloader']


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack DWM sample dicts into a batch, keeping token ids in their narrow dtype.

    In a DataLoader worker, every tensor of the batch is a view into **one** storage. Each storage
    crosses to the main process as its own shared-memory file descriptor, handed over through a
    socket connection to the worker, and that handshake, not the bytes, is what bounds a
    DataLoader: one storage per batch instead of one per field more than doubles the batches per
    second that the main process receives (``benchmarks/loader_throughput.py`` measures it).
    In the main process (``num_workers=0``) nothing crosses, and each field gets its own tensor.
    """
    first = samples[0]
    has_scores = 'scores' in first
    if torch.utils.data.get_worker_info() is None:
        batch = {
            'input_ids': torch.from_numpy(np.stack([s['input_ids'] for s in samples])),
            'num_tokens': torch.tensor([s['num_tokens'] for s in samples], dtype=torch.int32),
            'uid': torch.tensor([s['uid'] for s in samples], dtype=torch.int64),
            'domain': torch.tensor([s['domain'] for s in samples], dtype=torch.int64),
            'prior_weight': torch.tensor([s['prior_weight'] for s in samples], dtype=torch.float32),
        }
        if has_scores:
            batch['scores'] = torch.from_numpy(np.stack([s['scores'] for s in samples]))
        return batch
    # One byte arena, laid out by decreasing alignment:
    # uid int64[n] | domain int64[n] | num_tokens int32[n] | prior_weight float32[n] |
    # scores float32[n, k] | input_ids [n, seq_len] (8-byte aligned).
    n = len(samples)
    ids_dtype = first['input_ids'].dtype
    seq_len = len(first['input_ids'])
    k = len(first['scores']) if has_scores else 0
    ids_at = (24 * n + 4 * n * k + 7) // 8 * 8
    arena = torch.empty(ids_at + n * seq_len * ids_dtype.itemsize, dtype=torch.uint8)
    raw = arena.numpy()
    ints = raw[:16 * n].view(np.int64)
    ints[:n] = [s['uid'] for s in samples]
    ints[n:] = [s['domain'] for s in samples]
    raw[16 * n:20 * n].view(np.int32)[:] = [s['num_tokens'] for s in samples]
    raw[20 * n:24 * n].view(np.float32)[:] = [s['prior_weight'] for s in samples]
    ids = raw[ids_at:].view(ids_dtype).reshape(n, seq_len)
    for row, s in enumerate(samples):
        ids[row] = s['input_ids']
    batch = {
        'input_ids': arena[ids_at:].view(_torch_dtype(ids_dtype)).view(n, seq_len),
        'num_tokens': arena[16 * n:20 * n].view(torch.int32),
        'uid': arena[:8 * n].view(torch.int64),
        'domain': arena[8 * n:16 * n].view(torch.int64),
        'prior_weight': arena[20 * n:24 * n].view(torch.float32),
    }
    if has_scores:
        raw[24 * n:24 * n + 4 * n * k].view(np.float32).reshape(n, k)[:] = [s['scores'] for s in samples]
        batch['scores'] = arena[24 * n:24 * n + 4 * n * k].view(torch.float32).view(n, k)
    return batch


_TORCH_DTYPES: dict[np.dtype, torch.dtype] = {}


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    if dtype not in _TORCH_DTYPES:
        _TORCH_DTYPES[dtype] = torch.from_numpy(np.empty(0, dtype)).dtype
    return _TORCH_DTYPES[dtype]


def widen_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Widen ``input_ids`` to int64 and add ``labels`` (``-100`` past ``num_tokens``).

    Idempotent, so it is safe as both a ``batch_transforms`` and an explicit call.
    """
    input_ids = batch['input_ids']
    if input_ids.dtype != torch.int64:
        input_ids = input_ids.to(torch.int64)
        batch['input_ids'] = input_ids
    if 'labels' not in batch:
        labels = input_ids.clone()
        if 'num_tokens' in batch:
            positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
            labels[positions >= batch['num_tokens'].unsqueeze(1).to(torch.int64)] = -100
        batch['labels'] = labels
    return batch


def num_tokens_in_batch(batch: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Composer's token count: all positions (``total``) and those with a loss."""
    total = int(batch['input_ids'].numel())
    if 'num_tokens' in batch:
        valid = int(batch['num_tokens'].sum())
        # A causal LM predicts token t+1 from t: a sample with k valid tokens has k-1 targets.
        loss_generating = int((batch['num_tokens'] - 1).clamp(min=0).sum())
    else:
        valid = total
        loss_generating = total - int(batch['input_ids'].shape[0])
    return {'total': total, 'loss_generating': loss_generating, 'valid': valid}


def build_dataset(cfg: Mapping[str, Any], device_batch_size: Optional[int] = None, where: str = 'dataset'):
    """Build a :class:`~dwm_stream.data.dataset.DWMDataset` from a ``dataset:`` config mapping.

    The keys are ``DWMDataset``'s: ``remote``/``local``/``split``/``selection`` or ``streams`` (a mapping of
    name -> ``DWMStream`` arguments, or a list), plus any ``StreamingDataset`` argument. ``dwm-stream train`` and
    the LLM Foundry entry points check the config against ``dwm_stream.train.config.DatasetConfig`` before it
    gets here, so that an unknown key or a wrong type is reported with its YAML key and the valid keys.

    Args:
        cfg (Mapping): The ``dataset:`` section.
        device_batch_size (int, optional): Sets ``batch_size`` if the config does not.
        where (str): Config path for error messages. Default: ``'dataset'``.
    """
    cfg = dict(cfg)
    streams_cfg = cfg.pop('streams', None)
    streams = None
    if streams_cfg:
        items = streams_cfg.items() if isinstance(streams_cfg, Mapping) else enumerate(streams_cfg)
        streams = []
        for name, scfg in items:
            try:
                streams.append(DWMStream(**dict(scfg)))
            except TypeError as e:  # an argument DWMStream does not take
                raise ValueError(f'{where}.streams.{name}: {e}') from e
    if device_batch_size is not None and cfg.get('batch_size') is None:
        cfg['batch_size'] = device_batch_size
    return DWMDataset(streams=streams, **cfg)


def build_dataloader(dataset_cfg: Mapping[str, Any],
                     device_batch_size: int,
                     num_workers: int = 0,
                     drop_last: bool = True,
                     prefetch_factor: Optional[int] = None,
                     persistent_workers: bool = False,
                     pin_memory: bool = False,
                     timeout: float = 0,
                     where: str = 'train_loader.dataset'):
    """A Composer ``DataSpec`` over a ``DWMDataset`` built from ``dataset_cfg``.

    Uses streaming's ``StreamingDataLoader`` so that LLM Foundry and Composer checkpoint the
    dataset position the usual way.
    """
    dataset = build_dataset(dataset_cfg, device_batch_size, where=where)
    loader = StreamingDataLoader(
        dataset,
        batch_size=device_batch_size,
        collate_fn=collate_samples,
        num_workers=num_workers,
        drop_last=drop_last,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=persistent_workers and num_workers > 0,
        pin_memory=pin_memory,
        timeout=timeout,
    )
    return DataSpec(loader, batch_transforms=widen_batch, get_num_tokens_in_batch=num_tokens_in_batch)
