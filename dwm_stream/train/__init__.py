"""Training glue: the YAML schema (``config``), one builder per config section (``builders``), the
``dwm-stream train`` entry (``entry``; also ``python -m dwm_stream.train``), LLM Foundry entry points (``foundry``),
callbacks, loggers, checkpoint safety, evaluation and the per-stage report."""
