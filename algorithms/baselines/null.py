"""Nulls and oracles for a benchmark of weighting methods: what a method's weights are worth beyond their spread.

* :func:`permute_within_batch`: a batch's weights in a random order. Trained with them, a method keeps the spread of
  its weights (and so their cost in effective batch size) but loses what they know about the samples: *its null*.
* :class:`PermutedWeights`: wraps any algorithm that sets ``batch['dwm_weight']`` at ``AFTER_DATALOADER`` (DWM in
  weight mode, :class:`~algorithms.baselines.StaticDomainWeighting`, ...) and permutes those weights within each
  batch before they enter the loss. (:class:`~algorithms.baselines.LossReweighting` computes its weights from the
  loss, later: it takes ``permute_seed`` instead.)
* :class:`DomainSelection`: the loader yields ``select_factor`` x the batch (a *pool*); train on ``1 /
  select_factor`` of it, drawn at random among the samples of ``keep_domains`` first (the *selection oracle* when
  those are the clean domains), or at random from the whole pool (``keep_domains=None``: the null of every selection
  method that keeps a fixed number of samples, since a permuted 0/1 selection mask is a uniformly random subset).
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from algorithms.baselines.static_domain import dataset_domain_names
from algorithms.dwm.functional import WEIGHT_KEY, ensure_labels, gumbel_top_k, subset_batch

__all__ = ['permute_within_batch', 'PermutedWeights', 'DomainSelection']


def _batch_seed(tag: str, seed: int, batch_index: int) -> int:
    digest = hashlib.sha256(f'{tag}:{seed}:{batch_index}'.encode()).digest()
    return int.from_bytes(digest[:8], 'little') & ((1 << 63) - 1)


def permute_within_batch(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``weights`` in a random order (the same multiset: the same mean, spread and ESS).

    Args:
        weights (torch.Tensor): ``[n]`` per-sample weights.
        generator (torch.Generator): CPU generator of the permutation.

    Returns:
        torch.Tensor: ``weights[perm]``, on ``weights``' device.
    """
    perm = torch.randperm(weights.shape[0], generator=generator)
    return weights[perm.to(weights.device)]


class PermutedWeights(Algorithm):
    """Run ``inner`` unchanged, except that the weights it puts in ``batch['dwm_weight']`` are permuted within each
    batch (a fresh permutation per batch, from ``seed`` and the batch index, so a resumed run repeats them).

    Example:
        .. code-block:: python

            from algorithms.baselines import PermutedWeights, StaticDomainWeighting
            null = PermutedWeights(StaticDomainWeighting({'DegradedRandomTokens': 0.0}), seed=0)
            trainer = Trainer(..., algorithms=[null])

    Args:
        inner (Algorithm): An algorithm that sets ``batch['dwm_weight']`` at ``AFTER_DATALOADER`` and puts
            ``state.batch['dwm_weight']`` into the loss later (DWM, the static and noise baselines).
        seed (int): Seed of the permutations. Default: ``0``.
    """

    def __init__(self, inner: Algorithm, seed: int = 0) -> None:
        self.inner, self.seed = inner, int(seed)

    def match(self, event: Event, state: State) -> bool:
        return self.inner.match(event, state)

    def apply(self, event: Event, state: State, logger: Logger):
        out = self.inner.apply(event, state, logger)
        if event == Event.AFTER_DATALOADER and isinstance(state.batch, dict) and WEIGHT_KEY in state.batch:
            generator = torch.Generator().manual_seed(_batch_seed('null', self.seed, int(state.timestamp.batch)))
            batch = dict(state.batch)
            batch[WEIGHT_KEY] = permute_within_batch(batch[WEIGHT_KEY], generator)
            state.batch = batch
        return out

    def __getattr__(self, name: str):  # the wrapped algorithm's attributes (metrics, weighter) stay reachable
        if name == 'inner':
            raise AttributeError(name)
        return getattr(self.inner, name)


class DomainSelection(Algorithm):
    """Train on ``1 / select_factor`` of each loader batch: samples of ``keep_domains`` first, drawn at random among
    them, then (if there are too few) others at random; with ``keep_domains=None``, a random subset.

    Events: ``AFTER_DATALOADER`` only (the kept samples get weight 1: the plain loss).

    Args:
        keep_domains (Sequence[str], optional): Domain names to draw from first. Default: ``None`` (random subset).
        select_factor (int): Loader batch / trained batch. Default: ``4``.
        domain_names (Sequence[str], optional): Names of the ids in ``batch['domain']``. Default: ``None`` (the
            train dataset's ``domain_names``, read at ``FIT_START``).
        seed (int): Seed of the draws (one generator per batch index). Default: ``0``.
    """

    def __init__(self, keep_domains: Optional[Sequence[str]] = None, select_factor: int = 4,
                 domain_names: Optional[Sequence[str]] = None, seed: int = 0) -> None:
        if select_factor < 1:
            raise ValueError(f'DomainSelection: select_factor must be >= 1, got {select_factor}')
        self.keep_domains = None if keep_domains is None else list(keep_domains)
        self.select_factor, self.seed = int(select_factor), int(seed)
        self.domain_names = list(domain_names) if domain_names is not None else None

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.FIT_START, Event.AFTER_DATALOADER)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            if self.domain_names is None:
                self.domain_names = dataset_domain_names(state)
            return
        batch = ensure_labels(dict(state.batch))
        n = batch['input_ids'].shape[0]
        scores = torch.zeros(n, dtype=torch.float64)
        if self.keep_domains is not None:
            if self.domain_names is None:
                raise ValueError('DomainSelection: keep_domains is keyed by name; pass domain_names=')
            keep_ids = [i for i, name in enumerate(self.domain_names) if name in self.keep_domains]
            kept = torch.isin(batch['domain'].cpu().long(), torch.tensor(keep_ids, dtype=torch.long))
            scores = torch.where(kept, 0.0, -1e4).double()  # Gumbel noise never lifts -1e4 above 0
        generator = torch.Generator().manual_seed(_batch_seed('select', self.seed, int(state.timestamp.batch)))
        index = gumbel_top_k(scores, max(1, n // self.select_factor), generator)
        batch = subset_batch(batch, index, n)
        batch[WEIGHT_KEY] = torch.ones(index.numel(), device=batch['input_ids'].device)
        state.batch = batch
