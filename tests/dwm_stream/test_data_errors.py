"""Every data error names the file (or key) and the fix, and is raised when the dataset is built (issue 11).

Each test sets up the situation a user hit, on real shards (``write_synthetic_corpus`` writes them as ``dwm-stream
convert`` does), and checks the early error. Before issue 11: a missing local shard gave streaming's "path to
remote dataset must be provided" at the batch that reached it; a deleted ``dwm.json`` a bare ``IndexError`` at the
first sample; ``ds[len(ds)]`` ``IndexError: list index out of range``; ``shuffle: "false"`` was taken as true.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from torch.utils.data import DataLoader

from dwm_stream.schema import ConfigError
from dwm_stream.data.dataset import DWMDataset, DWMStream
from dwm_stream.data.loader import build_dataloader, build_dataset, collate_samples
from dwm_stream.format.integrity import MissingShardError
from dwm_stream.testing.synthetic import write_synthetic_corpus

N = 120
SEQ = 16


@pytest.fixture(scope='module')
def pristine(synthetic_mds):
    return synthetic_mds('pristine', N, seq_len=SEQ, vocab_size=3000, seed=4, size_limit=1 << 9)


@pytest.fixture
def corpus(pristine, tmp_path):
    """A private copy that a test may damage."""
    out = str(tmp_path / 'mds')
    shutil.copytree(pristine, out)
    return out


def _index(root):
    with open(os.path.join(root, 'index.json')) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------- shards
def test_missing_local_shard_is_named_at_construction(corpus):
    shard = _index(corpus)['shards'][3]['zip_data']['basename']
    os.remove(os.path.join(corpus, shard))
    with pytest.raises(MissingShardError) as info:
        DWMDataset(local=corpus, batch_size=4)
    assert str(info.value) == (f'{os.path.join(corpus, shard)}: missing (listed in '
                               f'{os.path.join(corpus, "index.json")}); restore it, or give `remote` (where the '
                               f'dataset was written) so that streaming can download it.')
    with pytest.raises(FileNotFoundError, match='restore it'):  # and through the YAML loader
        build_dataloader({'local': corpus}, 4)


def test_missing_local_shards_are_listed(corpus):
    shards = [s['zip_data']['basename'] for s in _index(corpus)['shards']]
    for name in shards[1:8]:
        os.remove(os.path.join(corpus, name))
    with pytest.raises(MissingShardError, match=rf'^{corpus}: 7 shard files listed in .*index\.json are missing '
                                                rf'\({shards[1]}, .* and 2 more\); restore them, or give `remote`'):
        DWMDataset(local=corpus, batch_size=4)


def test_raw_shard_without_its_compressed_file_is_named_and_kept(corpus):
    """Streaming would delete the decompressed file of a shard whose .zstd is gone; it is refused first."""
    entry = _index(corpus)['shards'][0]
    raw, zipped = entry['raw_data']['basename'], entry['zip_data']['basename']
    from streaming.base.compression import decompress  # the user decompressed a shard beside its .zstd
    with open(os.path.join(corpus, zipped), 'rb') as f, open(os.path.join(corpus, raw), 'wb') as out:
        out.write(decompress(entry['compression'], f.read()))
    os.remove(os.path.join(corpus, zipped))
    with pytest.raises(MissingShardError, match=rf'{zipped}: missing .*\({raw}, decompressed, is there, but without '
                                                r'its compressed file streaming deletes it'):
        DWMDataset(local=corpus, batch_size=4)
    assert os.path.exists(os.path.join(corpus, raw))


def test_uncompressed_corpus_missing_a_shard(tmp_path):
    root = str(tmp_path / 'raw')
    write_synthetic_corpus(root, 40, seq_len=SEQ, size_limit=1 << 11, compression=None)
    shard = _index(root)['shards'][1]['raw_data']['basename']
    os.remove(os.path.join(root, shard))
    with pytest.raises(MissingShardError, match=rf'{shard}: missing'):
        DWMDataset(local=root, batch_size=4)


def test_missing_cache_files_are_fine_with_a_remote(corpus, tmp_path):
    cache = str(tmp_path / 'cache')
    shutil.copytree(corpus, cache)
    os.remove(os.path.join(cache, _index(cache)['shards'][2]['zip_data']['basename']))
    assert len(list(DWMDataset(remote=corpus, local=cache, batch_size=4))) == N  # streaming downloads it


# ---------------------------------------------------------------------------------------------- dwm.json
def test_deleted_dwm_json_is_named_at_construction(corpus):
    os.remove(os.path.join(corpus, 'dwm.json'))
    with pytest.raises(ValueError) as info:
        DWMDataset(local=corpus, batch_size=4)
    assert str(info.value) == (f'{os.path.join(corpus, "dwm.json")}: missing, but the shards have dwm-stream\'s '
                               f'`domain` column, whose ids only dwm.json names; restore the dwm.json written with '
                               f'these shards, or re-run `dwm-stream convert`.')


def test_deleted_dwm_json_of_a_remote_corpus(corpus, tmp_path):
    os.remove(os.path.join(corpus, 'dwm.json'))
    with pytest.raises(ValueError, match=rf'^{corpus}/dwm\.json: missing, but the shards have dwm-stream'):
        DWMDataset(remote=corpus, local=str(tmp_path / 'cache'), batch_size=4)


@pytest.mark.parametrize('damage, message', [
    ('truncate', (r'dwm\.json: not valid JSON, truncated or damaged \(.*\); restore the dwm\.json written with '
                  r'these shards, or re-run `dwm-stream convert`\.$')),
    ('empty', r'dwm\.json: empty; restore the dwm\.json'),
    ('list', r'dwm\.json: expected a JSON object, got list; restore'),
    ('no_domains', r"dwm\.json: missing keys \['domains'\]; restore"),
    ('bad_seq_len', r"dwm\.json: `seq_len` must be a positive int, got '16'; restore"),
    ('num_samples', (rf'dwm\.json: says {N + 1} samples, but .*index\.json lists {N} \(it belongs to another '
                     r'conversion\); restore')),
    ('seq_len', (rf'dwm\.json: seq_len {2 * SEQ}, but the shards hold {SEQ} tokens per sample '
                 rf'\(ndarray:uint16:{SEQ}\); restore')),
])
def test_damaged_dwm_json_is_named_at_construction(corpus, damage, message):
    path = os.path.join(corpus, 'dwm.json')
    with open(path) as f:
        text = f.read()
    meta = json.loads(text)
    if damage == 'truncate':
        text = text[:len(text) // 2]
    elif damage == 'empty':
        text = ''
    elif damage == 'list':
        text = json.dumps([meta])
    elif damage == 'no_domains':
        del meta['domains']
    elif damage == 'bad_seq_len':
        meta['seq_len'] = str(meta['seq_len'])
    elif damage == 'num_samples':
        meta['num_samples'] += 1
    elif damage == 'seq_len':
        meta['seq_len'] *= 2
    if damage not in ('truncate', 'empty', 'list'):
        text = json.dumps(meta)
    with open(path, 'w') as f:
        f.write(text)
    with pytest.raises(ValueError, match=message) as info:
        DWMDataset(local=corpus, batch_size=4)
    assert str(info.value).startswith(path + ':')


def test_domain_ids_beyond_dwm_json_are_named(corpus):
    """A dwm.json that lists fewer domains than the shards use (e.g. from another conversion of the same size)."""
    path = os.path.join(corpus, 'dwm.json')
    with open(path) as f:
        meta = json.load(f)
    meta['domains'] = meta['domains'][:1]
    with open(path, 'w') as f:
        json.dump(meta, f)
    ds = DWMDataset(local=corpus, batch_size=4)
    with pytest.raises(ValueError, match=rf'shard\.\d+\.mds: row \d+ has domain id [12], but {path} lists 1 '
                                         r'domain\(s\); restore the dwm\.json'):
        list(ds)


# ---------------------------------------------------------------------------------------------- indexing
def test_index_out_of_range_names_the_valid_range(pristine):
    ds = DWMDataset(local=pristine, batch_size=4)
    assert ds[-1]['uid'] == ds[N - 1]['uid'] and ds[-N]['uid'] == ds[0]['uid']
    for bad in (N, N + 5, -N - 1):
        with pytest.raises(IndexError) as info:
            ds[bad]
        assert str(info.value) == (f'Invalid sample index `{bad}`: 0 <= index < {N} (or -{N} <= index < 0 from '
                                   f'the end); the dataset has {N} samples.')


# ---------------------------------------------------------------------------------------------- types
@pytest.mark.parametrize('key, value, expected', [
    ('shuffle', 'false', r"shuffle: expected bool \(true/false, unquoted\), got str \('false'\)\."),
    ('shuffle', 1, r'shuffle: expected bool \(true/false, unquoted\), got int \(1\)\.'),
    ('allow_unsafe_types', 'no', r"allow_unsafe_types: expected bool"),
    ('shuffle_seed', '7', r"shuffle_seed: expected int, got str \('7'\)\."),
    ('shuffle_seed', 1.5, r'shuffle_seed: expected int, got float \(1\.5\)\.'),
    ('download_timeout', '60', r"download_timeout: expected float, got str \('60'\)"),
    ('batch_size', True, r'batch_size: expected int, got bool \(True\)'),
    ('max_seq_len', 0, r'max_seq_len: must be > 0, got 0\.'),
])
def test_argument_types_are_checked_at_construction(pristine, key, value, expected):
    kwargs = {'batch_size': 4, key: value}
    with pytest.raises(ConfigError, match='^' + expected):
        DWMDataset(local=pristine, **kwargs)
    cfg = {'local': pristine, **kwargs}  # the same dataset config, as Foundry hands it over raw
    with pytest.raises(ConfigError, match='^train_loader.dataset.' + expected):
        build_dataset(cfg, 4, where='train_loader.dataset')


def test_string_false_is_not_taken_as_true(pristine):
    """The original failure: `shuffle: "false"` shuffled. Now refused; the bool false keeps index order."""
    with pytest.raises(ConfigError, match='shuffle'):
        DWMDataset(local=pristine, batch_size=4, shuffle='false')
    ds = DWMDataset(local=pristine, batch_size=4, shuffle=False)
    first = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_samples)))
    assert first['uid'].tolist() == [ds[i]['uid'] for i in range(4)]


def test_stream_and_loader_argument_types(pristine, tmp_path):
    with pytest.raises(ConfigError, match=r"^train_loader\.dataset\.streams\.web\.proportion: expected "
                                                r"float, got str \('0\.5'\)"):
        build_dataset({'streams': {'web': {'local': pristine, 'proportion': '0.5'}}}, 4, where='train_loader.dataset')
    with pytest.raises(ConfigError, match=r"^keep_zip: expected bool"):
        DWMStream(local=pristine, keep_zip='true')
    with pytest.raises(ConfigError, match=r"^train_loader\.drop_last: expected bool \(true/false, "
                                                r"unquoted\), got str \('false'\)"):
        build_dataloader({'local': pristine}, 4, drop_last='false')
    with pytest.raises(ConfigError, match=r"^train_loader\.num_workers: expected int, got str \('2'\)"):
        build_dataloader({'local': pristine}, 4, num_workers='2')


def test_foundry_entry_point_rejects_a_string_bool(pristine):
    """`llmfoundry train` hands the loader's YAML keys to build_dwm_dataloader as they are."""
    from dwm_stream.train.foundry import build_dwm_dataloader
    with pytest.raises(ValueError, match=r"train_loader\.dataset\.shuffle: expected bool"):
        build_dwm_dataloader(None, 4, dataset={'local': pristine, 'shuffle': 'false'})
    spec = build_dwm_dataloader(None, 4, dataset={'local': pristine, 'shuffle': False})
    assert np.array_equal(next(iter(spec.dataloader))['uid'].numpy(),
                          [spec.dataloader.dataset[i]['uid'] for i in range(4)])
