"""The YAML schema of ``dwm-stream train`` as structured dataclasses, checked by OmegaConf (as LLM Foundry checks its
``TrainConfig``).

One dataclass per section: :class:`TrainConfig` at the top level, :class:`LoaderConfig` for ``train_loader`` and
``eval_loader``, :class:`DatasetConfig` for their ``dataset`` (every ``StreamingDataset`` argument plus
``selection`` and ``streams: {name: StreamConfig}``), :class:`DWMConfig` for ``algorithms.dwm`` (every ``DWM``
argument; ``weighter`` is :class:`algorithms.dwm.WeighterConfig` itself), and the optimizer, scheduler, callbacks and
loggers. ``tests/dwm_stream/test_config.py`` checks that the dataset, stream, DWM, loader, scheduler, callback and
logger schemas match the signatures of what they configure, so the two cannot drift apart.

:func:`check` merges a mapping into its schema key by key: OmegaConf checks the types (and fills the defaults),
and every error is a :class:`ConfigError` that names the full key path (``algorithms.dwm.weighter.d_model``) and,
for unknown keys, the valid ones. It is stricter than OmegaConf in one way: a string (or a number) where a bool
belongs, and a string where a number belongs, are errors, not conversions (``shuffle: "false"`` is not ``True``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, TypeVar, Union

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from algorithms.dwm import WeighterConfig

__all__ = [
    'ConfigError', 'check', 'check_train_config', 'check_scheduler',
    'TrainConfig', 'ModelConfig', 'TokenizerConfig', 'LoaderConfig', 'EvalLoaderConfig', 'DatasetConfig',
    'StreamConfig', 'AlgorithmsConfig', 'DWMConfig', 'RefitLoaderConfig', 'ValidationConfig', 'OptimizerConfig',
    'SCHEDULER_CONFIGS', 'CallbacksConfig', 'LoggersConfig',
]

T = TypeVar('T')


class ConfigError(ValueError):
    """A config value that does not fit the schema; the message names the full key path."""


# ------------------------------------------------------------------------------------------------ data
@dataclass
class StreamConfig:
    """One entry of ``dataset.streams``: every ``streaming.Stream`` argument plus ``selection``."""

    remote: Optional[str] = None
    local: Optional[str] = None
    split: Optional[str] = None
    proportion: Optional[float] = None
    repeat: Optional[float] = None
    choose: Optional[int] = None
    download_retry: Optional[int] = None
    download_timeout: Optional[float] = None
    validate_hash: Optional[str] = None
    keep_zip: Optional[bool] = None
    selection: Optional[str] = None  # a selection file for this stream (dwm_stream.data.selection)


@dataclass
class DatasetConfig:
    """``train_loader.dataset`` (and every other ``dataset:``): the arguments of ``DWMDataset``.

    Every ``StreamingDataset.__init__`` argument with its default, plus ``selection`` (with ``remote``/``local``)
    and ``streams`` as a mapping of name -> :class:`StreamConfig` (a list is accepted and named by position).
    ``stream_name``/``stream_config`` are left out: ``DWMDataset`` always builds its own streams.
    """

    streams: Optional[dict[str, StreamConfig]] = None
    remote: Optional[str] = None
    local: Optional[str] = None
    split: Optional[str] = None
    selection: Optional[str] = None
    download_retry: int = 2
    download_timeout: float = 60.0
    validate_hash: Optional[str] = None
    keep_zip: bool = False
    epoch_size: Optional[Union[str, int]] = None
    predownload: Optional[int] = None
    cache_limit: Optional[Union[str, int]] = None
    sampling_method: str = 'balanced'
    sampling_granularity: int = 1
    partition_algo: str = 'relaxed'
    num_canonical_nodes: Optional[int] = None
    batch_size: Optional[int] = None
    shuffle: bool = False
    shuffle_algo: str = 'py1e'
    shuffle_seed: int = 9176
    shuffle_block_size: Optional[int] = None
    batching_method: str = 'random'
    allow_unsafe_types: bool = False
    replication: Optional[int] = None


@dataclass
class LoaderConfig:
    """``train_loader``: ``name: dwm``, the ``dataset``, and the other arguments of
    ``dwm_stream.data.loader.build_dataloader``."""

    name: str = 'dwm'
    dataset: DatasetConfig = MISSING
    num_workers: int = 0
    drop_last: bool = True
    prefetch_factor: Optional[int] = None
    persistent_workers: bool = False
    pin_memory: bool = False
    timeout: float = 0.0


@dataclass
class EvalLoaderConfig(LoaderConfig):
    """``eval_loader``: as :class:`LoaderConfig`, but the last partial batch is evaluated too."""

    drop_last: bool = False


# ------------------------------------------------------------------------------------------------ DWM
@dataclass
class RefitLoaderConfig:
    """``algorithms.dwm.refit_loader``: batches from the training distribution, with their own order.

    ``dataset`` keys override the train loader's dataset; ``batch_size`` defaults to the device batch size.
    """

    dataset: Optional[DatasetConfig] = None
    batch_size: Optional[int] = None


@dataclass
class ValidationConfig:
    """``algorithms.dwm.validation``: ``lambada: PATH`` (a LAMBADA-format file) or ``dataset: {...}`` (held-out MDS)."""

    lambada: Optional[str] = None
    dataset: Optional[DatasetConfig] = None
    tokenizer: Optional[str] = None
    batch_size: Optional[int] = None
    max_length: Optional[int] = None


@dataclass
class DWMConfig:
    """``algorithms.dwm``: every ``algorithms.dwm.DWM`` argument with its default, the two loaders as configs."""

    num_stages: int = 5
    stage_boundaries: Optional[list[str]] = None
    refit_steps: int = 20
    refit_lr: float = 1e-3
    lookahead_lr: Optional[float] = None
    lookahead: str = 'sgd'
    hypergrad: str = 'jvp'
    fd_eps: float = 1e-3
    warmup_uniform: bool = False
    weighter: Optional[WeighterConfig] = None
    tau: Optional[float] = None
    mix_uniform: Optional[float] = None
    refit_loader: Optional[RefitLoaderConfig] = None  # DWM's refit_dataloader, as a config
    validation: Optional[ValidationConfig] = None  # DWM's val_dataloader, as a config
    use_prior_weight: bool = True
    score_names: Optional[list[str]] = None
    domain_names: Optional[list[str]] = None
    save_dir: Optional[str] = None
    schedule: Optional[str] = None
    refit: bool = True
    mode: str = 'weight'
    select_factor: int = 4
    loss_normalization: str = 'token'
    normalize_hypergradient: bool = True
    seed: int = 0
    log_every: int = 1
    single_loss_pass: bool = True
    refit_checkpoint_weighter: bool = False
    refit_kl: float = 0.0
    refit_backbone_lr_scale: float = 1.0
    val_batches_per_step: int = 1
    lookahead_steps: int = 1
    ess_band: list[float] = field(default_factory=lambda: [0.5, 1.0])
    dead_tol: float = 1e-6


@dataclass
class AlgorithmsConfig:
    """``algorithms``: the algorithms dwm-stream builds, by name."""

    dwm: Optional[DWMConfig] = None


# ------------------------------------------------------------------------------------------------ model, optim
@dataclass
class ModelConfig:
    """``model``: ``name: llama`` (fresh, ``config_overrides`` checked against ``LlamaConfig``) or ``hf_causal_lm``."""

    name: str = 'llama'
    config_overrides: dict[str, Any] = field(default_factory=dict)
    pretrained_model_name_or_path: Optional[str] = None
    pretrained: bool = False
    init_device: str = 'cpu'
    attn_implementation: str = 'sdpa'


@dataclass
class TokenizerConfig:
    """``tokenizer``: a local tokenizer directory or an HF name, and keyword arguments for loading it."""

    name: str = MISSING
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizerConfig:
    """``optimizer``: ``decoupled_adamw`` or ``adamw``; an unset (``null``) value keeps the optimizer's default."""

    name: str = 'decoupled_adamw'
    lr: Optional[float] = None
    betas: Optional[list[float]] = None
    eps: Optional[float] = None
    weight_decay: Optional[float] = None


