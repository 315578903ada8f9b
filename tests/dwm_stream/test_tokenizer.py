"""The local BPE tokenizer: offline loading, lossless round trip, caching."""

from __future__ import annotations

import os

import pytest

from dwm_stream.convert.sources import read_jsonl_zst
from dwm_stream.convert.tokenizer import (EOS_TOKEN, FINGERPRINT_BASENAME, corpus_train_files,
                                  load_tokenizer, train_tokenizer)


def test_autotokenizer_loads_it_offline(small_tokenizer, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('TRANSFORMERS_OFFLINE', '1')
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(small_tokenizer)
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == EOS_TOKEN
    assert tok.eos_token_id == tok.pad_token_id
    assert len(tok) == 2048
    assert type(load_tokenizer(small_tokenizer)).__name__ == 'PreTrainedTokenizerFast'


TRICKY = ['', ' ', '  leading and trailing  ', 'tabs\tand\r\nCRLF\n\n\n', 'ünïcödé — “quotes” 日本語 🎉',
          '\x00\x01 control', "def f(x):\n    return x ** 2  # comment\n", "don't    stop 'em",
          ' ' * 50 + 'x']


def test_round_trip_is_lossless(small_corpus, small_tokenizer):
    tok = load_tokenizer(small_tokenizer)
    texts = TRICKY + [d.text for f in corpus_train_files(small_corpus.out_dir)
                      for d in read_jsonl_zst(f)]
    ids = tok(texts, add_special_tokens=False)['input_ids']
    bad = [t for t, i in zip(texts, ids) if tok.decode(i) != t]
    assert not bad, f'{len(bad)} texts do not round-trip, e.g. {bad[0][:200]!r}'
    assert max(max(i, default=0) for i in ids) < 2048


def test_cached_by_fingerprint(small_corpus, small_tokenizer, tmp_path):
    before = os.path.getmtime(os.path.join(small_tokenizer, 'tokenizer.json'))
    assert train_tokenizer(small_corpus.out_dir, small_tokenizer, vocab_size=2048,
                           progress=False) == small_tokenizer
    assert os.path.getmtime(os.path.join(small_tokenizer, 'tokenizer.json')) == before
    assert os.path.isfile(os.path.join(small_tokenizer, FINGERPRINT_BASENAME))


def test_other_settings_retrain(small_corpus, tmp_path):
    out = str(tmp_path / 'tok')
    train_tokenizer(small_corpus.out_dir, out, vocab_size=300, progress=False)
    assert len(load_tokenizer(out)) == 300
    train_tokenizer(small_corpus.out_dir, out, vocab_size=320, progress=False)
    assert len(load_tokenizer(out)) == 320


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='no such corpus directory'):
        train_tokenizer(str(tmp_path / 'nope'), str(tmp_path / 'tok'), progress=False)
    with pytest.raises(FileNotFoundError, match='not a tokenizer directory'):
        load_tokenizer(str(tmp_path / 'nope'))
    with pytest.raises(ValueError, match='vocab-size'):
        train_tokenizer(str(tmp_path), str(tmp_path / 'tok'), vocab_size=100, progress=False)
