"""The DWM algorithm and the ``dwm`` dataloader under LLM Foundry 0.22.0's own train entry point.

dwm-stream registers ``llmfoundry_algorithms: dwm`` and ``llmfoundry_dataloaders: dwm`` entry points
(pyproject.toml). This test writes a tiny LLM Foundry-format YAML (``hf_causal_lm`` from a tiny
``LlamaConfig``, the test tokenizer, ``train_loader: {name: dwm}``, ``algorithms: {dwm: {...}}``) and
runs it with LLM Foundry's CLI (``llmfoundry train YAML``, which calls
``llmfoundry.command_utils.train_from_yaml``) in a subprocess, on CPU and offline.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from test_read_only import tree_digest, user_corpora
from transformers import AutoTokenizer, LlamaConfig

pytestmark = pytest.mark.slow

BATCHES = 4


def test_entry_points_are_registered():
    """Installed (editable) dwm-stream exposes both entry points to LLM Foundry's registries."""
    groups = {g: {e.name: e.value for e in importlib.metadata.entry_points(group=g)}
              for g in ('llmfoundry_algorithms', 'llmfoundry_dataloaders')}
    assert groups['llmfoundry_algorithms'].get('dwm') == 'dwm_stream.train.foundry:DWMAlgorithm'
    assert groups['llmfoundry_dataloaders'].get('dwm') == 'dwm_stream.train.foundry:build_dwm_dataloader'
    for value in (groups['llmfoundry_algorithms']['dwm'], groups['llmfoundry_dataloaders']['dwm']):
        importlib.metadata.EntryPoint(name='dwm', value=value, group='').load()