@dataclass
class CosineWithWarmupSchedulerConfig:
    """``scheduler: {name: cosine_with_warmup}``: Composer's ``CosineAnnealingWithWarmupScheduler``."""

    t_warmup: str = MISSING
    t_max: str = '1dur'
    alpha_f: float = 0.0
    scale_warmup: bool = False


@dataclass
class LinearDecayWithWarmupSchedulerConfig:
    """``scheduler: {name: linear_decay_with_warmup}``: Composer's ``LinearWithWarmupScheduler``."""

    t_warmup: str = MISSING
    alpha_i: float = 1.0
    alpha_f: float = 0.0
    t_max: str = '1dur'
    scale_warmup: bool = False


@dataclass
class ConstantWithWarmupSchedulerConfig:
    """``scheduler: {name: constant_with_warmup}``: Composer's ``ConstantWithWarmupScheduler``."""

    t_warmup: str = MISSING
    alpha: float = 1.0
    t_max: str = '1dur'
    scale_warmup: bool = False


# ``scheduler.name`` -> the schema of the other keys.
SCHEDULER_CONFIGS: dict[str, type] = {
    'cosine_with_warmup': CosineWithWarmupSchedulerConfig,
    'linear_decay_with_warmup': LinearDecayWithWarmupSchedulerConfig,
    'constant_with_warmup': ConstantWithWarmupSchedulerConfig,
}


