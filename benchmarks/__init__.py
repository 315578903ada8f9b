"""Runnable benchmarks: ``dwm-stream bench NAME`` or ``python -m benchmarks.NAME`` from the checkout's root.

Each compares against a baseline measured in the same run and regenerates its own section of
``benchmarks/RESULTS.md``; ``common`` holds what they share (machine probe, summaries, the section writer, the
``--quick``/``--out`` options). Not part of the installed package.
"""
