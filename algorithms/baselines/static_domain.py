"""``StaticDomainWeighting``: fixed per-domain loss weights (thin glue over :mod:`algorithms.baselines.weights`).

Events:

* ``AFTER_DATALOADER``: ``batch['dwm_weight'] = table[batch['domain']]``, renormalised to mean 1 over the batch
  (the same key DWM uses, so Composer's splitter slices it per microbatch).
* ``AFTER_LOSS``: ``state.loss`` becomes ``sum_i w_i c_i`` with DWM's own loss terms
  (:func:`algorithms.dwm.functional.loss_contributions`), so all-ones weights give exactly the plain loss.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from algorithms.baselines.weights import batch_domain_weights
from algorithms.dwm.functional import WEIGHT_KEY, ensure_labels, logits_of, weighted_loss

__all__ = ['StaticDomainWeighting', 'apply_weighted_loss', 'dataset_domain_names']


def dataset_domain_names(state: State) -> Optional[list[str]]:
    """The train dataset's ``domain_names`` (a ``DWMDataset`` has them), or ``None``: how the baselines name the ids
    in ``batch['domain']`` when they were not given names."""
    dataset = getattr(getattr(state, 'train_dataloader', None), 'dataset', None)
    names = getattr(dataset, 'domain_names', None)
    return list(names) if names else None


def apply_weighted_loss(state: State, weights: torch.Tensor, normalization: str = 'token') -> torch.Tensor:
    """Replace ``state.loss`` with the weighted loss of the current microbatch, as DWM's ``AFTER_LOSS`` does.

    Returns the per-sample mean token losses (detached), for metrics.
    """
    loss, per_sample = weighted_loss(logits_of(state.outputs), state.batch['labels'], weights, normalization)
    state.loss = loss
    return per_sample


class StaticDomainWeighting(Algorithm):
    """Weight every sample's loss by a fixed weight of its domain (the *static domain reweighting* baseline).

    Example:
        .. code-block:: python

            from algorithms.baselines import StaticDomainWeighting
            alg = StaticDomainWeighting({'RedPajamaBook': 1.6, 'DegradedRandomTokens': 0.1, ...},
                                        domain_names=dataset.domain_names)
            trainer = Trainer(..., algorithms=[alg])

    Args:
        domain_weights (Mapping[str, float] | Sequence[float]): Weight per domain name (with ``domain_names``) or per
            domain id. See :func:`~algorithms.baselines.weights.domain_weights_from_alignment` for one way to get
            them from a proxy run. Names missing from the mapping get weight 1.
        domain_names (Sequence[str], optional): Names of the ids in ``batch['domain']``. Default: ``None`` (the
            train dataset's ``domain_names``, read at ``FIT_START``).
        log_every (int): Log the mean weight per domain every this many batches. Default: ``1``.
    """

    def __init__(self,
                 domain_weights: Union[Mapping[str, float], Sequence[float]],
                 domain_names: Optional[Sequence[str]] = None,
                 log_every: int = 1) -> None:
        self.domain_weights = dict(domain_weights) if isinstance(domain_weights, Mapping) else list(domain_weights)
        self.domain_names = list(domain_names) if domain_names is not None else None
        self.log_every = max(1, int(log_every))
        self._table: Optional[torch.Tensor] = None

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.FIT_START, Event.AFTER_DATALOADER, Event.AFTER_LOSS)

    def table(self) -> torch.Tensor:
        """Weight per domain id."""
        if self._table is None:
            if isinstance(self.domain_weights, list):
                self._table = torch.tensor(self.domain_weights, dtype=torch.float64)
            else:
                if self.domain_names is None:
                    raise ValueError('StaticDomainWeighting: domain_weights is keyed by name; pass domain_names= '
                                     '(the train dataset has no domain_names to read them from)')
                unknown = set(self.domain_weights) - set(self.domain_names)
                if unknown:
                    raise ValueError(f'StaticDomainWeighting: domain(s) {sorted(unknown)} are not in the data\'s '
                                     f'domains {self.domain_names}')
                self._table = torch.tensor([float(self.domain_weights.get(n, 1.0)) for n in self.domain_names],
                                           dtype=torch.float64)
        return self._table

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            if self.domain_names is None:
                self.domain_names = dataset_domain_names(state)
            self.table()
        elif event == Event.AFTER_DATALOADER:
            batch = ensure_labels(dict(state.batch))
            if 'domain' not in batch:
                raise ValueError("StaticDomainWeighting needs batch['domain'] (DWMDataset batches carry it)")
            weights = batch_domain_weights(batch['domain'], self.table())
            batch[WEIGHT_KEY] = weights.to(batch['input_ids'].device)
            state.batch = batch
            if int(state.timestamp.batch) % self.log_every == 0:
                metrics = {}
                for d in torch.unique(batch['domain']).tolist():
                    name = self.domain_names[d] if self.domain_names and d < len(self.domain_names) else str(d)
                    metrics[f'static_domain/domain/{name}/weight'] = float(weights[batch['domain'] == d].mean())
                logger.log_metrics(metrics)
        elif event == Event.AFTER_LOSS:
            if WEIGHT_KEY in state.batch:
                apply_weighted_loss(state, state.batch[WEIGHT_KEY])
