"""LLM Foundry's own pretraining YAMLs, with DWM added, run unchanged under both entry points (issue 11, finding 2).

The two YAMLs reproduce the structure of Foundry 0.22's published examples key by key:
``scripts/train/yamls/pretrain/mpt-125m.yaml`` (``mpt_causal_lm``) and ``hf-llama-3.1-8B.yaml`` (``hf_causal_lm``,
the Llama family): ``variables`` with ``${variables.x}`` interpolation, ``model`` with ``init_device: meta``,
``tokenizer`` with ``kwargs``, ``train_loader``, ``eval_loader`` (Foundry's ``text`` loader), ``scheduler``,
``optimizer``, ``algorithms.gradient_clipping``, ``max_duration``, ``eval_interval``, ``eval_first``, ``precision``,
``fsdp_config``, ``callbacks`` (speed/lr/memory monitors, runtime estimator), ``loggers``, ``save_folder``... They are
scaled down to the test corpus and a CPU: a tiny model, the test tokenizer, local data, 0 workers, a few batches,
``fp32`` (Composer has no bf16 on CPU, under either entry point). Then only two things change, as the issue asks:
``train_loader.name: text`` becomes ``dwm``, and ``algorithms.dwm`` is added (with its refit dataset and validation
tokenizer in full, since under Foundry the algorithm sees only its own keys).

Each YAML runs for a few batches under ``dwm-stream train`` (in-process: ``load_config`` + ``build_trainer`` +
``fit``, as ``main`` does) and under ``llmfoundry train`` (a subprocess, as ``test_foundry.py`` runs it).
``fsdp_config`` on one CPU process: both entry points warn and train with DDP semantics (Foundry's rule for a
single device), and DWM's FSDP refusal does not trigger.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from composer.loggers import InMemoryLogger
from transformers import AutoTokenizer, LlamaConfig

from dwm_stream.train import builders, config
from dwm_stream.train.entry import build_trainer, fit, load_config

pytestmark = pytest.mark.slow

BATCHES = 2
LLMFOUNDRY = os.path.join(os.path.dirname(sys.executable), 'llmfoundry')
ENV = {'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false', 'OMP_NUM_THREADS': '1',
       'CUDA_VISIBLE_DEVICES': ''}

FSDP_CONFIG = {'sharding_strategy': 'FULL_SHARD', 'mixed_precision': 'PURE', 'activation_checkpointing': False,
               'activation_checkpointing_reentrant': False, 'activation_cpu_offload': False,
               'limit_all_gathers': True}
CALLBACKS = {'speed_monitor': {'window_size': 10}, 'lr_monitor': {}, 'memory_monitor': {}, 'runtime_estimator': {}}
OPTIMIZER = {'name': 'decoupled_adamw', 'lr': 6.0e-4, 'betas': [0.9, 0.95], 'eps': 1.0e-08, 'weight_decay': 0.0}


def _run_keys() -> dict:
    """What both scaled-down YAMLs set alike: console lines, callbacks, an in-memory logger, one checkpoint."""
    return {'progress_bar': False, 'log_to_console': True, 'console_log_interval': '1ba',
            'callbacks': copy.deepcopy(CALLBACKS), 'loggers': {'inmemory': {}}, 'save_interval': f'{BATCHES}ba'}


@pytest.fixture(scope='module')
def data_root(converted_mds, tmp_path_factory) -> str:
    """Foundry's ``data_local`` layout: ``<root>/train`` and ``<root>/val`` (copies of the test corpus, whose
    ``tokens`` column Foundry's ``text`` loader reads as well)."""
    root = tmp_path_factory.mktemp('foundry-data')
    for split in ('train', 'val'):
        shutil.copytree(converted_mds, root / split)
    return str(root)