# ------------------------------------------------------------------------------------------------ callbacks, loggers
@dataclass
class LRMonitorConfig:
    """Composer's ``LRMonitor`` (no arguments)."""


@dataclass
class SpeedMonitorConfig:
    """Composer's ``SpeedMonitor``."""

    window_size: int = 100
    gpu_flops_available: Optional[float] = None
    time_unit: str = 'hours'


@dataclass
class MemoryMonitorConfig:
    """Composer's ``MemoryMonitor``."""

    memory_keys: Optional[dict[str, str]] = None
    dist_aggregate_batch_interval: Optional[int] = None


@dataclass
class RuntimeEstimatorConfig:
    """Composer's ``RuntimeEstimator``."""

    skip_batches: int = 1
    time_unit: str = 'hours'


@dataclass
class TrainedSamplesConfig:
    """``dwm_stream.train.callbacks.TrainedSamples`` (default file ``<run_dir>/trained_samples-rank{rank}.jsonl``)."""

    filename: Optional[str] = None
    fsync: bool = False


@dataclass
class CallbacksConfig:
    """``callbacks``: each key enables a callback (``{}`` or ``null`` for its defaults)."""

    lr_monitor: Optional[LRMonitorConfig] = None
    speed_monitor: Optional[SpeedMonitorConfig] = None
    memory_monitor: Optional[MemoryMonitorConfig] = None
    runtime_estimator: Optional[RuntimeEstimatorConfig] = None
    trained_samples: Optional[TrainedSamplesConfig] = None


@dataclass
class MetricsJSONLConfig:
    """``dwm_stream.train.loggers.MetricsJSONLLogger`` (default file ``<run_dir>/metrics.jsonl``)."""

    filename: Optional[str] = None


@dataclass
class FileLoggerConfig:
    """Composer's ``FileLogger``."""

    filename: str = '{run_name}/logs-rank{rank}.txt'
    remote_file_name: Optional[str] = None
    capture_stdout: bool = True
    capture_stderr: bool = True
    buffer_size: int = 1
    log_traces: bool = True
    flush_interval: int = 100
    overwrite: bool = False


@dataclass
class TensorboardLoggerConfig:
    """Composer's ``TensorboardLogger``."""

    log_dir: Optional[str] = None
    flush_interval: int = 100
    rank_zero_only: bool = True


@dataclass
class LoggersConfig:
    """``loggers``: each key enables a logger (``{}`` or ``null`` for its defaults)."""

    metrics_jsonl: Optional[MetricsJSONLConfig] = None
    file: Optional[FileLoggerConfig] = None
    tensorboard: Optional[TensorboardLoggerConfig] = None


