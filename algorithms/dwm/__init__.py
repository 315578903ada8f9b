"""DWM: a batch-aware Data Weighting Model that reweights per-sample losses, refit by bi-level optimisation.

Yu et al., "LLM Data Selection and Utilization via Dynamic Bi-level Optimization", ICML 2025 (arXiv 2507.16178).

What a user writes in a script or a YAML: ``DWM`` (the Composer algorithm), ``WeighterConfig``/``Weighter`` (the
model that scores a batch), ``ValidationBatches`` (the LAMBADA-format validation set of the refit) and
``load_schedule`` (a saved per-stage schedule, for transfer). The pure functions are in ``functional`` (losses,
weights, batches) and ``hypergradient`` (the exact one-step hypergradient); ``DWM`` only wires them into Composer's
events (``INIT``, ``FIT_START``, ``AFTER_DATALOADER``, ``BEFORE_FORWARD``, ``AFTER_FORWARD``, ``AFTER_LOSS``,
``BATCH_END``). See ``README.md`` in this folder for the method card.
"""

from algorithms.dwm.dwm import DWM
from algorithms.dwm.export import load_schedule
from algorithms.dwm.validation import ValidationBatches
from algorithms.dwm.weighter import Weighter, WeighterConfig

__all__ = ['DWM', 'WeighterConfig', 'Weighter', 'ValidationBatches', 'load_schedule']
