"""The training read path: ``DWMDataset`` (a ``StreamingDataset`` subclass), selection overlays, the schemas of the
settings and the checks done at construction (``schemas``), and the Composer ``DataSpec`` built from a dataset config. Every use of
mosaicml-streaming's private API is in ``_streaming_compat``."""
