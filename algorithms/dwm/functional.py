"""The pure functions of DWM: per-sample causal-LM losses, the weighted loss, and operations on weight vectors and
batches. No Composer state here; ``DWM`` and the baselines call these.

Everything here matches HuggingFace's ``ForCausalLMLoss``: ``labels`` are *unshifted* (the model shifts them by
one position internally), ``-100`` marks tokens that produce no loss, and logits are upcast to float32. With all
weights equal to 1, :func:`weighted_loss` with ``normalization='token'`` is the HF token-mean loss of the batch.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F

__all__ = [
    'IGNORE_INDEX',
    'WEIGHT_KEY',
    'WeightedLoss',
    'logits_of',
    'per_sample_loss_sums',
    'per_sample_loss',
    'loss_contributions',
    'weighted_loss',
    'ensure_labels',
    'normalize_with_prior',
    'uniform_if_nonfinite',
    'weight_statistics',
    'trust_region_target',
    'domain_means',
    'log_weight_regression_loss',
    'spread_reached',
    'gumbel_top_k',
    'remembered_domain_means',
    'subset_batch',
    'spearman',
    'kl_to_uniform',
    'refit_objective',
]

IGNORE_INDEX = -100
WEIGHT_KEY = 'dwm_weight'  # the batch key that carries per-sample weights into Composer's microbatch splitter


class WeightedLoss(NamedTuple):
    """A weighted loss and the per-sample token-mean losses it was made of."""
    loss: torch.Tensor        # scalar, differentiable
    per_sample: torch.Tensor  # [B] token-mean loss of each sample, detached


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits of a model's outputs: a dict-like (``ModelOutput``, Composer's HF outputs) or an object."""
    return outputs['logits'] if isinstance(outputs, dict) or hasattr(outputs, 'keys') else outputs.logits


