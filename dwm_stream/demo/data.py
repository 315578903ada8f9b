"""The data the demo and the quality benchmark train on, prepared once and cached.

``prepare_data`` builds the embedded corpus, trains a BPE tokenizer on it, converts its ``train/`` and
``validation/`` splits to MDS shards and splits its LAMBADA-format file into a fit half (DWM's validation) and a
report half (never used to fit anything). Every step is skipped when its output is already there, under a folder
named for the :class:`DataBudget`, so a quick and a full run never share a cache by mistake.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Callable, Optional

from dwm_stream.convert.pipeline import convert
from dwm_stream.convert.tokenizer import train_tokenizer
from dwm_stream.demo.corpus import build_corpus, split_lambada

__all__ = ['DataBudget', 'prepare_data']


@dataclass(frozen=True)
class DataBudget:
    """What sets the size of the data.

    Args:
        corpus_size (str): Train text of the embedded corpus, e.g. ``'8MB'`` (see ``build_corpus``).
        vocab_size (int): BPE vocabulary, byte tokens and ``<|endoftext|>`` included.
        seq_len (int): Tokens per packed sample in the MDS shards.
    """
    corpus_size: str
    vocab_size: int
    seq_len: int

    def key(self, seed: int = 0) -> str:
        """The cache folder's name: ``4MB-v2048-s128`` (``-seed3`` appended for a corpus seed other than 0)."""
        return f'{self.corpus_size}-v{self.vocab_size}-s{self.seq_len}' + (f'-seed{seed}' if seed else '')


def prepare_data(data_dir: str, budget: DataBudget, seed: int = 0, workers: int = 1, progress: bool = False,
                 say: Optional[Callable[[str, str], None]] = None) -> dict[str, str]:
    """Corpus, tokenizer, MDS shards and the LAMBADA fit/report split, each cached in ``data_dir/<budget key>``.

    Args:
        data_dir (str): Cache root; the data goes to ``data_dir/<budget.key(seed)>``.
        budget (DataBudget): Corpus size, vocabulary and sample length.
        seed (int): Seed of the corpus build. Default: ``0``.
        workers (int): Conversion processes (the shards are the same for any number). Default: ``1``.
        progress (bool): Progress bars of the corpus build, tokenizer training and conversion. Default: ``False``.
        say (Callable[[str, str], None], optional): Called with ``(step, message)`` for each step, ``step`` one of
            ``'corpus'``, ``'tokenizer'``, ``'convert'``. Default: ``None`` (silent).

    Returns:
        dict[str, str]: Paths: ``root``, ``corpus``, ``tokenizer``, ``train`` and ``validation`` (MDS shards),
        ``lambada_fit``, ``lambada_report``.
    """
    def tell(step: str, message: str) -> None:
        if say is not None:
            say(step, message)

    root = os.path.join(data_dir, budget.key(seed))
    paths = {'root': root, 'corpus': os.path.join(root, 'corpus'), 'tokenizer': os.path.join(root, 'tokenizer'),
             'train': os.path.join(root, 'mds', 'train'), 'validation': os.path.join(root, 'mds', 'validation'),
             'lambada_fit': os.path.join(root, 'lambada_fit.jsonl'),
             'lambada_report': os.path.join(root, 'lambada_report.jsonl')}
    if os.path.exists(os.path.join(paths['corpus'], 'dwm_corpus.json')):  # written last: the corpus is complete
        tell('corpus', f'corpus: cached in {paths["corpus"]}')
    else:
        shutil.rmtree(paths['corpus'], ignore_errors=True)  # an interrupted build
        tell('corpus', f'building the embedded corpus ({budget.corpus_size}) in {paths["corpus"]}')
        build_corpus(paths['corpus'], size=budget.corpus_size, seed=seed, progress=progress)
    tell('tokenizer', 'training the BPE tokenizer (cached when unchanged)')
    train_tokenizer(paths['corpus'], paths['tokenizer'], vocab_size=budget.vocab_size, progress=progress)
    for split in ('train', 'validation'):
        if os.path.exists(os.path.join(paths[split], 'index.json')):
            tell('convert', f'{split} shards: cached in {paths[split]}')
        else:
            tell('convert', f'converting {split}/ to MDS shards ({budget.seq_len} tokens per sample)')
            convert(os.path.join(paths['corpus'], split), paths[split], tokenizer=paths['tokenizer'],
                    seq_len=budget.seq_len, workers=workers, overwrite=True, progress=progress)
    if not os.path.exists(paths['lambada_report']):
        # First half: fits DWM's weighter (and the quality benchmark's static weights). Second half: reported only.
        split_lambada(os.path.join(paths['corpus'], 'lambada.jsonl'), paths['lambada_fit'], paths['lambada_report'])
    return paths
