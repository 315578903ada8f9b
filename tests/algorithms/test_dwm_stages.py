"""Stage boundaries from num_stages or explicit Composer times."""

import pytest
from composer.core import Time, TimeUnit

from algorithms.dwm.stages import stage_boundaries


def test_even_stages_over_duration():
    b = stage_boundaries(5)
    assert [t.value for t in b] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert all(t.unit == TimeUnit.DURATION for t in b)
    assert stage_boundaries(1) == []


def test_explicit_boundaries():
    b = stage_boundaries(boundaries=['100ba', '0.5dur', Time(2, TimeUnit.EPOCH)])
    assert b[0] == Time(100, TimeUnit.BATCH) and b[1].unit == TimeUnit.DURATION and b[2].unit == TimeUnit.EPOCH


@pytest.mark.parametrize('bad,match', [(['10xx'], 'stage_boundaries\\[0\\]'), (['1.5dur'], 'strictly'),
                                       (['10ba', '5ba'], 'increase')])
def test_bad_boundaries_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        stage_boundaries(boundaries=bad)


def test_schedule_records_its_run(tmp_path):
    """schedule.json names the run that owns its directory; rewriting the stages keeps the record, and a schedule
    with no stage yet is refused for replay with a message that says so."""
    from algorithms.dwm.export import load_saved_weighters, read_owner, write_saved_weighters

    run = {'run_name': 'a', 'max_duration': '10ba'}
    write_saved_weighters(tmp_path, [], run=run)
    assert read_owner(tmp_path) == run
    write_saved_weighters(tmp_path, [])  # DWM's per-stage export: the record stays
    assert read_owner(tmp_path) == run
    assert read_owner(tmp_path / 'elsewhere') is None
    with pytest.raises(ValueError, match=r'holds no stage yet'):
        load_saved_weighters(tmp_path)
