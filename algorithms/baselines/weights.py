"""Pure functions: per-sample weights of the two baselines (mean 1 over the batch, like DWM's).

* :func:`linupper_weights`: loss-based per-sample reweighting, Sow et al. (ICLR 2025), their *LinUpper* strategy.
* :func:`domain_weights_from_alignment`, :func:`batch_domain_weights`: static domain reweighting, with domain
  weights fixed once from a proxy model's gradients.

The weights multiply the per-sample loss terms exactly as DWM's do: ``sum_i w_i c_i`` with ``c_i`` from
:func:`algorithms.dwm.functional.loss_contributions`, so all-ones weights give the plain loss.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

__all__ = ['linupper_weights', 'domain_weights_from_alignment', 'batch_domain_weights']


def linupper_weights(losses: torch.Tensor, r: float = 1.0, delta: float = 1.0) -> torch.Tensor:
    """Sow et al.'s LinUpper weights of one batch, scaled to mean 1.

    1. Map the batch's losses linearly onto ``[-delta, delta]``:
       ``h_i = delta * (2 l_i - (l_max + l_min)) / (l_max - l_min)``.
    2. LinUpper: ``f_i = min(h_i + delta, delta)``: weight rises linearly with loss up to the batch's mid-range
       loss and is flat above it (low-loss samples are down-weighted, high-loss ones are not boosted without
       bound).
    3. ``w_i = n * softmax(f / r)_i`` (their ``g = exp(f / r)`` normalised over the batch; ``r`` is the strength of
       their KL regulariser: smaller ``r``, sharper weights).

    With ``r = 1`` and ``delta = 1`` the largest weight is at most ``e`` times the smallest.

    Args:
        losses (torch.Tensor): ``[n]`` per-sample mean token losses (detached).
        r (float): KL regularisation strength (their ``kl_reg``). Default: ``1.0``.
        delta (float): Half-width of the normalised loss range. Default: ``1.0``.

    Returns:
        torch.Tensor: ``[n]`` float32 weights, positive, mean 1 (all ones if every loss is equal).
    """
    if r <= 0:
        raise ValueError(f'linupper_weights: r must be > 0, got {r}')
    losses = losses.detach().double()
    n = losses.numel()
    span = float(losses.max() - losses.min())
    if n == 0 or span <= 0 or not torch.isfinite(losses).all():
        return torch.ones(n, dtype=torch.float32, device=losses.device)
    lo, hi = float(losses.min()), float(losses.max())
    h = delta * (2 * losses - (hi + lo)) / (hi - lo)
    f = torch.minimum(h + delta, torch.full_like(h, delta))
    return (n * torch.softmax(f / r, dim=0)).float()


def domain_weights_from_alignment(
    alignment: Mapping[str, float],
    shares: Mapping[str, float],
    mix_uniform: float = 0.1,
) -> dict[str, float]:
    """Static per-domain weights from each domain's first-order effect on the validation loss.

    ``alignment[d]`` is ``<grad L_val, grad L_d>``: how much one SGD step of unit size on domain ``d`` lowers the
    validation loss, to first order. Domains that would raise it (negative alignment) get weight 0 before mixing:

        u_d = max(alignment_d, 0);  u_d /= sum_d shares_d u_d;  w_d = (1 - mix_uniform) u_d + mix_uniform

    so that the expected weight of a sample drawn from the training mix is 1, and no domain falls below
    ``mix_uniform`` (DWM's ``λ``). If no domain helps, all weights are 1.

    Args:
        alignment (Mapping[str, float]): Per-domain ``<grad L_val, grad L_d>``.
        shares (Mapping[str, float]): Share of the training samples in each domain (need not sum to 1).
        mix_uniform (float): Floor mixed in, as DWM's ``mix_uniform``. Default: ``0.1``.

    Returns:
        dict[str, float]: Weight per domain of ``alignment``.
    """
    if not 0.0 <= mix_uniform <= 1.0:
        raise ValueError(f'mix_uniform must be in [0, 1], got {mix_uniform}')
    missing = set(alignment) - set(shares)
    if missing:
        raise ValueError(f'no training share for domain(s) {sorted(missing)}')
    total_share = sum(shares[d] for d in alignment)
    positive = {d: max(float(a), 0.0) for d, a in alignment.items()}
    mean = sum(shares[d] * positive[d] for d in alignment) / max(total_share, 1e-30)
    if mean <= 0:
        return {d: 1.0 for d in alignment}
    return {d: (1 - mix_uniform) * positive[d] / mean + mix_uniform for d in alignment}


def batch_domain_weights(domain_ids: torch.Tensor, table: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Per-sample weights ``table[domain_i]``, renormalised to mean 1 over the batch (as DWM's weights are).

    Args:
        domain_ids (torch.Tensor): ``[n]`` int64 domain ids (``batch['domain']``).
        table (Sequence[float] | torch.Tensor): Weight of each domain id.

    Returns:
        torch.Tensor: ``[n]`` float32 weights, mean 1.
    """
    table = torch.as_tensor(table, dtype=torch.float64, device=domain_ids.device)
    if domain_ids.numel() and int(domain_ids.max()) >= table.numel():
        raise ValueError(f'domain id {int(domain_ids.max())} has no weight (the table has {table.numel()} entries)')
    w = table[domain_ids.long()]
    mean = w.mean()
    if w.numel() == 0 or not torch.isfinite(mean) or mean <= 0:
        return torch.ones(domain_ids.shape, dtype=torch.float32, device=domain_ids.device)
    return (w / mean).float()
