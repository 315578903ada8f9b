"""Every YAML in yamls/ loads and builds its Trainer pieces, so that no YAML rots.

The paper's YAMLs (370M / 1.3B, S3 remotes) are checked without a GPU or network: the tokenizer is
the test tokenizer (``DWM_TOKENIZER``), the models are built on the meta device, and the data
sections are pointed at a local copy of the test corpus by overrides. ``demo-cpu.yaml`` is tiny, so
it builds a full Composer ``Trainer``. Unknown keys and wrong types fail with a message that names
the key (and, for unknown keys, lists the valid ones).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil

import numpy as np
import pytest
import torch
from composer.core import Precision, Time, TimeUnit

from algorithms.dwm.export import load_schedule, save_weighter, write_saved_weighters
from algorithms.dwm import Weighter, WeighterConfig
from dwm_stream.data.selection import write_selection
from dwm_stream.train import builders, config
from dwm_stream.train.config import TrainConfig
from dwm_stream.train.entry import ConsoleLineLogger, build_trainer, load_config, main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
YAML_DIR = os.path.join(REPO, 'yamls')
ALL_YAMLS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(YAML_DIR, '*.yaml')))
PAPER_YAMLS = [
    'slimpajama-370m-random.yaml',
    'slimpajama-370m-random-dwm.yaml',
    'slimpajama-370m-dsir-dwm.yaml',
    'slimpajama-370m-qurating-dwm.yaml',
    'slimpajama-1.3b-transfer.yaml',
]
GPT_NEOX_VOCAB = 50277  # len(EleutherAI/gpt-neox-20b's tokenizer), the YAMLs' default tokenizer
# Environment variables that the YAMLs read (restored after each test by monkeypatch).
YAML_ENV = ['DWM_TOKENIZER', 'DWM_LAMBADA_VAL', 'DWM_TRAIN_REMOTE', 'DWM_VAL_REMOTE', 'DWM_CACHE',
            'DWM_SAVE_ROOT', 'DWM_SCHEDULE', 'DWM_DSIR_SELECTION', 'DWM_QURATING_SELECTION',
            'DWM_DEMO_TOKENIZER', 'DWM_DEMO_TRAIN_REMOTE', 'DWM_DEMO_VAL_REMOTE', 'DWM_DEMO_CACHE',
            'DWM_DEMO_LAMBADA_FIT']


def _path(name: str) -> str:
    return os.path.join(YAML_DIR, name)


@pytest.fixture(scope='module')
def local_mds(converted_mds, tmp_path_factory) -> str:
    """A private copy of the converted test corpus (the session fixture must not be modified)."""
    out = str(tmp_path_factory.mktemp('yaml-mds') / 'train')
    shutil.copytree(converted_mds, out)
    return out


@pytest.fixture
def yaml_env(monkeypatch, tmp_path, small_tokenizer, small_corpus):
    """The YAMLs' environment variables pointed at test files; cwd in a temp dir."""
    for key in YAML_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv('DWM_TOKENIZER', small_tokenizer)
    monkeypatch.setenv('DWM_DEMO_TOKENIZER', small_tokenizer)
    monkeypatch.setenv('DWM_LAMBADA_VAL', small_corpus.lambada_path)
    monkeypatch.setenv('DWM_DEMO_LAMBADA_FIT', small_corpus.lambada_path)
    monkeypatch.setenv('DWM_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('DWM_DEMO_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('TRANSFORMERS_OFFLINE', '1')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _local_data_overrides(cfg: dict, local_mds: str, selection: str | None = None) -> list[str]:
    """Overrides that point every data section of ``cfg`` at the local test corpus."""
    out = ['train_loader.dataset.remote=null', f'train_loader.dataset.local={local_mds}',
           'train_loader.num_workers=0', 'train_loader.persistent_workers=false',
           'train_loader.pin_memory=false']
    if 'prefetch_factor' in cfg['train_loader']:
        out.append('train_loader.prefetch_factor=null')
    if selection is not None:
        out.append(f'train_loader.dataset.selection={selection}')
    if cfg.get('eval_loader'):
        out += ['eval_loader.dataset.remote=null', f'eval_loader.dataset.local={local_mds}',
                'eval_loader.num_workers=0']
    dwm = (cfg.get('algorithms') or {}).get('dwm') or {}
    if (dwm.get('refit_loader') or {}).get('dataset'):
        out += ['algorithms.dwm.refit_loader.dataset.remote=null',
                f'algorithms.dwm.refit_loader.dataset.local={local_mds}']
        if selection is not None:
            out.append(f'algorithms.dwm.refit_loader.dataset.selection={selection}')
    return out


def _build_dwm(run: config.RunConfig, tokenizer, device_batch: int) -> list:
    """``algorithms.dwm`` as ``dwm-stream train`` builds it (without the Trainer)."""
    algorithms = []
    for name, section in run.algorithms.items():
        assert name == 'dwm'
        algorithms.append(builders.ConfiguredDWM.from_section(
            section, train_dataset=config.set_keys(run.train_loader.dataset), tokenizer=tokenizer,
            device_batch_size=device_batch))
    return algorithms


def _write_selection(local_mds: str, path: str, score: str) -> np.ndarray:
    uids = np.load(os.path.join(local_mds, 'uids.npy'))
    rng = np.random.default_rng(0)
    chosen = np.sort(rng.choice(uids, size=len(uids) // 2, replace=False))
    write_selection(path, chosen, prior_weight=rng.uniform(0.5, 2.0, len(chosen)).astype(np.float32),
                    scores={score: rng.normal(size=len(chosen)).astype(np.float32)},
                    info={'selector': score, 'test': True})
    return chosen


# ------------------------------------------------------------------------------------------------ inventory
def test_yaml_inventory():
    """The YAMLs the issue asks for are all there, and every YAML in yamls/ is under test."""
    assert set(PAPER_YAMLS + ['demo-cpu.yaml']) <= set(ALL_YAMLS)


@pytest.mark.parametrize('name', ALL_YAMLS)
def test_yaml_has_header_comment(name):
    with open(_path(name)) as f:
        text = f.read()
    header = text[:text.index('\n' + next(line for line in text.splitlines()
                                          if line and not line.startswith('#')))]
    assert text.startswith('#'), f'{name}: start with a comment saying what the YAML is for'
    assert len(header.splitlines()) >= 3, f'{name}: the header comment is too short'
    assert 'dwm-stream' in header, f'{name}: the header must say how to run it'


# ------------------------------------------------------------------------------------------------ the paper
@pytest.mark.parametrize('name', PAPER_YAMLS)
def test_paper_yaml_settings(name, yaml_env):
    """30B tokens, 5 stages, seq 2048, LAMBADA validation, S3 placeholders, bf16 on GPU, right sizes."""
    cfg = load_config(_path(name), ['model.init_device=meta',
                                    f'model.config_overrides.vocab_size={GPT_NEOX_VOCAB}'])
    assert cfg['tokenizer']['name'] == os.environ['DWM_TOKENIZER']
    duration = Time.from_timestring(str(cfg['max_duration']))
    if duration.unit == TimeUnit.TOKEN:
        assert duration.value == 30_000_000_000
    else:
        assert duration.unit == TimeUnit.BATCH
        tokens = duration.value * cfg['global_train_batch_size'] * cfg['max_seq_len']
        assert abs(tokens - 30e9) / 30e9 < 0.01
    assert cfg['max_seq_len'] == 2048
    assert cfg['model']['config_overrides']['max_position_embeddings'] == 2048
    assert Precision(cfg['precision']) == Precision.AMP_BF16
    assert cfg['device'] == 'gpu'
    # Placeholders: without the environment variables, the remotes are s3:// examples.
    assert cfg['train_loader']['dataset']['remote'] == 's3://your-bucket/slimpajama-mds/train'
    assert cfg['eval_loader']['dataset']['remote'] == 's3://your-bucket/slimpajama-mds/validation'
    assert cfg['save_folder'].startswith('s3://your-bucket/')
    assert cfg['autoresume'] is True

    dwm = (cfg.get('algorithms') or {}).get('dwm')
    if name == 'slimpajama-370m-random.yaml':
        assert dwm is None, 'the baseline has no DWM'
    else:
        assert dwm['num_stages'] == 5
    if name.endswith('-dwm.yaml'):
        assert dwm['validation']['lambada'] == os.environ['DWM_LAMBADA_VAL']
        assert dwm.get('refit', True) is True
    if 'dsir' in name or 'qurating' in name:
        selector = 'dsir' if 'dsir' in name else 'qurating'
        assert cfg['train_loader']['dataset']['selection'].startswith('s3://your-bucket/selections/')
        assert selector in cfg['train_loader']['dataset']['selection']
        # the refit loader draws from the same (selected) training distribution
        assert dwm['refit_loader']['dataset']['selection'] == cfg['train_loader']['dataset']['selection']
    if name == 'slimpajama-1.3b-transfer.yaml':
        assert dwm['refit'] is False
        assert dwm['schedule'].endswith('slimpajama-370m-random-dwm/dwm_schedule/schedule.json')

    # Model size with the default tokenizer's vocabulary (built on the meta device: no memory).
    run = config.check_train_config(cfg)
    tokenizer = builders.build_tokenizer(run.tokenizer)
    model = builders.build_model(run.model, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    assert all(p.device.type == 'meta' for p in model.parameters())
    if '370m' in name:
        assert 330e6 < n_params < 420e6, n_params
    else:
        assert 1.2e9 < n_params < 1.45e9, n_params


def test_env_overrides_remotes(yaml_env, monkeypatch):
    monkeypatch.setenv('DWM_TRAIN_REMOTE', 's3://elsewhere/train')
    monkeypatch.setenv('DWM_DSIR_SELECTION', 's3://elsewhere/dsir.parquet')
    cfg = load_config(_path('slimpajama-370m-dsir-dwm.yaml'))
    assert cfg['train_loader']['dataset']['remote'] == 's3://elsewhere/train'
    assert cfg['algorithms']['dwm']['refit_loader']['dataset']['remote'] == 's3://elsewhere/train'
    assert cfg['train_loader']['dataset']['selection'] == 's3://elsewhere/dsir.parquet'


@pytest.mark.parametrize('name', [n for n in PAPER_YAMLS if n.endswith('-dwm.yaml')])
def test_lambada_path_is_required(name, yaml_env, monkeypatch):
    monkeypatch.delenv('DWM_LAMBADA_VAL')
    with pytest.raises(ValueError, match='DWM_LAMBADA_VAL'):
        load_config(_path(name))


# ------------------------------------------------------------------------------------------------ builds
@pytest.mark.parametrize('name', PAPER_YAMLS)
def test_paper_yaml_builds(name, yaml_env, local_mds, small_tokenizer, monkeypatch):
    """Tokenizer, meta-device model, DWM, optimizer, scheduler, callbacks, loggers; data from a local copy."""
    tmp = yaml_env
    selection = None
    chosen = None
    if 'dsir' in name or 'qurating' in name:
        selection = str(tmp / 'selection.parquet')
        chosen = _write_selection(local_mds, selection, 'dsir' if 'dsir' in name else 'qurating')
    if name == 'slimpajama-1.3b-transfer.yaml':
        monkeypatch.setenv('DWM_SCHEDULE', _write_schedule(str(tmp / 'schedule-370m'), small_tokenizer))
    raw = load_config(_path(name))
    cfg = load_config(_path(name), ['model.init_device=meta', 'global_train_batch_size=4',
                                    'device_train_microbatch_size=4', 'device_eval_batch_size=4',
                                    *_local_data_overrides(raw, local_mds, selection)])
    assert set(cfg) <= {f.name for f in dataclasses.fields(TrainConfig)}
    run = config.check_train_config(cfg)
    tokenizer = builders.build_tokenizer(run.tokenizer)
    assert len(tokenizer) == 2048  # the test tokenizer, not the network's
    model = builders.build_model(run.model, tokenizer)
    assert {p.device.type for p in model.parameters()} == {'meta'}
    assert model.model.config.hidden_size == raw['model']['config_overrides']['hidden_size']
    optimizer = builders.build_optimizer(run.optimizer, model)
    assert optimizer.param_groups[0]['lr'] == raw['optimizer']['lr']
    scheduler = builders.build_scheduler(run.scheduler)
    assert scheduler is not None
    callbacks = builders.build_callbacks(run.callbacks)
    assert len(callbacks) == len(raw.get('callbacks') or {})
    loggers = builders.build_loggers(run.loggers, str(tmp / 'run'))
    assert len(loggers) == len(raw.get('loggers') or {})
    Time.from_timestring(str(cfg['eval_interval']))
    Time.from_timestring(str(cfg['save_interval']))

    algorithms = _build_dwm(run, tokenizer, device_batch=4)
    assert len(algorithms) == (0 if name == 'slimpajama-370m-random.yaml' else 1)

    # The train and eval loaders build and yield a batch (one is enough).
    train = builders.build_train_dataloader(run.train_loader, 4)
    batch = train.batch_transforms(next(iter(train.dataloader)))
    assert batch['input_ids'].shape == (4, 256) and batch['input_ids'].dtype == torch.int64
    if chosen is not None:
        assert set(batch['uid'].tolist()) <= set(chosen.tolist())
        assert not torch.all(batch['prior_weight'] == 1)
    builders.build_eval_dataloader(run.eval_loader, 4)

    if algorithms:
        dwm = algorithms[0]
        if dwm.config.refit:
            # The refit loader (train distribution, its own seed) and the LAMBADA validation set build.
            refit_batch = next(iter(_loader_of(dwm, 'refit')))
            assert refit_batch['input_ids'].shape[0] == raw['algorithms']['dwm']['refit_loader']['batch_size']
            if chosen is not None:
                assert set(refit_batch['uid'].tolist()) <= set(chosen.tolist())
            val_batch = next(iter(_loader_of(dwm, 'val')))
            assert val_batch['input_ids'].shape[0] <= raw['algorithms']['dwm']['validation']['batch_size']
            assert (val_batch['labels'] != -100).any()
        else:
            stages = load_schedule(dwm.config.schedule)
            assert stages[0][1].config.vocab_size == len(tokenizer)


def _loader_of(dwm, which: str):
    """The refit / validation loader that ``ConfiguredDWM`` handed to ``DWM``."""
    cycler = dwm.refit_batches if which == 'refit' else dwm.val_batches
    return cycler._resolve()  # the loader itself (a re-iterable), as DWM will draw from it


def _write_schedule(save_dir: str, tokenizer_dir: str) -> str:
    """A small 2-stage weighter schedule, as a 370M DWM run writes it (for the transfer YAML)."""
    tokenizer = builders.build_tokenizer(config.TokenizerConfig(name=tokenizer_dir))
    stages = []
    for stage in range(2):
        weighter = Weighter(WeighterConfig(vocab_size=len(tokenizer), d_model=16, n_layers=1, n_heads=2,
                                           max_seq_len=64, seed=stage))
        stem = os.path.join(save_dir, f'stage_{stage}')
        save_weighter(weighter, stem, stage=stage, start=f'{stage * 100}ba')
        stages.append({'stage': stage, 'start': f'{stage * 100}ba', 'weights': f'stage_{stage}.safetensors',
                       'config': f'stage_{stage}.json'})
    return str(write_saved_weighters(save_dir, stages))


def test_demo_yaml_builds_a_trainer(yaml_env, local_mds):
    """demo-cpu.yaml is small enough to build the whole Composer Trainer (DWM's INIT included)."""
    name = 'demo-cpu.yaml'
    raw = load_config(_path(name))
    cfg = load_config(_path(name), [*_local_data_overrides(raw, local_mds), f'save_folder={yaml_env / "run"}'])
    trainer = build_trainer(cfg, config_path=_path(name))
    try:
        dwm = [a for a in trainer.state.algorithms if isinstance(a, builders.ConfiguredDWM)]
        assert len(dwm) == 1 and dwm[0].config.num_stages == raw['algorithms']['dwm']['num_stages']
        assert dwm[0].weighter is not None  # built at Event.INIT
        assert dwm[0].config.save_dir == str(yaml_env / 'run' / 'dwm_schedule')
        assert trainer.state.max_duration == Time.from_timestring(raw['max_duration'])
        assert trainer.state.device_train_microbatch_size == raw['device_train_microbatch_size']
        # Off a terminal (pytest captures stderr), no progress bar: one console line per interval instead.
        destinations = trainer.logger.destinations
        assert not any(type(d).__name__ == 'ProgressBarLogger' for d in destinations)
        assert sum(isinstance(d, ConsoleLineLogger) for d in destinations) == 1
    finally:
        trainer.close()


# ------------------------------------------------------------------------------------------------ errors
DWM_YAML = 'slimpajama-370m-random-dwm.yaml'


def _build_section(cfg: dict, section: str | None, tokenizer):
    if section is None:  # the config is checked when it is loaded
        return None
    run = config.check_train_config(cfg)
    if section == 'model':
        return builders.build_model(run.model, tokenizer)
    if section == 'train_loader':
        return builders.build_train_dataloader(run.train_loader, 4)
    if section == 'algorithms':
        return _build_dwm(run, tokenizer, 4)
    if section == 'optimizer':
        return builders.build_optimizer(run.optimizer, torch.nn.Linear(2, 2))
    if section == 'scheduler':
        return builders.build_scheduler(run.scheduler)
    if section == 'trainer':
        return build_trainer(cfg, config_path=_path(DWM_YAML))
    raise AssertionError(section)


@pytest.mark.parametrize('override, section, where, valid_key', [
    ('bogus=1', None, '', 'max_duration'),
    ('model.bogus=1', None, 'model', 'config_overrides'),
    ('model.config_overrides.hiden_size=8', 'model', 'model.config_overrides', 'hidden_size'),
    ('train_loader.bogus=1', None, 'train_loader', 'num_workers'),
    ('train_loader.dataset.bogus=1', None, 'train_loader.dataset', 'shuffle_seed'),
    ('algorithms.gradient_clipper.clipping_type=norm', None, 'algorithms', 'gradient_clipping'),
    ('algorithms.gradient_clipping.clipping_typ=norm', None, 'algorithms.gradient_clipping', 'clipping_type'),
    ('algorithms.dwm.bogus=1', None, 'algorithms.dwm', 'num_stages'),
    ('algorithms.dwm.refit_loader.bogus=1', None, 'algorithms.dwm.refit_loader', 'dataset'),
    ('algorithms.dwm.refit_loader.dataset.bogus=1', None, 'algorithms.dwm.refit_loader.dataset', 'shuffle_seed'),
    ('algorithms.dwm.validation.bogus=1', None, 'algorithms.dwm.validation', 'lambada'),
    ('algorithms.dwm.weighter.bogus=1', None, 'algorithms.dwm.weighter', 'd_model'),
    ('optimizer.bogus=1', None, 'optimizer', 'weight_decay'),
    ('scheduler.bogus=1', None, 'scheduler', 't_warmup'),
    ('callbacks.bogus={}', None, 'callbacks', 'lr_monitor'),
    ('callbacks.speed_monitor.bogus=1', None, 'callbacks.speed_monitor', 'window_size'),
    ('loggers.bogus={}', None, 'loggers', 'metrics_jsonl'),
])
def test_unknown_key_lists_valid_keys(override, section, where, valid_key, yaml_env, small_tokenizer):
    """Unknown keys fail when the config is loaded (``section`` None) or, for model.config_overrides, when the
    section is built; the message names the full key path, the unknown key and the valid keys."""
    tokenizer = builders.build_tokenizer(config.TokenizerConfig(name=small_tokenizer))
    with pytest.raises(ValueError) as info:
        cfg = load_config(_path(DWM_YAML), ['model.init_device=meta', override])
        _build_section(cfg, section, tokenizer)
    message = str(info.value)
    assert (f'{where}: unknown key' if where else 'unknown top-level key') in message, message
    if section is None:
        assert message.startswith(_path(DWM_YAML)), f'the file is not named: {message}'
    key_path = override.split('=')[0]
    unknown = (key_path[len(where) + 1:] if where else key_path).split('.')[0]
    assert repr(unknown) in message, f'the unknown key is not named: {message}'
    assert valid_key in message, f'the valid keys are not listed: {message}'


@pytest.mark.parametrize('override, section, key', [
    ('seed=abc', None, 'seed'),
    ('global_train_batch_size=lots', None, 'global_train_batch_size'),
    ('model.config_overrides.hidden_size=big', 'model', 'model.config_overrides.hidden_size'),
    ('model.config_overrides.tie_word_embeddings=sometimes', 'model', 'model.config_overrides.tie_word_embeddings'),
    ('algorithms.dwm.num_stages=five', None, 'algorithms.dwm.num_stages'),
    ('algorithms.dwm.refit_steps=many', None, 'algorithms.dwm.refit_steps'),
    ('algorithms.dwm.refit_lr=fast', None, 'algorithms.dwm.refit_lr'),
    ('algorithms.dwm.refit=maybe', None, 'algorithms.dwm.refit'),
    ('algorithms.dwm.weighter.d_model=big', None, 'algorithms.dwm.weighter.d_model'),
    ('algorithms.dwm.weighter=big', None, 'algorithms.dwm.weighter'),
    ('algorithms.dwm.validation.batch_size=lots', None, 'algorithms.dwm.validation.batch_size'),
    ('train_loader.dataset.shuffle="false"', None, 'train_loader.dataset.shuffle'),
    ('train_loader.dataset.shuffle=1', None, 'train_loader.dataset.shuffle'),
    ('train_loader.num_workers="2"', None, 'train_loader.num_workers'),
    ('eval_loader.dataset.shuffle_seed=abc', None, 'eval_loader.dataset.shuffle_seed'),
    ('optimizer.lr=fast', None, 'optimizer.lr'),
    ('optimizer.betas=0.9', None, 'optimizer.betas'),
    ('optimizer.betas=[0.9,high]', None, 'optimizer.betas[1]'),
    ('scheduler.t_warmup=soon', 'scheduler', 'scheduler.t_warmup'),
    ('scheduler.alpha_f=low', None, 'scheduler.alpha_f'),
    ('callbacks.speed_monitor.window_size=wide', None, 'callbacks.speed_monitor.window_size'),
    ('algorithms.gradient_clipping={clipping_type: norm, clipping_threshold: high}', None,
     'algorithms.gradient_clipping.clipping_threshold'),
    ('callbacks.optimizer_monitor.batch_log_interval=often', None, 'callbacks.optimizer_monitor.batch_log_interval'),
])
def test_wrong_type_names_the_key(override, section, key, yaml_env, small_tokenizer):
    """A wrong type fails when the config is loaded (``section`` None) or when its section is built (a Composer
    time that does not parse, a LlamaConfig setting); the message names the full key path."""
    tokenizer = builders.build_tokenizer(config.TokenizerConfig(name=small_tokenizer))
    with pytest.raises(ValueError) as info:
        cfg = load_config(_path(DWM_YAML), ['model.init_device=meta', override])
        _build_section(cfg, section, tokenizer)
    assert f'{key}:' in str(info.value), str(info.value)


@pytest.mark.parametrize('override, key', [
    ('max_duration=null', 'max_duration'),
    ('tokenizer.name=null', 'tokenizer.name'),
    ('train_loader.dataset=null', 'train_loader.dataset'),
    ('scheduler.t_warmup=null', 'scheduler.t_warmup'),
])
def test_required_key_is_named(override, key, yaml_env):
    with pytest.raises(ValueError, match=key.replace('.', r'\.')):
        load_config(_path(DWM_YAML), [override])


def test_cli_rejects_unknown_dataset_key(yaml_env, local_mds):
    """Through ``dwm-stream train``'s entry point: fails before any data is read."""
    raw = load_config(_path('demo-cpu.yaml'))
    with pytest.raises(ValueError, match=r"train_loader\.dataset: unknown key\(s\) \['shufle'\].*shuffle"):
        main([_path('demo-cpu.yaml'), *_local_data_overrides(raw, local_mds), 'train_loader.dataset.shufle=true'])


def test_not_key_value_override(yaml_env):
    with pytest.raises(ValueError, match='key=value'):
        load_config(_path('demo-cpu.yaml'), ['max_duration'])


# ------------------------------------------------------------------------------------------------ start-up checks
def _demo_cfg(yaml_env, local_mds, *overrides: str) -> dict:
    raw = load_config(_path('demo-cpu.yaml'))
    return load_config(_path('demo-cpu.yaml'), [*_local_data_overrides(raw, local_mds),
                                                f'save_folder={yaml_env / "run"}', *overrides])


def test_missing_validation_is_named_when_the_run_is_built(yaml_env, local_mds):
    """Finding 1 under dwm-stream train: not at the first refit, but when the run is built, naming the YAML key."""
    cfg = _demo_cfg(yaml_env, local_mds, 'algorithms.dwm.validation=null')
    with pytest.raises(ValueError) as info:
        build_trainer(cfg, config_path=_path('demo-cpu.yaml'))
    assert str(info.value).startswith('algorithms.dwm.validation: missing, and the weighter is refit against it; set '
                                      '`lambada: PATH`'), str(info.value)


def test_validation_data_that_yields_nothing_fails_at_init(yaml_env, local_mds, tmp_path):
    """validation: {dataset: ...} over a directory without a corpus: Composer's INIT (inside build_trainer) says so."""
    empty = tmp_path / 'no-corpus'
    empty.mkdir()
    cfg = _demo_cfg(yaml_env, local_mds, 'algorithms.dwm.validation.lambada=null',
                    f'algorithms.dwm.validation.dataset.local={empty}')
    with pytest.raises(ValueError) as info:
        build_trainer(cfg, config_path=_path('demo-cpu.yaml'))
    assert str(info.value).startswith('algorithms.dwm.validation (DWM(val_dataloader=...)): yields no batch ('), \
        str(info.value)


def test_save_dir_of_another_run_fails_when_the_run_is_built(yaml_env, local_mds):
    """Finding 4 under dwm-stream train: the default save_dir (<save_folder>/dwm_schedule) holds another run's
    schedule; refused at INIT, also with the top-level save_overwrite: true (Composer's checkpoints, as under
    llmfoundry train); algorithms.dwm.save_overwrite=true lets the run replace it."""
    schedule_dir = str(yaml_env / 'run' / 'dwm_schedule')
    write_saved_weighters(schedule_dir, [], run={'run_name': 'an-earlier-run', 'max_duration': '400ba'})
    cfg = _demo_cfg(yaml_env, local_mds)
    with pytest.raises(ValueError, match=r"^algorithms\.dwm\.save_dir \(DWM\(save_dir=\.\.\.\)\): .*schedule\.json "
                                         r"belongs to run 'an-earlier-run', not to this run 'demo-dwm'; set a new "
                                         r'save_dir, or algorithms\.dwm\.save_overwrite: true'):
        build_trainer(cfg, config_path=_path('demo-cpu.yaml'))
    with pytest.raises(ValueError, match=r"^algorithms\.dwm\.save_dir .* belongs to run 'an-earlier-run'"):
        build_trainer(_demo_cfg(yaml_env, local_mds, 'save_overwrite=true'), config_path=_path('demo-cpu.yaml'))
    build_trainer(_demo_cfg(yaml_env, local_mds, 'algorithms.dwm.save_overwrite=true'),
                  config_path=_path('demo-cpu.yaml')).close()


def test_peeking_a_refit_loader_keeps_its_sequence(local_mds):
    """WidenedLoader.peek (DWM's start-up probe) reads the first batch of the iteration that follows."""
    dataset = {'local': local_mds, 'shuffle': True, 'shuffle_seed': 3}
    peeked = builders.WidenedLoader(dataset, 4, 'algorithms.dwm.refit_loader.dataset')
    first = peeked.peek()
    assert torch.equal(peeked.peek()['uid'], first['uid'])  # a second peek is the same batch
    plain = builders.WidenedLoader(dataset, 4, 'algorithms.dwm.refit_loader.dataset')
    ours = [b['uid'].tolist() for _, b in zip(range(3), peeked)]
    theirs = [b['uid'].tolist() for _, b in zip(range(3), plain)]
    assert ours == theirs and ours[0] == first['uid'].tolist()


@pytest.mark.parametrize('name', [n for n in PAPER_YAMLS if '370m' in n])
def test_370m_yamls_turn_on_the_fast_base_step(name, yaml_env):
    """The 370M YAMLs run SDPA attention (fused kernels; flash on a GPU) and ``torch.compile`` (issue 19); DWM's
    refit works under both (tests/algorithms/test_dwm_fast_attention.py)."""
    cfg = load_config(_path(name), ['model.init_device=meta'])
    assert cfg['model']['attn_implementation'] == 'sdpa'
    assert cfg['compile_config'] == {}
