"""Progress of a long step, fit for a terminal and for a log file alike.

On a terminal (stderr is a TTY) :class:`Progress` draws a tqdm bar. Anywhere else (a pipe, a file,
CI) it never writes the bar's ``\\r``-joined refreshes: it writes one short line every ``interval``
seconds and one when the step ends, e.g.::

    convert: 12.3/40.0 MB (31%) 8.1 MB/s
    convert: 40.0/40.0 MB (100%) 8.3 MB/s in 4.8s

Library functions take ``progress: bool = False`` and pass it as ``enabled``; the ``dwm-stream``
command line turns it on unless ``--no-progress`` is given.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Iterable, Iterator, Optional, TypeVar

from tqdm import tqdm

__all__ = ['Progress', 'track', 'is_terminal', 'LOG_INTERVAL']

LOG_INTERVAL = 10.0  # seconds between progress lines off a terminal

T = TypeVar('T')


def is_terminal(stream: Optional[IO[str]] = None) -> bool:
    """Whether ``stream`` (default: stderr) is an interactive terminal, where a redrawn bar is readable."""
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Progress of one step: a tqdm bar on a terminal, else a log line every ``interval`` seconds.

    Args:
        desc (str): What is being done, e.g. ``'convert'``.
        total (float, optional): Units the step will do; ``None`` when unknown. Default: ``None``.
        unit (str): ``'B'`` for bytes (shown in MB), else a plural noun such as ``'shards'``.
            Default: ``'tasks'``.
        enabled (bool): ``False`` makes every method a no-op. Default: ``True``.
        interval (float): Seconds between lines off a terminal. Default: :data:`LOG_INTERVAL`.
        stream (IO[str], optional): Where to write. Default: ``sys.stderr``.
    """

    def __init__(self,
                 desc: str,
                 total: Optional[float] = None,
                 unit: str = 'tasks',
                 enabled: bool = True,
                 interval: float = LOG_INTERVAL,
                 stream: Optional[IO[str]] = None) -> None:
        self.desc = desc
        self.total = total
        self.unit = unit
        self.interval = interval
        self.stream = sys.stderr if stream is None else stream
        self.count = 0.0
        self._bar = None
        self._log = False
        if enabled and is_terminal(self.stream):
            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == 'B', file=self.stream)
        else:
            self._log = enabled
        self._start = self._last = time.monotonic()

    def update(self, n: float = 1) -> None:
        """Count ``n`` more units done."""
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._log:
            now = time.monotonic()
            if now - self._last >= self.interval:
                self._last = now
                self._write(self._line(now))

    def set_description(self, desc: str) -> None:
        """Rename the step (e.g. ``'convert (scan)'`` then ``'convert'``)."""
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description(desc)

    def close(self) -> None:
        """End the step: close the bar, or write the last line. Idempotent."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._log:
            now = time.monotonic()
            self._write(f'{self._line(now)} in {now - self._start:.1f}s')
            self._log = False

    def __enter__(self) -> 'Progress':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _amount(self, value: float) -> str:
        return f'{value / 1e6:.1f}' if self.unit == 'B' else f'{value:,.0f}'

    def _line(self, now: float) -> str:
        unit = 'MB' if self.unit == 'B' else self.unit
        done = self._amount(self.count)
        text = f'{self.desc}: {done}/{self._amount(self.total)} {unit}' if self.total else f'{self.desc}: {done} {unit}'
        if self.total:
            text += f' ({100 * self.count / self.total:.0f}%)'
        elapsed = now - self._start
        if elapsed > 0:
            rate = self.count / elapsed
            text += f' {rate / 1e6:.1f} MB/s' if self.unit == 'B' else f' {rate:,.1f} {unit}/s'
        return text

    def _write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


def track(items: Iterable[T],
          desc: str,
          total: Optional[float] = None,
          unit: str = 'tasks',
          enabled: bool = True) -> Iterator[T]:
    """Yield ``items``, counting each one in a :class:`Progress` (closed when the iteration ends)."""
    if total is None and hasattr(items, '__len__'):
        total = len(items)  # type: ignore[arg-type]
    with Progress(desc, total, unit, enabled) as meter:
        for item in items:
            yield item
            meter.update(1)