def mpt_125m(data_root: str, tokenizer: str, vocab_size: int, save_folder: str) -> dict:
    """``mpt-125m.yaml`` (LLM Foundry 0.22), scaled down; ``train_loader.name`` still ``text``."""
    return {
        'variables': {'data_local': data_root, 'data_remote': None, 'max_seq_len': 256, 'global_seed': 17,
                      'run_name': 'mpt-dwm'},
        'max_seq_len': '${variables.max_seq_len}',
        'run_name': '${variables.run_name}',
        'model': {'name': 'mpt_causal_lm', 'init_device': 'meta', 'd_model': 64, 'n_heads': 4, 'n_layers': 2,
                  'expansion_ratio': 2, 'max_seq_len': '${variables.max_seq_len}', 'vocab_size': vocab_size,
                  'attn_config': {'attn_impl': 'torch'}, 'loss_fn': 'torch_crossentropy'},
        'tokenizer': {'name': tokenizer, 'kwargs': {'model_max_length': '${variables.max_seq_len}'}},
        'train_loader': {'name': 'text',
                         'dataset': {'local': '${variables.data_local}', 'remote': '${variables.data_remote}',
                                     'split': 'train', 'shuffle': True, 'max_seq_len': '${variables.max_seq_len}',
                                     'shuffle_seed': '${variables.global_seed}'},
                         'drop_last': True, 'num_workers': 0},
        'eval_loader': {'name': 'text',
                        'dataset': {'local': '${variables.data_local}', 'remote': '${variables.data_remote}',
                                    'split': 'val', 'shuffle': False, 'max_seq_len': '${variables.max_seq_len}',
                                    'shuffle_seed': '${variables.global_seed}'},
                        'drop_last': False, 'num_workers': 0, 'persistent_workers': False, 'prefetch_factor': None},
        'scheduler': {'name': 'cosine_with_warmup', 't_warmup': '1ba', 'alpha_f': 0.1},
        'optimizer': copy.deepcopy(OPTIMIZER),
        'algorithms': {'gradient_clipping': {'clipping_type': 'norm', 'clipping_threshold': 1.0}},
        'max_duration': f'{BATCHES}ba',
        'eval_interval': f'{BATCHES}ba',
        'eval_first': True,  # the published YAML says false; true here, to run the key
        'eval_subset_num_batches': 1,
        'global_train_batch_size': 4,
        'seed': '${variables.global_seed}',
        'device_eval_batch_size': 4,
        'device_train_microbatch_size': 4,
        'precision': 'fp32',
        'fsdp_config': copy.deepcopy(FSDP_CONFIG),
        **_run_keys(),
        'save_num_checkpoints_to_keep': 1,
        'save_folder': save_folder,
    }


def llama_8b(data_root: str, tokenizer: str, model_dir: str, save_folder: str) -> dict:
    """``hf-llama-3.1-8B.yaml`` (LLM Foundry 0.22's Llama pretraining example), scaled down."""
    return {
        'variables': {'data_local': data_root, 'data_remote': None, 'max_seq_len': 256, 'global_seed': 17,
                      'model_name': model_dir, 'tokenizer_name': tokenizer, 'run_name': 'llama-dwm'},
        'max_seq_len': '${variables.max_seq_len}',
        'run_name': '${variables.run_name}',
        'save_folder': save_folder,  # the published YAML: null
        'model': {'name': 'hf_causal_lm', 'init_device': 'meta',
                  'pretrained_model_name_or_path': '${variables.model_name}', 'pretrained': False,
                  'use_auth_token': False,  # published: true (a gated hub model); a local one needs none
                  'use_flash_attention_2': False,  # published: true (GPU)
                  'config_overrides': {'max_position_embeddings': '${variables.max_seq_len}'}},
        'tokenizer': {'name': '${variables.tokenizer_name}',
                      'kwargs': {'model_max_length': '${variables.max_seq_len}'}},
        'train_loader': {'name': 'text',
                         'dataset': {'local': '${variables.data_local}', 'remote': '${variables.data_remote}',
                                     'split': 'train', 'shuffle': True, 'max_seq_len': '${variables.max_seq_len}',
                                     'shuffle_seed': '${variables.global_seed}'},
                         'pin_memory': False, 'prefetch_factor': 2, 'persistent_workers': True, 'drop_last': True,
                         'num_workers': 0},
        'scheduler': {'name': 'cosine_with_warmup', 't_warmup': '1ba', 'alpha_f': 0.1},
        'optimizer': copy.deepcopy(OPTIMIZER),
        'algorithms': {'gradient_clipping': {'clipping_type': 'norm', 'clipping_threshold': 1.0}},
        'max_duration': f'{BATCHES}ba',
        'eval_interval': '100ba',
        'eval_first': False,
        'global_train_batch_size': 4,
        'seed': '${variables.global_seed}',
        'device_train_microbatch_size': 2,
        'precision': 'fp32',
        'dist_timeout': 600,
        'expandable_segments': True,
        'fsdp_config': {**copy.deepcopy(FSDP_CONFIG), 'state_dict_type': 'sharded', 'backward_prefetch': 'BACKWARD_PRE'},
        **_run_keys(),
    }


