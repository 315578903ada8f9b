"""DWM: a batch-aware Data Weighting Model that reweights per-sample losses, refit by bi-level optimisation.

Yu et al., "LLM Data Selection and Utilization via Dynamic Bi-level Optimization", ICML 2025 (arXiv 2507.16178).

What a user writes in a script or a YAML: ``DWM`` (the Composer algorithm) and ``DWMConfig`` (its options),
``WeighterConfig``/``Weighter`` (the model that scores a batch), ``ValidationBatches`` (the LAMBADA-format validation
set of the refit) and ``load_saved_weighters`` (a run's saved weighters, for transfer; also importable as
``load_schedule``). The pure functions are in ``functional`` (losses, weights, batches), ``hypergradient`` (the
exact one-step hypergradient) and ``refit`` (:func:`algorithms.dwm.refit.refit`, the bi-level refit step, callable
without a ``Trainer``); ``DWM`` only wires them into Composer's events. See ``README.md`` in this folder for the method card.

The names are imported when first used, so ``algorithms.dwm.config`` can be read (e.g. to check a YAML) without
torch or Composer.
"""

import importlib
from typing import Any

_WHERE = {
    'DWM': 'algorithms.dwm.dwm',
    'DWMConfig': 'algorithms.dwm.config',
    'WeighterConfig': 'algorithms.dwm.config',
    'Weighter': 'algorithms.dwm.weighter',
    'ValidationBatches': 'algorithms.dwm.validation',
    'load_saved_weighters': 'algorithms.dwm.export',
    'load_schedule': 'algorithms.dwm.export',
}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    return getattr(importlib.import_module(_WHERE[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
