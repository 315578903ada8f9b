"""The YAML schema of ``dwm-stream train`` as structured dataclasses, checked by OmegaConf (as LLM Foundry checks its
``TrainConfig``).

One dataclass per section: :class:`TrainConfig` at the top level, :class:`LoaderConfig` for ``train_loader`` and
``eval_loader``, :class:`DatasetConfig` for their ``dataset`` (every ``StreamingDataset`` argument plus
``selection`` and ``streams: {name: StreamConfig}``), :class:`DWMSection` for ``algorithms.dwm`` (DWM's own
:class:`algorithms.dwm.config.DWMConfig`, which is written once beside DWM, plus the two loaders the run builds), and
the optimizer, scheduler, callbacks and loggers. ``tests/dwm_stream/test_config.py`` checks that the dataset, stream,
loader, scheduler, callback and logger schemas match the signatures of what they configure, so the two cannot drift
apart.

:func:`check` merges a mapping into its schema key by key: OmegaConf checks the types (and fills the defaults),
and every error is a :class:`ConfigError` that names the full key path (``algorithms.dwm.weighter.d_model``) and,
for unknown keys, the valid ones. It is stricter than OmegaConf in one way: a string (or a number) where a bool
belongs, and a string where a number belongs, are errors, not conversions (``shuffle: "false"`` is not ``True``).

LLM Foundry 0.22's ``TrainConfig`` keys: every one is a field of :class:`TrainConfig` (supported; a few are accepted
and ignored with a warning, :data:`FOUNDRY_IGNORED`) or refused with a message that names ``llmfoundry train``
(:data:`FOUNDRY_REFUSED`). ``algorithms``, ``callbacks``, ``loggers``, and ``model``/loader/optimizer/scheduler
names other than dwm-stream's own, are looked up by LLM Foundry's registry names (:func:`component`): the Composer
classes Foundry registers are known without Foundry installed; the rest come from Foundry's registries when it is.
Their settings are checked against the class's signature (:func:`signature_schema`), with the same key-naming errors.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, TypeVar, Union

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from algorithms.dwm.config import DWMConfig  # torch-free: the light check reads it too
from dwm_stream.train import _light

__all__ = [
    'ConfigError', 'check', 'check_train_config', 'precheck_train_config', 'check_scheduler', 'check_component',
    'component', 'component_names',
    'signature_schema', 'FOUNDRY_REFUSED', 'FOUNDRY_IGNORED', 'COMPOSER_COMPONENTS', 'OWN_MODELS',
    'TrainConfig', 'ModelConfig', 'TokenizerConfig', 'LoaderConfig', 'EvalLoaderConfig', 'DatasetConfig',
    'StreamConfig', 'AlgorithmsConfig', 'DWMSection', 'RefitLoaderConfig', 'ValidationConfig', 'OptimizerConfig',
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
    ``stream_name``/``stream_config`` are left out: ``DWMDataset`` always builds its own streams. ``max_seq_len`` and
    ``token_encoding_type`` are LLM Foundry's text-dataset keys (``DWMDataset`` reads Foundry-converted corpora), so a
    Foundry ``train_loader.dataset`` is taken as it is.
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
    max_seq_len: Optional[int] = None  # LLM Foundry's text-dataset key: samples are truncated to it
    token_encoding_type: str = 'int64'  # LLM Foundry's: the dtype of a `tokens` column stored as bytes


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
class DWMSection(DWMConfig):
    """``algorithms.dwm``: :class:`algorithms.dwm.config.DWMConfig` (every option of DWM, with its default, written
    there once), plus the two loaders a run builds from the YAML (DWM itself takes them as loaders)."""

    refit_loader: Optional[RefitLoaderConfig] = None  # DWM's refit_dataloader, as a config
    validation: Optional[ValidationConfig] = None  # DWM's val_dataloader, as a config


@dataclass
class AlgorithmsConfig:
    """``algorithms``: dwm-stream's own algorithm, typed here; any other name is a registry one (:func:`component`)."""

    dwm: Optional[DWMSection] = None


