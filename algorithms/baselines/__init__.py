"""Simple baselines that reweight per-sample losses the way DWM does (``batch['dwm_weight']``, DWM's loss terms).

* :class:`StaticDomainWeighting`: fixed per-domain weights, e.g. from a short proxy run
  (:func:`domain_weights_from_alignment`).
* :class:`LossReweighting`: online loss-based per-sample weights, *LinUpper* of Sow et al. (ICLR 2025)
  (:func:`linupper_weights`).
* :class:`NoiseFloorWeighting`: tiny random per-sample weights (:func:`noise_floor_weights`), the noise floor a
  benchmark compares the others with.

See ``README.md`` in this folder for the card.
"""

from algorithms.baselines.loss_reweighting import LossReweighting
from algorithms.baselines.noise_floor import NoiseFloorWeighting, noise_floor_weights
from algorithms.baselines.static_domain import StaticDomainWeighting, apply_weighted_loss
from algorithms.baselines.weights import batch_domain_weights, domain_weights_from_alignment, linupper_weights

__all__ = [
    'LossReweighting',
    'NoiseFloorWeighting',
    'StaticDomainWeighting',
    'apply_weighted_loss',
    'batch_domain_weights',
    'domain_weights_from_alignment',
    'linupper_weights',
    'noise_floor_weights',
]
