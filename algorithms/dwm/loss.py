"""Per-sample causal-LM losses and the DWM weighted loss.

Everything here matches HuggingFace's ``ForCausalLMLoss``: ``labels`` are *unshifted* (the model shifts them by
one position internally), ``-100`` marks tokens that produce no loss, and logits are upcast to float32. With all
weights equal to 1, :func:`weighted_loss` with ``normalization='token'`` is the HF token-mean loss of the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    'IGNORE_INDEX',
    'per_sample_loss_sums',
    'per_sample_loss',
    'loss_contributions',
    'weighted_loss',
]

IGNORE_INDEX = -100


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
) -> torch.Tensor:
    """The DWM training loss of one (micro)batch: ``sum_i w_i * c_i``.

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
        torch.Tensor: scalar loss.
    """
    loss_sum, token_count = per_sample_loss_sums(logits, labels, shifted)
    contributions = loss_contributions(loss_sum, token_count, normalization)
    return (weights.to(contributions) * contributions).sum()
