"""Train from a YAML in LLM Foundry's layout: ``dwm-stream train CONFIG.yaml [key=value ...]``.

Data-parallel: ``composer -n N -m dwm_stream.train CONFIG.yaml [key=value ...]``.

The config is loaded with omegaconf (as LLM Foundry does), so ``${variables.x}`` and
``${oc.env:VAR,default}`` interpolations work and ``key.sub=value`` overrides apply, and then checked
against the schema in :mod:`dwm_stream.train.config`: an unknown key or a wrong type fails naming the
key (and the valid keys) before anything is built, and an LLM Foundry key that only ``llmfoundry
train`` runs fails saying so. See the README's YAML reference.

Console output: on a terminal, Composer's progress bar; anywhere else (a pipe, a file, CI), one
short line every ``console_log_interval`` (default ``10ba``) instead of the bar's redraws, unless
the YAML sets ``progress_bar`` or ``log_to_console`` itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from typing import Any, Optional, Sequence

import torch
from composer import Trainer
from composer.core import Evaluator, State
from composer.devices import DeviceCPU, DeviceGPU
from composer.loggers import ConsoleLogger
from composer.loggers.logger import format_log_data_value
from composer.utils import dist, reproducibility
from dwm_stream.progress import is_terminal
from dwm_stream.train import builders, config
from dwm_stream.train.checkpoint_safety import install as load_checkpoints_weights_only
from dwm_stream.train.config import ConfigError, RunConfig, TrainConfig, check_train_config
from dwm_stream.train.precheck import load_yaml

__all__ = ['load_config', 'build_trainer', 'fit', 'main', 'ConsoleLineLogger']


def load_config(path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Load a YAML config, apply ``key.sub=value`` overrides, resolve interpolations, and check it.

    Returns:
        dict: The resolved config as plain Python values (only the keys it sets).

    Raises:
        ValueError: The file is not YAML, an override is not ``key=value``, or the config does not fit
            :class:`~dwm_stream.train.config.TrainConfig` (a :class:`~dwm_stream.train.config.ConfigError` naming
            the key).
    """
    resolved = load_yaml(path, overrides)
    _check(resolved, path)
    return resolved


def _check(cfg: Any, config_path: str) -> RunConfig:
    try:
        return check_train_config(cfg)
    except ConfigError as e:
        raise ConfigError(f'{config_path}: {e}') from None


class ConsoleLineLogger(ConsoleLogger):
    """Composer's console logger, one line per log: where training is and its headline metrics.

    For a pipe or a file, where the progress bar's redraws would be thousands of lines and Composer's
    own console logger writes a line per metric (dozens with DWM's per-domain metrics). Eval logs one
    line at its end.
    """

    HEADLINE = ('loss/train/total', 'lr-', 'dwm/stage', 'dwm/weight/ess', 'dwm/refit/count',
                'dwm/refit/val_loss_after', 'metrics/eval/LanguageCrossEntropy')

    def _log_hparams_to_console(self) -> None:
        pass  # the YAML is the record of the config

    def eval_batch_end(self, state: State, logger: Any) -> None:
        pass  # no per-decile eval progress lines

    def log_to_console(self, data: dict[str, Any], state: State, prefix: str = '', is_train: bool = True) -> None:
        fields = [f'{name}: {format_log_data_value(data[name])}' for headline in self.HEADLINE
                  for name in sorted(data) if name.startswith(headline)]  # in HEADLINE's order
        where = self._get_progress_string(state) + ('' if is_train else ' eval')
        self._log_to_console(' '.join([where, ', '.join(fields)]).rstrip())


def _console_output(train: TrainConfig) -> tuple[bool, bool, list]:
    """``(progress_bar, log_to_console, extra loggers)``: what the YAML says, else a bar only on a terminal.

    Composer writes both to stderr (its default ``console_stream``), so that is the stream whose
    terminal-ness decides.
    """
    progress_bar, log_to_console = train.progress_bar, train.log_to_console
    if progress_bar is None and log_to_console is None:
        if is_terminal(sys.stderr):
            return True, False, []
        return False, False, [ConsoleLineLogger(log_interval=train.console_log_interval, stream='stderr')]
    if progress_bar is None:
        progress_bar = not log_to_console and is_terminal(sys.stderr)
    if log_to_console is None:
        log_to_console = not progress_bar
    return progress_bar, log_to_console, []


