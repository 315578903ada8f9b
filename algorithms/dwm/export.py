"""Saving and loading weighters and stage schedules with safetensors + JSON only (no pickle).

Layout of a ``save_dir``::

    save_dir/
      stage_0.safetensors   weighter parameters of stage 1
      stage_0.json          {"weighter_config": {...}, "stage": 0, "start": "0ba"}
      ...
      schedule.json         {"format": "dwm-schedule", "version": 1,
                             "run": {"run_name": "...", "max_duration": "..."},
                             "stages": [{"stage": 0, "start": "0ba", "weights": "stage_0.safetensors",
                                         "config": "stage_0.json"}, ...]}

``start`` is the Composer time at which the stage began in the run that wrote it. A replay (``DWM(schedule=...,
refit=False)``) switches to stage ``k``'s weighter at its own ``k``-th boundary, so a schedule transfers to a run
of another length.

``run`` names the run that owns the directory. ``DWM`` writes it when training starts and refuses, at start-up, a
``save_dir`` whose ``schedule.json`` belongs to another run (see :func:`read_schedule_run`).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from algorithms.dwm.weighter import Weighter, WeighterConfig

__all__ = ['SCHEDULE_FILE', 'save_weighter', 'load_weighter', 'write_schedule', 'load_schedule', 'read_schedule_run', 'listed_stage_files',
           'schedule_file']

SCHEDULE_FILE = 'schedule.json'


def save_weighter(weighter: Weighter, stem: str | os.PathLike, **metadata: Any) -> tuple[Path, Path]:
    """Write ``<stem>.safetensors`` (parameters) and ``<stem>.json`` (config and ``metadata``).

    Args:
        weighter (Weighter): The weighter.
        stem (str | os.PathLike): Path without suffix.
        **metadata (Any): JSON-safe extras stored beside the config.

    Returns:
        tuple[Path, Path]: The two files.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights_path, config_path = stem.with_suffix('.safetensors'), stem.with_suffix('.json')
    with open(config_path, 'w') as f:
        json.dump({'weighter_config': weighter.config.to_dict(), **metadata}, f, indent=2)
    save_model(weighter, str(weights_path))
    # safetensors writes 0600; the weights get the mode the umask gives the .json beside them.
    os.chmod(weights_path, stat.S_IMODE(os.stat(config_path).st_mode))
    return weights_path, config_path


def load_weighter(weights_path: str | os.PathLike, config_path: str | os.PathLike | None = None) -> Weighter:
    """Rebuild a weighter from its safetensors file and JSON config.

    Args:
        weights_path (str | os.PathLike): ``.safetensors`` file.
        config_path (str | os.PathLike, optional): ``.json`` file. Default: ``None`` (same stem).

    Returns:
        Weighter: In eval mode.
    """
    weights_path = Path(weights_path)
    config_path = Path(config_path) if config_path is not None else weights_path.with_suffix('.json')
    for p in (weights_path, config_path):
        if not p.is_file():
            raise FileNotFoundError(f'weighter file {p} not found')
    meta = _read_json(config_path, 'weighter config')
    if 'weighter_config' not in meta:
        raise ValueError(f'{config_path}: missing "weighter_config"')
    weighter = Weighter(WeighterConfig.from_any(meta['weighter_config']))
    try:
        load_model(weighter, str(weights_path))
    except SafetensorError as e:  # e.g. a torch.save/pickle file: never unpickled here
        raise ValueError(f'weighter file {weights_path} is not a safetensors file ({e}); weighters load '
                         f'with safetensors only, never pickle (a pickle file can run arbitrary code).') from e
    return weighter.eval()


def _read_json(path: Path, what: str) -> Any:
    """A JSON document, or a clear error (a pickle or other binary file is refused, never unpickled)."""
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f'{what} {path} is not JSON ({type(e).__name__}); DWM schedules and weighter configs '
                         f'are JSON + safetensors only, never pickle.') from e


def schedule_file(path: str | os.PathLike) -> Path:
    """``schedule.json`` itself, for a path that is the file or its directory."""
    path = Path(path)
    return path if path.suffix == '.json' else path / SCHEDULE_FILE


def write_schedule(save_dir: str | os.PathLike, stages: list[dict[str, Any]],
                   run: dict[str, Any] | None = None) -> Path:
    """Write ``schedule.json`` listing the saved stages (each ``{"stage", "start", "weights", "config"}``).

    Args:
        save_dir (str | os.PathLike): The directory.
        stages (list[dict]): The stage entries.
        run (dict, optional): The run that owns the directory (``{"run_name", "max_duration"}``). Default: ``None``
            (keep the record already in the file, if any).
    """
    path = Path(save_dir) / SCHEDULE_FILE
    if run is None:
        run = read_schedule_run(save_dir)
    doc: dict[str, Any] = {'format': 'dwm-schedule', 'version': 1}
    if run is not None:
        doc['run'] = run
    doc['stages'] = stages
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix('.json.tmp')
    with open(tmp, 'w') as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, path)
    return path


def _read_schedule_doc(save_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``save_dir/schedule.json`` as a dict; ``None`` if missing or unreadable."""
    path = Path(save_dir) / SCHEDULE_FILE
    if not path.is_file():
        return None
    try:
        with open(path, encoding='utf-8') as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def read_schedule_run(save_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``run`` record of ``save_dir/schedule.json``: ``None`` if there is no file or it has no record (written by
    another tool or an older version); an unreadable file counts as a record-less one."""
    run = (_read_schedule_doc(save_dir) or {}).get('run')
    return dict(run) if isinstance(run, dict) else None


def listed_stage_files(save_dir: str | os.PathLike) -> list[str]:
    """The stage files (weights and configs) that ``save_dir/schedule.json`` lists, as plain file names (never a
    path outside ``save_dir``); empty if there is no readable schedule."""
    names = []
    for entry in (_read_schedule_doc(save_dir) or {}).get('stages') or []:
        for field in ('weights', 'config'):
            name = entry.get(field) if isinstance(entry, dict) else None
            if isinstance(name, str) and Path(name).name == name:
                names.append(name)
    return names


def load_schedule(path: str | os.PathLike) -> list[tuple[dict[str, Any], Weighter]]:
    """Load a schedule written by :func:`write_schedule`.

    Args:
        path (str | os.PathLike): ``schedule.json`` or the directory holding it.

    Returns:
        list[tuple[dict, Weighter]]: ``(entry, weighter)`` per stage, in stage order.
    """
    path = Path(path)
    if path.is_dir():
        path = path / SCHEDULE_FILE
    if not path.is_file():
        raise FileNotFoundError(f'DWM schedule {path} not found')
    doc = _read_json(path, 'DWM schedule')
    if not isinstance(doc, dict) or doc.get('format') != 'dwm-schedule' or not isinstance(doc.get('stages'), list):
        raise ValueError(f'{path}: not a DWM schedule (expected format "dwm-schedule" with a list of "stages")')
    if not doc['stages']:
        raise ValueError(f'{path}: holds no stage yet (the run writing it has not finished its first stage); '
                         'replay a finished run\'s schedule')
    out = []
    for entry in sorted(doc['stages'], key=lambda e: e['stage']):
        out.append((entry, load_weighter(path.parent / entry['weights'], path.parent / entry['config'])))
    return out
