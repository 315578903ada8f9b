"""The local tokenizer: a byte-level BPE trained with ``tokenizers`` on a corpus's train split.

``train_tokenizer`` saves a ``PreTrainedTokenizerFast`` directory (``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``) that ``AutoTokenizer.from_pretrained(DIR)``
loads with no network. Its only special token is ``<|endoftext|>``, used as EOS and as padding.
Byte-level pre-tokenization with no normaliser and no added prefix space, plus
``clean_up_tokenization_spaces=False``, make ``decode(encode(text)) == text`` for every string.

The result is cached: ``DIR/dwm_tokenizer.json`` records a fingerprint of the train files (relative
path, size and SHA-256) and the settings, and a second call with the same corpus and settings
returns at once.

Everything that takes a tokenizer also accepts an HF hub name or any local path via
:func:`load_tokenizer`.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterator, Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dwm_stream.convert.sources import read_jsonl_zst
from dwm_stream.progress import is_terminal

__all__ = ['train_tokenizer', 'load_tokenizer', 'corpus_train_files', 'EOS_TOKEN',
           'FINGERPRINT_BASENAME']

EOS_TOKEN = '<|endoftext|>'
FINGERPRINT_BASENAME = 'dwm_tokenizer.json'
_TRAINER_VERSION = 1


def corpus_train_files(corpus_dir: str) -> list[str]:
    """The ``.jsonl.zst`` files of a SlimPajama-layout corpus's train split, sorted.

    ``corpus_dir`` may be the corpus root (with ``train/``) or the train directory itself.
    """
    train = os.path.join(corpus_dir, 'train')
    root = train if os.path.isdir(train) else corpus_dir
    if not os.path.isdir(root):
        raise FileNotFoundError(f'{corpus_dir}: no such corpus directory; build one with '
                                '`dwm-stream corpus build --out DIR`.')
    files = []
    for d, dirs, names in os.walk(root):
        dirs.sort()
        files += [os.path.join(d, n) for n in sorted(names) if n.endswith('.jsonl.zst')]
    if not files:
        raise FileNotFoundError(f'{root}: no *.jsonl.zst files; expected SlimPajama layout '
                                'train/chunkN/example_train_K.jsonl.zst.')
    return sorted(files)


def _fingerprint(files: list[str], root: str, vocab_size: int, max_train_bytes: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({'version': _TRAINER_VERSION, 'vocab_size': vocab_size,
                         'max_train_bytes': max_train_bytes}).encode())
    for path in files:
        h.update(os.path.relpath(path, root).encode() + b'\0')
        with open(path, 'rb') as f:
            for block in iter(lambda: f.read(1 << 20), b''):
                h.update(block)
    return h.hexdigest()


def _texts(files: list[str], max_bytes: int) -> Iterator[str]:
    seen = 0
    for path in files:
        for doc in read_jsonl_zst(path):
            yield doc.text
            seen += len(doc.text)
            if seen >= max_bytes:
                return


def train_tokenizer(corpus_dir: str,
                    out_dir: str,
                    vocab_size: int = 8192,
                    progress: bool = False,
                    max_train_bytes: int = 200_000_000) -> str:
    """Train a byte-level BPE on the corpus's train split and save it as an HF tokenizer.

    Args:
        corpus_dir (str): Corpus root (with ``train/``) or its train directory.
        out_dir (str): Directory to save the tokenizer in.
        vocab_size (int): Vocabulary size, including the 256 byte tokens and ``<|endoftext|>``.
            Default: ``8192``.
        progress (bool): Show the trainer's progress bar, on a terminal only (it redraws in place).
            Default: ``False``.
        max_train_bytes (int): Train on at most this many characters of text, read in file order.
            Default: ``200_000_000``.

    Returns:
        str: ``out_dir``, loadable with ``AutoTokenizer.from_pretrained``.
    """
    if vocab_size < 258:
        raise ValueError(f'--vocab-size {vocab_size} is too small: a byte-level BPE needs at least '
                         '258 (256 bytes, <|endoftext|> and one merge).')
    files = corpus_train_files(corpus_dir)
    root = os.path.dirname(os.path.dirname(files[0]))
    fingerprint = _fingerprint(files, root, vocab_size, max_train_bytes)
    stamp = os.path.join(out_dir, FINGERPRINT_BASENAME)
    if os.path.isfile(stamp) and os.path.isfile(os.path.join(out_dir, 'tokenizer.json')):
        with open(stamp) as f:
            if json.load(f).get('fingerprint') == fingerprint:
                return out_dir

    # transformers takes seconds to import; the cached path above and convert's workers never need it.
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress and is_terminal())
    tok.train_from_iterator(_texts(files, max_train_bytes), trainer=trainer)

    fast = PreTrainedTokenizerFast(tokenizer_object=tok,
                                   eos_token=EOS_TOKEN,
                                   pad_token=EOS_TOKEN,
                                   bos_token=None,
                                   unk_token=None,
                                   clean_up_tokenization_spaces=False,
                                   model_max_length=1 << 30)
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    with open(stamp, 'w') as f:
        json.dump({'fingerprint': fingerprint, 'corpus': os.path.abspath(corpus_dir),
                   'vocab_size': vocab_size, 'actual_vocab_size': tok.get_vocab_size(),
                   'max_train_bytes': max_train_bytes}, f, indent=2, sort_keys=True)
    return out_dir


def load_tokenizer(name_or_path: str, revision: Optional[str] = None, **kwargs: Any):
    """An HF tokenizer from a local directory (never touching the network) or a hub name.

    Args:
        name_or_path (str): Local tokenizer directory, or an HF hub name (then the usual HF cache
            and ``HF_HUB_OFFLINE`` rules apply).
        revision (str | None): Hub revision. Default: ``None``.
        **kwargs: Passed to ``AutoTokenizer.from_pretrained`` (``model_max_length``, ``padding_side``...: LLM
            Foundry's ``tokenizer.kwargs``).
    """
    from transformers import AutoTokenizer  # lazy: seconds to import, see train_tokenizer
    if os.path.isdir(name_or_path):
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True, **kwargs)
    if os.path.exists(name_or_path) or name_or_path.startswith(('.', '/', '~')):
        raise FileNotFoundError(f'tokenizer {name_or_path!r}: not a tokenizer directory; train one '
                                'with `dwm-stream tokenizer train --corpus DIR --out DIR`.')
    try:
        return AutoTokenizer.from_pretrained(name_or_path, revision=revision, **kwargs)
    except OSError as e:
        raise FileNotFoundError(f'tokenizer {name_or_path!r}: not a local directory, and the hub '
                                f'could not provide it ({e}). Give a local path, or pre-download '
                                'it into the HF cache.') from e
