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

from typing import Optional, Sequence, Union

import torch
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger

from algorithms.baselines.static_domain import apply_weighted_loss
from algorithms.baselines.weights import linupper_weights
from algorithms.dwm.functional import WEIGHT_KEY, logits_of, per_sample_loss

__all__ = ['LossReweighting']


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
    """

    def __init__(self,
                 r: float = 1.0,
                 delta: float = 1.0,
                 warmup: Union[str, Time] = '0.05dur',
                 domain_names: Optional[Sequence[str]] = None,
                 log_every: int = 1) -> None:
        if r <= 0:
            raise ValueError(f'LossReweighting: r must be > 0, got {r}')
        self.r, self.delta = float(r), float(delta)
        self.warmup = Time.from_input(warmup, TimeUnit.BATCH) if isinstance(warmup, (str, int)) else warmup
        self.domain_names = list(domain_names) if domain_names is not None else None
        self.log_every = max(1, int(log_every))
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
            dataset = getattr(getattr(state, 'train_dataloader', None), 'dataset', None)
            if self.domain_names is None and getattr(dataset, 'domain_names', None):
                self.domain_names = list(dataset.domain_names)
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
                weights = linupper_weights(per_sample_loss(logits_of(state.outputs), batch['labels']), self.r,
                                           self.delta)
        weights = weights.to(batch['input_ids'].device)
        apply_weighted_loss(state, weights)
        self._batch_weights.append(weights.detach())

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