# ------------------------------------------------------------------------------------------------ model, optim
@dataclass
class ModelConfig:
    """``model``: ``name: llama`` (fresh, ``config_overrides`` checked against ``LlamaConfig``) or ``hf_causal_lm``
    (with LLM Foundry's ``use_flash_attention_2``, ``use_auth_token`` and ``trust_remote_code``). Any other name is an
    LLM Foundry model (``mpt_causal_lm``...), built by Foundry's registry with Foundry's own keys."""

    name: str = 'llama'
    config_overrides: dict[str, Any] = field(default_factory=dict)
    pretrained_model_name_or_path: Optional[str] = None
    pretrained: bool = False
    init_device: str = 'cpu'
    attn_implementation: str = 'sdpa'
    use_flash_attention_2: bool = False  # LLM Foundry's: attn_implementation flash_attention_2
    use_auth_token: bool = False  # LLM Foundry's: the HF token for a gated hub model
    trust_remote_code: bool = False


# ``model.name`` values dwm-stream builds itself (with :class:`ModelConfig`); others go to LLM Foundry's registry.
OWN_MODELS = ('llama', 'hf_causal_lm')


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
    """The top level of a ``dwm-stream train`` YAML (LLM Foundry's layout). ``None`` defaults are explained inline.

    Sections whose schema depends on a ``name`` (``model``, the loaders, ``optimizer``, ``scheduler``) or that are
    keyed by component names (``algorithms``, ``callbacks``, ``loggers``) are mappings here, checked by
    :func:`check_train_config` against the schema of each name.
    """

    run_name: str = 'dwm-run'
    seed: int = 17
    max_seq_len: Optional[int] = None  # informational; the corpus (or dataset.max_seq_len) fixes the sequence length
    variables: Optional[dict[str, Any]] = None  # LLM Foundry's: values for ${variables.x}; not read otherwise
    model: dict[str, Any] = MISSING  # ModelConfig for llama / hf_causal_lm, else an LLM Foundry model's keys
    tokenizer: TokenizerConfig = MISSING
    train_loader: dict[str, Any] = MISSING  # LoaderConfig for name: dwm, else an LLM Foundry loader's keys
    eval_loader: Optional[dict[str, Any]] = None  # EvalLoaderConfig for name: dwm, else an LLM Foundry loader's
    algorithms: Optional[dict[str, Any]] = None  # dwm: DWMSection; any other name: a registry algorithm's arguments
    optimizer: Optional[dict[str, Any]] = None  # None: decoupled_adamw with its own defaults
    scheduler: Optional[dict[str, Any]] = None  # name + the keys of SCHEDULER_CONFIGS[name] (or a registry one's)
    callbacks: Optional[dict[str, Any]] = None  # name -> settings (CallbacksConfig, or a registry callback's)
    loggers: Optional[dict[str, Any]] = None  # name -> settings (LoggersConfig, or a registry logger's)
    max_duration: Union[str, int] = MISSING
    eval_interval: Union[str, int] = 1
    eval_subset_num_batches: int = -1
    eval_first: bool = False  # evaluate once before training (when starting at batch 0), as LLM Foundry does
    global_train_batch_size: int = MISSING
    device_train_microbatch_size: Optional[Union[int, str]] = None  # None: the device batch size
    device_eval_batch_size: Optional[int] = None  # None: the device train batch size
    accumulate_train_batch_on_tokens: bool = False
    train_subset_num_batches: int = -1
    spin_dataloaders: bool = True
    precision: Optional[str] = None  # None: fp32 on CPU, amp_bf16 on GPU
    device: Optional[str] = None  # None: gpu if available, else cpu
    compile_config: Optional[dict[str, Any]] = None  # Composer's torch.compile settings
    save_folder: Optional[str] = None
    save_interval: Union[str, int] = '1ep'
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False  # Composer's checkpoints; DWM's schedule: algorithms.dwm.save_overwrite
    save_filename: Optional[str] = None  # None: Composer's ep{epoch}-ba{batch}-rank{rank}.pt
    save_latest_filename: Optional[str] = None  # None: Composer's latest-rank{rank}.pt
    save_weights_only: bool = False
    save_ignore_keys: Optional[list[str]] = None
    autoresume: bool = False
    load_path: Optional[str] = None
    load_weights_only: bool = False
    load_strict_model_weights: bool = True
    load_ignore_keys: Optional[list[str]] = None
    progress_bar: Optional[bool] = None  # None: a bar on a terminal, else a console line every console_log_interval
    log_to_console: Optional[bool] = None  # None: see progress_bar
    console_log_interval: Union[str, int] = '10ba'
    log_config: bool = False  # log the resolved config to the loggers as hyperparameters
    metadata: Optional[dict[str, Any]] = None  # logged as hyperparameters
    flatten_metadata: bool = True  # metadata keys at the top level of the hyperparameters (else under `metadata`)
    dist_timeout: float = 300.0
    python_log_level: Optional[str] = None
    max_split_size_mb: Optional[int] = None  # PYTORCH_CUDA_ALLOC_CONF max_split_size_mb, as LLM Foundry sets it
    expandable_segments: Optional[bool] = None  # PYTORCH_CUDA_ALLOC_CONF expandable_segments (None: leave it)
    cuda_load_lazy: bool = False  # CUDA_MODULE_LOADING=LAZY
    # Accepted and ignored with a warning (FOUNDRY_IGNORED):
    fsdp_config: Optional[dict[str, Any]] = None
    tp_config: Optional[dict[str, Any]] = None
    device_train_batch_size: Optional[Union[int, float]] = None
    n_gpus: Optional[int] = None
    device_train_grad_accum: Optional[Union[int, str]] = None


