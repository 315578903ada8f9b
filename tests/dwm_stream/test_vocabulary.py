"""Token ids beyond the vocabulary are named at start-up (issue 16, item 2).

A corpus converted with the 2048-id test tokenizer, trained with ``vocab_size: 512``, crashed at batch 1 with
``IndexError: index out of range in self`` in the weighter's embedding (a device-side assert on a GPU). ``dwm.json``
now records the corpus's largest id, and the run is refused before its first batch.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from dwm_stream.data.dataset import DWMDataset
from dwm_stream.data.vocabulary import check_token_ids
from dwm_stream.format.shards import CorpusMeta
from dwm_stream.train import builders
from dwm_stream.train.entry import build_trainer, fit

from tests.dwm_stream.test_yaml_first_refit import _config
from tests.dwm_stream.test_yamls import local_mds, yaml_env  # noqa: F401 - fixtures


def test_convert_records_the_largest_token_id(converted_mds, read_mds):
    with open(os.path.join(converted_mds, 'dwm.json')) as f:
        meta = CorpusMeta.from_json(f.read())
    largest = max(int(np.asarray(s['tokens']).max()) for s in read_mds(converted_mds))
    assert meta.max_token_id == largest and 0 < largest < 2048


def test_an_old_dwm_json_without_it_reads_and_is_not_checked(tmp_path, converted_mds):
    old = str(tmp_path / 'old')
    shutil.copytree(converted_mds, old)
    path = os.path.join(old, 'dwm.json')
    with open(path) as f:
        obj = json.load(f)
    del obj['max_token_id']
    with open(path, 'w') as f:
        json.dump(obj, f)
    dataset = DWMDataset(local=old, batch_size=4)
    assert dataset.streams[0].meta.max_token_id is None
    check_token_ids(dataset, 'train_loader.dataset', {'model.vocab_size': 8}, 'tok')  # skipped: nothing known


def test_a_vocabulary_too_small_for_the_corpus_is_refused_before_batch_1(yaml_env, local_mds,  # noqa: F811
                                                                          small_corpus):
    from dwm_stream.convert.tokenizer import train_tokenizer
    small = train_tokenizer(small_corpus.out_dir, str(yaml_env / 'bpe-512'), vocab_size=512, progress=False)
    cfg = _config('demo-cpu.yaml', yaml_env, local_mds, ['max_duration=1ba', 'algorithms.dwm.num_stages=1',
                                                          f'tokenizer.name={small}'])
    trainer = build_trainer(cfg, config_path='demo-cpu.yaml')
    try:
        with pytest.raises(ValueError) as info:
            fit(trainer, cfg)
        dwm = next(a for a in trainer.state.algorithms if isinstance(a, builders.ConfiguredDWM))
        assert int(trainer.state.timestamp.batch) == 0 and dwm.refits_done == 0
    finally:
        trainer.close()
    message = str(info.value)
    with open(os.path.join(local_mds, 'dwm.json')) as f:
        meta = json.load(f)
    assert message.startswith(f'train_loader.dataset: corpus {local_mds} holds token ids up to '
                              f'{meta["max_token_id"]} (its dwm.json: tokenizer {meta["tokenizer"]!r})'), message
    assert 'model.vocab_size is 512' in message and 'algorithms.dwm.weighter.vocab_size is 512' in message
    assert f"tokenizer.name: {cfg['tokenizer']['name']!r}" in message
