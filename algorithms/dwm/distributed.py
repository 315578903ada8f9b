"""Data-parallel collectives DWM needs, over ``composer.utils.dist`` (no-ops on one process).

* :func:`all_gather_cat`: concatenate a per-rank ``[n_r, ...]`` tensor into the global ``[sum n_r, ...]``, in rank
  order, and return this rank's offset.
* :func:`gather_with_local_grad`: the same, but this rank's slice keeps its autograd graph, so that a loss on the
  global tensor backpropagates into this rank's own inputs.
* :func:`all_reduce_sum_dict`: sum a dict of tensors over ranks with one flat collective.
"""

from __future__ import annotations

import torch
from composer.utils import dist

__all__ = ['all_gather_cat', 'gather_with_local_grad', 'all_reduce_sum_dict', 'all_reduce_sum_']


def all_gather_cat(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``tensor`` ``[n_r, ...]`` over ranks (sizes may differ); returns ``(global, offset)``."""
    if dist.get_world_size() == 1:
        return tensor.detach(), 0
    tensor = tensor.detach().contiguous()
    size = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    sizes = [int(s.item()) for s in dist.all_gather(size)]
    max_n = max(sizes)
    padded = torch.zeros((max_n, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[:tensor.shape[0]] = tensor
    gathered = dist.all_gather(padded)
    rank = dist.get_global_rank()
    offset = sum(sizes[:rank])
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)], dim=0), offset


def gather_with_local_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Like :func:`all_gather_cat`, keeping the autograd graph of this rank's own slice."""
    if dist.get_world_size() == 1:
        return tensor, 0
    gathered, offset = all_gather_cat(tensor)
    n = tensor.shape[0]
    return torch.cat([gathered[:offset], tensor, gathered[offset + n:]], dim=0), offset


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """In-place sum over ranks of a list of tensors (one flat collective)."""
    if dist.get_world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, reduce_operation='SUM')
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_sum_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new dict whose tensors are summed over ranks."""
    if dist.get_world_size() == 1:
        return tensors
    out = {k: v.detach().clone() for k, v in tensors.items()}
    all_reduce_sum_(list(out.values()))
    return out
