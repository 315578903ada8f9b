"""Simple baselines that reweight per-sample losses the way DWM does (``batch['dwm_weight']``, DWM's loss terms).

* :class:`StaticDomainWeighting`: fixed per-domain weights, e.g. from a short proxy run
  (:func:`domain_weights_from_alignment`).
* :class:`LossReweighting`: online loss-based per-sample weights, *LinUpper* of Sow et al. (ICLR 2025)
  (:func:`linupper_weights`).
* :class:`ReducibleLossWeighting`: the same rule on the reducible loss (loss minus the loss under a model of
  held-out data), a RHO-LOSS rule.
* :class:`NoiseFloorWeighting`: tiny random per-sample weights (:func:`noise_floor_weights`), the noise floor a
  benchmark compares the others with.
* :class:`PermutedWeights`, :func:`permute_within_batch`: any method's weights permuted within each batch, its
  *null*; :class:`DomainSelection`: the selection oracle (clean domains first from a larger pool) and its null
  (a random subset).

See ``README.md`` in this folder for the card.
"""

from algorithms.baselines.loss_reweighting import LossReweighting, ReducibleLossWeighting
from algorithms.baselines.null import DomainSelection, PermutedWeights, permute_within_batch
from algorithms.baselines.noise_floor import NoiseFloorWeighting, noise_floor_weights
from algorithms.baselines.static_domain import StaticDomainWeighting, apply_weighted_loss
from algorithms.baselines.weights import batch_domain_weights, domain_weights_from_alignment, linupper_weights

__all__ = [
    'DomainSelection',
    'PermutedWeights',
    'ReducibleLossWeighting',
    'permute_within_batch',
    'LossReweighting',
    'NoiseFloorWeighting',
    'StaticDomainWeighting',
    'apply_weighted_loss',
    'batch_domain_weights',
    'domain_weights_from_alignment',
    'linupper_weights',
    'noise_floor_weights',
]
