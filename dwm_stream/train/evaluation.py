"""Evaluation of a causal LM on held-out data: token loss by domain, LAMBADA-format accuracy.

Pure functions over an HF causal LM and batches with ``input_ids`` / ``labels`` (``-100`` where
no loss is taken). Labels are unshifted (HF convention); the shift happens here.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

__all__ = ['heldout_loss', 'lambada_metrics']


def _token_losses(lm: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token losses [B, L-1], the mask of scored tokens, and whether argmax was right."""
    kwargs = {'input_ids': batch['input_ids']}
    if 'attention_mask' in batch:
        kwargs['attention_mask'] = batch['attention_mask']
    logits = lm(**kwargs).logits[:, :-1].float()
    targets = batch['labels'][:, 1:]
    mask = targets != -100
    safe = targets.clamp(min=0)
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), safe, reduction='none') * mask
    correct = (logits.argmax(-1) == safe) | ~mask
    return losses, mask, correct


@torch.no_grad()
def heldout_loss(lm: torch.nn.Module, batches: Iterable[dict], domain_names: Optional[Sequence[str]] = None,
                 max_batches: Optional[int] = None) -> dict[str, float]:
    """Mean token loss over the batches, overall (``'all'``) and by domain name.

    Args:
        lm (torch.nn.Module): An HF causal LM.
        batches (Iterable[dict]): Widened DWM batches (``input_ids``, ``labels``, ``domain``).
        domain_names (Sequence[str], optional): Names for ``batch['domain']`` ids. Default: ``None``.
        max_batches (int, optional): Stop after this many batches. Default: ``None`` (all).
    """
    was_training = lm.training
    lm.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        losses, mask, _ = _token_losses(lm, batch)
        per_sample_sum = losses.sum(1)
        per_sample_n = mask.sum(1)
        for row, (s, n) in enumerate(zip(per_sample_sum.tolist(), per_sample_n.tolist())):
            names = ['all']
            if 'domain' in batch:
                d = int(batch['domain'][row])
                names.append(domain_names[d] if domain_names else str(d))
            for name in names:
                sums[name] = sums.get(name, 0.0) + s
                counts[name] = counts.get(name, 0) + n
    lm.train(was_training)
    return {name: sums[name] / max(counts[name], 1) for name in sums}


@torch.no_grad()
def lambada_metrics(lm: torch.nn.Module, batches: Iterable[dict]) -> dict[str, float]:
    """LAMBADA-format scores: mean continuation-token loss, and accuracy (every continuation token
    is the model's argmax)."""
    was_training = lm.training
    lm.eval()
    loss_sum, tokens, right, examples = 0.0, 0, 0, 0
    for batch in batches:
        losses, mask, correct = _token_losses(lm, batch)
        loss_sum += float(losses.sum())
        tokens += int(mask.sum())
        right += int(correct.all(1).sum())
        examples += int(batch['input_ids'].shape[0])
    lm.train(was_training)
    return {'loss': loss_sum / max(tokens, 1), 'accuracy': right / max(examples, 1), 'examples': examples}
