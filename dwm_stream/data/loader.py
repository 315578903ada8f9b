"""From a dataset config to a Composer ``DataSpec``: collation, late widening, token counts.

Token ids cross DataLoader worker processes in their narrow storage dtype (uint16 for vocabularies
up to 65,536) and are widened to int64 in the main process by :func:`widen_batch`, Composer's
``batch_transforms`` hook, which also derives ``labels`` (``-100`` on padding past
``num_tokens``). That halves or quarters the bytes that cross process boundaries.

A batch whose samples differ in length (an LLM Foundry corpus without fixed-size samples) or in
dtype (streams of different corpora) is padded with 0 to its longest sample and stored in a dtype
that holds every id; ``num_tokens`` keeps each sample's real length, so padding gets label -100.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import numpy as np
import torch
from composer.core import DataSpec
from streaming import StreamingDataLoader

from dwm_stream.data.schemas import check_dataset_arguments, check_loader_arguments, check_stream_arguments
from dwm_stream.data.dataset import DWMDataset, DWMStream
from dwm_stream.data.read_only import CorpusConflictError
from dwm_stream.format.integrity import MissingCredentialsError

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
    ids_dtype = first['input_ids'].dtype
    seq_len = len(first['input_ids'])
    uniform = True
    for s in samples:
        ids = s['input_ids']
        if len(ids) != seq_len or ids.dtype != ids_dtype:
            uniform = False
            break
    if not uniform:
        ids_dtype = _common_dtype(samples)
        seq_len = max(len(s['input_ids']) for s in samples)
    if torch.utils.data.get_worker_info() is None:
        batch = {
            'input_ids': torch.from_numpy(np.stack([s['input_ids'] for s in samples]) if uniform else
                                          _padded(samples, ids_dtype, seq_len)),
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
    if uniform:
        for row, s in enumerate(samples):
            ids[row] = s['input_ids']
    else:
        _fill_padded(ids, samples)
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


def _common_dtype(samples: list[dict[str, Any]]) -> np.dtype:
    """An integer dtype that holds the ids of every sample (int64 if numpy's promotion is not an integer)."""
    dtype = np.result_type(*{s['input_ids'].dtype for s in samples})
    return dtype if dtype.kind in 'iu' else np.dtype(np.int64)


def _fill_padded(out: np.ndarray, samples: list[dict[str, Any]]) -> None:
    for row, s in enumerate(samples):
        ids = s['input_ids']
        out[row, :len(ids)] = ids
        out[row, len(ids):] = 0


def _padded(samples: list[dict[str, Any]], dtype: np.dtype, seq_len: int) -> np.ndarray:
    out = np.empty((len(samples), seq_len), dtype)
    _fill_padded(out, samples)
    return out


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
    name -> ``DWMStream`` arguments, or a list), ``max_seq_len``/``token_encoding_type`` (LLM Foundry's), plus any
    ``StreamingDataset`` argument. A stream's name is the domain of a corpus without ``dwm.json`` (an LLM Foundry
    corpus). ``dwm-stream train`` and the LLM Foundry entry points check the config against
    ``dwm_stream.train.config.DatasetConfig`` before it gets here, so that an unknown key or a wrong type is reported
    with its YAML key and the valid keys; the types are checked here too (:mod:`dwm_stream.data.schemas`), for
    callers that come straight here.

    Args:
        cfg (Mapping): The ``dataset:`` section.
        device_batch_size (int, optional): Sets ``batch_size`` if the config does not.
        where (str): Config path for error messages. Default: ``'dataset'``.
    """
    cfg = dict(cfg)
    check_dataset_arguments(cfg, where)
    streams_cfg = cfg.pop('streams', None)
    streams = None
    if streams_cfg:
        named = isinstance(streams_cfg, Mapping)
        items = streams_cfg.items() if named else enumerate(streams_cfg)
        streams = []
        for name, scfg in items:
            scfg = dict(scfg)
            check_stream_arguments(scfg, f'{where}.streams.{name}')
            if named:  # the stream's name is the domain of a corpus without dwm.json
                scfg.setdefault('name', str(name))
            try:
                streams.append(DWMStream(**scfg))
            except TypeError as e:  # an argument DWMStream does not take
                raise ValueError(f'{where}.streams.{name}: {e}') from e
    if device_batch_size is not None and cfg.get('batch_size') is None:
        cfg['batch_size'] = device_batch_size
    try:
        return DWMDataset(streams=streams, **cfg)
    except CorpusConflictError as e:  # name the keys by their YAML path
        raise CorpusConflictError(re.sub(r'`(remote|local|streams)\b', f'`{where}.\\1', str(e))) from None
    except MissingCredentialsError as e:  # one short message, naming the key of the remote
        raise MissingCredentialsError(f'{_remote_key(cfg, streams_cfg, str(e), where)}: {e}') from None


def _remote_key(cfg: Mapping[str, Any], streams_cfg: Any, message: str, where: str) -> str:
    """The YAML key of the remote that ``message`` names (``where.remote`` or ``where.streams.<name>.remote``)."""
    items = (streams_cfg.items() if isinstance(streams_cfg, Mapping) else enumerate(streams_cfg or []))
    for name, scfg in items:
        remote = (scfg or {}).get('remote')
        if remote and message.startswith(str(remote).rstrip('/') + '/'):
            return f'{where}.streams.{name}.remote'
    return f'{where}.remote'


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
    check_loader_arguments({'device_batch_size': device_batch_size, 'num_workers': num_workers,
                            'drop_last': drop_last, 'prefetch_factor': prefetch_factor,
                            'persistent_workers': persistent_workers, 'pin_memory': pin_memory, 'timeout': timeout},
                           where.removesuffix('.dataset'))
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
