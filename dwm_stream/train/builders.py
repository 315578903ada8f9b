"""Build each training component from its config section, one small function each.

The YAML layout is LLM Foundry's (``model``, ``tokenizer``, ``train_loader``, ``eval_loader``,
``algorithms``, ``optimizer``, ``scheduler``, ``callbacks``, ``loggers``); ``dwm_stream.train.entry``
assembles the pieces into a Composer ``Trainer``, and ``dwm_stream.train.foundry`` exposes the same
dataloader and algorithm to LLM Foundry's registries. A builder takes its section as
:func:`dwm_stream.train.config.check_train_config` typed it (a :class:`~dwm_stream.train.config.RunConfig` field):
the config is checked once, at the edge, and an error names the YAML key. Under LLM Foundry, whose registry passes
raw keyword arguments, the registered loader and algorithm are that edge and check their own.

A name that is not dwm-stream's own (an algorithm, callback or logger other than ours, an ``mpt_causal_lm``
model, a ``text`` loader, a Lion optimizer...) is built from LLM Foundry's registry name
(:func:`dwm_stream.train.config.component`), as ``llmfoundry train`` builds it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import logging
import os
from typing import Any, Iterator, Mapping, Optional

import torch
from composer.core import DataSpec, Event, State, Time
from composer.loggers import Logger
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import HuggingFaceModel
from streaming import StreamingDataset
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from algorithms.dwm import DWM, ValidationBatches
from algorithms.dwm.config import DWMConfig, missing_loader_message
from dwm_stream.convert.tokenizer import load_tokenizer
from dwm_stream.data.loader import build_dataloader, build_dataset, collate_samples, widen_batch
from dwm_stream.data.vocabulary import check_token_ids
from dwm_stream.train import config

__all__ = ['build_tokenizer', 'build_model', 'build_optimizer', 'build_scheduler', 'build_callbacks',
           'build_loggers', 'build_algorithm', 'build_train_dataloader', 'build_eval_dataloader', 'ConfiguredDWM',
           'WidenedLoader']

log = logging.getLogger(__name__)


def _typed(settings: Any, kinds: tuple[type, ...], builder: str, section: str) -> None:
    """A builder takes a checked section; a raw mapping is refused, naming how to check it."""
    if not isinstance(settings, kinds):
        raise TypeError(f'{builder} takes the `{section}` section as checked by dwm_stream.train.config '
                        f'({" or ".join(k.__name__ for k in kinds)}), got {type(settings).__name__}; check a mapping '
                        'with config.check_train_config (a whole YAML) or config.check / config.check_model / '
                        'config.check_loader (one section).')


# ---------------------------------------------------------------------------------------------- model
def build_tokenizer(settings: config.TokenizerConfig):
    """``tokenizer: {name: PATH_OR_HF_NAME, kwargs: {...}}``: ``kwargs`` go to ``AutoTokenizer.from_pretrained``
    (``model_max_length``, ``padding_side``...), as LLM Foundry passes them."""
    _typed(settings, (config.TokenizerConfig,), 'build_tokenizer', 'tokenizer')
    # As LLM Foundry's build_tokenizer: DataLoader workers fork after the tokenizer has run (the LAMBADA validation
    # set), and each would print tokenizers' fork warning. A value the user set is kept.
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    try:
        tokenizer = load_tokenizer(settings.name, **settings.kwargs)
    except TypeError as e:
        raise ValueError(f'tokenizer.kwargs: {e}; give AutoTokenizer.from_pretrained keyword arguments') from e
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


def build_model(settings: config.ModelConfig | config.Component, tokenizer):
    """A Composer ``HuggingFaceModel`` around a causal LM.

    ``model: {name: llama, config_overrides: {hidden_size: ..., ...}}`` builds a fresh
    ``LlamaForCausalLM`` (vocab size from the tokenizer); ``name: hf_causal_lm`` with
    ``pretrained_model_name_or_path: LOCAL_DIR`` loads one (``pretrained: true`` for its weights).
    ``init_device: meta`` builds without allocating (used to check big YAMLs). Any other ``name`` is an LLM Foundry
    model (``mpt_causal_lm``...), built by Foundry's ``build_composer_model`` with Foundry's keys.
    """
    _typed(settings, (config.ModelConfig, config.Component), 'build_model', 'model')
    if isinstance(settings, config.Component):
        return _build_foundry_model(settings, tokenizer)
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
            raise ValueError('model.pretrained_model_name_or_path: required for name: hf_causal_lm; give a local '
                             'model directory or an HF model name.')
        hub = {'trust_remote_code': settings.trust_remote_code}
        if settings.use_auth_token:
            hub['token'] = True
        model_config = AutoConfig.from_pretrained(path, **hub, **overrides)
        model_config._attn_implementation = ('flash_attention_2' if settings.use_flash_attention_2
                                             else settings.attn_implementation)
        if settings.pretrained and settings.init_device != 'meta':
            model = AutoModelForCausalLM.from_pretrained(path, config=model_config, **hub)
        else:
            with torch.device(settings.init_device):
                model = AutoModelForCausalLM.from_config(model_config)
    else:  # pragma: no cover - config.check_model allows only these names here
        raise AssertionError(settings.name)
    return HuggingFaceModel(model, tokenizer=tokenizer, use_logits=True, shift_labels=True,
                            metrics=[LanguageCrossEntropy(), LanguagePerplexity()],
                            eval_metrics=[LanguageCrossEntropy(), LanguagePerplexity()])


def _build_foundry_model(settings: config.Component, tokenizer):
    """An LLM Foundry model by its registry name, as ``llmfoundry train`` builds one on a single process."""
    # only with LLM Foundry installed (config.check_model)
    from llmfoundry.utils import builders as foundry

    model_cfg = dict(settings.kwargs)
    return foundry.build_composer_model(name=settings.name, cfg=model_cfg, tokenizer=tokenizer,
                                        init_context=contextlib.nullcontext(),
                                        master_weights_dtype=model_cfg.pop('master_weights_dtype', None))


# ---------------------------------------------------------------------------------------------- optim
def build_optimizer(settings: Optional[config.Component], model: torch.nn.Module):
    """``optimizer: {name: decoupled_adamw | adamw, lr, betas, eps, weight_decay...}`` (unset: the optimizer's own
    defaults; no section: ``decoupled_adamw``); another name is a registry optimizer (LLM Foundry's
    ``decoupled_lionw``...) with its own keyword arguments."""
    settings = settings or config.Component('decoupled_adamw')
    _typed(settings, (config.Component,), 'build_optimizer', 'optimizer')
    kwargs = {k: v for k, v in settings.kwargs.items() if v is not None}
    if isinstance(kwargs.get('betas'), (list, tuple)):
        if len(kwargs['betas']) != 2:
            raise ValueError(f"optimizer.betas: expected two numbers, got {kwargs['betas']!r}.")
        kwargs['betas'] = tuple(kwargs['betas'])
    return config.component('optimizers', settings.name)(model.parameters(), **kwargs)


def build_scheduler(settings: Optional[config.Component]):
    """``scheduler: {name: cosine_with_warmup | linear_decay_with_warmup | constant_with_warmup, t_warmup, ...}``;
    another name is a registry scheduler (LLM Foundry's ``inv_sqrt_with_warmup``...)."""
    if settings is None:
        return None
    _typed(settings, (config.Component,), 'build_scheduler', 'scheduler')
    for key, value in settings.kwargs.items():
        if key.startswith('t_'):
            try:
                Time.from_input(value)
            except (ValueError, TypeError) as e:
                raise ValueError(f'scheduler.{key}: expected a Composer time such as 100ba or 0.1dur, '
                                 f'got {value!r} ({e}).') from e
    return config.component('schedulers', settings.name)(**settings.kwargs)


def build_callbacks(settings: Mapping[str, Mapping[str, Any]], run_dir: Optional[str] = None) -> list:
    """``callbacks: {lr_monitor: {}, speed_monitor: {window_size: 10}, memory_monitor: {}, runtime_estimator: {},
    trained_samples: {filename, fsync}}``: each callback with its keyword arguments (unset: its own defaults).

    ``trained_samples`` (ours, :mod:`dwm_stream.train.callbacks`) records the uids of every trained batch, by
    default to ``<run_dir>/trained_samples-rank{rank}.jsonl``. Any other name is a callback LLM Foundry registers
    (``optimizer_monitor``, ``early_stopper``, ``hf_checkpointer``...) with its own keyword arguments.
    """
    callbacks = []
    for name, kwargs in settings.items():  # the YAML's order
        if name == 'trained_samples':
            kwargs = {**kwargs, 'run_dir': run_dir}
        callbacks.append(config.component('callbacks', name)(**kwargs))
    return callbacks


def build_loggers(settings: Mapping[str, Mapping[str, Any]], run_dir: Optional[str]) -> list:
    """``loggers: {metrics_jsonl: {filename}, file: {filename, ...}, tensorboard: {log_dir, ...}}``: each logger with
    its keyword arguments (unset: its own defaults).

    ``metrics_jsonl`` (ours) writes every logged metric with its batch index, which
    ``dwm-stream report`` and the demo read; by default to ``<run_dir>/metrics.jsonl``. Any other name is a logger LLM
    Foundry registers (``wandb``, ``mlflow``, ``inmemory``...) with its own keyword arguments.
    """
    loggers = []
    for name, kwargs in settings.items():
        if name == 'metrics_jsonl':
            kwargs = {**kwargs, 'run_dir': run_dir}
        loggers.append(config.component('loggers', name)(**kwargs))
    return loggers


def build_algorithm(name: str, kwargs: Mapping[str, Any]):
    """A registry algorithm (``gradient_clipping``, ``alibi``...; ``dwm`` is :class:`ConfiguredDWM`) from its checked
    keyword arguments."""
    return config.component('algorithms', name)(**kwargs)


# ---------------------------------------------------------------------------------------------- data
def _build_loader(builder: str, settings: Any, device_batch_size: int, where: str, tokenizer: Any = None,
                  **defaults: Any) -> DataSpec:
    _typed(settings, (config.LoaderConfig, config.Component), builder, where)
    if isinstance(settings, config.Component):  # an LLM Foundry loader (`text`...), built as llmfoundry train does
        from llmfoundry.data import dataloader as foundry

        return foundry.build_dataloader({'name': settings.name, **settings.kwargs}, tokenizer, device_batch_size)
    kwargs = {**defaults, **config.set_keys(settings)}  # unset: build_dataloader's defaults
    dataset = kwargs.pop('dataset')
    kwargs.pop('name')
    return build_dataloader(dataset, device_batch_size, where=f'{where}.dataset', **kwargs)


def build_train_dataloader(settings: Any, device_batch_size: int, where: str = 'train_loader',
                           tokenizer: Any = None) -> DataSpec:
    """``train_loader: {name: dwm, dataset: {...}, num_workers, drop_last, ...}`` (a ``LoaderConfig``) -> ``DataSpec``;
    another ``name`` (a :class:`~dwm_stream.train.config.Component`) is an LLM Foundry loader (``text``...), which
    takes the ``tokenizer``."""
    return _build_loader('build_train_dataloader', settings, device_batch_size, where, tokenizer)


def build_eval_dataloader(settings: Any, device_batch_size: int, where: str = 'eval_loader',
                          tokenizer: Any = None) -> DataSpec:
    """``eval_loader``: as ``train_loader``, but ``drop_last`` defaults to ``false`` (the last partial batch is
    evaluated too)."""
    return _build_loader('build_eval_dataloader', settings, device_batch_size, where, tokenizer, drop_last=False)


class WidenedLoader:
    """Re-iterable: a ``DWMDataset`` loader whose batches are widened (int64 ids + labels).

    The config is checked when the loader is made; the dataset is built at the first iteration. ``drop_last``: only
    full batches (a refit or validation batch of another size would change what it averages), unless ``False`` (a
    pass that must see every sample).
    """

    def __init__(self, dataset_cfg: Mapping[str, Any], batch_size: int, where: str, drop_last: bool = True) -> None:
        config.check(config.DatasetConfig, dataset_cfg, where)
        self.dataset_cfg, self.batch_size, self.where = dict(dataset_cfg), batch_size, where
        self.drop_last = drop_last
        self._loader = None
        self._peeked: Optional[tuple[Iterator[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = None

    def _build(self) -> DataLoader:
        if self._loader is None:
            dataset = build_dataset(self.dataset_cfg, self.batch_size, where=self.where)
            self._loader = DataLoader(dataset, batch_size=self.batch_size, collate_fn=collate_samples,
                                      drop_last=self.drop_last)
        return self._loader

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._peeked is not None:  # continue the iteration peek() started: the same sequence as without it
            (iterator, first), self._peeked = self._peeked, None
            return itertools.chain([first], (widen_batch(batch) for batch in iterator))
        return (widen_batch(batch) for batch in self._build())

    def peek(self) -> dict[str, torch.Tensor]:
        """The first batch; the next ``iter()`` starts with it (``DWM`` checks its data with it at start-up).

        Raises:
            StopIteration: The dataset yields no full batch.
        """
        if self._peeked is None:
            iterator = iter(self._build())
            self._peeked = (iterator, widen_batch(next(iterator)))
        return self._peeked[1]


# ---------------------------------------------------------------------------------------------- DWM
# A dataset section's location: which corpus it reads and where streaming may write. Never taken from another
# section: a refit loader that names its own corpus reads that corpus, exactly as the YAML says.
LOCATION_KEYS = ('remote', 'local', 'split', 'streams')
_DEFAULT_SHUFFLE_SEED = inspect.signature(StreamingDataset).parameters['shuffle_seed'].default  # streaming's
_logged_fill_ins: set[tuple[str, ...]] = set()


def refit_dataset_config(train_dataset: Optional[Mapping[str, Any]],
                         refit_dataset: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """``algorithms.dwm.refit_loader.dataset`` with what the user left out filled in from ``train_loader.dataset``.

    A refit section that sets any location key (``remote``, ``local``, ``split``, ``streams``) keeps its own
    location: none of them is taken from the train loader (its ``remote`` with the refit's ``local`` would make
    streaming treat that directory as a download cache, and delete from it). A refit section without a location
    reads the train loader's corpus, through a cache of its own (``<local>.refit``) when that corpus is remote. Other
    keys (``shuffle``, ``max_seq_len``...) are filled in where the refit section leaves them out; ``shuffle_seed``
    defaults to the train loader's + 1 (its own order). Each fill-in is logged once per process.
    """
    train, refit = dict(train_dataset or {}), dict(refit_dataset or {})
    own_location = any(refit.get(key) is not None for key in LOCATION_KEYS)
    filled: dict[str, str] = {}
    dataset_cfg = dict(refit)
    for key, value in train.items():
        if key in refit or key == 'batch_size' or (own_location and key in LOCATION_KEYS):
            continue
        dataset_cfg[key] = value
        filled[key] = 'from train_loader.dataset'
    if 'shuffle_seed' not in refit and dataset_cfg:
        dataset_cfg['shuffle_seed'] = int(train.get('shuffle_seed', _DEFAULT_SHUFFLE_SEED)) + 1
        filled['shuffle_seed'] = 'train_loader.dataset.shuffle_seed + 1'
    if not own_location and dataset_cfg.get('remote') and dataset_cfg.get('local'):
        dataset_cfg['local'] = str(dataset_cfg['local']).rstrip('/') + '.refit'
        filled['local'] = "train_loader.dataset.local + '.refit' (a cache of its own)"
    dataset_cfg.pop('batch_size', None)
    if filled:
        message = 'algorithms.dwm.refit_loader.dataset: ' + '; '.join(f'{k} {v}' for k, v in sorted(filled.items()))
        key = tuple(sorted(filled.items()))
        if key not in _logged_fill_ins:
            _logged_fill_ins.add(key)
            log.info(message)
    return dataset_cfg


class ConfiguredDWM(DWM):
    """:class:`algorithms.dwm.DWM` built from YAML: its loaders are given as configs.

    Takes every option of DWM (:class:`algorithms.dwm.config.DWMConfig`), checked with the two loaders against
    :class:`dwm_stream.train.config.DWMSection`, except that the two loaders are configs:

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
        **kwargs: Any option of DWM (``num_stages``, ``save_dir``, ``save_overwrite``...).

    Raises:
        ConfigError: At construction (config load, under ``dwm-stream train`` and ``llmfoundry train`` alike), for a
            wrong key or type, and for a run that refits without ``validation`` (or, under LLM Foundry, without
            ``refit_loader.dataset`` or ``validation.tokenizer``) or whose ``validation.lambada`` file does not exist.
            The data itself is checked at Composer's ``INIT`` (:class:`~algorithms.dwm.DWM`).
    """

    def __init__(self,
                 refit_loader: Optional[Mapping[str, Any]] = None,
                 validation: Optional[Mapping[str, Any]] = None,
                 train_dataset: Optional[Mapping[str, Any]] = None,
                 tokenizer: Any = None,
                 device_batch_size: Optional[int] = None,
                 **kwargs: Any) -> None:
        # LLM Foundry's registry builds the algorithm from raw keyword arguments: this is its edge, checked here.
        settings = config.check(config.DWMSection, {**kwargs, 'refit_loader': refit_loader, 'validation': validation},
                                'algorithms.dwm')
        self._configure(settings, train_dataset, tokenizer, device_batch_size)

    @classmethod
    def from_section(cls, section: Optional[config.DWMSection], train_dataset: Optional[Mapping[str, Any]] = None,
                     tokenizer: Any = None, device_batch_size: Optional[int] = None) -> 'ConfiguredDWM':
        """From the ``algorithms.dwm`` section :func:`~dwm_stream.train.config.check_train_config` typed (``None``:
        every default); not checked again."""
        self = cls.__new__(cls)
        self._configure(section or config.DWMSection(), train_dataset, tokenizer, device_batch_size)
        return self

    def _configure(self, settings: config.DWMSection, train_dataset: Optional[Mapping[str, Any]], tokenizer: Any,
                   device_batch_size: Optional[int]) -> None:
        refit_cfg = config.set_keys(settings.refit_loader)  # the keys the YAML sets: the rest is filled in below
        val_cfg = config.set_keys(settings.validation)
        batch_size = refit_cfg.get('batch_size') or device_batch_size or 8
        if settings.refits() and not val_cfg:
            raise config.ConfigError(missing_loader_message('validation', 'algorithms.dwm.validation') + '.')
        refit = None
        if settings.refit:
            refit_dataset = dict(refit_cfg.get('dataset') or {})
            dataset_cfg = refit_dataset_config(train_dataset, refit_dataset)
            if not dataset_cfg:
                raise config.ConfigError('algorithms.dwm.refit_loader.dataset: missing (under llmfoundry train the '
                                         'algorithm sees only its own keys); give the training corpus (remote/local, '
                                         'its own shuffle_seed), or algorithms.dwm.refit: false.')
            refit = WidenedLoader(dataset_cfg, batch_size, 'algorithms.dwm.refit_loader.dataset')
        val = None
        if val_cfg:
            val_batch = val_cfg.get('batch_size') or batch_size
            if val_cfg.get('lambada'):
                if not os.path.isfile(val_cfg['lambada']):
                    raise config.ConfigError(f'algorithms.dwm.validation.lambada: {val_cfg["lambada"]} does not exist; '
                                             'give a LAMBADA-format file (one {"context", "continuation"} per line).')
                if not val_cfg.get('tokenizer') and tokenizer is None:
                    raise config.ConfigError('algorithms.dwm.validation.tokenizer: missing (under llmfoundry train the '
                                             "algorithm does not see the model's); give the tokenizer's name or "
                                             'directory.')
                tok = load_tokenizer(val_cfg['tokenizer']) if val_cfg.get('tokenizer') else tokenizer
                val = ValidationBatches(val_cfg['lambada'], tok, batch_size=val_batch,
                                        max_length=val_cfg.get('max_length'))
            elif val_cfg.get('dataset'):
                val = WidenedLoader(val_cfg['dataset'], val_batch, 'algorithms.dwm.validation.dataset')
            else:
                raise config.ConfigError('algorithms.dwm.validation: needs `lambada: PATH` or `dataset: {...}`; set '
                                         'one.')
        super().__init__(DWMConfig.from_any(settings), refit_dataloader=refit, val_dataloader=val)
        self._run_tokenizer = getattr(tokenizer, 'name_or_path', None)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:  # the train loader is on the State from here on; no batch has run yet
            self._check_token_ids(state)
        super().apply(event, state, logger)

    def _check_token_ids(self, state: State) -> None:
        """Every corpus's largest token id (``dwm.json``) fits the model's and the weighter's vocabulary."""
        model = getattr(state.model, 'module', state.model)
        inner = getattr(model, 'model', model)
        try:
            model_vocab = int(inner.get_input_embeddings().num_embeddings)
        except (AttributeError, NotImplementedError, TypeError):
            model_vocab = getattr(getattr(inner, 'config', None), 'vocab_size', None)
        vocabularies = {'model.vocab_size': model_vocab,
                        'algorithms.dwm.weighter.vocab_size': self.weighter_config.vocab_size}
        tokenizer = self._run_tokenizer or getattr(getattr(model, 'tokenizer', None), 'name_or_path', None)
        loaders = [('train_loader.dataset', getattr(state.train_dataloader, 'dataset', None))]
        for name, cycler in (('algorithms.dwm.refit_loader.dataset', self.refit_batches),
                             ('algorithms.dwm.validation.dataset', self.val_batches)):
            loader = getattr(cycler.source, '_loader', None)
            loaders.append((name, getattr(loader, 'dataset', None)))
        for where, dataset in loaders:
            check_token_ids(dataset, where, vocabularies, tokenizer)
