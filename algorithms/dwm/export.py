"""The saved weighters of a run: writing and reading them with safetensors + JSON only (no pickle), and who owns the
``save_dir`` they go to.

Layout of a ``save_dir``::

    save_dir/
      stage_0.safetensors   weighter parameters of stage 1
      stage_0.json          {"weighter_config": {...}, "stage": 0, "start": "0ba"}
      ...
      schedule.json         {"format": "dwm-schedule", "version": 1,
                             "run": {"run_name": "...", "max_duration": "..."},
                             "stages": [{"stage": 0, "start": "0ba", "weights": "stage_0.safetensors",
                                         "config": "stage_0.json"}, ...]}

``schedule.json`` lists the saved weighters, one per stage; the file keeps that name (and its ``format``) so that the
runs users already saved load as they are. ``start`` is the Composer time at which the stage began in the run that
wrote it. A replay (``DWM(schedule=..., refit=False)``) switches to stage ``k``'s weighter at its own ``k``-th
boundary, so saved weighters transfer to a run of another length.

``run`` names the run that owns the directory. ``DWM`` writes it when training starts and refuses, at start-up, a
``save_dir`` whose ``schedule.json`` belongs to another run (:func:`save_dir_problem`, :func:`claim_save_dir`).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Any, Optional

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from algorithms.dwm.config import WeighterConfig
from algorithms.dwm.weighter import Weighter

__all__ = ['SAVED_WEIGHTERS_FILE', 'save_weighter', 'load_weighter', 'write_saved_weighters', 'load_saved_weighters',
           'load_schedule', 'read_owner', 'listed_stage_files', 'saved_weighters_file', 'run_record', 'save_dir_problem',
           'claim_save_dir', 'export_stage']

log = logging.getLogger(__name__)

SAVED_WEIGHTERS_FILE = 'schedule.json'  # the name every saved run has on disk


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


def saved_weighters_file(path: str | os.PathLike) -> Path:
    """``schedule.json`` itself, for a path that is the file or its directory."""
    path = Path(path)
    return path if path.suffix == '.json' else path / SAVED_WEIGHTERS_FILE


def write_saved_weighters(save_dir: str | os.PathLike, stages: list[dict[str, Any]],
                   run: dict[str, Any] | None = None) -> Path:
    """Write ``schedule.json``, the list of saved weighters (each ``{"stage", "start", "weights", "config"}``).

    Args:
        save_dir (str | os.PathLike): The directory.
        stages (list[dict]): The stage entries.
        run (dict, optional): The run that owns the directory (``{"run_name", "max_duration"}``). Default: ``None``
            (keep the record already in the file, if any).
    """
    path = Path(save_dir) / SAVED_WEIGHTERS_FILE
    if run is None:
        run = read_owner(save_dir)
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


def _read_saved_weighters_doc(save_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``save_dir/schedule.json`` as a dict; ``None`` if missing or unreadable."""
    path = Path(save_dir) / SAVED_WEIGHTERS_FILE
    if not path.is_file():
        return None
    try:
        with open(path, encoding='utf-8') as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def read_owner(save_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``run`` record of ``save_dir/schedule.json``: ``None`` if there is no file or it has no record (written by
    another tool or an older version); an unreadable file counts as a record-less one."""
    run = (_read_saved_weighters_doc(save_dir) or {}).get('run')
    return dict(run) if isinstance(run, dict) else None


def listed_stage_files(save_dir: str | os.PathLike) -> list[str]:
    """The stage files (weights and configs) that ``save_dir/schedule.json`` lists, as plain file names (never a
    path outside ``save_dir``); empty if there is no readable schedule."""
    names = []
    for entry in (_read_saved_weighters_doc(save_dir) or {}).get('stages') or []:
        for field in ('weights', 'config'):
            name = entry.get(field) if isinstance(entry, dict) else None
            if isinstance(name, str) and Path(name).name == name:
                names.append(name)
    return names


def load_saved_weighters(path: str | os.PathLike) -> list[tuple[dict[str, Any], Weighter]]:
    """Load the saved weighters written by :func:`write_saved_weighters`.

    Args:
        path (str | os.PathLike): ``schedule.json`` or the directory holding it.

    Returns:
        list[tuple[dict, Weighter]]: ``(entry, weighter)`` per stage, in stage order.
    """
    path = Path(path)
    if path.is_dir():
        path = path / SAVED_WEIGHTERS_FILE
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


load_schedule = load_saved_weighters  # the name scripts written before the saved weighters were named so still use


# ------------------------------------------------------------------------------------------------ save_dir ownership
_KEY = 'algorithms.dwm.save_dir (DWM(save_dir=...))'


def run_record(run_name: Any, max_duration: Any) -> dict[str, Any]:
    """Who owns a ``save_dir``: the run's name and length (a Composer ``Time`` or ``None``), as ``schedule.json``
    records them."""
    if max_duration is not None:
        value = max_duration.value
        value = int(value) if float(value).is_integer() else value
        max_duration = f'{value}{max_duration.unit.value}'
    return {'run_name': str(run_name), 'max_duration': max_duration}


def save_dir_problem(save_dir: Optional[str], overwrite: bool, replayed: Optional[str],
                     run: dict[str, Any]) -> tuple[Optional[str], Optional[dict[str, Any]]]:
    """At start-up (INIT): ``(message, owner)``. ``save_dir`` must not hold another run's ``schedule.json`` (it would
    be overwritten, its stage files left unreferenced), nor the saved weighters this run replays. The same run (same
    ``run_name`` and ``max_duration``: an autoresume, or a restart after a kill before the first checkpoint) continues
    in it. A run of that name but another length may only continue it by resuming a checkpoint: that is known after
    the checkpoint loads (and Composer sets ``max_duration`` after INIT), so :func:`claim_save_dir` decides it at
    FIT_START from the ``owner`` record returned here."""
    if save_dir is None or overwrite:
        return None, None
    fix = 'set a new save_dir, or algorithms.dwm.save_overwrite: true to replace it'
    path = saved_weighters_file(save_dir)
    if replayed is not None and saved_weighters_file(replayed).resolve() == path.resolve():
        return (f'{_KEY}: {save_dir} holds the schedule this run replays (algorithms.dwm.schedule); set another '
                'save_dir'), None
    if not path.is_file():
        return None, None
    record = read_owner(save_dir)
    if record is None or record.get('run_name') != run['run_name']:
        owner = f'run {record.get("run_name")!r}' if record else 'another run (no run recorded)'
        return f'{_KEY}: {path} belongs to {owner}, not to this run {run["run_name"]!r}; {fix}', None
    return None, record


def claim_save_dir(save_dir: Optional[str], owner: Optional[dict[str, Any]], run: dict[str, Any], resumed: bool,
                   overwrite: bool, exports: list[dict[str, Any]], writer: bool) -> None:
    """At FIT_START: decide the case :func:`save_dir_problem` left open, and record ``run`` as ``save_dir``'s owner
    (on the ``writer`` rank). A fresh start removes the stage files that the ``schedule.json`` it replaces listed."""
    theirs = (owner or {}).get('max_duration')
    if not resumed and None not in (theirs, run['max_duration']) and theirs != run['max_duration']:
        raise ValueError(f'algorithms.dwm.save_dir (DWM(save_dir=...)): {saved_weighters_file(save_dir)} '
                         f'belongs to a run {run["run_name"]!r} of max_duration {theirs} (this one: '
                         f'{run["max_duration"]}) that this run does not resume; set a new save_dir, or '
                         'algorithms.dwm.save_overwrite: true to replace it, or autoresume from its checkpoint')
    if save_dir is None or not writer:
        return
    if not resumed and (Path(save_dir) / SAVED_WEIGHTERS_FILE).is_file():
        record = read_owner(save_dir)
        if overwrite and (record or {}).get('run_name') != run['run_name']:
            log.warning('algorithms.dwm.save_dir: replacing the schedule of %s in %s (save_overwrite: true).',
                        f'run {record["run_name"]!r}' if record else 'another run', save_dir)
        for name in listed_stage_files(save_dir):  # an unreadable old schedule.json lists nothing to clean up
            (Path(save_dir) / name).unlink(missing_ok=True)
    write_saved_weighters(save_dir, exports, run=run)


def export_stage(save_dir: str, weighter: Weighter, stage: int, start: str,
                 exports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Save stage ``stage``'s weighter (it began at ``start``) and list it in ``schedule.json``; returns the new list
    of exports (a stage exported again replaces its entry)."""
    stem = Path(save_dir) / f'stage_{stage}'
    save_weighter(weighter, stem, stage=stage, start=start)
    exports = [e for e in exports if e['stage'] != stage]
    exports.append({'stage': stage, 'start': start, 'weights': stem.name + '.safetensors',
                    'config': stem.name + '.json'})
    write_saved_weighters(save_dir, exports)
    return exports
