"""A Composer callback that records which sample uids each optimizer step trained on, and the rule
that turns a record written across kills and resumptions into the *committed* training history.

YAML: ``callbacks: {trained_samples: {}}`` (optional ``filename``, default
``<run_dir>/trained_samples-rank{rank}.jsonl``; ``fsync: true`` to survive power loss, not just a
killed process).

The file is append-only JSON lines, one per event, flushed as it is written:

* ``{"event": "fit_start", "batch": B}``: a run (fresh or resumed) starts training at batch ``B``,
  i.e. the model, optimizer, data position and DWM state are those after batches ``0..B-1``.
* ``{"event": "batch", "batch": b, "uids": [...], "weights": [...]}``: batch ``b`` (0-based) was
  trained on these uids (this rank's part of the global batch, after any DWM selection), with these
  DWM weights when DWM is on. Written at ``BATCH_END``, i.e. before the checkpoint of batch ``b + 1``.

**Which batches are committed.** A batch's update survives only if a checkpoint taken after it is
the one a later run resumes from (or the run ends). When a run is killed, the records it wrote
after its last checkpoint describe work that was lost with the process: the resumed run starts at
the checkpoint's batch ``B`` and trains batches ``B, B+1, ...`` again. So :func:`committed_batches`
reads the file in order and, at every ``fit_start`` with batch ``B``, drops every record with
``batch >= B`` seen so far. After the last run has finished, what remains is exactly one record per
batch ``0..N-1``: the history the final model was trained on. Its uids, concatenated, are the
*trained multiset*; ``tests/reliability/test_kill_resume.py`` asserts that it equals the
uninterrupted run's (no sample lost, none repeated). A line cut short by a kill mid-write is
skipped (the writer starts its next record on a fresh line).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist

from algorithms.dwm.functional import WEIGHT_KEY

__all__ = ['TrainedSamples', 'read_records', 'committed_batches']


class TrainedSamples(Callback):
    """Append ``batch -> uids`` for every trained batch to a JSON-lines file (see the module docs).

    Args:
        filename (str, optional): Path; ``{rank}`` is replaced by the global rank. Default:
            ``<run_dir>/trained_samples-rank{rank}.jsonl`` (``run_dir`` given by ``dwm-stream train``).
        run_dir (str, optional): Where the default file goes. Default: ``'.'``.
        fsync (bool): ``os.fsync`` after every record. Default: ``False`` (a flush is enough to
            survive ``kill -9``, since the data is then in the kernel).
    """

    def __init__(self, filename: Optional[str] = None, run_dir: Optional[str] = None, fsync: bool = False) -> None:
        self.filename = filename or os.path.join(run_dir or '.', 'trained_samples-rank{rank}.jsonl')
        self.fsync = bool(fsync)
        self._file = None

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            path = self.filename.format(rank=dist.get_global_rank())
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._file = open(path, 'a+')
            self._file.seek(0, os.SEEK_END)
            if self._file.tell():  # a kill may have cut the last line: start on a fresh one
                self._file.seek(self._file.tell() - 1)
                last = self._file.read(1)
                self._file.seek(0, os.SEEK_END)
                if last != '\n':
                    self._file.write('\n')
        self._file.write(json.dumps(record) + '\n')
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            self._write({'event': 'fit_start', 'batch': int(state.timestamp.batch)})
        elif event == Event.BATCH_END:
            batch = state.batch
            uids = batch.get('uid') if isinstance(batch, dict) else None
            if uids is None:
                raise ValueError('trained_samples: the batch has no `uid` column; it records DWMDataset batches.')
            record: dict[str, Any] = {'event': 'batch', 'batch': int(state.timestamp.batch) - 1,
                                      'uids': [int(u) for u in uids.tolist()]}
            weights = batch.get(WEIGHT_KEY)
            if weights is not None:
                record['weights'] = [float(w) for w in weights.detach().cpu().tolist()]
            self._write(record)
        elif event == Event.FIT_END:
            self.close(state, logger)

    def close(self, state: State, logger: Logger) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_records(path: str) -> list[dict[str, Any]]:
    """The records of a ``trained_samples`` file, in order; lines cut short by a kill are skipped."""
    with open(path) as f:
        lines = [line for line in f.read().split('\n') if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill (a record ends with its brace)
            continue
    return records


def committed_batches(path: str) -> dict[int, dict[str, Any]]:
    """Batch index -> its record, for the batches the final model was trained on (module docs)."""
    history: dict[int, dict[str, Any]] = {}
    for record in read_records(path):
        if record['event'] == 'fit_start':
            start = int(record['batch'])
            for b in [b for b in history if b >= start]:
                del history[b]
        elif record['event'] == 'batch':
            b = int(record['batch'])
            if b in history:
                raise ValueError(f'{path}: batch {b} recorded twice without a fit_start between them.')
            history[b] = record
    return dict(sorted(history.items()))
