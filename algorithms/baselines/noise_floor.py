"""``NoiseFloorWeighting``: tiny random per-sample weights, the noise floor of a data weighting benchmark.

A method whose weights carry no information about the data, but perturb training as much as a cautious data
weighting method does, changes the held-out loss by some amount per seed: differences smaller than that are noise.

Events (as :class:`~algorithms.baselines.StaticDomainWeighting`):

* ``AFTER_DATALOADER``: ``batch['dwm_weight'] = noise_floor_weights(n, sigma, generator)`` (mean 1 over the batch),
  from the algorithm's own generator (seeded by ``seed``), so the global RNG, the data order and the model's
  initialisation are those of a uniform run of the same seed.
* ``AFTER_LOSS``: ``state.loss`` becomes ``sum_i w_i c_i`` with DWM's loss terms.
"""

from __future__ import annotations

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from algorithms.baselines.static_domain import apply_weighted_loss
from algorithms.dwm.functional import WEIGHT_KEY, ensure_labels

__all__ = ['NoiseFloorWeighting', 'noise_floor_weights']


def noise_floor_weights(n: int, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``w = 1 + sigma * N(0, 1)`` per sample, clipped at ``0.01`` (positive), renormalised to mean 1.

    Args:
        n (int): Samples in the batch.
        sigma (float): Standard deviation of the noise (before the renormalisation).
        generator (torch.Generator): The noise's own generator.

    Returns:
        torch.Tensor: ``[n]`` float32 weights, positive, mean 1.
    """
    if sigma < 0:
        raise ValueError(f'noise_floor_weights: sigma must be >= 0, got {sigma}')
    w = (1.0 + sigma * torch.randn(n, generator=generator, dtype=torch.float64)).clamp(min=0.01)
    return (w / w.mean()).float()


class NoiseFloorWeighting(Algorithm):
    """Weight every sample's loss by ``1 + sigma * N(0, 1)``, renormalised to mean 1 per batch.

    Example:
        .. code-block:: python

            from algorithms.baselines import NoiseFloorWeighting
            trainer = Trainer(..., algorithms=[NoiseFloorWeighting(sigma=0.02, seed=0)])

    Args:
        sigma (float): Standard deviation of the weights. Default: ``0.02`` (the within-batch weight spread of
            DWM's trust-region refits on the quality benchmark, ~0.02-0.05).
        seed (int): Seed of the weights' own generator. Default: ``0``.
    """

    def __init__(self, sigma: float = 0.02, seed: int = 0) -> None:
        if sigma < 0:
            raise ValueError(f'NoiseFloorWeighting: sigma must be >= 0, got {sigma}')
        self.sigma, self.seed = float(sigma), int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.AFTER_DATALOADER, Event.AFTER_LOSS)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.AFTER_DATALOADER:
            batch = ensure_labels(dict(state.batch))
            weights = noise_floor_weights(batch['input_ids'].shape[0], self.sigma, self.generator)
            batch[WEIGHT_KEY] = weights.to(batch['input_ids'].device)
            state.batch = batch
        elif event == Event.AFTER_LOSS and WEIGHT_KEY in state.batch:
            apply_weighted_loss(state, state.batch[WEIGHT_KEY])
