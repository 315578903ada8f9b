"""The embedded corpus: SlimPajama layout, domains, determinism, held-out LAMBADA."""

from __future__ import annotations

import glob
import json
import os
import re

import pytest

from dwm_stream.demo.corpus import (ALT_DEGRADED_DOMAINS, DEGRADED_DOMAINS, DOMAINS, REAL_DOMAINS, build_corpus,
                                    MAX_DOC_CHARS, degraded_domains, parse_size)
from dwm_stream.convert.sources import read_jsonl_zst


def _docs(root: str, split: str):
    files = sorted(glob.glob(os.path.join(root, split, 'chunk*', '*.jsonl.zst')))
    return [d for f in files for d in read_jsonl_zst(f)]


def test_layout_is_slimpajamas(small_corpus):
    root = small_corpus.out_dir
    rel = sorted(os.path.relpath(p, root) for p in glob.glob(f'{root}/**/*.jsonl.zst', recursive=True))
    assert rel == sorted(small_corpus.train_files + small_corpus.validation_files)
    assert all(re.fullmatch(r'train/chunk[1-9]\d*/example_train_\d+\.jsonl\.zst', p)
               for p in small_corpus.train_files)
    assert all(re.fullmatch(r'validation/chunk1/example_holdout_\d+\.jsonl\.zst', p)
               for p in small_corpus.validation_files)
    assert len({p.split('/')[1] for p in small_corpus.train_files}) >= 2  # several chunks
    assert os.path.isfile(os.path.join(root, 'lambada.jsonl'))


def test_every_line_has_text_and_a_known_domain(small_corpus):
    docs = _docs(small_corpus.out_dir, 'train')
    domains = {d.domain for d in docs}
    assert domains <= set(DOMAINS)
    assert set(DEGRADED_DOMAINS) <= domains
    assert len(domains & set(REAL_DOMAINS)) >= 3
    assert all(d.text.strip() for d in docs)
    assert all('<|endoftext|>' not in d.text for d in docs)
    # files mix domains, as SlimPajama's do
    first_file = list(read_jsonl_zst(os.path.join(small_corpus.out_dir, small_corpus.train_files[0])))
    assert len({d.domain for d in first_file}) >= 4


def test_size_is_respected(small_corpus):
    total = sum(len(d.text.encode()) for d in _docs(small_corpus.out_dir, 'train'))
    assert total == sum(small_corpus.bytes_per_domain.values())
    assert small_corpus.size_bytes * 0.95 <= total <= small_corpus.size_bytes * 1.15


def test_validation_is_held_out(small_corpus):
    train = {d.text for d in _docs(small_corpus.out_dir, 'train')}
    val = _docs(small_corpus.out_dir, 'validation')
    assert val and small_corpus.validation_docs == len(val)
    real_val = [d.text for d in val if d.domain in REAL_DOMAINS]
    assert real_val and not train & set(real_val)


def test_lambada_is_held_out_prose(small_corpus):
    with open(small_corpus.lambada_path) as f:
        examples = [json.loads(line) for line in f]
    assert len(examples) == small_corpus.lambada_examples >= 20
    train_text = ' '.join(' '.join(d.text.split()) for d in _docs(small_corpus.out_dir, 'train')
                          if d.domain in REAL_DOMAINS)
    for ex in examples:
        assert set(ex) == {'context', 'continuation'}
        assert re.fullmatch(r' [A-Za-z]{2,}', ex['continuation'])
        assert len(ex['context'].split()) >= 39
        assert ex['context'] + ex['continuation'] not in train_text


def test_same_seed_is_byte_identical_and_seed_matters(tmp_path):
    def files(root):
        return {os.path.relpath(p, root): open(p, 'rb').read()
                for p in glob.glob(f'{root}/**/*', recursive=True) if os.path.isfile(p)}

    a = build_corpus(str(tmp_path / 'a'), size='300KB', seed=3, progress=False)
    b = build_corpus(str(tmp_path / 'b'), size='300KB', seed=3, progress=False)
    c = build_corpus(str(tmp_path / 'c'), size='300KB', seed=4, progress=False)
    assert files(a.out_dir) == files(b.out_dir)
    fa, fc = files(a.out_dir), files(c.out_dir)
    assert fa['train/chunk1/example_train_0.jsonl.zst'] != fc['train/chunk1/example_train_0.jsonl.zst']


def test_refuses_to_overwrite(small_corpus):
    with pytest.raises(FileExistsError, match='already holds a corpus'):
        build_corpus(small_corpus.out_dir, size='300KB', progress=False)


@pytest.mark.parametrize('text, value', [('8MB', 8_000_000), ('500KB', 500_000), ('2MiB', 2 << 20),
                                         (123456, 123456), ('1.5MB', 1_500_000)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize('text', ['lots', '10', '-5MB'])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match='--size'):
        parse_size(text)


def test_alt_corruptions_replace_the_degraded_domains(tmp_path):
    """``corruptions='alt'``: the same real domains, other degraded ones, and each corruption is what it says."""
    info = build_corpus(str(tmp_path / 'alt'), size='300KB', seed=0, progress=False, corruptions='alt')
    assert degraded_domains('alt') == ALT_DEGRADED_DOMAINS and degraded_domains() == DEGRADED_DOMAINS
    docs = _docs(info.out_dir, 'train')
    domains = {d.domain for d in docs}
    assert set(ALT_DEGRADED_DOMAINS) <= domains and not domains & set(DEGRADED_DOMAINS)
    assert len(domains & set(REAL_DOMAINS)) >= 3
    flat = [d.text for d in docs if d.domain == 'DegradedFlattenedCode']
    assert flat and all('\n' not in t and '  ' not in t for t in flat)
    repeated = [d.text for d in docs if d.domain == 'DegradedRepeated']
    assert repeated and all(len(set(t.split('\n\n'))) == 1 and t.count('\n\n') >= 2 for t in repeated)
    with open(os.path.join(info.out_dir, 'dwm_corpus.json')) as f:
        assert json.load(f)['corruptions'] == 'alt'
    with pytest.raises(ValueError, match='corruptions'):
        build_corpus(str(tmp_path / 'bad'), size='300KB', corruptions='other')


def test_validation_size_and_the_default_summary(tmp_path):
    info = build_corpus(str(tmp_path / 'v'), size='300KB', seed=0, progress=False, validation_size='200KB')
    total = sum(len(d.text.encode()) for d in _docs(info.out_dir, 'validation'))
    assert 200_000 <= total <= 200_000 + len(DOMAINS) * 2 * MAX_DOC_CHARS  # each domain stops after a document
    with open(os.path.join(info.out_dir, 'dwm_corpus.json')) as f:
        assert 'corruptions' not in json.load(f)  # the standard corpus's summary is unchanged