# LLM Foundry 0.22 TrainConfig keys that dwm-stream train accepts and ignores, with the warning's reason.
FOUNDRY_IGNORED: dict[str, str] = {
    'fsdp_config': 'a single process trains without FSDP, as llmfoundry train reverts to DDP there; with several '
                   'processes it is refused (dwm-stream train uses DDP, and DWM needs the full model on every rank)',
    'tp_config': 'a single process trains without tensor parallelism, as llmfoundry train does; with several '
                 'processes it is refused',
    'device_train_batch_size': 'derived from global_train_batch_size and the world size, as llmfoundry train does',
    'n_gpus': 'derived from the world size, as llmfoundry train does',
    'device_train_grad_accum': 'derived from device_train_microbatch_size, as llmfoundry train does',
}

# LLM Foundry 0.22 TrainConfig keys that dwm-stream train refuses (llmfoundry train supports them), with what they do.
FOUNDRY_REFUSED: dict[str, str] = {
    'code_paths': 'imports Python files that register components',
    'eval_loaders': 'several evaluation loaders (LLM Foundry fills it from a list-valued eval_loader)',
    'icl_tasks': 'in-context-learning evaluation',
    'icl_tasks_str': 'in-context-learning evaluation',
    'eval_gauntlet': 'the evaluation gauntlet',
    'eval_gauntlet_str': 'the evaluation gauntlet',
    'icl_subset_num_batches': 'in-context-learning evaluation',
    'icl_seq_len': 'in-context-learning evaluation',
    'profiler': "Composer's profiler",
    'only_hf_checkpoint': 'checkpoint conversion without training',
    'only_composer_checkpoint': 'checkpoint conversion without training',
}


def refused(key: str, what: str) -> str:
    """The message for a Foundry feature that dwm-stream train does not run."""
    return (f'{key}: not supported by dwm-stream train ({what}); run `llmfoundry train` (pip install '
            '"dwm-stream[foundry]"), which supports it, or remove the key.')


