"""Start-up checks: what would stop a DWM run later is named at Composer's ``INIT`` (the ``Trainer``'s construction),
before any training step. Each check returns the message (naming the YAML key, and the ``DWM`` argument for
plain-Python use) or ``None``; ``DWM`` gathers them from every rank and raises them together. The save_dir checks are
in :mod:`algorithms.dwm.export`; the stage plan against ``max_duration`` is checked at ``FIT_START``
(:func:`algorithms.dwm.stages.check_against_duration`), where Composer has set it.
"""

from __future__ import annotations

from typing import Any, Optional

from algorithms.dwm.config import DWMConfig, missing_loader_message

__all__ = ['loader_problem', 'replay_problem', 'lookahead_lr_problem']

_LOADER_KEYS = {'val_dataloader': ('validation', 'algorithms.dwm.validation (DWM(val_dataloader=...))'),
                'refit_dataloader': ('refit_loader', 'algorithms.dwm.refit_loader (DWM(refit_dataloader=...))')}


def loader_problem(source: Any, name: str) -> tuple[Optional[str], Optional[BaseException]]:
    """``(message, exception)`` if the loader ``source`` (DWM's ``name`` argument) is missing or yields no batch, else
    ``(None, None)``.

    A loader with a ``peek()`` (``ValidationBatches``, dwm-stream's YAML loaders) or a list is probed for its first
    batch without moving any iteration; any other iterable, or a factory, is only drawn from at the first refit.
    """
    loader, key = _LOADER_KEYS[name]
    if source is None:
        return missing_loader_message(loader, key), None
    try:
        if hasattr(source, 'peek'):
            batch = source.peek()
        elif isinstance(source, (list, tuple)):
            if not source:
                raise ValueError('the list is empty')
            batch = source[0]
        else:
            return None, None
    except StopIteration as e:
        return f'{key}: yields no batch (it is empty); point it at data with at least one batch', e
    except Exception as e:  # noqa: BLE001 - reported with the key; chained to the error raised
        return f'{key}: yields no batch ({type(e).__name__}: {e}); fix the data it names', e
    if not hasattr(batch, 'keys') or 'input_ids' not in batch:
        kind = sorted(batch.keys()) if hasattr(batch, 'keys') else type(batch).__name__
        return (f'{key}: its batches ({kind}) have no `input_ids`; give batches of token ids (with `labels`, -100 '
                'where no loss is taken)'), None
    return None, None


def replay_problem(config: DWMConfig, saved: Optional[int]) -> Optional[str]:
    """A frozen replay (``refit=False``) uses stage ``k``'s saved weighter in stage ``k``: the counts must agree
    (``saved``: how many weighters the replayed ``schedule.json`` holds, ``None`` without a replay)."""
    if saved is None or config.refit:
        return None
    stages = config.stage_count()
    if saved == stages:
        return None
    if config.stage_boundaries is not None:
        key, now = 'algorithms.dwm.stage_boundaries (DWM(stage_boundaries=...))', f'{stages - 1} boundaries'
        fix = f'give {saved - 1} stage_boundaries'
    else:
        key, now, fix = 'algorithms.dwm.num_stages (DWM(num_stages=...))', f'{stages} stages', f'set num_stages: {saved}'
    return (f'{key}: {now}, but the replayed schedule {config.schedule} (algorithms.dwm.schedule) holds {saved} '
            f'stage{"s" if saved != 1 else ""}; {fix} to replay it stage by stage')


def lookahead_lr_problem(config: DWMConfig, lookahead_lr: Optional[float]) -> Optional[str]:
    """A refit's look-ahead step must not be 0 (``lookahead_lr``: the rate the refit would use, ``None`` when there is
    no optimizer yet to take it from)."""
    if not config.refits() or lookahead_lr != 0.0:
        return None
    key = 'algorithms.dwm.lookahead_lr' if config.lookahead_lr is not None else 'optimizer.lr (the default lookahead_lr)'
    return (f'{key} is 0: the look-ahead step and the hypergradient vanish and no refit can move the weighter; '
            'set algorithms.dwm.lookahead_lr (DWM(lookahead_lr=...)) to a positive learning rate')
