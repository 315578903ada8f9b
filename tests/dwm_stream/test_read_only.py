"""A user's corpus is read-only (issue 16, item 1; RELIABILITY.md "A user's data is read-only").

The run of the issue: the train loader reads ``{remote: R, local: CACHE}`` and the refit loader names the user's own
converted corpus, ``{local: MYCORPUS}``. ``dwm-stream train`` merged the train loader's ``remote`` into the refit
section, streaming took MYCORPUS for a download cache and deleted its compressed shards. Here MYCORPUS is hashed
(every file, its mode and its bytes, and the list of files) before and after a run under each entry point; nothing
may be added, changed or removed. The run under ``llmfoundry train`` is ``test_foundry.py``'s, which checks this
beside what it checks of Foundry's entry point.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat

import numpy as np
import pytest
import yaml
from transformers import AutoTokenizer, LlamaConfig

from dwm_stream.data.dataset import DWMDataset
from dwm_stream.data.loader import build_dataset
from dwm_stream.data.read_only import CorpusConflictError, complete_corpus
from dwm_stream.train import builders
from dwm_stream.train.entry import build_trainer, fit, load_config

ENV = {'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false', 'OMP_NUM_THREADS': '1',
       'CUDA_VISIBLE_DEVICES': ''}


def tree_digest(root: str) -> dict[str, tuple[int, str]]:
    """Every file under ``root``: relative path -> (mode, sha256 of its bytes); directories with their mode."""
    out = {}
    for dirname, dirs, files in os.walk(root):
        for name in dirs:
            path = os.path.join(dirname, name)
            out[os.path.relpath(path, root) + '/'] = (stat.S_IMODE(os.stat(path).st_mode), 'dir')
        for name in files:
            path = os.path.join(dirname, name)
            with open(path, 'rb') as f:
                out[os.path.relpath(path, root)] = (stat.S_IMODE(os.stat(path).st_mode),
                                                    hashlib.sha256(f.read()).hexdigest())
    return out


@pytest.fixture
def corpora(tmp_path, converted_mds):
    return user_corpora(tmp_path, converted_mds)


def user_corpora(tmp_path, converted_mds) -> tuple[str, str, str]:
    """``mycorpus`` (the user's converted corpus) and ``remote`` (the same corpus, where a train loader streams it
    from into ``cache``)."""
    mine, remote = str(tmp_path / 'mycorpus'), str(tmp_path / 'remote')
    shutil.copytree(converted_mds, mine)
    shutil.copytree(converted_mds, remote)
    assert complete_corpus(mine) is not None
    # compressed: streaming would decompress into it
    assert any(name.endswith('.zstd') for _, _, names in os.walk(mine) for name in names)
    return mine, remote, str(tmp_path / 'cache')


def _config(tmp_path, corpora, tokenizer: str, lambada: str, entry: str) -> str:
    mine, remote, cache = corpora
    tok = AutoTokenizer.from_pretrained(tokenizer)
    model_dir = str(tmp_path / 'tiny-llama')
    LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id).save_pretrained(model_dir)
    save_folder = str(tmp_path / f'run-{entry}')
    refit_dataset = {'local': mine, 'shuffle': True}
    if entry == 'llmfoundry':  # under Foundry the algorithm sees only its own keys
        refit_dataset['shuffle_seed'] = 5
    cfg = {
        'run_name': f'read-only-{entry}',
        'seed': 3,
        'max_seq_len': 256,
        'model': {'name': 'hf_causal_lm', 'pretrained_model_name_or_path': model_dir, 'pretrained': False},
        'tokenizer': {'name': tokenizer},
        'train_loader': {'name': 'dwm', 'num_workers': 0,
                         'dataset': {'remote': remote, 'local': cache, 'shuffle': True, 'shuffle_seed': 4}},
        'algorithms': {'dwm': {
            'num_stages': 2, 'refit_steps': 1, 'lookahead_lr': 1.0e-3,
            'weighter': {'d_model': 16, 'n_layers': 1, 'n_heads': 2, 'max_seq_len': 256},
            'refit_loader': {'batch_size': 4, 'dataset': refit_dataset},
            'validation': {'lambada': lambada, 'tokenizer': tokenizer, 'batch_size': 4, 'max_length': 256},
        }},
        'optimizer': {'name': 'decoupled_adamw', 'lr': 1.0e-3},
        'scheduler': {'name': 'constant_with_warmup', 't_warmup': '0ba'},
        'global_train_batch_size': 4,
        'device_train_microbatch_size': 4,
        'device_eval_batch_size': 4,
        'max_duration': '2ba',
        'precision': 'fp32',
        'save_folder': save_folder,
        'save_interval': '2ba',
        'progress_bar': False,
        'log_to_console': True,
        'console_log_interval': '1ba',
    }
    path = str(tmp_path / f'{entry}.yaml')
    with open(path, 'w') as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


@pytest.mark.slow
def test_refit_corpus_is_byte_identical_after_dwm_stream_train(tmp_path, monkeypatch, corpora, small_tokenizer,
                                                               small_corpus):
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    before = tree_digest(corpora[0])
    path = _config(tmp_path, corpora, small_tokenizer, small_corpus.lambada_path, 'dwm-stream')
    cfg = load_config(path)
    trainer = build_trainer(cfg, config_path=path)
    try:
        fit(trainer, cfg)
        dwm = trainer.state.algorithms[0]
        assert dwm.refits_done == 2  # the refit loader was read
        refit_dataset = dwm.refit_batches.source._loader.dataset
        assert refit_dataset.streams[0].remote == corpora[0]  # the corpus, not the train loader's remote
    finally:
        trainer.close()
    assert tree_digest(corpora[0]) == before


def test_location_keys_are_never_filled_in_from_the_train_loader(caplog):
    train = {'remote': 's3://bucket/corpus', 'local': '/tmp/cache', 'split': 'train', 'shuffle': True,
             'shuffle_seed': 4, 'max_seq_len': 128, 'batch_size': 8}
    with caplog.at_level(logging.INFO, logger='dwm_stream.train.builders'):
        refit = builders.refit_dataset_config(train, {'local': '/data/mycorpus'})
        again = builders.refit_dataset_config(train, {'local': '/data/mycorpus'})
    assert refit == again == {'local': '/data/mycorpus', 'shuffle': True, 'shuffle_seed': 5, 'max_seq_len': 128}
    fill_ins = [r.getMessage() for r in caplog.records if 'refit_loader.dataset' in r.getMessage()]
    assert len(fill_ins) == 1, fill_ins  # logged once
    assert 'shuffle_seed train_loader.dataset.shuffle_seed + 1' in fill_ins[0]
    assert 'max_seq_len from train_loader.dataset' in fill_ins[0]
    # A refit section with its own remote keeps it, and gets no local from the train loader.
    assert builders.refit_dataset_config(train, {'remote': 's3://other'})['remote'] == 's3://other'
    assert 'local' not in builders.refit_dataset_config(train, {'remote': 's3://other'})
    assert 'remote' not in builders.refit_dataset_config(train, {'streams': {'a': {'local': '/data/a'}}})
    # Without a location of its own, the refit loader reads the train corpus through a cache of its own.
    assert builders.refit_dataset_config(train, {})['local'] == '/tmp/cache.refit'
    assert builders.refit_dataset_config(train, {})['remote'] == 's3://bucket/corpus'


def _read_all(dataset) -> list[int]:
    return sorted(int(s['uid']) for s in dataset)


def test_local_only_corpus_is_read_only(corpora):
    mine = corpora[0]
    before = tree_digest(mine)
    everything = sorted(np.load(os.path.join(mine, 'uids.npy')).tolist())
    assert _read_all(DWMDataset(local=mine, shuffle=True, batch_size=4)) == everything
    assert _read_all(DWMDataset(local=mine, batch_size=4, cache_limit='1gb')) == everything
    assert tree_digest(mine) == before


def test_remote_with_a_local_holding_the_same_corpus_reads_it_read_only(corpora):
    mine, remote, _ = corpora
    before = tree_digest(mine)
    everything = sorted(np.load(os.path.join(mine, 'uids.npy')).tolist())
    assert _read_all(DWMDataset(remote=remote, local=mine, batch_size=4)) == everything
    assert tree_digest(mine) == before


def test_remote_with_a_local_holding_another_corpus_is_refused(tmp_path, corpora, converted_mds):
    mine, _, _ = corpora
    other = str(tmp_path / 'other')
    shutil.copytree(converted_mds, other)
    index = os.path.join(other, 'index.json')
    with open(index) as f:
        text = f.read()
    with open(index, 'w') as f:  # another corpus: its index differs
        f.write(text.replace('"version": 2', '"version": 2, "note": "another corpus"', 1))
    before = tree_digest(mine)
    with pytest.raises(CorpusConflictError, match=r'`remote` \(.*other\) and `local` \(.*mycorpus\)'):
        DWMDataset(remote=other, local=mine, batch_size=4)
    cfg = {'remote': other, 'local': mine}
    with pytest.raises(CorpusConflictError,
                       match=r'`train_loader\.dataset\.remote` \(.*\) and `train_loader\.dataset\.local` \(.*\)'):
        build_dataset(cfg, 4, where='train_loader.dataset')
    assert tree_digest(mine) == before