# ------------------------------------------------------------------------------------------------ registry names
# The Composer classes that LLM Foundry 0.22 registers, under Foundry's names, as ``module:Class`` (imported when
# used). They are built without LLM Foundry installed; tests/dwm_stream/test_config.py checks this table against
# Foundry's registries. Everything else LLM Foundry registers is looked up in its registries when it is installed.
COMPOSER_COMPONENTS: dict[str, dict[str, str]] = {
    'algorithms': {
        'gradient_clipping': 'composer.algorithms:GradientClipping',
        'alibi': 'composer.algorithms:Alibi',
        'gated_linear_units': 'composer.algorithms:GatedLinearUnits',
        'low_precision_layernorm': 'composer.algorithms:LowPrecisionLayerNorm',
    },
    'callbacks': {
        'lr_monitor': 'composer.callbacks:LRMonitor',
        'memory_monitor': 'composer.callbacks:MemoryMonitor',
        'memory_snapshot': 'composer.callbacks:MemorySnapshot',
        'speed_monitor': 'composer.callbacks:SpeedMonitor',
        'runtime_estimator': 'composer.callbacks:RuntimeEstimator',
        'optimizer_monitor': 'composer.callbacks:OptimizerMonitor',
        'generate_callback': 'composer.callbacks:Generate',
        'early_stopper': 'composer.callbacks:EarlyStopper',
        'system_metrics_monitor': 'composer.callbacks:SystemMetricsMonitor',
        'oom_observer': 'composer.callbacks:OOMObserver',
        'nan_monitor': 'composer.callbacks:NaNMonitor',
        'load_checkpoint': 'composer.callbacks:LoadCheckpoint',
    },
    'loggers': {
        'wandb': 'composer.loggers:WandBLogger',
        'tensorboard': 'composer.loggers:TensorboardLogger',
        'inmemory': 'composer.loggers:InMemoryLogger',
        'in_memory_logger': 'composer.loggers:InMemoryLogger',
        'mlflow': 'composer.loggers:MLFlowLogger',
        'mosaicml': 'composer.loggers:MosaicMLLogger',
    },
    'optimizers': {'decoupled_adamw': 'composer.optim:DecoupledAdamW'},
    'schedulers': {
        'constant_with_warmup': 'composer.optim:ConstantWithWarmupScheduler',
        'cosine_with_warmup': 'composer.optim:CosineAnnealingWithWarmupScheduler',
        'linear_decay_with_warmup': 'composer.optim:LinearWithWarmupScheduler',
    },
}
# What each kind is called in messages, and the section it configures.
_KIND_SECTIONS = {'algorithms': 'algorithms', 'callbacks': 'callbacks', 'loggers': 'loggers', 'models': 'model.name',
                  'dataloaders': 'train_loader.name', 'optimizers': 'optimizer.name', 'schedulers': 'scheduler.name'}


def foundry_registry(kind: str) -> Optional[Any]:
    """LLM Foundry's registry of ``kind`` (``'algorithms'``, ``'callbacks'``...), or ``None`` without LLM Foundry."""
    try:  # heavy (seconds): imported only for a name that is not dwm-stream's or Composer's
        from llmfoundry import registry
    except ImportError:
        return None
    return getattr(registry, kind, None)


def component(kind: str, name: str) -> Optional[Callable[..., Any]]:
    """The class (or builder function) LLM Foundry registers as ``name`` among its ``kind``, or ``None``.

    The Composer classes of :data:`COMPOSER_COMPONENTS` are found without LLM Foundry; any other name is looked up in
    Foundry's registry (with its entry points: ``dwm`` itself is there) when LLM Foundry is installed.
    """
    if _light.ACTIVE:  # a light check: a name that is not dwm-stream's own is left to the full check
        return _deferred
    path = COMPOSER_COMPONENTS.get(kind, {}).get(name)
    if path is not None:
        module, attr = path.split(':')
        return getattr(importlib.import_module(module), attr)
    registry = foundry_registry(kind)
    if registry is not None and name in registry:
        return registry.get(name)
    return None


