"""`dwm-stream report`: preference by criterion and by domain across stages, from metrics.jsonl."""

import json
import math

import pytest

from dwm_stream.cli import main as cli_main
from dwm_stream.train.loggers import read_metrics
from dwm_stream.train.report import preference_tables, write_report


def _write_run(path):
    """Three stages as DWM logs them: periodic stage + domain weights, Spearman before the next stage."""
    lines = []
    batch = 0
    for stage in range(3):
        lines.append({'dwm/stage': stage})
        for _ in range(4):
            batch += 1
            lines.append({'dwm/weight/mean': 1.0, 'dwm/stage': stage})
            lines.append({'dwm/domain/Book/weight': 1.0 + 0.1 * stage + 0.01 * batch,
                          'dwm/domain/Junk/weight': 1.0 - 0.2 * stage, 'dwm/domain/Book/loss': 3.0})
        lines.append({'dwm/spearman/educational_value': 0.1 * (stage + 1), 'dwm/spearman/dsir': None if stage == 0
                      else -0.2})
    with open(path, 'w') as f:
        for i, metrics in enumerate(lines):
            f.write(json.dumps({'batch': i, 'epoch': 0, 'metrics': metrics}) + '\n')


def test_tables_and_png(tmp_path, capsys):
    _write_run(tmp_path / 'metrics.jsonl')
    tables = preference_tables(read_metrics(str(tmp_path / 'metrics.jsonl')))
    assert tables.stages == [0, 1, 2]
    assert tables.criterion[0]['educational_value'] == pytest.approx(0.1)
    assert tables.criterion[2]['educational_value'] == pytest.approx(0.3)
    assert math.isnan(tables.criterion[0]['dsir']) and tables.criterion[1]['dsir'] == -0.2
    assert tables.domain[1]['Junk'] == pytest.approx(0.8)
    assert tables.domain[0]['Book'] == pytest.approx(1.0 + 0.01 * 2.5)  # batches 1..4 of stage 0

    assert cli_main(['report', str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert 'Preference by criterion' in printed and 'Preference by domain' in printed
    assert '+0.300' in printed and '0.800' in printed
    with open(tmp_path / 'preferences.png', 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    text, png = write_report(str(tmp_path / 'metrics.jsonl'), out=str(tmp_path / 'other.png'))
    assert png.endswith('other.png') and 'educational_value' in text


def test_errors_name_the_run(tmp_path):
    with pytest.raises(FileNotFoundError, match='metrics.jsonl'):
        write_report(str(tmp_path))
    (tmp_path / 'metrics.jsonl').write_text(json.dumps({'batch': 0, 'metrics': {'loss/train/total': 2.0}}) + '\n')
    with pytest.raises(ValueError, match='no `dwm/spearman'):
        write_report(str(tmp_path))
