"""dwm-stream: the data side of DWM (Data Weighting Model, ICML 2025) for Composer and mosaicml-streaming.

``from dwm_stream import DWMDataset, DWMStream`` — imported lazily, so that ``dwm-stream --help`` and
light tools do not pay for importing torch and streaming.
"""

from typing import Any

__all__ = ['DWMDataset', 'DWMStream', 'build_dataloader', '__version__']
__version__ = '0.1.0'


def __getattr__(name: str) -> Any:
    if name in ('DWMDataset', 'DWMStream'):
        from dwm_stream.data import dataset
        return getattr(dataset, name)
    if name == 'build_dataloader':
        from dwm_stream.data.loader import build_dataloader
        return build_dataloader
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