def component_names(kind: str) -> list[str]:
    """Every name :func:`component` finds for ``kind`` (LLM Foundry's registry only when it is installed)."""
    names = set(COMPOSER_COMPONENTS.get(kind, {}))
    registry = foundry_registry(kind)
    if registry is not None:
        names.update(registry.get_all())
    return sorted(names)


def signature_schema(fn: Callable[..., Any], leave_out: tuple[str, ...] = ()) -> type:
    """A structured-config dataclass of ``fn``'s keyword arguments (a class: its ``__init__``'s).

    A parameter annotated ``int``, ``float``, ``bool`` or ``str`` (or ``Optional`` of one) is typed so; any other one
    takes any value (the class checks it). A parameter without a default is required; the others default to
    ``None``, meaning 'not given' (:func:`check_component` passes on only the keys the YAML sets, so the class keeps
    its own defaults). A ``**kwargs`` parameter is recorded as ``__var_keyword__`` on the schema.
    """
    target = fn.__init__ if isinstance(fn, type) else fn
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - unresolvable annotations: the values are checked by the class itself
        hints = {}
    fields, var_keyword = [], False
    for name, p in inspect.signature(fn).parameters.items():
        if name in ('self', *leave_out) or p.kind == p.VAR_POSITIONAL:
            continue
        if p.kind == p.VAR_KEYWORD:
            var_keyword = True
            continue
        kind, _ = _unwrap_optional(hints.get(name, Any))
        if kind not in (int, float, bool, str):
            kind = float if _is_number_union(kind) else Any
        if p.default is p.empty:
            fields.append((name, kind, field(default=MISSING)))
        else:
            fields.append((name, Optional[kind] if kind is not Any else Any, field(default=None)))
    schema = dataclasses.make_dataclass(f'{getattr(fn, "__name__", "Component")}Settings', fields)
    schema.__var_keyword__ = var_keyword  # type: ignore[attr-defined]
    return schema


def _is_number_union(kind: Any) -> bool:
    return typing.get_origin(kind) in (Union, types.UnionType) and set(typing.get_args(kind)) == {int, float}


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


# ``optimizer.name`` values dwm-stream builds itself (with :class:`OptimizerConfig`); others: a registry optimizer.
OWN_OPTIMIZERS = ('decoupled_adamw', 'adamw')


def check_scheduler(cfg: Optional[Mapping[str, Any]], where: str = 'scheduler') -> Optional[Any]:
    """``scheduler``: its ``name`` picks the schema of the other keys in :data:`SCHEDULER_CONFIGS`, else the
    signature of the registry scheduler of that name (a dict of its settings is returned then)."""
    if cfg is None:
        return None
    name = _section_name(cfg, where, None)
    rest = {k: v for k, v in cfg.items() if k != 'name'}
    if name in SCHEDULER_CONFIGS:
        return check(SCHEDULER_CONFIGS[name], rest, where)
    if not isinstance(name, str) or component('schedulers', name) is None:
        valid = sorted(set(SCHEDULER_CONFIGS) | set(component_names('schedulers')))
        raise ConfigError(f'{where}.name: {name!r} is not supported; use one of {valid}.')
    return check_component('schedulers', name, rest, where)


def check_optimizer(cfg: Optional[Mapping[str, Any]], where: str = 'optimizer') -> Optional[Any]:
    """``optimizer``: :class:`OptimizerConfig` for :data:`OWN_OPTIMIZERS`, else the registry optimizer's signature."""
    if cfg is None:
        return None
    name = _section_name(cfg, where, 'decoupled_adamw')
    if name in OWN_OPTIMIZERS:
        return check(OptimizerConfig, cfg, where)
    if not isinstance(name, str) or component('optimizers', name) is None:
        valid = sorted(set(OWN_OPTIMIZERS) | set(component_names('optimizers')))
        raise ConfigError(f'{where}.name: {name!r} is not supported; use one of {valid}.')
    return check_component('optimizers', name, {k: v for k, v in cfg.items() if k != 'name'}, where,
                           leave_out=('params',))


