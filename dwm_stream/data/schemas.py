"""The schemas of a ``dataset:`` section, one of its ``streams`` and a loader: the signatures of ``DWMDataset`` (with
``StreamingDataset``'s arguments, which it passes on), ``DWMStream`` (with ``Stream``'s) and ``build_dataloader``, read
from their source (:func:`dwm_stream.schema.source_signature`), so that a YAML is checked before torch and streaming
are imported and no argument or default is written out a second time. The value ranges the types cannot say are
listed here too.

The YAML schema (:mod:`dwm_stream.train.config`) nests these; the constructors check their own keyword arguments with
them (:func:`check_dataset_arguments`...), for the callers that do not come through a YAML.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Mapping, Optional

from omegaconf import MISSING

from dwm_stream.schema import check_arguments, check_ranges, signature_schema, source_signature

__all__ = ['dataset_schema', 'stream_schema', 'loader_schema', 'check_dataset_arguments', 'check_stream_arguments',
           'check_loader_arguments', 'LOADER_OWN_ARGUMENTS']

_DATASET_MODULE = 'dwm_stream.data.dataset'
# build_dataloader's arguments that a loader section does not set: the dataset section is a key of its own, and the
# batch size and the key path come from the run.
LOADER_OWN_ARGUMENTS = ('dataset_cfg', 'device_batch_size', 'where')
# What the types do not say: sizes that must be positive, counts and times that must not be negative.
_POSITIVE = ('max_seq_len', 'batch_size', 'device_batch_size', 'prefetch_factor')
_NON_NEGATIVE = ('download_retry', 'num_workers', 'predownload', 'download_timeout', 'timeout')


def _joined(*signatures: list[inspect.Parameter], leave_out: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """The parameters of a subclass's ``__init__`` and of the one it passes ``**kwargs`` on to, in that order."""
    seen, out = set(leave_out), []
    for parameters in signatures:
        for p in parameters:
            if p.name not in seen and p.kind != p.VAR_KEYWORD:
                seen.add(p.name)
                out.append(p)
    return out


@functools.cache
def stream_schema() -> type:
    """One entry of ``streams``: ``DWMStream``'s arguments (``selection``, ``name``) and ``Stream``'s."""
    return signature_schema(_joined(source_signature(_DATASET_MODULE, 'DWMStream.__init__'),
                                    source_signature('streaming.base.stream', 'Stream.__init__')),
                            name='StreamConfig')


@functools.cache
def dataset_schema() -> type:
    """A ``dataset:`` section: ``DWMDataset``'s arguments and ``StreamingDataset``'s (but the registry-built
    stream's, ``stream_name``/``stream_config``, which ``DWMDataset`` never uses), with ``streams`` a mapping of
    name -> :func:`stream_schema` (a list is named by position)."""
    parameters = _joined(source_signature(_DATASET_MODULE, 'DWMDataset.__init__'),
                         source_signature('streaming.base.dataset', 'StreamingDataset.__init__'),
                         leave_out=('streams', 'stream_name', 'stream_config'))
    return signature_schema(parameters, name='DatasetConfig',
                            fields=[('streams', Optional[dict[str, stream_schema()]], None)])


@functools.cache
def loader_schema() -> type:
    """A loader section with ``name: dwm``: ``build_dataloader``'s arguments and the ``dataset``."""
    return signature_schema(source_signature('dwm_stream.data.loader', 'build_dataloader'),
                            leave_out=LOADER_OWN_ARGUMENTS, name='LoaderConfig',
                            fields=[('name', str, 'dwm'), ('dataset', dataset_schema(), MISSING)])


def check_dataset_arguments(values: Mapping[str, Any], where: str = '') -> None:
    """The types and ranges of ``DWMDataset`` keyword arguments (or a ``dataset:`` mapping); ``streams`` and unknown
    keys are left to the callee.

    Raises:
        ConfigError: ``<where>.<key>: expected <type>, got <type> (<value>).``, or a value out of range.
    """
    check_arguments(dataset_schema(), {k: v for k, v in values.items() if k != 'streams'}, where)
    check_ranges(values, where, _POSITIVE, _NON_NEGATIVE)


def check_stream_arguments(values: Mapping[str, Any], where: str = '') -> None:
    """As :func:`check_dataset_arguments`, for ``DWMStream`` arguments (one entry of ``streams``)."""
    check_arguments(stream_schema(), values, where)
    check_ranges(values, where, _POSITIVE, _NON_NEGATIVE)


def check_loader_arguments(values: Mapping[str, Any], where: str = '') -> None:
    """As :func:`check_dataset_arguments`, for ``build_dataloader``'s loader arguments."""
    check_arguments(loader_schema(), {k: v for k, v in values.items() if k != 'device_batch_size'}, where)
    check_ranges(values, where, _POSITIVE, _NON_NEGATIVE)