# ------------------------------------------------------------------------------------------------ top level
@dataclass
class TrainConfig:
    """The top level of a ``dwm-stream train`` YAML (LLM Foundry's layout). ``None`` defaults are explained inline."""

    run_name: str = 'dwm-run'
    seed: int = 17
    max_seq_len: Optional[int] = None  # informational; the corpus fixes the sequence length
    model: ModelConfig = MISSING
    tokenizer: TokenizerConfig = MISSING
    train_loader: LoaderConfig = MISSING
    eval_loader: Optional[EvalLoaderConfig] = None
    algorithms: Optional[AlgorithmsConfig] = None
    optimizer: Optional[OptimizerConfig] = None  # None: decoupled_adamw with lr 1e-3
    scheduler: Optional[dict[str, Any]] = None  # name + the keys of SCHEDULER_CONFIGS[name]
    callbacks: Optional[CallbacksConfig] = None
    loggers: Optional[LoggersConfig] = None
    max_duration: Union[str, int] = MISSING
    eval_interval: Union[str, int] = 1
    eval_subset_num_batches: int = -1
    global_train_batch_size: int = MISSING
    device_train_microbatch_size: Optional[Union[int, str]] = None  # None: the device batch size
    device_eval_batch_size: Optional[int] = None  # None: the device train batch size
    accumulate_train_batch_on_tokens: bool = False
    precision: Optional[str] = None  # None: fp32 on CPU, amp_bf16 on GPU
    device: Optional[str] = None  # None: gpu if available, else cpu
    save_folder: Optional[str] = None
    save_interval: Union[str, int] = '1ep'
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    autoresume: bool = False
    load_path: Optional[str] = None
    progress_bar: Optional[bool] = None  # None: a bar on a terminal, else a console line every console_log_interval
    log_to_console: Optional[bool] = None  # None: see progress_bar
    console_log_interval: Union[str, int] = '10ba'
    dist_timeout: float = 300.0
    python_log_level: Optional[str] = None


# ------------------------------------------------------------------------------------------------ checking
def check(schema: type[T], cfg: Optional[Mapping[str, Any]], where: str = '') -> T:
    """Check ``cfg`` against the dataclass ``schema``; return it as a ``schema`` instance (defaults filled in).

    Args:
        schema (type): A structured-config dataclass of this module (or any OmegaConf-compatible dataclass).
        cfg (Mapping, optional): The section as plain Python values (``None``: all defaults).
        where (str): The section's key path, for messages (``'algorithms.dwm'``). Default: ``''`` (the top level).

    Raises:
        ConfigError: An unknown key (the valid keys listed), a value of the wrong type, a mapping expected, or a
            required key missing; the message names the full key path.
    """
    node = OmegaConf.structured(schema)
    _fill(schema, node, cfg or {}, where)
    missing = sorted(OmegaConf.missing_keys(node))
    if missing:
        keys = ', '.join(f'`{_join(where, key)}`' for key in missing)
        raise ConfigError(f'{keys} {"is" if len(missing) == 1 else "are"} required.')
    return OmegaConf.to_object(node)  # type: ignore[return-value]


def check_scheduler(cfg: Optional[Mapping[str, Any]], where: str = 'scheduler') -> Optional[Any]:
    """``scheduler``: its ``name`` picks the schema of the other keys in :data:`SCHEDULER_CONFIGS`."""
    if cfg is None:
        return None
    if not isinstance(cfg, Mapping):
        raise ConfigError(f'{where}: expected a mapping with a `name`, got {type(cfg).__name__} ({cfg!r}).')
    name = cfg.get('name')
    if name not in SCHEDULER_CONFIGS:
        raise ConfigError(f'{where}.name: {name!r} is not supported; use one of {sorted(SCHEDULER_CONFIGS)}.')
    return check(SCHEDULER_CONFIGS[name], {k: v for k, v in cfg.items() if k != 'name'}, where)