def _foundry_settings(train: TrainConfig, world_size: int, config_path: str) -> None:
    """The LLM Foundry keys that act before anything is built: the ignored ones warn (FSDP/TP on one process, as
    ``llmfoundry train`` reverts to DDP there; several processes refuse them), the CUDA allocator ones set the
    environment as Foundry does."""
    for key in ('fsdp_config', 'tp_config'):
        if getattr(train, key) is not None:
            if world_size > 1:
                raise ConfigError(f'{config_path}: ' + config.refused(key, 'FSDP / tensor parallelism; dwm-stream train '
                                                                    'trains with DDP, and DWM needs the full model '
                                                                    'on every rank'))
            warnings.warn(f'{key}: ignored ({config.FOUNDRY_IGNORED[key]}).')
    for key in ('device_train_batch_size', 'n_gpus', 'device_train_grad_accum'):
        if getattr(train, key) is not None:
            warnings.warn(f'{key}: ignored ({config.FOUNDRY_IGNORED[key]}).')
    alloc = [] if train.max_split_size_mb is None else [f'max_split_size_mb:{train.max_split_size_mb}']
    if train.expandable_segments is not None:
        alloc.append(f'expandable_segments:{train.expandable_segments}')
    if alloc:
        os.environ['PYTORCH_CUDA_ALLOC_CONF'] = ','.join(alloc)
    if train.cuda_load_lazy:
        os.environ['CUDA_MODULE_LOADING'] = 'LAZY'


def _model_config(settings: config.ModelConfig | config.Component) -> config.ModelConfig | config.Component:
    """``init_device: meta`` needs FSDP to materialise the model; dwm-stream train builds it on the CPU instead, as
    ``llmfoundry train`` does without FSDP."""
    own = isinstance(settings, config.ModelConfig)
    device = settings.init_device if own else settings.kwargs.get('init_device')
    if device not in ('meta', 'mixed'):
        return settings
    warnings.warn(f"model.init_device: {device!r} is for FSDP; building the model on 'cpu', "
                  'as llmfoundry train does without FSDP.')
    if own:
        return dataclasses.replace(settings, init_device='cpu')
    return config.Component(settings.name, {**settings.kwargs, 'init_device': 'cpu'})


def _eval_metric_names(model: Any) -> list[str]:
    """The model's eval metrics but the in-context-learning ones (they need ICL batches), as LLM Foundry picks them."""
    return [name for name, metric in model.get_metrics(is_train=False).items()
            if not any(cls.__name__ == 'InContextLearningMetric' for cls in type(metric).__mro__)]


