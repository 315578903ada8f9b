"""Token ids beyond a vocabulary, named at start-up (RELIABILITY.md, "Before step 0").

A corpus converted with one tokenizer and trained with a smaller one holds ids that index past the model's (and the
weighter's) embedding table: ``IndexError: index out of range in self`` at batch 1 on a CPU, a device-side assert
that takes the process down on a GPU. ``dwm-stream convert`` records the corpus's largest id in ``dwm.json``
(``max_token_id``); :func:`check_token_ids` compares it with each vocabulary before the first batch. A corpus without
the key (converted before it was recorded, or an LLM Foundry corpus without ``dwm.json``) is not checked.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

__all__ = ['check_token_ids']


def check_token_ids(dataset: Any, where: str, vocabularies: Mapping[str, Optional[int]],
                    run_tokenizer: Optional[str]) -> None:
    """Refuse a dataset whose corpora hold token ids that a vocabulary does not.

    Args:
        dataset (Any): A ``DWMDataset`` (anything else is not checked).
        where (str): Its YAML key, for the message (``'train_loader.dataset'``).
        vocabularies (Mapping[str, int | None]): Key -> vocabulary size (``{'model.vocab_size': 512, ...}``);
            ``None`` values are skipped.
        run_tokenizer (str, optional): The run's ``tokenizer.name``.

    Raises:
        ValueError: Naming the corpus, the tokenizer in its ``dwm.json``, the run's ``tokenizer.name``, each key whose
            vocabulary is too small, and what to do.
    """
    for stream in getattr(dataset, 'streams', None) or []:
        meta = getattr(stream, 'meta', None)
        largest = getattr(meta, 'max_token_id', None)
        if largest is None:
            continue
        small = {key: size for key, size in vocabularies.items() if size is not None and largest >= size}
        if not small:
            continue
        corpus = stream.remote or stream.local
        if stream.split:
            corpus = f'{corpus.rstrip("/")}/{stream.split}'
        sizes = ', '.join(f'{key} is {size}' for key, size in small.items())
        raise ValueError(
            f'{where}: corpus {corpus} holds token ids up to {largest} (its dwm.json: tokenizer {meta.tokenizer!r}), '
            f'but {sizes} (the run\'s tokenizer.name: {run_tokenizer!r}): those ids would index past the embeddings '
            f'at the first batch. Train with the tokenizer the corpus was converted with ({meta.tokenizer!r}) and a '
            f'vocab_size above {largest}, or re-convert the corpus with {run_tokenizer!r}.')