def check_train_config(cfg: Mapping[str, Any]) -> TrainConfig:
    """Check a whole ``dwm-stream train`` config (every section); return it as a :class:`TrainConfig`."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f'the top level must be a mapping of keys ({sorted(_field_names(TrainConfig))}).')
    train = check(TrainConfig, cfg)
    check_scheduler(cfg.get('scheduler'))
    return train


def _fill(schema: type, node: DictConfig, cfg: Any, where: str) -> None:
    """Assign ``cfg`` into ``node`` (a structured config of ``schema``) key by key, naming the key of any error."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f'{where or "the top level"}: expected a mapping of {sorted(_field_names(schema))}, got '
                          f'{type(cfg).__name__} ({cfg!r}).')
    hints = typing.get_type_hints(schema)
    unknown = [key for key in cfg if key not in hints]
    if unknown:
        section = f'{where}: unknown key(s)' if where else 'unknown top-level key(s)'
        raise ConfigError(f'{section} {sorted(map(str, unknown))}; valid keys are {sorted(hints)}.')
    for key, value in cfg.items():
        path = _join(where, key)
        kind, optional = _unwrap_optional(hints[key])
        if value is None and optional:
            node[key] = None
        elif dataclasses.is_dataclass(kind):
            node[key] = OmegaConf.structured(kind)
            _fill(kind, node[key], value, path)
        elif _is_dict_of_dataclass(kind):
            entries = _named_entries(value, path)
            node[key] = {}
            entry_kind = typing.get_args(kind)[1]
            for name, entry in entries.items():
                node[key][name] = OmegaConf.structured(entry_kind)
                _fill(entry_kind, node[key][name], entry, _join(path, name))
        else:
            value = _exact(value, kind, path)
            try:
                node[key] = value
            except OmegaConfBaseException as e:
                raise ConfigError(f'{path}: expected {_type_name(hints[key])}, got {type(value).__name__} '
                                  f'({value!r}).') from e


def _exact(value: Any, kind: Any, path: str) -> Any:
    """``value`` in the declared type ``kind``, converting only where nothing can be lost or misread.

    OmegaConf would take ``"false"`` or ``1`` for a bool and ``"5"`` for a number; those are errors here. An int
    for a float and a number for a str are converted explicitly (OmegaConf deprecates doing it implicitly).
    """
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f'{path}: expected bool (true/false, unquoted), got {type(value).__name__} ({value!r}).')
    if kind in (int, float) and isinstance(value, (str, bool)):
        raise ConfigError(f'{path}: expected {kind.__name__}, got {type(value).__name__} ({value!r}).')
    if kind is float and isinstance(value, int):
        return float(value)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if typing.get_origin(kind) is list and isinstance(value, (list, tuple)):
        (item_kind,) = typing.get_args(kind) or (Any,)
        return [_exact(item, item_kind, f'{path}[{i}]') for i, item in enumerate(value)]
    return value


def _named_entries(value: Any, path: str) -> Mapping[str, Any]:
    """``{name: entry}``; a list is named by position (``streams: [{...}, {...}]``)."""
    if isinstance(value, (list, tuple)):
        return {str(i): entry for i, entry in enumerate(value)}
    if not isinstance(value, Mapping):
        raise ConfigError(f'{path}: expected a mapping of name -> settings, got {type(value).__name__} ({value!r}).')
    return {str(name): entry for name, entry in value.items()}


def _unwrap_optional(kind: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``Optional[X]``, else ``(kind, False)``; a wider union stays as it is."""
    if typing.get_origin(kind) in (Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        optional = len(args) < len(typing.get_args(kind))
        return (args[0] if len(args) == 1 else Union[tuple(args)]), optional
    return kind, False


def _is_dict_of_dataclass(kind: Any) -> bool:
    args = typing.get_args(kind)
    return typing.get_origin(kind) is dict and len(args) == 2 and dataclasses.is_dataclass(args[1])


def _type_name(kind: Any) -> str:
    return getattr(kind, '__name__', None) if isinstance(kind, type) else str(kind).replace('typing.', '')


def _field_names(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def _join(where: str, key: Any) -> str:
    return f'{where}.{key}' if where else str(key)
