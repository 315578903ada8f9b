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
"""

from __future__ import annotations

from typing import Any, Optional, Union

from dwm_stream.train.builders import ConfiguredDWM, build_train_dataloader

__all__ = ['DWMAlgorithm', 'build_dwm_dataloader']


class DWMAlgorithm(ConfiguredDWM):
    """The DWM algorithm as LLM Foundry's registry builds it (every key from the YAML)."""


def build_dwm_dataloader(tokenizer: Any, device_batch_size: Union[int, float], dataset: dict[str, Any],
                         num_workers: int = 0, drop_last: bool = True, prefetch_factor: Optional[int] = None,
                         persistent_workers: bool = False, pin_memory: bool = False, timeout: float = 0):
    """LLM Foundry's dataloader builder signature -> a ``DataSpec`` over ``DWMDataset``."""
    del tokenizer  # the corpus is already tokenized; DWM reads the tokenizer from the model
    cfg = {'name': 'dwm', 'dataset': dataset, 'num_workers': num_workers, 'drop_last': drop_last,
           'prefetch_factor': prefetch_factor, 'persistent_workers': persistent_workers,
           'pin_memory': pin_memory, 'timeout': timeout}
    return build_train_dataloader(cfg, int(device_batch_size))