def with_dwm(cfg: dict, data_root: str, tokenizer: str, lambada: str, save_folder: str) -> dict:
    """The two changes: ``train_loader.name: dwm`` and ``algorithms.dwm``."""
    cfg = copy.deepcopy(cfg)
    cfg['train_loader']['name'] = 'dwm'
    cfg['algorithms']['dwm'] = {
        'num_stages': 2,
        'refit_steps': 1,
        'lookahead_lr': 1.0e-3,
        'weighter': {'d_model': 16, 'n_layers': 1, 'n_heads': 2, 'max_seq_len': 256},
        'save_dir': os.path.join(save_folder, 'dwm_schedule'),
        'refit_loader': {'batch_size': 4, 'dataset': {'local': data_root, 'split': 'train', 'shuffle': True,
                                                      'shuffle_seed': 18}},
        'validation': {'lambada': lambada, 'tokenizer': tokenizer, 'batch_size': 4, 'max_length': 256},
    }
    return cfg


def _tiny_llama(tmp_path, tokenizer: str) -> str:
    tok = AutoTokenizer.from_pretrained(tokenizer)
    model_dir = str(tmp_path / 'tiny-llama')
    LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id).save_pretrained(model_dir)
    return model_dir


def _yaml(tmp_path, which: str, data_root: str, tokenizer: str, lambada: str, entry: str) -> tuple[str, str]:
    """The YAML file of ``which`` (mpt / llama) with DWM, for ``entry``; and its save folder."""
    save_folder = str(tmp_path / f'{which}-{entry}')
    if which == 'mpt':
        base = mpt_125m(data_root, tokenizer, len(AutoTokenizer.from_pretrained(tokenizer)), save_folder)
    else:
        base = llama_8b(data_root, tokenizer, _tiny_llama(tmp_path, tokenizer), save_folder)
    cfg = with_dwm(base, data_root, tokenizer, lambada, save_folder)
    path = str(tmp_path / f'{which}-{entry}.yaml')
    with open(path, 'w') as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path, save_folder


def _schedule_stages(save_folder: str) -> list[int]:
    with open(os.path.join(save_folder, 'dwm_schedule', 'schedule.json')) as f:
        return [s['stage'] for s in json.load(f)['stages']]


@pytest.mark.parametrize('which', ['mpt', 'llama'])
def test_foundry_example_runs_under_dwm_stream_train(which, tmp_path, monkeypatch, data_root, small_tokenizer,
                                                      small_corpus):
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv('PYTORCH_CUDA_ALLOC_CONF', raising=False)  # expandable_segments sets it, as Foundry does
    monkeypatch.chdir(tmp_path)
    path, save_folder = _yaml(tmp_path, which, data_root, small_tokenizer, small_corpus.lambada_path, 'dwm-stream')
    cfg = load_config(path)
    assert cfg['max_seq_len'] == 256 and cfg['train_loader']['dataset']['max_seq_len'] == 256  # ${variables.x}
    with pytest.warns(UserWarning, match=r'fsdp_config: ignored \(a single process'):
        trainer = build_trainer(cfg, config_path=path)
    try:
        assert trainer.state.model.tokenizer.model_max_length == 256  # tokenizer.kwargs reached the tokenizer
        names = [type(a).__name__ for a in trainer.state.algorithms]
        assert names == ['GradientClipping', 'ConfiguredDWM'], names
        clipping = trainer.state.algorithms[0]
        assert clipping.clipping_type == 'norm' and clipping.clipping_threshold == 1.0
        assert {type(c).__name__ for c in trainer.state.callbacks} >= {'SpeedMonitor', 'LRMonitor', 'MemoryMonitor',
                                                                        'RuntimeEstimator'}
        memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
        assert all(p.device.type == 'cpu' for p in trainer.state.model.parameters())  # init_device: meta -> cpu
        fit(trainer, cfg)
        dwm = trainer.state.algorithms[1]
        assert int(trainer.state.timestamp.batch) == BATCHES
        assert dwm.refits_done == 2 and dwm.stage_index == 1
        assert _schedule_stages(save_folder) == [0, 1]
        assert 'dwm/weight/ess' in memory.data and 'dwm/refit/count' in memory.data
        if which == 'mpt':  # Foundry's `text` eval loader, and eval_first: an eval at batch 0, one at the end
            evals = memory.data['metrics/eval/LanguageCrossEntropy']
            assert [int(ts.batch) for ts, _ in evals] == [0, BATCHES], evals
        if which == 'llama':
            assert os.environ['PYTORCH_CUDA_ALLOC_CONF'] == 'expandable_segments:True'
    finally:
        trainer.close()