def _foundry_yaml(tmp_path, train: dict, refit: dict, tokenizer: str, lambada: str) -> str:
    tok = AutoTokenizer.from_pretrained(tokenizer)
    model_dir = str(tmp_path / 'tiny-llama')
    LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id).save_pretrained(model_dir)
    save_folder = str(tmp_path / 'run')
    cfg = {
        'run_name': 'foundry-dwm',
        'seed': 3,
        'max_seq_len': 256,
        'model': {'name': 'hf_causal_lm', 'pretrained_model_name_or_path': model_dir, 'pretrained': False},
        'tokenizer': {'name': tokenizer, 'kwargs': {'model_max_length': 256}},
        'train_loader': {'name': 'dwm', 'num_workers': 0, 'drop_last': True,
                         'dataset': {**train, 'shuffle': True, 'shuffle_seed': 4}},
        'algorithms': {'dwm': {
            'num_stages': 2,
            'refit_steps': 1,
            'lookahead_lr': 1.0e-3,
            'weighter': {'d_model': 32, 'n_layers': 1, 'n_heads': 2, 'max_seq_len': 256},
            'save_dir': os.path.join(save_folder, 'dwm_schedule'),
            # Under Foundry the algorithm sees only its own keys: the refit dataset and the validation
            # tokenizer are given in full.
            'refit_loader': {'batch_size': 4, 'dataset': {**refit, 'shuffle': True, 'shuffle_seed': 5}},
            'validation': {'lambada': lambada, 'tokenizer': tokenizer, 'batch_size': 4, 'max_length': 256},
        }},
        'optimizer': {'name': 'decoupled_adamw', 'lr': 1.0e-3, 'betas': [0.9, 0.95], 'eps': 1.0e-8,
                      'weight_decay': 0.0},
        'scheduler': {'name': 'constant_with_warmup', 't_warmup': '0ba'},
        'global_train_batch_size': 4,
        'device_train_microbatch_size': 4,
        'device_eval_batch_size': 4,
        'max_duration': f'{BATCHES}ba',
        'precision': 'fp32',
        'save_folder': save_folder,
        'save_interval': f'{BATCHES}ba',
        'progress_bar': False,
        'log_to_console': True,
        'console_log_interval': '1ba',
        'python_log_level': 'info',
    }
    path = str(tmp_path / 'foundry-dwm.yaml')
    with open(path, 'w') as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def test_llm_foundry_train_runs_dwm(tmp_path, converted_mds, small_tokenizer, small_corpus):
    """Also the Foundry half of ``test_read_only.py``: the train loader streams ``{remote, local: CACHE}`` and the
    refit loader names the user's own corpus ``{local: MYCORPUS}``, which must come out of the run byte-identical."""
    mine, remote, cache = user_corpora(tmp_path, converted_mds)
    before = tree_digest(mine)
    config = _foundry_yaml(tmp_path, {'remote': remote, 'local': cache}, {'local': mine}, small_tokenizer,
                           small_corpus.lambada_path)
    llmfoundry_cli = os.path.join(os.path.dirname(sys.executable), 'llmfoundry')
    assert os.path.exists(llmfoundry_cli), 'llm-foundry is not installed (pip install -e ".[foundry]")'
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', TOKENIZERS_PARALLELISM='false',
               OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    proc = subprocess.run([llmfoundry_cli, 'train', config], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f'llmfoundry train failed:\n{out[-8000:]}'

    # Foundry built our algorithm from its registry, and training finished.
    assert 'enabled_algorithms/DWMAlgorithm: true' in out, out[-4000:]
    assert 'llmfoundry.command_utils.train: Done.' in out
    assert f'[batch={BATCHES}/{BATCHES}]' in out

    # DWM actually ran: two refits, weights and per-domain metrics logged, one weighter per stage saved.
    assert out.count('Train dwm/refit/count:') == 2, out[-4000:]
    assert 'Train dwm/weight/ess:' in out and 'Train dwm/domain/' in out
    schedule_dir = tmp_path / 'run' / 'dwm_schedule'
    with open(schedule_dir / 'schedule.json') as f:
        schedule = json.load(f)
    assert [s['stage'] for s in schedule['stages']] == [0, 1]
    for stage in schedule['stages']:
        assert (schedule_dir / stage['weights']).exists() and (schedule_dir / stage['config']).exists()

    # The checkpoint holds the DWM state and the dataset position next to the model.
    checkpoint = torch.load(tmp_path / 'run' / 'latest-rank0.pt', map_location='cpu', weights_only=False)
    state = checkpoint['state']
    assert state['timestamp']['Timestamp']['batch'] == BATCHES
    algorithms = dict(state['algorithms'])
    assert algorithms['DWMAlgorithm']['refits_done'] == 2
    assert algorithms['DWMAlgorithm']['stage_index'] == 1
    assert state['dataset_state'] is not None
    assert tree_digest(mine) == before  # the refit corpus was read, never written


def test_foundry_builders_name_the_yaml_key(converted_mds, small_corpus):
    """Findings 1 and 5 under LLM Foundry: its own builders hand our entry points the YAML's keys raw, and the
    errors name them (a ConfigError, which is a ValueError), before any data is read."""
    from llmfoundry.data.dataloader import build_dataloader
    from llmfoundry.utils.builders import build_algorithm

    from dwm_stream.train.config import ConfigError

    refit = {'dataset': {'local': converted_mds}}
    with pytest.raises(ConfigError, match=r"^algorithms\.dwm\.weighter\.d_model: expected int, got str \('big'\)"):
        build_algorithm('dwm', {'refit': False, 'weighter': {'d_model': 'big'}})
    with pytest.raises(ConfigError, match=r'^algorithms\.dwm\.validation: missing, and the weighter is refit'):
        build_algorithm('dwm', {'num_stages': 5, 'refit_loader': refit})
    with pytest.raises(ConfigError, match=r'^algorithms\.dwm\.validation\.lambada: .* does not exist'):
        build_algorithm('dwm', {'refit_loader': refit, 'validation': {'lambada': '/nonexistent/lambada.jsonl',
                                                                      'tokenizer': 'unused'}})
    with pytest.raises(ConfigError, match=r'^algorithms\.dwm\.validation\.tokenizer: missing'):
        build_algorithm('dwm', {'refit_loader': refit, 'validation': {'lambada': small_corpus.lambada_path}})
    with pytest.raises(ConfigError, match=r'^algorithms\.dwm\.refit_loader\.dataset: missing'):
        build_algorithm('dwm', {'validation': {'lambada': small_corpus.lambada_path}})
    with pytest.raises(ConfigError, match=r"^train_loader\.dataset\.shuffle: expected bool .*got str \('false'\)"):
        build_dataloader({'name': 'dwm', 'dataset': {'local': converted_mds, 'shuffle': 'false'}}, None, 4)
