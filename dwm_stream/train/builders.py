"""Build each training component from its config section, one small function each.

The YAML layout is LLM Foundry's (``model``, ``tokenizer``, ``train_loader``, ``eval_loader``,
``algorithms``, ``optimizer``, ``scheduler``, ``callbacks``, ``loggers``); ``dwm_stream.train.entry``
assembles the pieces into a Composer ``Trainer``, and ``dwm_stream.train.foundry`` exposes the same
dataloader and algorithm to LLM Foundry's registries. Each builder first checks its section against the
schema in :mod:`dwm_stream.train.config`, so an error names the YAML key however the builder is reached.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Mapping, Optional

import torch
from composer.callbacks import LRMonitor, MemoryMonitor, RuntimeEstimator, SpeedMonitor
from composer.core import DataSpec, Time
from composer.loggers import FileLogger, TensorboardLogger
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import HuggingFaceModel
from composer.optim import (ConstantWithWarmupScheduler, CosineAnnealingWithWarmupScheduler, DecoupledAdamW,
                            LinearWithWarmupScheduler)
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from algorithms.dwm import DWM, ValidationBatches
from dwm_stream.convert.tokenizer import load_tokenizer
from dwm_stream.data.loader import build_dataloader, build_dataset, collate_samples, widen_batch
from dwm_stream.train import config
from dwm_stream.train.callbacks import TrainedSamples
from dwm_stream.train.loggers import MetricsJSONLLogger

__all__ = ['build_tokenizer', 'build_model', 'build_optimizer', 'build_scheduler', 'build_callbacks',
           'build_loggers', 'build_train_dataloader', 'build_eval_dataloader', 'ConfiguredDWM', 'WidenedLoader']

OPTIMIZERS = {'decoupled_adamw': DecoupledAdamW, 'adamw': torch.optim.AdamW}
# scheduler.name -> Composer class; config.SCHEDULER_CONFIGS holds each one's schema (same names).
SCHEDULERS = {
    'cosine_with_warmup': CosineAnnealingWithWarmupScheduler,
    'linear_decay_with_warmup': LinearWithWarmupScheduler,
    'constant_with_warmup': ConstantWithWarmupScheduler,
}
# callbacks.<name> / loggers.<name> -> class; config.CallbacksConfig / LoggersConfig hold their schemas.
CALLBACKS = {'lr_monitor': LRMonitor, 'speed_monitor': SpeedMonitor, 'memory_monitor': MemoryMonitor,
             'runtime_estimator': RuntimeEstimator, 'trained_samples': TrainedSamples}
LOGGERS = {'metrics_jsonl': MetricsJSONLLogger, 'file': FileLogger, 'tensorboard': TensorboardLogger}


def _settings(section: Any) -> dict[str, Any]:
    """A checked section (a dataclass, or ``None`` for 'all defaults') as keyword arguments."""
    return dataclasses.asdict(section) if section is not None else {}


# ---------------------------------------------------------------------------------------------- model
def build_tokenizer(cfg: Mapping[str, Any]):
    """``tokenizer: {name: PATH_OR_HF_NAME, kwargs: {...}}``."""
    settings = config.check(config.TokenizerConfig, cfg, 'tokenizer')
    tokenizer = load_tokenizer(settings.name, **settings.kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _llama_overrides_schema() -> type:
    """``model.config_overrides`` for ``name: llama``: every ``LlamaConfig`` setting, typed by its default
    (a setting whose default is ``None`` or a container takes any value)."""
    fields = []
    for key, default in LlamaConfig().to_dict().items():
        if key.startswith('_') or key in ('transformers_version', 'model_type'):
            continue
        kind = type(default) if type(default) in (int, float, bool, str) else Any
        fields.append((key, Optional[kind], None))
    return dataclasses.make_dataclass('LlamaConfigOverrides', fields)


def build_model(cfg: Mapping[str, Any], tokenizer):
    """A Composer ``HuggingFaceModel`` around a causal LM.

    ``model: {name: llama, config_overrides: {hidden_size: ..., ...}}`` builds a fresh
    ``LlamaForCausalLM`` (vocab size from the tokenizer); ``name: hf_causal_lm`` with
    ``pretrained_model_name_or_path: LOCAL_DIR`` loads one (``pretrained: true`` for its weights).
    ``init_device: meta`` builds without allocating (used to check big YAMLs).
    """
    settings = config.check(config.ModelConfig, cfg, 'model')
    overrides = dict(settings.config_overrides)
    if settings.name == 'llama':
        config.check(_llama_overrides_schema(), overrides, 'model.config_overrides')
        overrides = {k: v for k, v in overrides.items() if v is not None}  # null: leave to LlamaConfig
        overrides.setdefault('vocab_size', len(tokenizer))
        overrides.setdefault('bos_token_id', tokenizer.bos_token_id)
        overrides.setdefault('eos_token_id', tokenizer.eos_token_id)
        overrides.setdefault('pad_token_id', tokenizer.pad_token_id)
        try:
            model_config = LlamaConfig(**overrides, attn_implementation=settings.attn_implementation)
        except TypeError as e:
            raise ValueError(f'model.config_overrides: {e}') from e
        with torch.device(settings.init_device):
            model = LlamaForCausalLM(model_config)
    elif settings.name == 'hf_causal_lm':
        path = settings.pretrained_model_name_or_path
        if not path:
            raise ValueError('model.pretrained_model_name_or_path is required for name: hf_causal_lm.')
        model_config = AutoConfig.from_pretrained(path, **overrides)
        model_config._attn_implementation = settings.attn_implementation
        if settings.pretrained and settings.init_device != 'meta':
            model = AutoModelForCausalLM.from_pretrained(path, config=model_config)
        else:
            with torch.device(settings.init_device):
                model = AutoModelForCausalLM.from_config(model_config)
    else:
        raise ValueError(f"model.name: {settings.name!r} is not supported; use 'llama' or 'hf_causal_lm'.")
    return HuggingFaceModel(model, tokenizer=tokenizer, use_logits=True, shift_labels=True,
                            metrics=[LanguageCrossEntropy(), LanguagePerplexity()],
                            eval_metrics=[LanguageCrossEntropy(), LanguagePerplexity()])


# ---------------------------------------------------------------------------------------------- optim
def build_optimizer(cfg: Optional[Mapping[str, Any]], model: torch.nn.Module):
    """``optimizer: {name: decoupled_adamw | adamw, lr, betas, eps, weight_decay}`` (unset: the optimizer's default)."""
    settings = config.check(config.OptimizerConfig, cfg, 'optimizer')
    if settings.name not in OPTIMIZERS:
        raise ValueError(f'optimizer.name: {settings.name!r} is not supported; use one of {sorted(OPTIMIZERS)}.')
    kwargs = {k: v for k, v in _settings(settings).items() if k != 'name' and v is not None}
    if 'betas' in kwargs:
        if len(kwargs['betas']) != 2:
            raise ValueError(f"optimizer.betas: expected two numbers, got {kwargs['betas']!r}.")
        kwargs['betas'] = tuple(kwargs['betas'])
    return OPTIMIZERS[settings.name](model.parameters(), **kwargs)


def build_scheduler(cfg: Optional[Mapping[str, Any]]):
    """``scheduler: {name: cosine_with_warmup | linear_decay_with_warmup | constant_with_warmup, t_warmup, ...}``."""
    settings = config.check_scheduler(cfg)
    if settings is None:
        return None
    kwargs = _settings(settings)
    for key, value in kwargs.items():
        if key.startswith('t_'):
            try:
                Time.from_input(value)
            except (ValueError, TypeError) as e:
                raise ValueError(f'scheduler.{key}: expected a Composer time such as 100ba or 0.1dur, '
                                 f'got {value!r} ({e}).') from e
    return SCHEDULERS[cfg['name']](**kwargs)


def build_callbacks(cfg: Optional[Mapping[str, Any]], run_dir: Optional[str] = None) -> list:
    """``callbacks: {lr_monitor: {}, speed_monitor: {window_size: 10}, memory_monitor: {}, runtime_estimator: {},
    trained_samples: {filename, fsync}}``.

    ``trained_samples`` (ours, :mod:`dwm_stream.train.callbacks`) records the uids of every trained batch, by
    default to ``<run_dir>/trained_samples-rank{rank}.jsonl``.
    """
    settings = config.check(config.CallbacksConfig, cfg, 'callbacks')
    callbacks = []
    for name in cfg or {}:  # the order of the YAML; `name: null` enables it with its defaults
        kwargs = _settings(getattr(settings, name))
        if name == 'trained_samples':
            kwargs['run_dir'] = run_dir
        callbacks.append(CALLBACKS[name](**kwargs))
    return callbacks


def build_loggers(cfg: Optional[Mapping[str, Any]], run_dir: Optional[str]) -> list:
    """``loggers: {metrics_jsonl: {filename}, file: {filename, ...}, tensorboard: {log_dir, ...}}``.

    ``metrics_jsonl`` (ours) writes every logged metric with its batch index, which
    ``dwm-stream report`` and the demo read.
    """
    settings = config.check(config.LoggersConfig, cfg, 'loggers')
    loggers = []
    for name in cfg or {}:
        kwargs = _settings(getattr(settings, name))
        if name == 'metrics_jsonl':
            kwargs['filename'] = kwargs.get('filename') or os.path.join(run_dir or '.', 'metrics.jsonl')
        loggers.append(LOGGERS[name](**kwargs))
    return loggers


# ---------------------------------------------------------------------------------------------- data
def _build_loader(schema: type, cfg: Mapping[str, Any], device_batch_size: int, where: str) -> DataSpec:
    settings = config.check(schema, cfg, where)
    if settings.name != 'dwm':
        raise ValueError(f"{where}.name: {settings.name!r}; dwm-stream builds `name: dwm` loaders.")
    return build_dataloader(cfg['dataset'], device_batch_size, num_workers=settings.num_workers,
                            drop_last=settings.drop_last, prefetch_factor=settings.prefetch_factor,
                            persistent_workers=settings.persistent_workers, pin_memory=settings.pin_memory,
                            timeout=settings.timeout, where=f'{where}.dataset')


def build_train_dataloader(cfg: Mapping[str, Any], device_batch_size: int, where: str = 'train_loader') -> DataSpec:
    """``train_loader: {name: dwm, dataset: {...}, num_workers, drop_last, ...}`` -> ``DataSpec``."""
    return _build_loader(config.LoaderConfig, cfg, device_batch_size, where)


def build_eval_dataloader(cfg: Mapping[str, Any], device_batch_size: int, where: str = 'eval_loader') -> DataSpec:
    """``eval_loader``: as ``train_loader``, but ``drop_last`` defaults to ``false``."""
    return _build_loader(config.EvalLoaderConfig, cfg, device_batch_size, where)


class WidenedLoader:
    """Re-iterable: a ``DWMDataset`` loader whose batches are widened (int64 ids + labels).

    The config is checked when the loader is made; the dataset is built at the first iteration.
    """

    def __init__(self, dataset_cfg: Mapping[str, Any], batch_size: int, where: str) -> None:
        config.check(config.DatasetConfig, dataset_cfg, where)
        self.dataset_cfg, self.batch_size, self.where = dict(dataset_cfg), batch_size, where
        self._loader = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._loader is None:
            dataset = build_dataset(self.dataset_cfg, self.batch_size, where=self.where)
            self._loader = DataLoader(dataset, batch_size=self.batch_size, collate_fn=collate_samples,
                                      drop_last=True)
        return (widen_batch(batch) for batch in self._loader)


# ---------------------------------------------------------------------------------------------- DWM
class ConfiguredDWM(DWM):
    """:class:`algorithms.dwm.DWM` built from YAML: its loaders are given as configs.

    Takes every ``DWM`` argument (checked against :class:`dwm_stream.train.config.DWMConfig`), except that the two
    loaders are configs:

    Args:
        refit_loader (dict, optional): ``{dataset: {...}, batch_size}``: batches from the training
            distribution with their own order. ``dataset`` keys override the train loader's dataset
            (by default ``shuffle_seed`` + 1 and, for remote corpora, a separate local cache).
            Default: ``None`` (the train dataset, reseeded).
        validation (dict, optional): ``{lambada: PATH, tokenizer: NAME, batch_size, max_length}``
            for a LAMBADA-format file, or ``{dataset: {...}, batch_size}`` for a held-out MDS corpus.
            Default: ``None`` (required when refitting).
        train_dataset (dict, optional): The train loader's ``dataset`` config (filled in by
            ``dwm-stream train``; under LLM Foundry give ``refit_loader.dataset`` in full).
        tokenizer (Any, optional): The LLM's tokenizer (filled in by ``dwm-stream train``).
        device_batch_size (int, optional): Default batch size of the refit/validation loaders.
        **kwargs: Any other ``DWM`` argument.
    """

    def __init__(self,
                 refit_loader: Optional[Mapping[str, Any]] = None,
                 validation: Optional[Mapping[str, Any]] = None,
                 train_dataset: Optional[Mapping[str, Any]] = None,
                 tokenizer: Any = None,
                 device_batch_size: Optional[int] = None,
                 **kwargs: Any) -> None:
        settings = config.check(config.DWMConfig, {**kwargs, 'refit_loader': refit_loader, 'validation': validation},
                                'algorithms.dwm')
        dwm_kwargs = {key: getattr(settings, key) for key in kwargs}  # as typed by the schema; DWM's defaults
        refit_cfg = dict(refit_loader or {})
        val_cfg = dict(validation or {})
        batch_size = refit_cfg.get('batch_size') or device_batch_size or 8
        refit = None
        if settings.refit:
            refit_dataset = dict(refit_cfg.get('dataset') or {})
            dataset_cfg = {**(train_dataset or {}), **refit_dataset}
            if not dataset_cfg:
                raise ValueError('algorithms.dwm.refit_loader.dataset is required (the training corpus, '
                                 'with its own shuffle_seed).')
            if 'shuffle_seed' not in refit_dataset:
                dataset_cfg['shuffle_seed'] = int(dataset_cfg.get('shuffle_seed', 9176)) + 1
            if dataset_cfg.get('remote') and 'local' in dataset_cfg and not refit_dataset.get('local'):
                dataset_cfg['local'] = str(dataset_cfg['local']).rstrip('/') + '.refit'
            dataset_cfg.pop('batch_size', None)
            refit = WidenedLoader(dataset_cfg, batch_size, 'algorithms.dwm.refit_loader.dataset')
        val = None
        if val_cfg:
            val_batch = val_cfg.get('batch_size') or batch_size
            if val_cfg.get('lambada'):
                tok = load_tokenizer(val_cfg['tokenizer']) if val_cfg.get('tokenizer') else tokenizer
                if tok is None:
                    raise ValueError('algorithms.dwm.validation.tokenizer is required (the LLM tokenizer).')
                val = ValidationBatches(val_cfg['lambada'], tok, batch_size=val_batch,
                                        max_length=val_cfg.get('max_length'))
            elif val_cfg.get('dataset'):
                val = WidenedLoader(val_cfg['dataset'], val_batch, 'algorithms.dwm.validation.dataset')
            else:
                raise ValueError('algorithms.dwm.validation needs `lambada: PATH` or `dataset: {...}`.')
        super().__init__(refit_dataloader=refit, val_dataloader=val, **dwm_kwargs)
