"""progress: a bar on a terminal only; off a terminal, short lines at an interval and never a ``\\r``."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from dwm_stream.progress import Progress, is_terminal, track


class _Terminal(io.StringIO):

    def isatty(self) -> bool:
        return True


def test_off_a_terminal_writes_short_lines_at_the_interval():
    stream = io.StringIO()
    with Progress('convert', total=4e6, unit='B', interval=0.0, stream=stream) as meter:
        for _ in range(4):
            meter.update(1e6)
    text = stream.getvalue()
    assert '\r' not in text
    lines = text.splitlines()
    assert lines[0].startswith('convert: 1.0/4.0 MB (25%)')
    assert lines[-1].startswith('convert: 4.0/4.0 MB (100%) ') and ' in ' in lines[-1]
    assert len(lines) == 5  # one per update at interval 0, and the last one


def test_off_a_terminal_the_interval_holds_lines_back():
    stream = io.StringIO()
    with Progress('materialize', total=1000, unit='shards', interval=3600, stream=stream) as meter:
        for _ in range(1000):
            meter.update()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith('materialize: 1,000/1,000 shards (100%)')  # the closing line


def test_disabled_writes_nothing_anywhere():
    for stream in (io.StringIO(), _Terminal()):
        list(track(range(10), 'x', enabled=False))
        with Progress('x', total=10, enabled=False, interval=0.0, stream=stream) as meter:
            meter.update(10)
        assert stream.getvalue() == ''


def test_a_terminal_gets_a_bar():
    assert not is_terminal(io.StringIO()) and is_terminal(_Terminal())
    stream = _Terminal()
    with Progress('convert', total=10, stream=stream) as meter:
        meter.update(10)
    assert '\r' in stream.getvalue() and '10/10' in stream.getvalue()


@pytest.mark.slow
def test_cli_progress_is_log_lines_in_a_file_and_no_progress_is_silent(small_corpus, small_tokenizer, tmp_path, capfd):
    """`dwm-stream convert` with stderr to a file: log lines, no bar (a real process); `--no-progress` (before or
    after the command): nothing (the same ``main``, in this process, its stderr captured at the file descriptor)."""
    from dwm_stream.cli import main
    common = ['--src', small_corpus.train_dir, '--tokenizer', small_tokenizer, '--seq-len', '256']
    with open(tmp_path / 'default.err', 'w') as f:
        proc = subprocess.run([sys.executable, '-m', 'dwm_stream.cli', 'convert', *common, '--out',
                               str(tmp_path / 'a')], stdout=subprocess.PIPE, stderr=f, text=True, timeout=600)
    err = {'default': (tmp_path / 'default.err').read_text()}
    assert proc.returncode == 0, err['default'][-2000:]
    capfd.readouterr()
    for name, args in {'global': ['--no-progress', 'convert', *common, '--out', str(tmp_path / 'b')],
                       'after': ['convert', *common, '--out', str(tmp_path / 'c'), '--no-progress']}.items():
        assert main(args) == 0, name
        err[name] = capfd.readouterr().err

    def progress_lines(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith('convert')]

    assert '\r' not in err['default']
    assert progress_lines(err['default']), err['default']
    assert not progress_lines(err['global']) and not progress_lines(err['after']), err
