"""``LossReweighting``: online loss-based per-sample reweighting (Sow et al., ICLR 2025), thin glue over
:func:`algorithms.baselines.weights.linupper_weights`.

Events:

* ``AFTER_LOSS``: from the microbatch's own (detached) per-sample losses, ``w = linupper_weights(losses)`` (mean 1
  over the microbatch); ``state.loss`` becomes ``sum_i w_i c_i`` with DWM's loss terms. Before ``warmup`` ends (their
  *burn-out* steps) the weights are 1.
* ``BATCH_END``: the weights applied to the batch's microbatches are stored as ``batch['dwm_weight']`` (as DWM's
  are), and their mean per domain is logged.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger

from algorithms.baselines.null import _batch_seed, permute_within_batch
from algorithms.baselines.static_domain import apply_weighted_loss, dataset_domain_names
from algorithms.baselines.weights import linupper_weights
from algorithms.dwm.functional import WEIGHT_KEY, logits_of, per_sample_loss
from algorithms.dwm.inputs import lookup_by_uid

__all__ = ['LossReweighting', 'ReducibleLossWeighting']


class LossReweighting(Algorithm):
    """Reweight each sample by its current loss within the batch (*LinUpper*, Sow et al. 2025).

    Example:
        .. code-block:: python

            from algorithms.baselines import LossReweighting
            trainer = Trainer(..., algorithms=[LossReweighting(r=1.0, warmup='0.05dur')])

    Args:
        r (float): Strength of their KL regulariser (``kl_reg``): ``w ∝ exp(f / r)``. Default: ``1.0`` (their value).
        delta (float): Half-width of the normalised loss range. Default: ``1.0`` (their value).
        warmup (str | Time): Train with uniform weights until this time (their ``burnout_steps``, 1000 of 20000
            steps = 5%). Default: ``'0.05dur'``.
        domain_names (Sequence[str], optional): Names of ``batch['domain']`` ids, for per-domain metrics. Default:
            ``None`` (the train dataset's ``domain_names``).
        log_every (int): Log the mean weight per domain every this many batches. Default: ``1``.
        permute_seed (int, optional): Permute each batch's weights at random (seeded by this and the batch index)
            before they enter the loss: the method's *null*, with the same spread of weights but none of their
            knowledge of the samples. Default: ``None`` (the method itself).
    """

    def __init__(self,
                 r: float = 1.0,
                 delta: float = 1.0,
                 warmup: Union[str, Time] = '0.05dur',
                 domain_names: Optional[Sequence[str]] = None,
                 log_every: int = 1,
                 permute_seed: Optional[int] = None) -> None:
        if r <= 0:
            raise ValueError(f'LossReweighting: r must be > 0, got {r}')
        self.r, self.delta = float(r), float(delta)
        self.warmup = Time.from_input(warmup, TimeUnit.BATCH) if isinstance(warmup, (str, int)) else warmup
        self.domain_names = list(domain_names) if domain_names is not None else None
        self.log_every = max(1, int(log_every))
        self.permute_seed = None if permute_seed is None else int(permute_seed)
        self._batch_weights: list[torch.Tensor] = []

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.FIT_START, Event.AFTER_DATALOADER, Event.AFTER_LOSS, Event.BATCH_END)

    def _in_warmup(self, state: State) -> bool:
        if self.warmup.unit == TimeUnit.DURATION:
            assert state.max_duration is not None
            elapsed = state.get_elapsed_duration()
            return (elapsed.value if elapsed is not None else 0.0) < float(self.warmup.value)
        return state.timestamp.get(self.warmup.unit) < self.warmup

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            if self.domain_names is None:
                self.domain_names = dataset_domain_names(state)
            return
        if event == Event.AFTER_DATALOADER:
            self._batch_weights: list[torch.Tensor] = []
            return
        if event == Event.BATCH_END:
            self._batch_end(state, logger)
            return
        batch = state.batch
        if self._in_warmup(state):
            weights = torch.ones(batch['input_ids'].shape[0])
        else:
            with torch.no_grad():
                losses = per_sample_loss(logits_of(state.outputs), batch['labels'])
                weights = linupper_weights(self.signal(losses, batch), self.r, self.delta)
        if self.permute_seed is not None:  # the method's null: the same weights, in a random order
            generator = torch.Generator().manual_seed(
                _batch_seed('null', self.permute_seed, int(state.timestamp.batch)) + len(self._batch_weights))
            weights = permute_within_batch(weights, generator)
        weights = weights.to(batch['input_ids'].device)
        apply_weighted_loss(state, weights)
        self._batch_weights.append(weights.detach())

    def signal(self, losses: torch.Tensor, batch: dict) -> torch.Tensor:
        """What the weights rise with: the per-sample loss itself (subclasses change it)."""
        return losses

    def _batch_end(self, state: State, logger: Logger) -> None:
        batch = state.batch  # the whole device batch again (Composer restores it after the microbatches)
        weights = torch.cat(self._batch_weights) if self._batch_weights else None
        self._batch_weights = []
        if weights is None or weights.shape[0] != batch['input_ids'].shape[0]:
            return
        batch[WEIGHT_KEY] = weights
        if 'domain' in batch and int(state.timestamp.batch - 1) % self.log_every == 0:
            metrics = {}
            for d in torch.unique(batch['domain']).tolist():
                name = self.domain_names[d] if self.domain_names and d < len(self.domain_names) else str(d)
                metrics[f'loss_reweighting/domain/{name}/weight'] = float(weights[batch['domain'] == d].mean())
            logger.log_metrics(metrics)


class ReducibleLossWeighting(LossReweighting):
    """A RHO-LOSS rule (Mindermann et al., ICML 2022) as per-sample weights: the same LinUpper mapping as
    :class:`LossReweighting`, applied to the *reducible* loss ``l_i - IL_i`` instead of the loss, where ``IL_i`` is
    sample ``i``'s loss under a small model trained on held-out data (its *irreducible* loss). Noisy samples have a
    high loss under both models, so a low reducible loss; learnable ones not yet learnt have a high one.

    RHO-LOSS itself selects the top of a larger batch by reducible loss; here the same signal weights the batch, so
    that it is compared with the other weighting methods at the same trained batch.

    Args:
        irreducible_loss (Mapping[int, float]): ``IL`` by sample uid (``batch['uid']``); a sample without one raises.
        **kwargs: :class:`LossReweighting`'s arguments (``r``, ``delta``, ``warmup``, ``domain_names``,
            ``log_every``, ``permute_seed``).
    """

    def __init__(self, irreducible_loss: Mapping[int, float], **kwargs) -> None:
        super().__init__(**kwargs)
        self.irreducible_loss = {int(k): float(v) for k, v in irreducible_loss.items()}

    def signal(self, losses: torch.Tensor, batch: dict) -> torch.Tensor:
        if 'uid' not in batch:
            raise ValueError('ReducibleLossWeighting: the batch has no uid (a DWMDataset yields one per sample)')
        il = lookup_by_uid(self.irreducible_loss, batch['uid'], 'ReducibleLossWeighting (irreducible_loss)')
        return losses - il.to(dtype=losses.dtype, device=losses.device)
