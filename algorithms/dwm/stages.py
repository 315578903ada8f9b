"""The stage plan **[ours, configurable]**: when the weighter is refit.

Training is cut into ``num_stages`` stages; the stage plan is the list of their boundaries. Stage ``k`` starts at
boundary ``b_k``; ``b_0`` is the start of training. Boundaries are Composer times: either ``k / num_stages`` of ``max_duration`` (``"0.2dur"``...) or an
explicit list such as ``["100ba", "0.5dur"]`` (the starts of stages 2, 3, ...).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

from composer.core import State, Time, TimeUnit

__all__ = ['stage_boundaries', 'boundary_reached', 'check_against_duration']

KEY = 'algorithms.dwm'


def stage_boundaries(
    num_stages: int = 5,
    boundaries: Optional[Sequence[Union[str, Time]]] = None,
) -> list[Time]:
    """Start times of stages 2..S (stage 1 starts at time 0).

    Args:
        num_stages (int): Number of stages, spread evenly over ``max_duration`` when ``boundaries`` is ``None``.
            Default: ``5``.
        boundaries (Sequence[str | Time], optional): Explicit stage starts (Composer time strings like
            ``"100ba"``, ``"2000sp"``, ``"1ep"``, ``"0.5dur"``), strictly increasing within a unit. When given,
            ``num_stages`` is ``len(boundaries) + 1``. Default: ``None``.

    Returns:
        list[Time]: ``S - 1`` boundaries.
    """
    if boundaries is not None:
        parsed = []
        for i, b in enumerate(boundaries):
            try:
                t = b if isinstance(b, Time) else Time.from_timestring(str(b))
            except ValueError as e:
                raise ValueError(f'{KEY}.stage_boundaries[{i}]={b!r} is not a Composer time string '
                                 f'(e.g. "100ba", "0.5dur")') from e
            if t.unit == TimeUnit.DURATION and not 0 < t.value < 1:
                raise ValueError(f'{KEY}.stage_boundaries[{i}]={b!r}: a "dur" boundary must lie strictly in (0, 1)')
            if t.unit != TimeUnit.DURATION and t.value <= 0:
                raise ValueError(f'{KEY}.stage_boundaries[{i}]={b!r}: stage 0 starts at 0 (its refit runs before the '
                                 'first batch); a boundary starts a later stage, so it must come after 0')
            if parsed and parsed[-1].unit == t.unit and t.value <= parsed[-1].value:
                raise ValueError(f'{KEY}.stage_boundaries must increase; {b!r} follows {parsed[-1]}')
            parsed.append(t)
        return parsed
    if num_stages < 1:
        raise ValueError(f'{KEY}.num_stages: must be >= 1, got {num_stages}')
    return [Time(k / num_stages, TimeUnit.DURATION) for k in range(1, num_stages)]


def boundary_reached(state: State, boundary: Time) -> bool:
    """Whether training time in ``state`` has reached ``boundary``."""
    if boundary.unit == TimeUnit.DURATION:
        elapsed = state.get_elapsed_duration()
        return elapsed is not None and elapsed.value >= boundary.value - 1e-12
    return state.timestamp.get(boundary.unit).value >= boundary.value


def check_against_duration(boundaries: Sequence[Time], max_duration: Optional[Time], explicit: bool,
                           num_stages: int) -> Optional[str]:
    """Why this schedule cannot run within ``max_duration``, or ``None``.

    A stage boundary is reached at the end of the batch where training time reaches it; the next stage trains from
    there. A boundary at or past ``max_duration`` is never reached (or its refit is never used), and two boundaries
    reached at the same batch leave a stage with no batch. Checked where the units compare: a boundary in the unit
    of ``max_duration``, and a ``"dur"`` boundary when ``max_duration`` is in batches.

    Args:
        boundaries (Sequence[Time]): The starts of stages 1.. (:func:`stage_boundaries`).
        max_duration (Time, optional): The run's ``max_duration``; ``None``: nothing to check.
        explicit (bool): The boundaries were given (``stage_boundaries``), not spread by ``num_stages``.
        num_stages (int): The number of stages, for the message.
    """
    if max_duration is None or not boundaries:
        return None
    total = max_duration.value
    batches = f' ({total} batches)' if max_duration.unit == TimeUnit.BATCH else ''
    key = f'{KEY}.stage_boundaries' if explicit else f'{KEY}.num_stages={num_stages}'
    reached: dict[float, int] = {}
    for i, b in enumerate(boundaries):
        if b.unit == TimeUnit.DURATION and max_duration.unit == TimeUnit.BATCH:
            at = math.ceil(b.value * total - 1e-9)
        elif b.unit == max_duration.unit:
            at = b.value
        else:
            continue
        where = f'{key}[{i}]={b}' if explicit else f'{key} (stage {i + 1} at {b})'
        unit = 'ba' if b.unit == TimeUnit.DURATION else max_duration.unit.value
        if at >= total:
            fix = (f'give boundaries before {max_duration}, or a longer max_duration' if explicit else
                   f'set num_stages to at most {int(total)} (a stage needs a batch), or a longer max_duration')
            return (f'{where} is reached at {at:g}{unit}, at or past max_duration={max_duration}{batches}: that stage '
                    f'never trains a batch (DWM would refit for nothing, or never, and its weights stay where they '
                    f'are); {fix}')
        if at in reached:
            return (f'{where} is reached at {at:g}{unit}, the same {unit} as boundary {reached[at]} with '
                    f'max_duration={max_duration}{batches}: the stage between them trains no batch; '
                    + ('space the boundaries apart' if explicit else
                       f'set num_stages to at most {int(total)}, or a longer max_duration'))
        reached[at] = i
    return None
