"""The training read path: ``DWMDataset`` (a ``StreamingDataset`` subclass), selection overlays, the argument type
checks done at construction (``arguments``), and the Composer ``DataSpec`` built from a dataset config. Every use of
mosaicml-streaming's private API is in ``_streaming_compat``."""
