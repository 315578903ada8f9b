"""Train from a YAML in LLM Foundry's layout: ``dwm-stream train CONFIG.yaml [key=value ...]``.

Data-parallel: ``composer -n N -m dwm_stream.train CONFIG.yaml [key=value ...]``.

The config is loaded with omegaconf (as LLM Foundry does), so ``${oc.env:VAR,default}``
interpolations work and ``key.sub=value`` overrides apply. Unknown keys fail with the valid keys
listed. See the README's YAML reference.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Optional, Sequence

__all__ = ['load_config', 'build_trainer', 'main', 'TOP_LEVEL_KEYS']

# Top-level keys and what they are for (also the README's YAML reference).
TOP_LEVEL_KEYS = {
    'run_name': 'name of the run (checkpoints and logs go under save_folder)',
    'seed': 'global seed (model init, Composer)',
    'max_seq_len': 'informational; the corpus fixes the sequence length',
    'model': 'model section: name llama|hf_causal_lm, config_overrides, pretrained_model_name_or_path',
    'tokenizer': 'tokenizer section: name (a local dir or HF name)',
    'train_loader': 'name: dwm, dataset: {...}, num_workers, ...',
    'eval_loader': 'name: dwm, dataset: {...} (held-out MDS corpus) for eval loss',
    'algorithms': 'algorithms: {dwm: {...}}',
    'optimizer': 'name: decoupled_adamw|adamw, lr, betas, eps, weight_decay',
    'scheduler': 'name: cosine_with_warmup|linear_decay_with_warmup|constant_with_warmup, t_warmup, alpha_f',
    'callbacks': 'lr_monitor, speed_monitor, memory_monitor, runtime_estimator, trained_samples',
    'loggers': 'metrics_jsonl, file, tensorboard',
    'max_duration': 'Composer time, e.g. 200ba or 30000000000tok',
    'eval_interval': 'Composer time between evaluations, e.g. 50ba',
    'eval_subset_num_batches': 'batches per evaluation (-1: all)',
    'global_train_batch_size': 'samples per optimizer step over all ranks',
    'device_train_microbatch_size': 'samples per forward/backward on one rank (int or auto)',
    'device_eval_batch_size': 'samples per eval batch on one rank',
    'accumulate_train_batch_on_tokens': 'scale microbatch losses by tokens, not samples',
    'precision': 'fp32 | amp_bf16 | amp_fp16',
    'device': 'cpu | gpu (default: gpu if available)',
    'save_folder': 'checkpoint folder (local or s3://)',
    'save_interval': 'Composer time between checkpoints',
    'save_num_checkpoints_to_keep': 'local checkpoints kept (-1: all)',
    'save_overwrite': 'overwrite existing checkpoints',
    'autoresume': 'resume from the latest checkpoint in save_folder',
    'load_path': 'checkpoint to load (weights, optimizer, dataset position, DWM state)',
    'progress_bar': 'show a progress bar',
    'log_to_console': 'print metrics to the console',
    'console_log_interval': 'Composer time between console logs',
    'dist_timeout': 'seconds to wait for other ranks',
    'python_log_level': 'logging level for composer/streaming/dwm modules',
}


def load_config(path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Load a YAML config and apply ``key.sub=value`` overrides; resolve interpolations."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    if not os.path.exists(path):
        raise FileNotFoundError(f'config {path} does not exist.')
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError carries the line in its message
        raise ValueError(f'{path}: not valid YAML: {e}') from e
    bad = [o for o in overrides if '=' not in o]
    if bad:
        raise ValueError(f'override {bad[0]!r} is not key=value (e.g. max_duration=10ba).')
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ValueError(f'{path}: {e}') from e
    if not isinstance(resolved, dict):
        raise ValueError(f'{path}: the top level must be a mapping of keys ({sorted(TOP_LEVEL_KEYS)}).')
    unknown = set(resolved) - set(TOP_LEVEL_KEYS)
    if unknown:
        raise ValueError(f'{path}: unknown top-level key(s) {sorted(unknown)}; valid keys are '
                         f'{sorted(TOP_LEVEL_KEYS)}.')
    return resolved


def _require(cfg: dict[str, Any], key: str, kind: type | tuple, where: str) -> Any:
    if key not in cfg:
        raise ValueError(f'{where}: `{key}` is required.')
    value = cfg[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else ' or '.join(k.__name__ for k in kind)
        raise ValueError(f'{where}: `{key}` must be {names}, got {type(value).__name__} ({value!r}).')
    return value


def build_trainer(cfg: dict[str, Any], config_path: str = 'config'):
    """Build a Composer ``Trainer`` (not yet fit) from a loaded config."""
    import torch
    from composer import Trainer
    from composer.utils import dist, reproducibility

    from dwm_stream.train import builders
    from dwm_stream.train.checkpoint_safety import install as load_checkpoints_weights_only
    load_checkpoints_weights_only()  # Composer 0.32 unpickles checkpoints fully; see checkpoint_safety

    seed = cfg.get('seed', 17)
    if not isinstance(seed, int):
        raise ValueError(f'{config_path}: `seed` must be int, got {seed!r}.')
    reproducibility.seed_all(seed)
    device = cfg.get('device') or ('gpu' if torch.cuda.is_available() else 'cpu')
    if not dist.is_initialized() and int(os.environ.get('WORLD_SIZE', '1')) > 1:
        from composer.devices import DeviceCPU, DeviceGPU
        dist.initialize_dist(DeviceGPU() if device == 'gpu' else DeviceCPU(), cfg.get('dist_timeout', 300))
    world_size = dist.get_world_size()
    global_batch = _require(cfg, 'global_train_batch_size', int, config_path)
    if global_batch % world_size:
        raise ValueError(f'{config_path}: global_train_batch_size={global_batch} is not divisible by the '
                         f'world size {world_size}.')
    device_batch = global_batch // world_size
    run_name = cfg.get('run_name', 'dwm-run')
    save_folder = cfg.get('save_folder')
    run_dir = save_folder if save_folder and '://' not in save_folder else os.path.join('runs', run_name)

    tokenizer = builders.build_tokenizer(_require(cfg, 'tokenizer', dict, config_path))
    model = builders.build_model(_require(cfg, 'model', dict, config_path), tokenizer)
    train_cfg = _require(cfg, 'train_loader', dict, config_path)
    train_spec = builders.build_train_dataloader(train_cfg, device_batch)
    eval_spec = None
    if cfg.get('eval_loader'):
        from composer.core import Evaluator
        eval_spec = Evaluator(label='eval',
                              dataloader=builders.build_train_dataloader(
                                  {'drop_last': False, **cfg['eval_loader']},
                                  cfg.get('device_eval_batch_size', device_batch), where='eval_loader'),
                              metric_names=['LanguageCrossEntropy', 'LanguagePerplexity'])

    algorithms = []
    for name, kwargs in (cfg.get('algorithms') or {}).items():
        if name != 'dwm':
            raise ValueError(f'algorithms.{name}: unknown algorithm; dwm-stream provides `dwm`.')
        kwargs = dict(kwargs or {})
        if kwargs.get('save_dir') is None and run_dir:
            kwargs['save_dir'] = os.path.join(run_dir, 'dwm_schedule')
        algorithms.append(builders.ConfiguredDWM(train_dataset=train_cfg.get('dataset'), tokenizer=tokenizer,
                                                 device_batch_size=device_batch, **kwargs))

    optimizer = builders.build_optimizer(cfg.get('optimizer') or {'name': 'decoupled_adamw', 'lr': 1e-3}, model)
    loggers = builders.build_loggers(cfg.get('loggers'), run_dir)
    trainer = Trainer(
        run_name=run_name,
        model=model,
        train_dataloader=train_spec,
        eval_dataloader=eval_spec,
        eval_interval=cfg.get('eval_interval', 1),
        eval_subset_num_batches=cfg.get('eval_subset_num_batches', -1),
        max_duration=_require(cfg, 'max_duration', (str, int), config_path),
        optimizers=optimizer,
        schedulers=builders.build_scheduler(cfg.get('scheduler')),
        algorithms=algorithms,
        callbacks=builders.build_callbacks(cfg.get('callbacks'), run_dir),
        loggers=loggers,
        device=device,
        device_train_microbatch_size=cfg.get('device_train_microbatch_size', device_batch),
        accumulate_train_batch_on_tokens=cfg.get('accumulate_train_batch_on_tokens', False),
        precision=cfg.get('precision', 'fp32' if device == 'cpu' else 'amp_bf16'),
        seed=seed,
        save_folder=save_folder,
        save_interval=cfg.get('save_interval', '1ep'),
        save_num_checkpoints_to_keep=cfg.get('save_num_checkpoints_to_keep', -1),
        save_overwrite=cfg.get('save_overwrite', False),
        autoresume=cfg.get('autoresume', False),
        load_path=cfg.get('load_path'),
        progress_bar=cfg.get('progress_bar', False),
        log_to_console=cfg.get('log_to_console', True),
        console_log_interval=cfg.get('console_log_interval', '10ba'),
        python_log_level=cfg.get('python_log_level'),
        dist_timeout=cfg.get('dist_timeout', 300),
    )
    return trainer


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog='dwm-stream train',
        description='Train a causal LM with Composer from a YAML in LLM Foundry\'s layout. '
                    'Data-parallel: composer -n N -m dwm_stream.train CONFIG.yaml [overrides].')
    parser.add_argument('config', help='the YAML config (see yamls/ and the README\'s YAML reference)')
    parser.add_argument('overrides', nargs='*', help='key.sub=value overrides, e.g. max_duration=20ba')
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    trainer = build_trainer(cfg, config_path=args.config)
    trainer.fit()
    trainer.close()
    return 0

