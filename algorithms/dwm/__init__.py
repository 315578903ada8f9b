"""DWM: a batch-aware Data Weighting Model that reweights per-sample losses, refit by bi-level optimisation.

Yu et al., "LLM Data Selection and Utilization via Dynamic Bi-level Optimization", ICML 2025 (arXiv 2507.16178).

The algorithm runs on ``Event.INIT``, ``Event.FIT_START``, ``Event.AFTER_DATALOADER``, ``Event.AFTER_LOSS`` and
``Event.BATCH_END``. See ``README.md`` in this folder for the method card.
"""

from algorithms.dwm.dwm import (DWM, WEIGHT_KEY, ensure_labels, gumbel_top_k, kl_to_uniform, normalize_with_prior,
                                refit_objective, subset_batch, uniform_if_nonfinite, weight_statistics)
from algorithms.dwm.export import load_schedule, load_weighter, save_weighter, write_schedule
from algorithms.dwm.hypergradient import (HypergradientResult, adam_preconditioner, directional_derivative_fd,
                                          directional_derivative_jvp, hypergradient, hypergradient_autograd, lookahead)
from algorithms.dwm.loss import loss_contributions, per_sample_loss, per_sample_loss_sums, weighted_loss
from algorithms.dwm.schedule import boundary_reached, stage_boundaries
from algorithms.dwm.validation import (ValidationBatches, build_validation_batches, read_lambada_jsonl,
                                       tokenize_lambada_example)
from algorithms.dwm.weighter import Weighter, WeighterConfig, mean_pool, normalize_embeddings

__all__ = [
    'DWM',
    'WEIGHT_KEY',
    'Weighter',
    'WeighterConfig',
    'mean_pool',
    'normalize_embeddings',
    'HypergradientResult',
    'adam_preconditioner',
    'lookahead',
    'hypergradient',
    'hypergradient_autograd',
    'directional_derivative_jvp',
    'directional_derivative_fd',
    'per_sample_loss',
    'per_sample_loss_sums',
    'loss_contributions',
    'weighted_loss',
    'stage_boundaries',
    'boundary_reached',
    'read_lambada_jsonl',
    'tokenize_lambada_example',
    'build_validation_batches',
    'ValidationBatches',
    'save_weighter',
    'load_weighter',
    'write_schedule',
    'load_schedule',
    'ensure_labels',
    'normalize_with_prior',
    'uniform_if_nonfinite',
    'weight_statistics',
    'kl_to_uniform',
    'refit_objective',
    'gumbel_top_k',
    'subset_batch',
]
