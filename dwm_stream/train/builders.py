"""Build each training component from its config section, one small function each.

The YAML layout is LLM Foundry's (``model``, ``tokenizer``, ``train_loader``, ``eval_loader``,
``algorithms``, ``optimizer``, ``scheduler``, ``callbacks``, ``loggers``); ``dwm_stream.train.entry``
assembles the pieces into a Composer ``Trainer``, and ``dwm_stream.train.foundry`` exposes the same
dataloader and algorithm to LLM Foundry's registries.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping, Optional

import torch

from algorithms.dwm import DWM
from dwm_stream.data.loader import build_dataloader, build_dataset, collate_samples, widen_batch

__all__ = ['build_tokenizer', 'build_model', 'build_optimizer', 'build_scheduler', 'build_callbacks',
           'build_loggers', 'build_train_dataloader', 'ConfiguredDWM', 'WidenedLoader']


def _check_keys(cfg: Mapping[str, Any], valid: set[str], where: str) -> None:
    unknown = set(cfg) - valid
    if unknown:
        raise ValueError(f'{where}: unknown key(s) {sorted(unknown)}; valid keys are {sorted(valid)}.')


def _type_ok(value: Any, kind: Any) -> bool:
    """Whether a YAML value fits a (simple) annotation; unknown/complex annotations are accepted."""
    import types
    import typing
    if kind is Any:
        return True
    origin = typing.get_origin(kind)
    if origin is typing.Union or origin is types.UnionType:
        return any(_type_ok(value, k) for k in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if kind in (list, tuple) or origin in (list, tuple) or getattr(origin, '__name__', '') == 'Sequence':
        return isinstance(value, (list, tuple))
    if kind is dict or origin is dict:
        return isinstance(value, dict)
    return True


def _check_types(cfg: Mapping[str, Any], kinds: Mapping[str, Any], where: str) -> None:
    """Raise naming the key when a value does not fit its annotation in ``kinds``."""
    for key, value in cfg.items():
        if key in kinds and not _type_ok(value, kinds[key]):
            kind = kinds[key]
            name = getattr(kind, '__name__', None) or str(kind).replace('typing.', '')
            raise ValueError(f'{where}.{key}: expected {name}, got {type(value).__name__} ({value!r}).')


# ---------------------------------------------------------------------------------------------- model
def build_tokenizer(cfg: Mapping[str, Any]):
    """``tokenizer: {name: PATH_OR_HF_NAME, kwargs: {...}}``."""
    _check_keys(cfg, {'name', 'kwargs'}, 'tokenizer')
    from dwm_stream.convert.tokenizer import load_tokenizer
    if 'name' not in cfg:
        raise ValueError('tokenizer.name is required: a local tokenizer directory or an HF tokenizer name.')
    tokenizer = load_tokenizer(cfg['name'], **dict(cfg.get('kwargs') or {}))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


MODEL_KEYS = {'name', 'config_overrides', 'pretrained_model_name_or_path', 'pretrained', 'init_device',
              'attn_implementation'}


def build_model(cfg: Mapping[str, Any], tokenizer):
    """A Composer ``HuggingFaceModel`` around a causal LM.

    ``model: {name: llama, config_overrides: {hidden_size: ..., ...}}`` builds a fresh
    ``LlamaForCausalLM`` (vocab size from the tokenizer); ``name: hf_causal_lm`` with
    ``pretrained_model_name_or_path: LOCAL_DIR`` loads one (``pretrained: true`` for its weights).
    ``init_device: meta`` builds without allocating (used to check big YAMLs).
    """
    from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
    from composer.models import HuggingFaceModel
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    _check_keys(cfg, MODEL_KEYS, 'model')
    name = cfg.get('name', 'llama')
    overrides = dict(cfg.get('config_overrides') or {})
    attn = cfg.get('attn_implementation', 'sdpa')
    init_device = cfg.get('init_device', 'cpu')
    if name == 'llama':
        defaults = LlamaConfig().to_dict()
        _check_keys(overrides, {k for k in defaults if not k.startswith('_')} - {'transformers_version', 'model_type'},
                    'model.config_overrides')
        _check_types({k: v for k, v in overrides.items() if v is not None},  # null: leave to LlamaConfig
                     {k: type(v) for k, v in defaults.items() if type(v) in (int, float, bool, str)},
                     'model.config_overrides')
        overrides.setdefault('vocab_size', len(tokenizer))
        overrides.setdefault('bos_token_id', tokenizer.bos_token_id)
        overrides.setdefault('eos_token_id', tokenizer.eos_token_id)
        overrides.setdefault('pad_token_id', tokenizer.pad_token_id)
        try:
            config = LlamaConfig(**overrides, attn_implementation=attn)
        except TypeError as e:
            raise ValueError(f'model.config_overrides: {e}') from e
        with torch.device(init_device):
            model = LlamaForCausalLM(config)
    elif name == 'hf_causal_lm':
        path = cfg.get('pretrained_model_name_or_path')
        if not path:
            raise ValueError('model.pretrained_model_name_or_path is required for name: hf_causal_lm.')
        config = AutoConfig.from_pretrained(path, **overrides)
        config._attn_implementation = attn
        if cfg.get('pretrained', False) and init_device != 'meta':
            model = AutoModelForCausalLM.from_pretrained(path, config=config)
        else:
            with torch.device(init_device):
                model = AutoModelForCausalLM.from_config(config)
    else:
        raise ValueError(f"model.name: {name!r} is not supported; use 'llama' or 'hf_causal_lm'.")
    metrics = [LanguageCrossEntropy(), LanguagePerplexity()]
    return HuggingFaceModel(model, tokenizer=tokenizer, use_logits=True, shift_labels=True,
                            metrics=metrics, eval_metrics=[LanguageCrossEntropy(), LanguagePerplexity()])


# ---------------------------------------------------------------------------------------------- optim
def build_optimizer(cfg: Mapping[str, Any], model: torch.nn.Module):
    """``optimizer: {name: decoupled_adamw | adamw, lr, betas, eps, weight_decay}``."""
    from composer.optim import DecoupledAdamW
    cfg = dict(cfg)
    name = cfg.pop('name', 'decoupled_adamw')
    _check_keys(cfg, {'lr', 'betas', 'eps', 'weight_decay'}, 'optimizer')
    _check_types(cfg, {'lr': float, 'eps': float, 'weight_decay': float, 'betas': list}, 'optimizer')
    if 'betas' in cfg and (len(cfg['betas']) != 2 or not all(_type_ok(b, float) for b in cfg['betas'])):
        raise ValueError(f"optimizer.betas: expected two numbers, got {cfg['betas']!r}.")
    if 'betas' in cfg:
        cfg['betas'] = tuple(cfg['betas'])
    classes = {'decoupled_adamw': DecoupledAdamW, 'adamw': torch.optim.AdamW}
    if name not in classes:
        raise ValueError(f'optimizer.name: {name!r} is not supported; use one of {sorted(classes)}.')
    return classes[name](model.parameters(), **cfg)


def build_scheduler(cfg: Optional[Mapping[str, Any]]):
    """``scheduler: {name: cosine_with_warmup | linear_decay_with_warmup | constant_with_warmup, t_warmup, alpha_f}``."""
    from composer.optim import (ConstantWithWarmupScheduler, CosineAnnealingWithWarmupScheduler,
                                LinearWithWarmupScheduler)
    if not cfg:
        return None
    cfg = dict(cfg)
    name = cfg.pop('name')
    classes = {
        'cosine_with_warmup': (CosineAnnealingWithWarmupScheduler, {'t_warmup', 'alpha_f', 't_max'}),
        'linear_decay_with_warmup': (LinearWithWarmupScheduler, {'t_warmup', 'alpha_i', 'alpha_f', 't_max'}),
        'constant_with_warmup': (ConstantWithWarmupScheduler, {'t_warmup', 'alpha', 't_max'}),
    }
    if name not in classes:
        raise ValueError(f'scheduler.name: {name!r} is not supported; use one of {sorted(classes)}.')
    cls, keys = classes[name]
    _check_keys(cfg, keys, f'scheduler ({name})')
    from composer.core import Time
    for key, value in cfg.items():
        if key.startswith('t_'):
            try:
                Time.from_input(value)
            except (ValueError, TypeError) as e:
                raise ValueError(f'scheduler.{key}: expected a Composer time such as 100ba or 0.1dur, '
                                 f'got {value!r} ({e}).') from e
        elif not _type_ok(value, float):
            raise ValueError(f'scheduler.{key}: expected a number, got {type(value).__name__} ({value!r}).')
    return cls(**cfg)


def build_callbacks(cfg: Optional[Mapping[str, Any]], run_dir: Optional[str] = None) -> list:
    """``callbacks: {lr_monitor: {}, speed_monitor: {window_size: 10}, memory_monitor: {}, runtime_estimator: {},
    trained_samples: {filename, fsync}}``.

    ``trained_samples`` (ours, :mod:`dwm_stream.train.callbacks`) records the uids of every trained batch, by
    default to ``<run_dir>/trained_samples-rank{rank}.jsonl``.
    """
    from composer.callbacks import LRMonitor, MemoryMonitor, RuntimeEstimator, SpeedMonitor
    from dwm_stream.train.callbacks import TrainedSamples
    known = {'lr_monitor': LRMonitor, 'speed_monitor': SpeedMonitor, 'memory_monitor': MemoryMonitor,
             'runtime_estimator': RuntimeEstimator, 'trained_samples': TrainedSamples}
    callbacks = []
    for name, kwargs in (cfg or {}).items():
        if name not in known:
            raise ValueError(f'callbacks.{name}: unknown callback; valid are {sorted(known)}.')
        kwargs = dict(kwargs or {})
        if name == 'trained_samples':
            _check_keys(kwargs, {'filename', 'fsync'}, 'callbacks.trained_samples')
            kwargs['run_dir'] = run_dir
        try:
            callbacks.append(known[name](**kwargs))
        except TypeError as e:
            raise ValueError(f'callbacks.{name}: {e}') from e
    return callbacks


def build_loggers(cfg: Optional[Mapping[str, Any]], run_dir: Optional[str]) -> list:
    """``loggers: {metrics_jsonl: {filename}, file: {filename}, tensorboard: {}}``.

    ``metrics_jsonl`` (ours) writes every logged metric with its batch index, which
    ``dwm-stream report`` and the demo read.
    """
    from composer.loggers import FileLogger
    from dwm_stream.train.loggers import MetricsJSONLLogger
    loggers = []
    for name, kwargs in (cfg or {}).items():
        kwargs = dict(kwargs or {})
        if name == 'metrics_jsonl':
            filename = kwargs.pop('filename', None) or os.path.join(run_dir or '.', 'metrics.jsonl')
            _check_keys(kwargs, set(), 'loggers.metrics_jsonl')
            loggers.append(MetricsJSONLLogger(filename))
        elif name == 'file':
            loggers.append(FileLogger(**kwargs))
        elif name == 'tensorboard':
            from composer.loggers import TensorboardLogger
            loggers.append(TensorboardLogger(**kwargs))
        else:
            raise ValueError(f'loggers.{name}: unknown logger; valid are [file, metrics_jsonl, tensorboard].')
    return loggers


# ---------------------------------------------------------------------------------------------- data
LOADER_KEYS = {'name', 'dataset', 'num_workers', 'drop_last', 'prefetch_factor', 'persistent_workers',
               'pin_memory', 'timeout'}


def build_train_dataloader(cfg: Mapping[str, Any], device_batch_size: int, where: str = 'train_loader'):
    """``train_loader: {name: dwm, dataset: {...}, num_workers, drop_last, ...}`` -> ``DataSpec``."""
    cfg = dict(cfg)
    _check_keys(cfg, LOADER_KEYS, where)
    name = cfg.pop('name', 'dwm')
    if name != 'dwm':
        raise ValueError(f"{where}.name: {name!r}; dwm-stream builds `name: dwm` loaders.")
    if 'dataset' not in cfg:
        raise ValueError(f'{where}.dataset is required (remote/local/streams/selection/shuffle...).')
    dataset = cfg.pop('dataset')
    return build_dataloader(dataset, device_batch_size, where=f'{where}.dataset', **cfg)


class WidenedLoader:
    """Re-iterable: a ``DWMDataset`` loader whose batches are widened (int64 ids + labels)."""

    def __init__(self, dataset_cfg: Mapping[str, Any], batch_size: int, where: str) -> None:
        self.dataset_cfg, self.batch_size, self.where = dict(dataset_cfg), batch_size, where
        self._loader = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._loader is None:
            from torch.utils.data import DataLoader
            dataset = build_dataset(self.dataset_cfg, self.batch_size, where=self.where)
            self._loader = DataLoader(dataset, batch_size=self.batch_size, collate_fn=collate_samples,
                                      drop_last=True)
        return (widen_batch(batch) for batch in self._loader)


# ---------------------------------------------------------------------------------------------- DWM
REFIT_LOADER_KEYS = {'dataset', 'batch_size'}
VALIDATION_KEYS = {'lambada', 'dataset', 'tokenizer', 'batch_size', 'max_length'}


class ConfiguredDWM(DWM):
    """:class:`algorithms.dwm.DWM` built from YAML: its loaders are given as configs.

    Takes every ``DWM`` argument, except that the two loaders are configs:

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
        import inspect
        valid = set(inspect.signature(DWM.__init__).parameters) - {'self', 'refit_dataloader', 'val_dataloader'}
        valid |= {'refit_loader', 'validation'}
        unknown = set(kwargs) - valid
        if unknown:
            raise ValueError(f'algorithms.dwm: unknown key(s) {sorted(unknown)}; valid keys are {sorted(valid)}.')
        import typing
        _check_types(kwargs, typing.get_type_hints(DWM.__init__), 'algorithms.dwm')
        refit_cfg = dict(refit_loader or {})
        _check_keys(refit_cfg, REFIT_LOADER_KEYS, 'algorithms.dwm.refit_loader')
        val_cfg = dict(validation or {})
        _check_keys(val_cfg, VALIDATION_KEYS, 'algorithms.dwm.validation')
        batch_size = refit_cfg.get('batch_size') or device_batch_size or 8
        refit = None
        if kwargs.get('refit', True):
            dataset_cfg = dict(train_dataset or {})
            dataset_cfg.update(refit_cfg.get('dataset') or {})
            if not dataset_cfg:
                raise ValueError('algorithms.dwm.refit_loader.dataset is required (the training corpus, '
                                 'with its own shuffle_seed).')
            if 'dataset' not in refit_cfg or 'shuffle_seed' not in refit_cfg['dataset']:
                dataset_cfg['shuffle_seed'] = int(dataset_cfg.get('shuffle_seed', 9176)) + 1
            if dataset_cfg.get('remote') and 'local' in dataset_cfg and not (refit_cfg.get('dataset') or {}).get('local'):
                dataset_cfg['local'] = str(dataset_cfg['local']).rstrip('/') + '.refit'
            dataset_cfg.pop('batch_size', None)
            refit = WidenedLoader(dataset_cfg, batch_size, 'algorithms.dwm.refit_loader.dataset')
        val = None
        if val_cfg:
            val_batch = val_cfg.get('batch_size') or batch_size
            if 'lambada' in val_cfg:
                from algorithms.dwm import ValidationBatches
                tok = tokenizer
                if val_cfg.get('tokenizer'):
                    from dwm_stream.convert.tokenizer import load_tokenizer
                    tok = load_tokenizer(val_cfg['tokenizer'])
                if tok is None:
                    raise ValueError('algorithms.dwm.validation.tokenizer is required (the LLM tokenizer).')
                val = ValidationBatches(val_cfg['lambada'], tok, batch_size=val_batch,
                                        max_length=val_cfg.get('max_length'))
            elif 'dataset' in val_cfg:
                val = WidenedLoader(val_cfg['dataset'], val_batch, 'algorithms.dwm.validation.dataset')
            else:
                raise ValueError('algorithms.dwm.validation needs `lambada: PATH` or `dataset: {...}`.')
        super().__init__(refit_dataloader=refit, val_dataloader=val, **kwargs)
