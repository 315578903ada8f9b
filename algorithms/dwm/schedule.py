"""Stage boundaries **[ours, configurable]**: when the weighter is refit.

Training is cut into ``num_stages`` stages. Stage ``k`` starts at boundary ``b_k``; ``b_0`` is the start of
training. Boundaries are Composer times: either ``k / num_stages`` of ``max_duration`` (``"0.2dur"``...) or an
explicit list such as ``["100ba", "0.5dur"]`` (the starts of stages 2, 3, ...).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from composer.core import State, Time, TimeUnit

__all__ = ['stage_boundaries', 'boundary_reached']


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
                raise ValueError(f'stage_boundaries[{i}]={b!r} is not a Composer time string '
                                 f'(e.g. "100ba", "0.5dur")') from e
            if t.unit == TimeUnit.DURATION and not 0 < t.value < 1:
                raise ValueError(f'stage_boundaries[{i}]={b!r}: a "dur" boundary must lie strictly in (0, 1)')
            if parsed and parsed[-1].unit == t.unit and t.value <= parsed[-1].value:
                raise ValueError(f'stage_boundaries must increase; {b!r} follows {parsed[-1]}')
            parsed.append(t)
        return parsed
    if num_stages < 1:
        raise ValueError(f'num_stages must be >= 1, got {num_stages}')
    return [Time(k / num_stages, TimeUnit.DURATION) for k in range(1, num_stages)]


def boundary_reached(state: State, boundary: Time) -> bool:
    """Whether training time in ``state`` has reached ``boundary``."""
    if boundary.unit == TimeUnit.DURATION:
        elapsed = state.get_elapsed_duration()
        return elapsed is not None and elapsed.value >= boundary.value - 1e-12
    return state.timestamp.get(boundary.unit).value >= boundary.value
