"""The data the demo and the quality benchmark train on, prepared once and cached.

``prepare_data`` builds the embedded corpus (or takes any SlimPajama-layout corpus, ``corpus_dir=``), trains a BPE
tokenizer on it, converts its ``train/`` and ``validation/`` splits to MDS shards and splits its LAMBADA-format file
into a fit half (DWM's validation) and a report half (never used to fit anything). Every step is skipped when its
output is already there, under a folder named for the :class:`DataBudget` (and the corpus), so a quick and a full run
never share a cache by mistake.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Optional

from dwm_stream.convert.pipeline import convert
from dwm_stream.convert.tokenizer import train_tokenizer
from dwm_stream.demo.corpus import RECIPE_VERSION, build_corpus, split_lambada

__all__ = ['DataBudget', 'prepare_data']


@dataclass(frozen=True)
class DataBudget:
    """What sets the size of the data.

    Args:
        corpus_size (str): Train text of the embedded corpus, e.g. ``'8MB'`` (see ``build_corpus``).
        vocab_size (int): BPE vocabulary, byte tokens and ``<|endoftext|>`` included.
        seq_len (int): Tokens per packed sample in the MDS shards.
        validation_size (str, optional): Validation text of the embedded corpus, e.g. ``'600KB'``. Default:
            ``None`` (``build_corpus``'s default).
        degraded_share (float, optional): Share of the embedded corpus's bytes in its degraded domains. Default:
            ``None`` (``build_corpus``'s default).
    """
    corpus_size: str
    vocab_size: int
    seq_len: int
    validation_size: Optional[str] = None
    degraded_share: Optional[float] = None

    def key(self, seed: int = 0, corruptions: str = 'standard') -> str:
        """The cache folder's name: ``4MB-v2048-s128`` (``-val600KB``, ``-alt``, ``-seed3`` appended for a
        validation size, corruption set or corpus seed other than the defaults)."""
        return (f'{self.corpus_size}-v{self.vocab_size}-s{self.seq_len}'
                + (f'-val{self.validation_size}' if self.validation_size else '')
                + (f'-deg{round(100 * self.degraded_share)}' if self.degraded_share is not None else '')
                + (f'-{corruptions}' if corruptions != 'standard' else '') + (f'-seed{seed}' if seed else ''))


def _cached_recipe(corpus: str) -> Optional[int]:
    """The recipe version of the cached embedded corpus in ``corpus`` (1 for one built before versions were
    recorded; ``None`` if there is no complete corpus)."""
    try:
        with open(os.path.join(corpus, 'dwm_corpus.json'), encoding='utf-8') as f:
            return int(json.load(f).get('recipe', 1))
    except (OSError, ValueError, AttributeError):
        return None


def prepare_data(data_dir: str, budget: DataBudget, seed: int = 0, workers: int = 1, progress: bool = False,
                 say: Optional[Callable[[str, str], None]] = None, corruptions: str = 'standard',
                 corpus_dir: Optional[str] = None, lambada: Optional[str] = None) -> dict[str, Optional[str]]:
    """Corpus, tokenizer, MDS shards and the LAMBADA fit/report split, each cached in ``data_dir/<budget key>``.

    Args:
        data_dir (str): Cache root; the data goes to ``data_dir/<budget.key(seed, corruptions)>`` (for
            ``corpus_dir``: ``data_dir/<corpus folder name>-<hash of its path>-<budget.key()>``).
        budget (DataBudget): Corpus size, vocabulary and sample length (``corpus_size`` and ``validation_size``
            are ignored with ``corpus_dir``).
        seed (int): Seed of the corpus build. Default: ``0``.
        corruptions (str): Degraded domains of the embedded corpus: ``'standard'`` or ``'alt'`` (see
            ``build_corpus``). Default: ``'standard'``.
        corpus_dir (str, optional): Use this SlimPajama-layout corpus (``train/``, ``validation/``) instead of
            building the embedded one; it is read, never written. Default: ``None``.
        lambada (str, optional): With ``corpus_dir``, its LAMBADA-format file; without one the two LAMBADA paths
            are ``None``. Default: ``None`` (the embedded corpus always has one).
        workers (int): Conversion processes (the shards are the same for any number). Default: ``1``.
        progress (bool): Progress bars of the corpus build, tokenizer training and conversion. Default: ``False``.
        say (Callable[[str, str], None], optional): Called with ``(step, message)`` for each step, ``step`` one of
            ``'corpus'``, ``'tokenizer'``, ``'convert'``. Default: ``None`` (silent).

    Returns:
        dict[str, str | None]: Paths: ``root``, ``corpus``, ``tokenizer``, ``train`` and ``validation`` (MDS
        shards), ``lambada_fit``, ``lambada_report`` (``None`` for a ``corpus_dir`` without ``lambada``).
    """
    def tell(step: str, message: str) -> None:
        if say is not None:
            say(step, message)

    if corpus_dir is None:
        root = os.path.join(data_dir, budget.key(seed, corruptions))
    else:
        corpus_dir = os.path.abspath(corpus_dir)
        digest = hashlib.blake2s(corpus_dir.encode(), digest_size=4).hexdigest()
        root = os.path.join(data_dir, f'{os.path.basename(corpus_dir)}-{digest}-{budget.key()}')
    paths: dict[str, Optional[str]] = {
        'root': root, 'corpus': corpus_dir or os.path.join(root, 'corpus'),
        'tokenizer': os.path.join(root, 'tokenizer'),
        'train': os.path.join(root, 'mds', 'train'), 'validation': os.path.join(root, 'mds', 'validation'),
        'lambada_fit': os.path.join(root, 'lambada_fit.jsonl'),
        'lambada_report': os.path.join(root, 'lambada_report.jsonl')}
    if corpus_dir is not None:
        for split in ('train', 'validation'):
            if not os.path.isdir(os.path.join(corpus_dir, split)):
                raise FileNotFoundError(f'{corpus_dir} has no {split}/ folder: not a SlimPajama-layout corpus')
        tell('corpus', f'corpus: {corpus_dir}')
    elif _cached_recipe(paths['corpus']) == RECIPE_VERSION:  # dwm_corpus.json is written last: complete
        tell('corpus', f'corpus: cached in {paths["corpus"]}')
    else:
        # An interrupted build, or one of an older recipe: this folder is the cache's own, never a user's corpus.
        # Everything built from it goes too.
        for stale in (paths['corpus'], paths['tokenizer'], os.path.join(root, 'mds')):
            shutil.rmtree(stale, ignore_errors=True)
        tell('corpus', f'building the embedded corpus ({budget.corpus_size}) in {paths["corpus"]}')
        build_corpus(paths['corpus'], size=budget.corpus_size, seed=seed, progress=progress, corruptions=corruptions,
                     validation_size=budget.validation_size, degraded_share=budget.degraded_share)
    tell('tokenizer', 'training the BPE tokenizer (cached when unchanged)')
    train_tokenizer(paths['corpus'], paths['tokenizer'], vocab_size=budget.vocab_size, progress=progress)
    for split in ('train', 'validation'):
        if os.path.exists(os.path.join(paths[split], 'index.json')):
            tell('convert', f'{split} shards: cached in {paths[split]}')
        else:
            tell('convert', f'converting {split}/ to MDS shards ({budget.seq_len} tokens per sample)')
            convert(os.path.join(paths['corpus'], split), paths[split], tokenizer=paths['tokenizer'],
                    seq_len=budget.seq_len, workers=workers, overwrite=True, progress=progress)
    source = os.path.join(paths['corpus'], 'lambada.jsonl') if corpus_dir is None else lambada
    if source is None:
        paths['lambada_fit'] = paths['lambada_report'] = None
    else:
        # First half: fits DWM's weighter (and the quality benchmark's static weights). Second half: reported only.
        # Re-split every time (cheap), so a --lambada FILE that changed is never read from a stale split.
        split_lambada(source, paths['lambada_fit'], paths['lambada_report'])
    return paths
