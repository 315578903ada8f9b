"""LLM Foundry entry points (``llmfoundry_algorithms: dwm``, ``llmfoundry_dataloaders: dwm``).

With dwm-stream installed, an LLM Foundry 0.22 YAML can say::

    train_loader:
      name: dwm
      dataset: {remote: s3://..., local: /tmp/cache, shuffle: true}
    algorithms:
      dwm:
        num_stages: 5
        refit_loader: {dataset: {remote: s3://..., local: /tmp/cache-refit, shuffle_seed: 18}}
        validation: {lambada: /data/lambada_val.jsonl, tokenizer: <the model's tokenizer>}

LLM Foundry hands an algorithm only its own YAML keys, so under Foundry the refit loader's
dataset and the validation tokenizer are given in full (``dwm-stream train`` fills them in).

Foundry hands both the YAML's values raw; the same schema checks them when Foundry builds the run,
and DWM checks its data, schedule and ``save_dir`` at Composer's ``INIT``, so every mistake is named
by its YAML key (``algorithms.dwm.validation: missing, ...``) before any training step. Set
``run_name``: DWM's ``save_dir`` belongs to the run that wrote it, and Composer names an unnamed run
at random.
"""

from __future__ import annotations

from typing import Any, Union

from composer.core import DataSpec

from dwm_stream.train import config
from dwm_stream.train.builders import ConfiguredDWM, build_train_dataloader

__all__ = ['DWMAlgorithm', 'build_dwm_dataloader']


class DWMAlgorithm(ConfiguredDWM):
    """The DWM algorithm as LLM Foundry's registry builds it (every key from the YAML, checked against
    :class:`dwm_stream.train.config.DWMSection`)."""


def build_dwm_dataloader(tokenizer: Any, device_batch_size: Union[int, float], **loader_cfg: Any) -> DataSpec:
    """LLM Foundry's dataloader builder signature -> a ``DataSpec`` over ``DWMDataset``.

    Args:
        tokenizer (Any): Foundry's tokenizer; unused (the corpus is already tokenized, and DWM reads the
            tokenizer from the model).
        device_batch_size (int | float): Samples per batch on this rank.
        **loader_cfg: The loader's YAML keys other than ``name`` (``dataset``, ``num_workers``, ``drop_last``,
            ...), checked against :class:`dwm_stream.train.config.LoaderConfig`, so that an unknown key is named
            with the valid ones. Foundry builds eval loaders through the same function, and does not say which
            loader it is building: messages name it ``train_loader``.
    """
    del tokenizer
    # LLM Foundry's registry passes raw keyword arguments: this is their edge, checked here.
    settings = config.check_loader({'name': 'dwm', **loader_cfg}, 'train_loader')
    return build_train_dataloader(settings, int(device_batch_size))