def build_trainer(cfg: dict[str, Any], config_path: str = 'config') -> Trainer:
    """Build a Composer ``Trainer`` (not yet fit) from a loaded config.

    Everything the run needs is checked here, before any training step: the config (schema), each section as it is
    built, and DWM's data, schedule and ``save_dir`` at Composer's ``INIT`` (in the ``Trainer``'s construction).
    """
    run = _check(cfg, config_path)
    train = run.top
    load_checkpoints_weights_only()  # Composer 0.32 unpickles checkpoints fully; see checkpoint_safety

    reproducibility.seed_all(train.seed)
    device = train.device or ('gpu' if torch.cuda.is_available() else 'cpu')
    if not dist.is_initialized() and int(os.environ.get('WORLD_SIZE', '1')) > 1:
        dist.initialize_dist(DeviceGPU() if device == 'gpu' else DeviceCPU(), train.dist_timeout)
    world_size = dist.get_world_size()
    _foundry_settings(train, world_size, config_path)
    global_batch = train.global_train_batch_size
    if global_batch % world_size:
        raise ValueError(f'{config_path}: global_train_batch_size={global_batch} is not divisible by the '
                         f'world size {world_size}.')
    device_batch = global_batch // world_size
    save_folder = train.save_folder
    run_dir = save_folder if save_folder and '://' not in save_folder else os.path.join('runs', train.run_name)

    tokenizer = builders.build_tokenizer(run.tokenizer)
    model = builders.build_model(_model_config(run.model), tokenizer)
    train_spec = builders.build_train_dataloader(run.train_loader, device_batch, tokenizer=tokenizer)
    eval_spec = None
    if run.eval_loader is not None:
        eval_spec = Evaluator(label='eval',
                              dataloader=builders.build_eval_dataloader(
                                  run.eval_loader, train.device_eval_batch_size or device_batch,
                                  tokenizer=tokenizer),
                              metric_names=_eval_metric_names(model))

    algorithms = []
    for name, settings in run.algorithms.items():  # `name: null`: its defaults
        if name != 'dwm':
            algorithms.append(builders.build_algorithm(name, settings))
            continue
        settings = settings or config.DWMSection()
        if settings.save_dir is None and run_dir:
            settings = dataclasses.replace(settings, save_dir=os.path.join(run_dir, 'dwm_schedule'))
        # The top-level save_overwrite is Composer's (checkpoints); DWM's schedule has algorithms.dwm.save_overwrite,
        # as under llmfoundry train, where the algorithm sees only its own keys.
        train_dataset = (config.set_keys(run.train_loader.dataset)
                         if not isinstance(run.train_loader, config.Component) else None)
        algorithms.append(builders.ConfiguredDWM.from_section(settings, train_dataset=train_dataset,
                                                              tokenizer=tokenizer, device_batch_size=device_batch))

    optimizer = builders.build_optimizer(run.optimizer, model)  # none: decoupled_adamw, its own defaults
    loggers = builders.build_loggers(run.loggers, run_dir)
    progress_bar, log_to_console, console_loggers = _console_output(train)
    optional = {key: getattr(train, key) for key in ('save_filename', 'save_latest_filename', 'compile_config')
                if getattr(train, key) is not None}
    with warnings.catch_warnings():
        # Composer warns when a ConsoleLogger comes in `loggers`; ConsoleLineLogger is meant to.
        warnings.filterwarnings('ignore', message='Specifying the ConsoleLogger via `loggers`')
        trainer = Trainer(
            run_name=train.run_name,
            model=model,
            train_dataloader=train_spec,
            train_subset_num_batches=train.train_subset_num_batches,
            spin_dataloaders=train.spin_dataloaders,
            eval_dataloader=eval_spec,
            eval_interval=train.eval_interval,
            eval_subset_num_batches=train.eval_subset_num_batches,
            max_duration=train.max_duration,
            optimizers=optimizer,
            schedulers=builders.build_scheduler(run.scheduler),
            algorithms=algorithms,
            callbacks=builders.build_callbacks(run.callbacks, run_dir),
            loggers=loggers + console_loggers,
            device=device,
            device_train_microbatch_size=train.device_train_microbatch_size or device_batch,
            accumulate_train_batch_on_tokens=train.accumulate_train_batch_on_tokens,
            precision=train.precision or ('fp32' if device == 'cpu' else 'amp_bf16'),
            seed=train.seed,
            save_folder=save_folder,
            save_interval=train.save_interval,
            save_num_checkpoints_to_keep=train.save_num_checkpoints_to_keep,
            save_overwrite=train.save_overwrite,
            save_weights_only=train.save_weights_only,
            save_ignore_keys=train.save_ignore_keys,
            autoresume=train.autoresume,
            load_path=train.load_path,
            load_weights_only=train.load_weights_only,
            load_strict_model_weights=train.load_strict_model_weights,
            load_ignore_keys=train.load_ignore_keys,
            progress_bar=progress_bar,
            log_to_console=log_to_console,
            console_log_interval=train.console_log_interval,
            python_log_level=train.python_log_level,
            dist_timeout=train.dist_timeout,
            **optional,
        )
    if train.log_config:
        trainer.logger.log_hyperparameters({k: v for k, v in cfg.items() if k != 'variables'})
    if train.metadata:
        trainer.logger.log_hyperparameters(dict(train.metadata) if train.flatten_metadata
                                           else {'metadata': dict(train.metadata)})
    return trainer


def fit(trainer: Trainer, cfg: dict[str, Any]) -> None:
    """``eval_first`` (at batch 0, as LLM Foundry does), then ``trainer.fit()``."""
    if cfg.get('eval_first') and int(trainer.state.timestamp.batch) == 0:
        trainer.eval()
    trainer.fit()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog='dwm-stream train',
        description='Train a causal LM with Composer from a YAML in LLM Foundry\'s layout. '
                    'Data-parallel: composer -n N -m dwm_stream.train CONFIG.yaml [overrides].')
    parser.add_argument('config', help='the YAML config (see yamls/ and the README\'s YAML reference)')
    parser.add_argument('overrides', nargs='*', help='key.sub=value overrides, e.g. max_duration=20ba')
    args = parser.parse_args(argv)
    cfg = load_yaml(args.config, args.overrides)  # checked once, by build_trainer (and lightly before the imports)
    trainer = build_trainer(cfg, config_path=args.config)
    fit(trainer, cfg)
    trainer.close()
    return 0
