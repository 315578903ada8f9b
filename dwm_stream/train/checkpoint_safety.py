"""Load Composer checkpoints with ``torch.load(weights_only=True)`` instead of full pickle.

Composer 0.32.1 loads every checkpoint with ``torch.load(..., weights_only=False)``
(``composer.utils.checkpoint._torch_load_with_validation``), i.e. it unpickles whatever the file holds:
a checkpoint from a bucket someone else can write could run arbitrary code on load. Composer has no
option to change that, so :func:`install` replaces that one function (``dwm-stream train`` calls it
before building the ``Trainer``) with a load through PyTorch's restricted ``weights_only`` unpickler,
which accepts tensors, containers and primitives plus the few extra types that a Composer checkpoint
of a dwm-stream run really holds (:data:`SAFE_GLOBALS`: ``datetime.timedelta`` in the timestamp,
numpy arrays and dtypes in the RNG state, ``TorchVersion`` in the metadata). Anything else is
refused with :class:`UnsafeCheckpointError`, naming the file and the offending globals.

Weighter and schedule files never use pickle: ``algorithms.dwm.export`` writes safetensors + JSON.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Union

__all__ = ['SAFE_GLOBALS', 'UnsafeCheckpointError', 'safe_load', 'install', 'installed']


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds pickled objects outside the ``weights_only`` allowlist."""


def _safe_globals() -> list:
    import numpy as np
    from torch.torch_version import TorchVersion
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    extra: list = [datetime.timedelta, _reconstruct, np.ndarray, np.dtype, TorchVersion]
    dtypes = getattr(np, 'dtypes', None)  # the per-dtype classes numpy >= 1.25 pickles dtypes with
    if dtypes is not None:
        extra += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith('DType')]
    return extra


SAFE_GLOBALS: list = _safe_globals()


def safe_load(path: Union[str, Path], map_location: Any = 'cpu') -> Any:
    """``torch.load(path, weights_only=True)`` with :data:`SAFE_GLOBALS` allowed.

    Raises:
        UnsafeCheckpointError: The file needs other globals (it would run code if fully unpickled).
    """
    import pickle

    import torch
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            names = sorted(set(unsafe) - {f'{g.__module__}.{g.__qualname__}' for g in SAFE_GLOBALS})
        except Exception:  # noqa: BLE001 - not a zip checkpoint; the unpickler's message says why
            names = []
        raise UnsafeCheckpointError(
            f'refusing to load checkpoint {path}: it holds pickled objects outside the weights_only '
            f'allowlist{f" ({names})" if names else ""}, and unpickling them could run arbitrary code. '
            f'Only load checkpoints written by dwm-stream/Composer from a trusted location. '
            f'({_reason(e)})') from None


def _reason(error: BaseException) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for line in lines:
        if 'WeightsUnpickler error' in line or 'Unsupported' in line:
            return line
    return lines[0] if lines else type(error).__name__


_installed = False


def installed() -> bool:
    return _installed


def install() -> None:
    """Make Composer load checkpoints through :func:`safe_load` (idempotent)."""
    global _installed
    if _installed:
        return
    from composer.utils import checkpoint as composer_checkpoint
    ensure_valid = composer_checkpoint._ensure_valid_checkpoint

    def _torch_load_with_validation(checkpoint_filepath, map_location):
        return safe_load(ensure_valid(checkpoint_filepath), map_location=map_location)

    composer_checkpoint._torch_load_with_validation = _torch_load_with_validation
    _installed = True