def per_sample_loss_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    shifted: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token loss and loss-token count of each sample.

    Args:
        logits (torch.Tensor): ``[B, L, V]`` model outputs.
        labels (torch.Tensor): ``[B, L]`` int64 targets, ``-100`` where no loss is taken.
        shifted (bool): ``True`` if ``labels[:, t]`` is already the target of ``logits[:, t]``. ``False`` (HF
            convention) if ``labels[:, t + 1]`` is. Default: ``False``.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: ``loss_sum`` and ``token_count`` (``[B]``, float32, or float64 for
        float64 logits).
    """
    if not shifted:
        # Shift the labels, not the logits (as HF's ``ForCausalLMLoss`` does): the target of the last position is
        # -100, so its loss is exactly 0, and the logits stay a contiguous view (slicing them would copy the whole
        # [B, L, V] tensor in the forward and allocate another in the backward).
        labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    batch_size, seq_len, vocab_size = logits.shape
    logits = logits if logits.dtype == torch.float64 else logits.float()  # HF upcasts to float32; keep float64
    token_loss = F.cross_entropy(
        logits.reshape(-1, vocab_size),
        labels.reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction='none',
    ).view(batch_size, seq_len)  # [B, L] (shifted: exactly 0 at the last position and wherever ignored)
    token_count = (labels != IGNORE_INDEX).sum(dim=1).to(token_loss.dtype)
    return token_loss.sum(dim=1), token_count


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, shifted: bool = False) -> torch.Tensor:
    """Token-mean loss of each sample (``0`` for a sample without loss tokens).

    Args:
        logits (torch.Tensor): ``[B, L, V]`` model outputs.
        labels (torch.Tensor): ``[B, L]`` targets, ``-100`` ignored.
        shifted (bool): See :func:`per_sample_loss_sums`. Default: ``False``.

    Returns:
        torch.Tensor: float32 ``[B]``.
    """
    loss_sum, token_count = per_sample_loss_sums(logits, labels, shifted)
    return loss_sum / token_count.clamp(min=1)


def loss_contributions(
    loss_sum: torch.Tensor,
    token_count: torch.Tensor,
    normalization: str = 'token',
    total_tokens: torch.Tensor | float | None = None,
    total_samples: int | None = None,
) -> torch.Tensor:
    """Per-sample terms ``c_i`` such that the weighted loss is ``sum_i w_i * c_i``.

    Args:
        loss_sum (torch.Tensor): ``[B]`` summed token loss per sample.
        token_count (torch.Tensor): ``[B]`` loss tokens per sample.
        normalization (str): ``'token'``: ``c_i = loss_sum_i / total_tokens`` (HF's token mean when ``w = 1``).
            ``'sample'``: ``c_i = mean_token_loss_i / total_samples`` (the paper's ``(1/n) sum_i w_i l_i``).
            Default: ``'token'``.
        total_tokens (torch.Tensor | float, optional): Denominator for ``'token'``; under data parallelism, the
            global token count. Default: ``None`` (the sum of ``token_count``).
        total_samples (int, optional): Denominator for ``'sample'``. Default: ``None`` (``B``).

    Returns:
        torch.Tensor: ``[B]`` contributions.
    """
    if normalization == 'token':
        denom = token_count.sum() if total_tokens is None else total_tokens
        if isinstance(denom, torch.Tensor):
            denom = denom.clamp(min=1)
        else:
            denom = max(float(denom), 1.0)
        return loss_sum / denom
    if normalization == 'sample':
        n = loss_sum.shape[0] if total_samples is None else total_samples
        return loss_sum / token_count.clamp(min=1) / max(n, 1)
    raise ValueError(f"normalization must be 'token' or 'sample', got {normalization!r}")


def weighted_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    normalization: str = 'token',
    shifted: bool = False,
) -> WeightedLoss:
    """The weighted training loss of one (micro)batch, ``sum_i w_i * c_i``: the one used by DWM and the baselines.

    With ``normalization='token'`` this is ``sum_i w_i * sum_t l_it / sum_i T_i``; all-ones weights give exactly
    the loss HuggingFace computes for the same (micro)batch, so Composer's own microbatch scaling (by samples or,
    with ``accumulate_train_batch_on_tokens``, by tokens) applies unchanged on top.

    Args:
        logits (torch.Tensor): ``[B, L, V]``.
        labels (torch.Tensor): ``[B, L]``, ``-100`` ignored.
        weights (torch.Tensor): ``[B]`` per-sample weights (mean 1 over the global batch).
        normalization (str): ``'token'`` or ``'sample'``, see :func:`loss_contributions`. Default: ``'token'``.
        shifted (bool): See :func:`per_sample_loss_sums`. Default: ``False``.

    Returns:
        WeightedLoss: the scalar ``loss`` and the detached ``[B]`` token-mean loss of each sample.
    """
    loss_sum, token_count = per_sample_loss_sums(logits, labels, shifted)
    contributions = loss_contributions(loss_sum, token_count, normalization)
    loss = (weights.to(contributions) * contributions).sum()
    return WeightedLoss(loss, (loss_sum / token_count.clamp(min=1)).detach())


def ensure_labels(batch: dict[str, Any]) -> dict[str, Any]:
    """Add ``labels`` (``input_ids`` with ``-100`` where ``attention_mask`` is 0) when the batch has none."""
    if 'labels' not in batch:
        labels = batch['input_ids'].clone()
        if 'attention_mask' in batch:
            labels[batch['attention_mask'] == 0] = IGNORE_INDEX
        batch['labels'] = labels
    return batch


def normalize_with_prior(weights: torch.Tensor, prior: Optional[torch.Tensor]) -> torch.Tensor:
    """``w * prior`` renormalised to mean 1 (``w`` unchanged when ``prior`` is ``None``)."""
    if prior is None:
        return weights
    combined = weights * prior.to(weights)
    return combined / combined.mean().clamp(min=torch.finfo(combined.dtype).tiny)


def uniform_if_nonfinite(weights: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """All ones if any weight is NaN/inf or non-positive; returns ``(weights, fell_back)``."""
    if bool(torch.isfinite(weights).all()) and bool((weights > 0).all()):
        return weights, False
    return torch.ones_like(weights), True


def weight_statistics(weights: torch.Tensor) -> dict[str, float]:
    """Mean, std, min, max and effective sample size fraction ``(sum w)^2 / (n sum w^2)`` of a weight vector."""
    w = weights.detach().double()
    n = w.numel()
    return {
        'mean': float(w.mean()),
        'std': float(w.std(unbiased=False)),
        'min': float(w.min()),
        'max': float(w.max()),
        'ess': float(w.sum()**2 / (n * (w**2).sum())),
    }


def gumbel_top_k(
    scores: torch.Tensor,
    k: int,
    generator: torch.Generator,
    start: int = 0,
    stop: Optional[int] = None,
) -> torch.Tensor:
    """Top ``k`` of ``scores + Gumbel noise`` within ``scores[start:stop]``: ``k`` draws without replacement from
    ``softmax(scores)`` restricted to that slice.

    Noise is drawn for the whole (global) ``scores`` vector and then sliced, so a sample's noise does not depend on
    how the global batch is split over ranks.

    Args:
        scores (torch.Tensor): ``[N]`` global scores (already divided by ``tau``).
        k (int): How many to keep.
        generator (torch.Generator): CPU generator (seeded per batch for exact resumption).
        start (int): Start of this rank's slice. Default: ``0``.
        stop (int, optional): End of the slice. Default: ``None`` (``N``).

    Returns:
        torch.Tensor: Sorted indices into the slice.
    """
    uniform = torch.rand(scores.shape, generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    perturbed = scores.detach().double().cpu() - torch.log(-torch.log(uniform))
    return torch.topk(perturbed[start:stop], k).indices.sort().values


def subset_batch(batch: dict[str, Any], index: torch.Tensor, n: int) -> dict[str, Any]:
    """Rows ``index`` of every tensor/list in ``batch`` whose first dimension is ``n``; other entries kept."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            out[key] = value[index.to(value.device)]
        elif isinstance(value, (list, tuple)) and len(value) == n:
            out[key] = type(value)(value[i] for i in index.tolist())
        else:
            out[key] = value
    return out


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``x``, ties sharing the mean of their ranks (as Spearman's rho needs)."""
    values, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).to(torch.float64)
    return (last - (counts.to(torch.float64) - 1) / 2)[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation of two ``[N]`` vectors (ties get average ranks); NaN when fewer than 3 values or
    either vector is constant."""
    if x.numel() < 3 or bool((x == x[0]).all()) or bool((y == y[0]).all()):
        return math.nan
    rx, ry = _average_ranks(x.double()), _average_ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def kl_to_uniform(weights: torch.Tensor) -> torch.Tensor:
    """``KL(p || u)`` for ``p = w / sum(w)`` and ``u`` uniform over the ``n`` samples (0 for uniform weights)."""
    p = weights / weights.sum()
    return torch.xlogy(p, p).sum() + math.log(weights.shape[0])


def refit_objective(hyper: torch.Tensor, weights: torch.Tensor, own_weights: torch.Tensor,
                    beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighter's refit loss ``sum_i h_i w_i + beta * n * KL(w'/n || u)`` and the KL (detached).

    ``sum_i h_i w_i`` has gradient ``h`` in ``w``: the exact one-step hypergradient (the paper's objective, linear in
    the weights). The trust region **[ours]** is taken on ``w'``, the weighter's own weights (mean 1, before any
    prior weight); with ``w' = w`` its minimiser over the simplex is ``w_i ∝ exp(-h_i / beta)``.

    Args:
        hyper (torch.Tensor): ``[n]`` hypergradient ``dL_val/dw`` (constant; optionally RMS-normalised).
        weights (torch.Tensor): ``[n]`` the weights used in training (with a graph to the weighter).
        own_weights (torch.Tensor): ``[n]`` the weighter's weights before any prior (with a graph).
        beta (float): Trust-region strength; ``0`` adds nothing (not even a zero term).

    Returns:
        tuple[torch.Tensor, torch.Tensor]: the scalar loss and ``KL(w'/n || u)``.
    """
    loss = (hyper.detach() * weights).sum()
    kl = kl_to_uniform(own_weights)
    if beta > 0:
        loss = loss + beta * own_weights.shape[0] * kl
    return loss, kl.detach()


def trust_region_target(hyper: torch.Tensor, beta: float, mix_uniform: float = 0.0) -> torch.Tensor:
    """The weights that minimise one batch's trust-region refit objective (:func:`refit_objective`):
    ``w_i ∝ exp(-h_i / beta)``, mean 1, then mixed with uniform as the weighter mixes its own (``(1 - λ) w + λ``),
    so that the target is one the weighter can reach.

    Args:
        hyper (torch.Tensor): ``[n]`` hypergradient of the batch (RMS-normalised, so ``beta`` is a temperature in
            RMS units).
        beta (float): Trust-region strength (``refit_kl``), ``> 0``.
        mix_uniform (float): The weighter's ``λ``. Default: ``0.0``.

    Returns:
        torch.Tensor: ``[n]`` float64 target weights, mean 1.
    """
    if beta <= 0:
        raise ValueError(f'trust_region_target: beta must be > 0 (refit_kl), got {beta}')
    h = hyper.detach().double()
    w = h.numel() * torch.softmax(-h / beta, dim=0)
    return (1.0 - mix_uniform) * w + mix_uniform


def _per_domain_means(values: torch.Tensor, domains: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The domain ids present, each one's mean of ``values``, and each sample's index into them."""
    if values.shape != domains.shape:
        raise ValueError(f'domain_means: values {tuple(values.shape)} and domains {tuple(domains.shape)} differ')
    ids, inverse = torch.unique(domains, return_inverse=True)
    sums = torch.zeros(ids.numel(), dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
    counts = torch.bincount(inverse, minlength=ids.numel()).to(values.dtype)
    return ids, sums / counts, inverse


def domain_means(values: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
    """Each sample's value replaced by the mean of the values of its domain: ``values`` ``[n]``, ``domains`` ``[n]``
    integer ids. The pooling of ``refit_target='domain'``: many samples' evidence about their domain, instead of one
    sample's noisy hypergradient."""
    _, means, inverse = _per_domain_means(values, domains)
    return means[inverse]


def remembered_domain_means(values: torch.Tensor, domains: torch.Tensor, memory: dict[int, float],
                            keep: float) -> tuple[torch.Tensor, dict[int, float]]:
    """:func:`domain_means`, averaged with the earlier refits' means: each domain's mean becomes ``keep * memory[d] +
    (1 - keep) * mean_d`` (a domain absent from ``memory`` takes its own mean). Returns each sample's remembered mean
    and the new memory (``memory`` is not changed; domains it holds and this refit did not see are carried over)."""
    if not 0.0 <= keep < 1.0:
        raise ValueError(f'remembered_domain_means: keep must be in [0, 1), got {keep}')
    ids, means, inverse = _per_domain_means(values, domains)
    new = dict(memory)
    for d, mean in zip(ids.tolist(), means.tolist()):
        new[d] = keep * memory[d] + (1.0 - keep) * mean if d in memory else mean
    lookup = torch.tensor([new[d] for d in ids.tolist()], dtype=values.dtype, device=values.device)
    return lookup[inverse], new


def log_weight_regression_loss(weights: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of ``log w`` and ``log target``, each centred over the batch (a weighting is defined
    up to its scale): the loss that fits the weighter to pooled refit targets (``refit_fit='regression'``)."""
    lw = torch.log(weights.clamp(min=1e-12))
    lt = torch.log(target.detach().to(weights.dtype).clamp(min=1e-12))
    return ((lw - lw.mean()) - (lt - lt.mean())).pow(2).mean()


def spread_reached(weights: torch.Tensor, target: torch.Tensor) -> float:
    """How far a weighting went toward its target: ``<w - 1, t - 1> / |t - 1|^2`` (the projection of the weights'
    deviation from uniform on the target's; 1 = all the way, 0 = uniform or orthogonal, NaN for a uniform target)."""
    dw = weights.detach().double() - weights.detach().double().mean()
    dt = target.detach().double() - target.detach().double().mean()
    denom = float(dt.pow(2).sum())
    return float((dw * dt).sum()) / denom if denom > 0 else math.nan
