"""A Composer logger destination that appends every logged metric to a JSON-lines file.

One line per ``log_metrics`` call: ``{"batch": int, "epoch": int, "metrics": {name: value}}``.
``dwm-stream demo`` and ``dwm-stream report`` read it back; any Composer logger (console,
tensorboard, MLflow, W&B) sees the same metrics.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

from composer.loggers import LoggerDestination
from composer.utils import dist

__all__ = ['MetricsJSONLLogger', 'read_metrics']


class MetricsJSONLLogger(LoggerDestination):
    """Append metrics to ``filename`` (rank 0 only).

    Args:
        filename (str, optional): The JSON-lines file. Its directory is created. Default: ``None``
            (``<run_dir>/metrics.jsonl``).
        run_dir (str, optional): The run's directory (``dwm-stream train`` gives it). Default: ``None`` (``.``).
    """

    def __init__(self, filename: Optional[str] = None, run_dir: Optional[str] = None) -> None:
        super().__init__()
        self.filename = filename or os.path.join(run_dir or '.', 'metrics.jsonl')
        self._file = None
        self._state = None

    def init(self, state, logger) -> None:
        self._state = state
        if dist.get_global_rank() == 0:
            os.makedirs(os.path.dirname(os.path.abspath(self.filename)), exist_ok=True)
            self._file = open(self.filename, 'a', buffering=1)

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        if self._file is None:
            return
        clean = {}
        for name, value in metrics.items():
            if hasattr(value, 'item') and getattr(value, 'numel', lambda: 1)() == 1:
                value = value.item()
            if isinstance(value, (int, float)):
                clean[name] = value if math.isfinite(value) else None
        if not clean:
            return
        ts = self._state.timestamp if self._state is not None else None
        record = {
            'batch': int(ts.batch) if ts is not None else step,
            'epoch': int(ts.epoch) if ts is not None else None,
            'metrics': clean,
        }
        self._file.write(json.dumps(record) + '\n')

    def close(self, state, logger) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(filename: str) -> list[dict[str, Any]]:
    """Read a metrics JSON-lines file; a malformed line is reported with its line number."""
    records = []
    with open(filename) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f'{filename}:{lineno}: not valid JSON ({e}).') from e
    return records