@pytest.mark.parametrize('which', ['mpt', 'llama'])
def test_foundry_example_runs_under_llmfoundry_train(which, tmp_path, data_root, small_tokenizer, small_corpus):
    assert os.path.exists(LLMFOUNDRY), 'llm-foundry is not installed (pip install -e ".[foundry]")'
    path, save_folder = _yaml(tmp_path, which, data_root, small_tokenizer, small_corpus.lambada_path, 'llmfoundry')
    proc = subprocess.run([LLMFOUNDRY, 'train', path], cwd=tmp_path, env=dict(os.environ, **ENV),
                          capture_output=True, text=True, timeout=600, check=False)
    out = proc.stdout + proc.stderr
    (tmp_path / 'llmfoundry.log').write_text(out)
    assert proc.returncode == 0, f'llmfoundry train failed:\n{out[-8000:]}'
    assert 'is not applicable for single-GPU training. Reverting to DDP.' in out  # Foundry's fsdp_config rule
    assert 'llmfoundry.command_utils.train: Done.' in out
    assert 'Train dwm/refit/count: 2' in out, out[-4000:]
    assert _schedule_stages(save_folder) == [0, 1]
    if which == 'mpt':  # eval_first, then the eval at the end, both on Foundry's `text` loader
        assert out.count('Eval metrics/eval/LanguageCrossEntropy:') == 2, out[-4000:]
    # Foundry built both algorithms from its registry; the checkpoint holds their state.
    checkpoint = torch.load(os.path.join(save_folder, f'ep0-ba{BATCHES}-rank0.pt'), map_location='cpu',
                            weights_only=False)['state']
    algorithms = dict(checkpoint['algorithms'])
    assert set(algorithms) == {'GradientClipping', 'DWMAlgorithm'}
    assert algorithms['DWMAlgorithm']['refits_done'] == 2


def test_missing_validation_under_llmfoundry_train(tmp_path, data_root, small_tokenizer, small_corpus):
    """Finding 1 under Foundry's own entry point: the run stops while it is built, naming the YAML key."""
    path, save_folder = _yaml(tmp_path, 'llama', data_root, small_tokenizer, small_corpus.lambada_path, 'novalidation')
    with open(path) as f:
        cfg = yaml.safe_load(f)
    del cfg['algorithms']['dwm']['validation']
    with open(path, 'w') as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    proc = subprocess.run([LLMFOUNDRY, 'train', path], cwd=tmp_path, env=dict(os.environ, **ENV),
                          capture_output=True, text=True, timeout=600, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    text = ' '.join(out.replace('[rank0]:', ' ').split())  # the traceback printer wraps long lines
    assert 'ConfigError: algorithms.dwm.validation: missing, and the weighter is refit against it' in text, out[-4000:]
    assert 'Starting training' not in out and not os.path.exists(os.path.join(save_folder, 'dwm_schedule'))


def test_the_examples_differ_from_foundry_only_in_train_loader_name_and_dwm(data_root, small_tokenizer, tmp_path):
    """The YAMLs above are the Foundry examples plus exactly the two DWM changes."""
    base = mpt_125m(data_root, small_tokenizer, 2048, str(tmp_path))
    changed = with_dwm(base, data_root, small_tokenizer, 'lambada.jsonl', str(tmp_path))
    assert changed['train_loader'] == {**base['train_loader'], 'name': 'dwm'}
    assert changed['algorithms'] == {**base['algorithms'], 'dwm': changed['algorithms']['dwm']}
    assert {k: v for k, v in changed.items() if k not in ('train_loader', 'algorithms')} == \
        {k: v for k, v in base.items() if k not in ('train_loader', 'algorithms')}
    assert builders.build_tokenizer(config.TokenizerConfig(name=small_tokenizer, kwargs={'model_max_length': 128})) \
        .model_max_length == 128
