"""The selection overlay and the materialised subset deliver the same samples."""

import os
import shutil
from collections import Counter

import numpy as np
import pytest

from dwm_stream.data.dataset import DWMDataset
from dwm_stream.select.materialize import PRIOR_BASENAME, materialize
from dwm_stream.data.selection import read_selection, write_selection


@pytest.fixture()
def corpus(converted_mds, tmp_path):
    """A private copy: streaming decompresses shards into the local directory it reads."""
    path = str(tmp_path / 'corpus')
    shutil.copytree(converted_mds, path)
    return path


def _delivered(dataset):
    """Every delivered uid (a list, so repeats would show) and what each sample carried."""
    uids, out = [], {}
    for sample in dataset:
        uid = int(sample['uid'])
        uids.append(uid)
        out[uid] = (sample['input_ids'][:sample['num_tokens']].tobytes(), int(sample['domain']),
                    float(sample['prior_weight']), tuple(np.asarray(sample.get('scores', [])).tolist()))
    return uids, out


def test_overlay_and_materialized_subset_deliver_the_same_samples(corpus, tmp_path):
    uids = np.load(os.path.join(corpus, 'uids.npy'))
    rng = np.random.default_rng(0)
    chosen = rng.choice(uids, size=len(uids) // 3, replace=False)
    prior = rng.uniform(0.5, 2.0, len(chosen)).astype(np.float32)
    sel = str(tmp_path / 'sel.parquet')
    write_selection(sel, chosen, prior_weight=prior, scores={'dsir': rng.normal(size=len(chosen))})

    out = str(tmp_path / 'subset')
    report = materialize(corpus, sel, out)
    assert report.num_samples == len(chosen) and report.prior_file == os.path.join(out, PRIOR_BASENAME)

    overlay_uids, overlay = _delivered(DWMDataset(local=corpus, selection=sel, shuffle=True, shuffle_seed=1,
                                                  batch_size=4))
    subset_uids, subset = _delivered(DWMDataset(local=out, selection=report.prior_file, shuffle=True, shuffle_seed=2,
                                   batch_size=4))
    assert Counter(overlay_uids) == Counter(subset_uids) == Counter(chosen.tolist())
    assert overlay == subset  # tokens, domain, prior weight and scores too
    plain = DWMDataset(local=out, shuffle=False, batch_size=4)
    assert plain.score_names == ['dsir'] and len(plain) == len(chosen)
    assert read_selection(report.prior_file).prior_weight.tolist() != [1.0] * len(chosen)


def test_unknown_uids_and_existing_output(corpus, tmp_path):
    uids = np.load(os.path.join(corpus, 'uids.npy'))
    bad = str(tmp_path / 'unknown.parquet')
    write_selection(bad, np.array([int(uids[0]), 987654321]))
    with pytest.raises(ValueError, match=r'unknown\.parquet.*987654321'):
        materialize(corpus, bad, str(tmp_path / 'a'))
    good = str(tmp_path / 'good.parquet')
    write_selection(good, uids[:5])
    materialize(corpus, good, str(tmp_path / 'b'))
    with pytest.raises(FileExistsError, match='--overwrite'):
        materialize(corpus, good, str(tmp_path / 'b'))
    assert materialize(corpus, good, str(tmp_path / 'b'), overwrite=True).prior_file is None