def check_model(cfg: Any, where: str = 'model') -> Optional[ModelConfig]:
    """``model``: :class:`ModelConfig` for :data:`OWN_MODELS`; another name must be an LLM Foundry model (whose keys
    Foundry's own builder checks), and ``None`` is returned for it."""
    name = _section_name(cfg, where, 'llama')
    if name in OWN_MODELS:
        return check(ModelConfig, cfg, where)
    if not isinstance(name, str) or component('models', name) is None:
        raise ConfigError(f'{where}.name: {name!r} is not a model dwm-stream builds ({list(OWN_MODELS)}) nor one LLM '
                          f'Foundry registers{_foundry_hint("models")}.')
    return None


def check_loader(cfg: Any, where: str = 'train_loader', schema: Optional[type] = None) -> Optional[Any]:
    """A loader: ``name: dwm`` (:class:`LoaderConfig`, or ``schema``); another name must be an LLM Foundry loader
    (``text``, ``finetuning``...), built and checked by Foundry, and ``None`` is returned for it."""
    name = _section_name(cfg, where, 'dwm')
    if name == 'dwm':
        return check(schema or LoaderConfig, cfg, where)
    if not isinstance(name, str) or component('dataloaders', name) is None:
        raise ConfigError(f"{where}.name: {name!r} is not a loader dwm-stream builds ('dwm') nor one LLM Foundry "
                          f'registers{_foundry_hint("dataloaders")}.')
    return None


def check_components(kind: str, cfg: Any, where: str, own: type) -> dict[str, Any]:
    """``algorithms`` / ``callbacks`` / ``loggers``: name -> settings. The names ``own`` types (its fields) are checked
    against it; any other name must be a registry one (:func:`component`), checked against its signature.

    Returns:
        dict: name -> the typed settings (an ``own`` field's dataclass or ``None``; a registry component's dict).
    """
    if cfg is None:
        return {}
    if not isinstance(cfg, Mapping):
        raise ConfigError(f'{where}: expected a mapping of name -> settings, got {type(cfg).__name__} ({cfg!r}).')
    own_names = set(typing.get_type_hints(own))
    unknown = [name for name in cfg if name not in own_names and component(kind, name) is None]
    with_config = foundry_registry('callbacks_with_config') if kind == 'callbacks' and unknown else None
    for name in unknown:
        if with_config is not None and name in with_config:
            raise ConfigError(refused(f'{where}.{name}', 'an LLM Foundry callback built from the whole train config'))
    if unknown:
        raise ConfigError(f'{where}: unknown key(s) {sorted(map(str, unknown))}; valid keys are '
                          f'{sorted(own_names | set(component_names(kind)))}{_foundry_hint(kind, ", more with")}.')
    typed = check(own, {k: v for k, v in cfg.items() if k in own_names}, where)
    return {name: getattr(typed, name) if name in own_names else check_component(kind, name, cfg[name],
                                                                                  _join(where, name))
            for name in cfg}


