"""LAMBADA-format validation batches."""

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from algorithms.dwm.validation import ValidationBatches, build_validation_batches, read_lambada_jsonl


@pytest.fixture
def tokenizer():
    vocab = {w: i for i, w in enumerate(['<pad>', '<unk>', 'the', 'cat', 'sat', 'on', 'mat', 'dog', 'ran', 'home'])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='<pad>', unk_token='<unk>')


def _write(path, lines):
    path.write_text('\n'.join(lines) + '\n')
    return path


def test_batches_score_only_the_continuation(tmp_path, tokenizer):
    path = _write(tmp_path / 'v.jsonl', [
        json.dumps({'context': 'the cat sat on the', 'continuation': ' mat'}),
        json.dumps({'context': 'the dog', 'continuation': ' ran home'}),
        '',
        json.dumps({'context': 'the cat', 'continuation': ' sat'}),
    ])
    batches = build_validation_batches(path, tokenizer, batch_size=2)
    assert len(batches) == 2
    b = batches[0]
    assert b['input_ids'].tolist() == [[2, 3, 4, 5, 2, 6], [2, 7, 8, 9, 0, 0]]
    assert b['labels'].tolist() == [[-100, -100, -100, -100, -100, 6], [-100, -100, 8, 9, -100, -100]]
    assert b['attention_mask'].tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]
    assert len(list(ValidationBatches(path, tokenizer, batch_size=2))) == 2


def test_max_length_keeps_the_continuation(tmp_path, tokenizer):
    path = _write(tmp_path / 'v.jsonl', [json.dumps({'context': 'the cat sat on the', 'continuation': ' mat'})])
    b = build_validation_batches(path, tokenizer, max_length=3)[0]
    assert b['input_ids'].tolist() == [[5, 2, 6]] and b['labels'].tolist() == [[-100, -100, 6]]


@pytest.mark.parametrize('lines,match', [
    (['{"context": "the cat", "continuation": " sat"}', 'not json'], r'v\.jsonl:2: not valid JSON'),
    (['{"context": "the cat"}'], r'v\.jsonl:1: expected an object'),
    (['{"context": "the cat", "continuation": "  "}'], r'v\.jsonl:1: empty "continuation"'),
    ([''], r'v\.jsonl: no records'),
])
def test_bad_files_name_file_and_line(tmp_path, lines, match):
    path = _write(tmp_path / 'v.jsonl', lines)
    with pytest.raises(ValueError, match=match):
        read_lambada_jsonl(path)


def test_continuation_without_tokens(tmp_path, tokenizer):
    class DropsContinuation:
        pad_token_id, eos_token_id = 0, None

        def __call__(self, text, add_special_tokens=True):
            return {'input_ids': tokenizer(text, add_special_tokens=add_special_tokens)['input_ids']
                    if add_special_tokens else []}

    path = _write(tmp_path / 'v.jsonl', [json.dumps({'context': 'the cat', 'continuation': ' sat'})])
    with pytest.raises(ValueError, match=r'v\.jsonl: record 1: continuation .* has no tokens'):
        build_validation_batches(path, DropsContinuation())


def test_missing_file_and_peek(tmp_path, tokenizer):
    """A missing file is named as such (DWM's start-up check reports it under algorithms.dwm.validation); peek()
    gives the first batch without consuming anything."""
    with pytest.raises(FileNotFoundError, match=r'LAMBADA-format file .*nope\.jsonl does not exist'):
        read_lambada_jsonl(tmp_path / 'nope.jsonl')
    path = _write(tmp_path / 'v.jsonl', [json.dumps({'context': 'the cat', 'continuation': ' sat'})] * 3)
    batches = ValidationBatches(path, tokenizer, batch_size=2)
    first = batches.peek()
    assert first['input_ids'].shape == (2, 3)
    assert [b['input_ids'].shape[0] for b in batches] == [2, 1]
