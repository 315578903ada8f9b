"""Stage boundaries from num_stages or explicit Composer times."""

import pytest
from composer.core import Time, TimeUnit

from algorithms.dwm.schedule import stage_boundaries


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
