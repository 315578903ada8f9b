"""Load a ``dwm-stream train`` YAML and check its schema before torch, Composer and transformers are imported.

Those imports take 15-30 s; a typo in the YAML should not wait for them. :func:`check_before_imports` loads the YAML
with its overrides (omegaconf only) and runs the schema checks that need none of them
(:func:`dwm_stream.train.config.precheck_train_config`). ``dwm-stream train`` and ``python -m dwm_stream.train`` call
it first; the full check then runs as before, when the run is built.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = ['load_yaml', 'check_before_imports']


def load_yaml(path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The YAML at ``path`` with ``key.sub=value`` overrides applied and interpolations resolved (not yet checked).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is not YAML, an override is not ``key=value``, or an interpolation fails.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f'config {path} does not exist.')
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError carries the line in its message
        raise ValueError(f'{path}: not valid YAML: {e}') from e
    bad = [o for o in overrides if '=' not in o]
    if bad:
        raise ValueError(f'override {bad[0]!r} is not key=value (e.g. max_duration=10ba).')
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ValueError(f'{path}: {e}') from e


def check_before_imports(argv: Sequence[str]) -> None:
    """``CONFIG.yaml [key=value ...]``: load and check the schema without the heavy imports.

    Raises:
        FileNotFoundError, ValueError: As :func:`load_yaml`, and a
            :class:`~dwm_stream.train.config.ConfigError` naming the key.
    """
    args = [a for a in argv if not a.startswith('-')]
    if not args:
        return  # argparse reports the missing CONFIG
    path, overrides = args[0], args[1:]
    cfg = load_yaml(path, overrides)
    from dwm_stream.train import _light
    first = 'dwm_stream.train.config' not in sys.modules
    _light.ACTIVE = first  # only a config module imported light checks light
    try:
        from dwm_stream.train.config import ConfigError, precheck_train_config
        try:
            precheck_train_config(cfg)
        except ConfigError as e:
            raise ConfigError(f'{path}: {e}') from None
    finally:
        _light.ACTIVE = False
