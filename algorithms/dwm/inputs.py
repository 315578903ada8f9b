"""The weighter's inputs beyond the tokens (issue 18, **[ours]**): per-sample scalars that the weighter sees beside its
own embedding of each sample.

* ``loss``: the sample's token-mean training loss under the LLM as it is now (as Meta-Weight-Net weighs by loss);
* ``reducible_loss``: that loss minus the sample's *reference* loss, its loss under a small model fit on held-out
  data (RHO-loss's reducible loss). The reference losses are computed offline, once: a JSON file ``{uid: loss}``
  (``algorithms.dwm.reference_losses``), or a ``reference_loss`` field that the loader yields with every sample.

Both are measured with no gradient, at the LLM's parameters of the moment: before each training step (one extra
forward over the device batch, over the whole pool in ``mode='select'``, the cost RHO-loss pays too) and at the frozen
parameters of a refit. The weighter standardises them over the (global) batch, so only their order and spread within a
batch matter, not the loss level, which falls as the LLM trains.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from algorithms.dwm.config import WEIGHTER_INPUTS
from algorithms.dwm.functional import per_sample_loss

__all__ = ['WEIGHTER_INPUTS', 'INPUTS_KEY', 'REFERENCE_KEY', 'load_reference_losses', 'lookup_by_uid',
           'sample_losses', 'weighter_inputs', 'standardize_inputs']

INPUTS_KEY = 'dwm_inputs'  # a batch's inputs [n, k], set by DWM before the weighter reads them
REFERENCE_KEY = 'reference_loss'  # a loader's own per-sample reference losses [n]

ReferenceLosses = Union[str, os.PathLike, Mapping[Any, float]]


def load_reference_losses(source: ReferenceLosses) -> dict[int, float]:
    """``{uid: reference loss}`` from a JSON object file ``{"<uid>": loss, ...}`` or a mapping. Raises ``ValueError``
    naming the file (or the entry) that is not such an object of finite numbers."""
    where = 'reference_losses'
    if isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
        try:
            with open(source) as f:
                source = json.load(f)
        except OSError as e:
            raise ValueError(f'{where}: cannot read the reference losses ({e.strerror or e}); give a JSON file '
                             '{"<uid>": loss, ...}') from e
        except json.JSONDecodeError as e:
            raise ValueError(f'{where}, line {e.lineno}: not JSON ({e.msg}); give a JSON file '
                             '{"<uid>": loss, ...}') from e
    if not isinstance(source, Mapping):
        raise ValueError(f'{where}: a JSON object {{"<uid>": loss, ...}} was expected, got {type(source).__name__}')
    table: dict[int, float] = {}
    for key, value in source.items():
        try:
            uid, loss = int(key), float(value)
        except (TypeError, ValueError):
            raise ValueError(f'{where}: entry {key!r}: {value!r} is not an integer uid with a number') from None
        if not math.isfinite(loss):
            raise ValueError(f'{where}: entry {key!r}: the reference loss {loss} is not finite')
        table[uid] = loss
    return table


def lookup_by_uid(table: Mapping[int, float], uids: torch.Tensor, who: str) -> torch.Tensor:
    """``table[uid]`` for every uid of a batch (float32 ``[n]``). Raises ``ValueError`` naming the first uids that
    have no entry (``who`` names the caller and the table)."""
    keys = [int(u) for u in uids.reshape(-1).tolist()]
    missing = [u for u in keys if u not in table]
    if missing:
        raise ValueError(f'{who}: no reference loss for sample uid(s) {missing[:5]}'
                         f'{f" and {len(missing) - 5} more" if len(missing) > 5 else ""}; compute it for every '
                         'training sample')
    return torch.tensor([table[u] for u in keys], dtype=torch.float32)


def sample_losses(lm: torch.nn.Module, batch: dict[str, Any], chunk: Optional[int] = None) -> torch.Tensor:
    """Each sample's token-mean loss under ``lm`` (no gradient, ``lm`` in eval mode for the pass and restored after),
    float32 ``[n]`` on ``lm``'s device; ``chunk`` rows per forward (default: the whole batch)."""
    device = next(lm.parameters()).device
    ids, labels, mask = batch['input_ids'], batch['labels'], batch.get('attention_mask')
    n = ids.shape[0]
    step = max(1, int(chunk or n))
    was_training = lm.training
    lm.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, n, step):
                rows = slice(start, start + step)
                kwargs = {'input_ids': ids[rows].to(device), 'use_cache': False}
                if mask is not None:
                    kwargs['attention_mask'] = mask[rows].to(device)
                out.append(per_sample_loss(lm(**kwargs).logits, labels[rows].to(device)).float())
    finally:
        lm.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, device=device)


def weighter_inputs(names: Sequence[str], lm: torch.nn.Module, batch: dict[str, Any],
                    reference: Optional[Mapping[int, float]] = None, chunk: Optional[int] = None) -> torch.Tensor:
    """The inputs ``names`` (of :data:`WEIGHTER_INPUTS`) of a batch's samples, float32 ``[n, len(names)]``.

    ``reducible_loss`` takes each sample's reference loss from ``batch['reference_loss']`` when the loader yields it,
    else from ``reference`` by ``batch['uid']``; a ``ValueError`` says how to provide it when neither is there.
    """
    unknown = [name for name in names if name not in WEIGHTER_INPUTS]
    if unknown:
        raise ValueError(f'weighter inputs {unknown}: unknown; valid inputs: {list(WEIGHTER_INPUTS)}')
    loss = sample_losses(lm, batch, chunk)
    columns = []
    for name in names:
        if name == 'loss':
            columns.append(loss)
            continue
        if REFERENCE_KEY in batch:
            ref = torch.as_tensor(batch[REFERENCE_KEY]).float().reshape(-1)
        elif reference is not None:
            if 'uid' not in batch:
                raise ValueError('weighter input reducible_loss: the batch has no uid to look the reference losses up '
                                 'by (a dwm_stream dataset yields one per sample)')
            ref = lookup_by_uid(reference, batch['uid'],
                                'algorithms.dwm.reference_losses (it must cover the refit loader\'s samples too)')
        else:
            raise ValueError('weighter input reducible_loss needs each sample\'s reference loss: set '
                             'algorithms.dwm.reference_losses (a JSON file {"<uid>": loss}, from a small model fit on '
                             'held-out data), or have the loader yield a reference_loss field')
        columns.append(loss - ref.to(loss.device))
    return torch.stack(columns, dim=1)


def standardize_inputs(inputs: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each column of ``inputs`` ``[n, k]`` centred and scaled to unit (population) variance over the batch's rows; a
    constant column becomes 0. Non-finite values raise ``ValueError``."""
    if not bool(torch.isfinite(inputs).all()):
        raise ValueError('the weighter inputs of a batch are not finite (a NaN or infinite loss or reference loss)')
    centred = inputs - inputs.mean(dim=0, keepdim=True)
    return centred * torch.rsqrt(centred.pow(2).mean(dim=0, keepdim=True) + eps)