def check_component(kind: str, name: str, settings: Any, where: str, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings of the registry component ``name``, checked against its signature (:func:`signature_schema`).

    Returns:
        dict: The keys the YAML sets, typed (an int for a float parameter becomes a float); nothing else, so the
        class keeps its own defaults. Keys a ``**kwargs`` parameter takes pass through unchecked.
    """
    fn = component(kind, name)
    if fn is _deferred:
        return dict(settings or {})
    if fn is None:
        raise ConfigError(f'{where}: {name!r} is not a name LLM Foundry registers among its {kind}'
                          f'{_foundry_hint(kind)}.')
    if settings is None:
        settings = {}
    if not isinstance(settings, Mapping):
        raise ConfigError(f'{where}: expected a mapping of settings, got {type(settings).__name__} ({settings!r}).')
    schema = signature_schema(fn, leave_out)
    known = {f.name for f in dataclasses.fields(schema)}
    extra = {k: v for k, v in settings.items() if k not in known} if schema.__var_keyword__ else {}
    typed = check(schema, {k: v for k, v in settings.items() if k not in extra}, where)
    return {**{k: getattr(typed, k) for k in settings if k not in extra}, **extra}


def _section_name(cfg: Any, where: str, default: Optional[str]) -> Any:
    if not isinstance(cfg, Mapping):
        raise ConfigError(f'{where}: expected a mapping with a `name`, got {type(cfg).__name__} ({cfg!r}).')
    return cfg.get('name', default)


def _foundry_hint(kind: str, lead: str = ';') -> str:
    """Where more names come from, when LLM Foundry is not installed."""
    if foundry_registry(kind) is not None:
        return ''
    return f'{lead} LLM Foundry installed (pip install "dwm-stream[foundry]"), or run `llmfoundry train`'


def _deferred(*args: Any, **kwargs: Any) -> None:
    """What :func:`component` returns in a light check: a name whose settings the full check looks at."""


def precheck_train_config(cfg: Any) -> None:
    """The checks of :func:`check_train_config` that need neither torch, Composer, transformers nor LLM Foundry.

    Run before those imports (``dwm-stream train``, ``python -m dwm_stream.train``), so that a typo in the YAML is
    reported in about a second instead of after 15-30 s of imports. Left to the full check: the settings of
    components that are not dwm-stream's own (Composer's and LLM Foundry's registry names).
    Call it only in a process where :mod:`dwm_stream.train.config` was first imported with
    :data:`dwm_stream.train._light.ACTIVE` set (:mod:`dwm_stream.train.precheck` does).

    Raises:
        ConfigError: As :func:`check_train_config`.
    """
    check_train_config(cfg)


def check_train_config(cfg: Mapping[str, Any]) -> TrainConfig:
    """Check a whole ``dwm-stream train`` config (every section); return it as a :class:`TrainConfig`.

    LLM Foundry keys that dwm-stream train does not run (:data:`FOUNDRY_REFUSED`) fail naming ``llmfoundry train``.
    """
    if not isinstance(cfg, Mapping):
        raise ConfigError(f'the top level must be a mapping of keys ({sorted(_field_names(TrainConfig))}).')
    for key in cfg:
        if key in FOUNDRY_REFUSED:
            raise ConfigError(refused(key, FOUNDRY_REFUSED[key]))
    if isinstance(cfg.get('eval_loader'), (list, tuple)):
        raise ConfigError(refused('eval_loader', 'a list of evaluation loaders'))
    unknown = sorted(str(key) for key in cfg if key not in _field_names(TrainConfig))
    if unknown:
        raise ConfigError(f'unknown top-level key(s) {unknown}; valid keys are {sorted(_field_names(TrainConfig))} '
                          '(YAML variables go under `variables:`, as in LLM Foundry 0.22).')
    train = check(TrainConfig, cfg)
    check_model(cfg['model'])
    check_loader(cfg['train_loader'], 'train_loader', LoaderConfig)
    if cfg.get('eval_loader') is not None:
        check_loader(cfg['eval_loader'], 'eval_loader', EvalLoaderConfig)
    check_optimizer(cfg.get('optimizer'))
    check_scheduler(cfg.get('scheduler'))
    check_components('algorithms', cfg.get('algorithms'), 'algorithms', AlgorithmsConfig)
    check_components('callbacks', cfg.get('callbacks'), 'callbacks', CallbacksConfig)
    check_components('loggers', cfg.get('loggers'), 'loggers', LoggersConfig)
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
