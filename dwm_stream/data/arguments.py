"""Type checks on the arguments of ``DWMDataset``, ``DWMStream`` and ``build_dataloader``, at construction.

``dwm-stream train`` checks its YAML against :mod:`dwm_stream.train.config`; these checks cover every other way in
(Python callers, LLM Foundry handing a dataset config over raw) with the same rule: a string (or a number) where
a bool belongs, and a string where a number belongs, are errors naming the key. YAML's ``shuffle: "false"`` is a
non-empty string, which Python, and so streaming, would take as true.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral, Real
from typing import Any

__all__ = ['ArgumentTypeError', 'check_dataset_arguments', 'check_loader_arguments', 'check_stream_arguments']


class ArgumentTypeError(TypeError, ValueError):
    """A dataset or loader argument of the wrong type; the message names the key (a ``ValueError`` too, as
    :class:`dwm_stream.train.config.ConfigError` is)."""


def _is_bool(x: Any) -> bool:
    return isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _is_float(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _is_str(x: Any) -> bool:
    return isinstance(x, str)


def _is_int_or_str(x: Any) -> bool:
    return _is_int(x) or _is_str(x)


_KINDS = {
    'bool': (_is_bool, 'a bool (true or false, unquoted)'),
    'int': (_is_int, 'an int'),
    'float': (_is_float, 'a number'),
    'str': (_is_str, 'a string'),
    'int|str': (_is_int_or_str, 'an int or a string such as "100mb"'),
}

# StreamingDataset's arguments (mosaicml-streaming 0.12) and DWMDataset's own; `None` is accepted for each.
_DATASET = {
    'remote': 'str', 'local': 'str', 'split': 'str', 'selection': 'str', 'download_retry': 'int',
    'download_timeout': 'float', 'validate_hash': 'str', 'keep_zip': 'bool', 'epoch_size': 'int|str',
    'predownload': 'int', 'cache_limit': 'int|str', 'sampling_method': 'str', 'sampling_granularity': 'int',
    'partition_algo': 'str', 'num_canonical_nodes': 'int', 'batch_size': 'int', 'shuffle': 'bool',
    'shuffle_algo': 'str', 'shuffle_seed': 'int', 'shuffle_block_size': 'int', 'batching_method': 'str',
    'allow_unsafe_types': 'bool', 'replication': 'int', 'max_seq_len': 'int', 'token_encoding_type': 'str',
}
# Stream's arguments and DWMStream's own.
_STREAM = {
    'remote': 'str', 'local': 'str', 'split': 'str', 'proportion': 'float', 'repeat': 'float', 'choose': 'int',
    'download_retry': 'int', 'download_timeout': 'float', 'validate_hash': 'str', 'keep_zip': 'bool',
    'selection': 'str', 'name': 'str',
}
_LOADER = {
    'device_batch_size': 'int', 'num_workers': 'int', 'drop_last': 'bool', 'prefetch_factor': 'int',
    'persistent_workers': 'bool', 'pin_memory': 'bool', 'timeout': 'float',
}
_POSITIVE = {'max_seq_len', 'batch_size', 'device_batch_size', 'prefetch_factor'}
_NON_NEGATIVE = {'download_retry', 'num_workers', 'predownload', 'download_timeout', 'timeout'}


def _check(kinds: Mapping[str, str], values: Mapping[str, Any], where: str) -> None:
    prefix = f'{where}.' if where else ''
    for key, value in values.items():
        kind = kinds.get(key)
        if kind is None or value is None:
            continue
        ok, expected = _KINDS[kind]
        if not ok(value):
            fix = 'write it without quotes' if isinstance(value, str) else f'give {expected}'
            raise ArgumentTypeError(f'{prefix}{key}: expected {expected}, got {type(value).__name__} {value!r}; '
                                    f'{fix}.')
        if key in _POSITIVE and value <= 0:
            raise ArgumentTypeError(f'{prefix}{key}: must be > 0, got {value!r}.')
        if key in _NON_NEGATIVE and value < 0:
            raise ArgumentTypeError(f'{prefix}{key}: must be >= 0, got {value!r}.')


def check_dataset_arguments(values: Mapping[str, Any], where: str = '') -> None:
    """Check ``DWMDataset`` keyword arguments (or a ``dataset:`` config) by key; unknown keys are left to the callee.

    Args:
        values (Mapping): Argument name -> value.
        where (str): Config path prefixed to the key in messages (``train_loader.dataset``). Default: none.

    Raises:
        ArgumentTypeError: ``<where>.<key>: expected <type>, got <type> <value>; <what to do>.``
    """
    _check(_DATASET, values, where)


def check_stream_arguments(values: Mapping[str, Any], where: str = '') -> None:
    """As :func:`check_dataset_arguments`, for ``DWMStream`` arguments (one entry of ``streams``)."""
    _check(_STREAM, values, where)


def check_loader_arguments(values: Mapping[str, Any], where: str = '') -> None:
    """As :func:`check_dataset_arguments`, for ``build_dataloader``'s loader arguments."""
    _check(_LOADER, values, where)
