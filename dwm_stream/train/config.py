"""The YAML schema of ``dwm-stream train`` as structured dataclasses, checked by OmegaConf (as LLM Foundry checks its
``TrainConfig``).

One dataclass per section: :class:`TrainConfig` at the top level, :class:`LoaderConfig` for ``train_loader`` and
``eval_loader``, :class:`DatasetConfig` for their ``dataset`` (``DWMDataset``'s and ``StreamingDataset``'s arguments,
``streams: {name: StreamConfig}``), :class:`DWMSection` for ``algorithms.dwm`` (DWM's own
:class:`algorithms.dwm.config.DWMConfig`, which is written once beside DWM, plus the two loaders the run builds), and
the model and the tokenizer. The dataset, stream and loader schemas are the signatures of what they configure
(:mod:`dwm_stream.data.schemas`), and so are the optimizer's, the scheduler's, the callbacks' and the loggers': a
component's arguments and defaults are written once, in the component.

:func:`~dwm_stream.schema.check` (the one checker, :mod:`dwm_stream.schema`) merges a mapping into its schema key by
key, and every error is a :class:`ConfigError` that names the full key path (``algorithms.dwm.weighter.d_model``)
and, for unknown keys, the valid ones.

LLM Foundry 0.22's ``TrainConfig`` keys: every one is a field of :class:`TrainConfig` (supported; a few are accepted
and ignored with a warning, :data:`FOUNDRY_IGNORED`) or refused with a message that names ``llmfoundry train``
(:data:`FOUNDRY_REFUSED`). ``algorithms``, ``callbacks``, ``loggers``, and ``model``/loader/optimizer/scheduler
names other than dwm-stream's own, are looked up by LLM Foundry's registry names (:func:`component`, one table,
:data:`COMPONENTS`): dwm-stream's own and the Composer classes Foundry registers are known without Foundry installed;
the rest come from Foundry's registries when it is. Their settings are checked against the class's signature
(:func:`~dwm_stream.schema.signature_schema`), with the same key-naming errors.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

from omegaconf import MISSING

from algorithms.dwm.config import DWMConfig  # torch-free: the light check reads it too
from dwm_stream.data.schemas import dataset_schema, loader_schema, stream_schema
from dwm_stream.schema import ConfigError, check, field_names, key_path, set_keys, signature_schema
from dwm_stream.train import _light

__all__ = [
    'ConfigError', 'check', 'set_keys', 'check_train_config', 'RunConfig', 'Component', 'precheck_train_config',
    'check_scheduler', 'check_optimizer', 'check_component', 'check_components', 'component', 'component_names',
    'signature_schema', 'FOUNDRY_REFUSED', 'FOUNDRY_IGNORED', 'COMPONENTS', 'OWN_MODELS',
    'TrainConfig', 'ModelConfig', 'TokenizerConfig', 'LoaderConfig', 'DatasetConfig',
    'StreamConfig', 'AlgorithmsConfig', 'DWMSection', 'RefitLoaderConfig', 'ValidationConfig',
]

# ------------------------------------------------------------------------------------------------ data
# The dataset, stream and loader sections are the signatures of DWMDataset, DWMStream and build_dataloader (with
# streaming's), read from source (dwm_stream.data.schemas): an unset key is None, and the callee's default applies.
StreamConfig = stream_schema()
DatasetConfig = dataset_schema()
LoaderConfig = loader_schema()  # train_loader and eval_loader (whose drop_last the builder defaults to false)


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
    eval_loader: Optional[dict[str, Any]] = None  # LoaderConfig for name: dwm, else an LLM Foundry loader's
    algorithms: Optional[dict[str, Any]] = None  # dwm: DWMSection; any other name: a registry algorithm's arguments
    optimizer: Optional[dict[str, Any]] = None  # None: decoupled_adamw with its own defaults
    scheduler: Optional[dict[str, Any]] = None  # name + that scheduler's keyword arguments (COMPONENTS, or a registry's)
    callbacks: Optional[dict[str, Any]] = None  # name -> that callback's keyword arguments
    loggers: Optional[dict[str, Any]] = None  # name -> that logger's keyword arguments
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


@dataclass
class Component:
    """A section built by name (an optimizer, a scheduler, an LLM Foundry model or loader) and its keyword arguments:
    checked against the component's signature, only the keys the YAML sets (unset: the component's own defaults);
    an LLM Foundry model's or loader's keys as given (Foundry's builder checks them)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    """A ``dwm-stream train`` config after :func:`check_train_config`: the top level and every section typed. The
    builders (:mod:`dwm_stream.train.builders`) take these sections; nothing downstream checks them again."""

    top: TrainConfig
    tokenizer: TokenizerConfig
    model: Union[ModelConfig, Component]  # Component: an LLM Foundry model, with Foundry's keys
    train_loader: Union[Any, Component]  # LoaderConfig for name: dwm; Component: an LLM Foundry loader
    eval_loader: Optional[Union[Any, Component]]
    optimizer: Optional[Component]  # None: decoupled_adamw with its own defaults
    scheduler: Optional[Component]
    algorithms: dict[str, Any]  # dwm: DWMSection (None: its defaults); another name: its keyword arguments
    callbacks: dict[str, dict[str, Any]]
    loggers: dict[str, dict[str, Any]]


def refused(key: str, what: str) -> str:
    """The message for a Foundry feature that dwm-stream train does not run."""
    return (f'{key}: not supported by dwm-stream train ({what}); run `llmfoundry train` (pip install '
            '"dwm-stream[foundry]"), which supports it, or remove the key.')


# ------------------------------------------------------------------------------------------------ registry names
# The one table of names -> classes, as ``module:Class`` (imported when used): dwm-stream's own callbacks, loggers and
# optimizer, and the Composer classes that LLM Foundry 0.22 registers, under Foundry's names (built without LLM Foundry
# installed; tests/dwm_stream/test_config.py checks those against Foundry's registries). Everything else LLM Foundry
# registers is looked up in its registries when it is installed. A component's settings are its signature's.
COMPONENTS: dict[str, dict[str, str]] = {
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
        'trained_samples': 'dwm_stream.train.callbacks:TrainedSamples',  # ours
    },
    'loggers': {
        'wandb': 'composer.loggers:WandBLogger',
        'tensorboard': 'composer.loggers:TensorboardLogger',
        'inmemory': 'composer.loggers:InMemoryLogger',
        'in_memory_logger': 'composer.loggers:InMemoryLogger',
        'mlflow': 'composer.loggers:MLFlowLogger',
        'mosaicml': 'composer.loggers:MosaicMLLogger',
        'metrics_jsonl': 'dwm_stream.train.loggers:MetricsJSONLLogger',  # ours
        'file': 'composer.loggers:FileLogger',  # ours (Foundry has no file logger)
    },
    'optimizers': {'decoupled_adamw': 'composer.optim:DecoupledAdamW',
                   'adamw': 'torch.optim:AdamW'},  # ours (Foundry's `adamw` is its own)
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

    The classes of :data:`COMPONENTS` are found without LLM Foundry; any other name is looked up in
    Foundry's registry (with its entry points: ``dwm`` itself is there) when LLM Foundry is installed.
    """
    if _light.ACTIVE:  # a light check: a name that is not dwm-stream's own is left to the full check
        return _deferred
    path = COMPONENTS.get(kind, {}).get(name)
    if path is not None:
        module, attr = path.split(':')
        return getattr(importlib.import_module(module), attr)
    registry = foundry_registry(kind)
    if registry is not None and name in registry:
        return registry.get(name)
    return None


def component_names(kind: str) -> list[str]:
    """Every name :func:`component` finds for ``kind`` (LLM Foundry's registry only when it is installed)."""
    names = set(COMPONENTS.get(kind, {}))
    registry = foundry_registry(kind)
    if registry is not None:
        names.update(registry.get_all())
    return sorted(names)


# Arguments a component takes from the run, not from its YAML section.
_FROM_THE_RUN = {('optimizers', None): ('params',), ('callbacks', 'trained_samples'): ('run_dir',),
                 ('loggers', 'metrics_jsonl'): ('run_dir',)}


def check_scheduler(cfg: Optional[Mapping[str, Any]], where: str = 'scheduler') -> Optional[Component]:
    """``scheduler``: ``name`` (a name of :data:`COMPONENTS` or LLM Foundry's registry) and the keyword arguments of
    that scheduler, checked against its signature (the keys the YAML sets)."""
    if cfg is None:
        return None
    return _named_component('schedulers', cfg, where, None)


def check_optimizer(cfg: Optional[Mapping[str, Any]], where: str = 'optimizer') -> Optional[Component]:
    """``optimizer``: ``name`` (default ``decoupled_adamw``) and that optimizer's keyword arguments, checked against its
    signature (unset: the optimizer's own defaults)."""
    if cfg is None:
        return None
    return _named_component('optimizers', cfg, where, 'decoupled_adamw')


def _named_component(kind: str, cfg: Mapping[str, Any], where: str, default: Optional[str]) -> Component:
    name = _section_name(cfg, where, default)
    if not isinstance(name, str) or component(kind, name) is None:
        raise ConfigError(f'{where}.name: {name!r} is not supported; use one of {component_names(kind)}.')
    return Component(name, check_component(kind, name, {k: v for k, v in cfg.items() if k != 'name'}, where))


def check_model(cfg: Any, where: str = 'model') -> Union[ModelConfig, Component]:
    """``model``: :class:`ModelConfig` for :data:`OWN_MODELS`; another name must be an LLM Foundry model, returned as a
    :class:`Component` with its keys as given (Foundry's own builder checks them)."""
    name = _section_name(cfg, where, 'llama')
    if name in OWN_MODELS:
        return check(ModelConfig, cfg, where)
    if not isinstance(name, str) or component('models', name) is None:
        raise ConfigError(f'{where}.name: {name!r} is not a model dwm-stream builds ({list(OWN_MODELS)}) nor one LLM '
                          f'Foundry registers{_foundry_hint("models")}.')
    return Component(name, {k: v for k, v in cfg.items() if k != 'name'})


def check_loader(cfg: Any, where: str = 'train_loader') -> Union[Any, Component]:
    """A loader: ``name: dwm`` (:class:`LoaderConfig`); another name must be an LLM Foundry loader (``text``,
    ``finetuning``...), returned as a :class:`Component` with its keys as given (Foundry builds and checks it)."""
    name = _section_name(cfg, where, 'dwm')
    if name == 'dwm':
        return check(LoaderConfig, cfg, where)
    if not isinstance(name, str) or component('dataloaders', name) is None:
        raise ConfigError(f"{where}.name: {name!r} is not a loader dwm-stream builds ('dwm') nor one LLM Foundry "
                          f'registers{_foundry_hint("dataloaders")}.')
    return Component(name, {k: v for k, v in cfg.items() if k != 'name'})


def check_components(kind: str, cfg: Any, where: str, own: Optional[type] = None) -> dict[str, Any]:
    """``algorithms`` / ``callbacks`` / ``loggers``: name -> settings. The names ``own`` types (its fields:
    ``algorithms.dwm``) are checked against it; any other name must be one of :func:`component`, checked against its
    signature.

    Returns:
        dict: name -> the typed settings (an ``own`` field's dataclass or ``None``; a component's dict).
    """
    if cfg is None:
        return {}
    if not isinstance(cfg, Mapping):
        raise ConfigError(f'{where}: expected a mapping of name -> settings, got {type(cfg).__name__} ({cfg!r}).')
    own_names = set(typing.get_type_hints(own)) if own is not None else set()
    unknown = [name for name in cfg if name not in own_names and component(kind, name) is None]
    with_config = foundry_registry('callbacks_with_config') if kind == 'callbacks' and unknown else None
    for name in unknown:
        if with_config is not None and name in with_config:
            raise ConfigError(refused(f'{where}.{name}', 'an LLM Foundry callback built from the whole train config'))
    if unknown:
        raise ConfigError(f'{where}: unknown key(s) {sorted(map(str, unknown))}; valid keys are '
                          f'{sorted(own_names | set(component_names(kind)))}{_foundry_hint(kind, ", more with")}.')
    typed = check(own, {k: v for k, v in cfg.items() if k in own_names}, where) if own is not None else None
    return {name: getattr(typed, name) if name in own_names else check_component(kind, name, cfg[name],
                                                                                  key_path(where, name))
            for name in cfg}


def check_component(kind: str, name: str, settings: Any, where: str, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings of the component ``name``, checked against its signature (:func:`signature_schema`; the arguments
    a component takes from the run, ``_FROM_THE_RUN``, are not settings).

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
    leave_out = (*leave_out, *_FROM_THE_RUN.get((kind, None), ()), *_FROM_THE_RUN.get((kind, name), ()))
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


def check_train_config(cfg: Mapping[str, Any]) -> RunConfig:
    """Check a whole ``dwm-stream train`` config (every section, once); return it typed, as the builders take it.

    LLM Foundry keys that dwm-stream train does not run (:data:`FOUNDRY_REFUSED`) fail naming ``llmfoundry train``.
    """
    if not isinstance(cfg, Mapping):
        raise ConfigError(f'the top level must be a mapping of keys ({sorted(field_names(TrainConfig))}).')
    for key in cfg:
        if key in FOUNDRY_REFUSED:
            raise ConfigError(refused(key, FOUNDRY_REFUSED[key]))
    if isinstance(cfg.get('eval_loader'), (list, tuple)):
        raise ConfigError(refused('eval_loader', 'a list of evaluation loaders'))
    unknown = sorted(str(key) for key in cfg if key not in field_names(TrainConfig))
    if unknown:
        raise ConfigError(f'unknown top-level key(s) {unknown}; valid keys are {sorted(field_names(TrainConfig))} '
                          '(YAML variables go under `variables:`, as in LLM Foundry 0.22).')
    top = check(TrainConfig, cfg)
    return RunConfig(
        top=top,
        tokenizer=top.tokenizer,
        model=check_model(cfg['model']),
        train_loader=check_loader(cfg['train_loader'], 'train_loader'),
        eval_loader=check_loader(cfg['eval_loader'], 'eval_loader') if cfg.get('eval_loader') is not None else None,
        optimizer=check_optimizer(cfg.get('optimizer')),
        scheduler=check_scheduler(cfg.get('scheduler')),
        algorithms=check_components('algorithms', cfg.get('algorithms'), 'algorithms', AlgorithmsConfig),
        callbacks=check_components('callbacks', cfg.get('callbacks'), 'callbacks'),
        loggers=check_components('loggers', cfg.get('loggers'), 'loggers'),
    )
