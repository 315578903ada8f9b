"""The one checker of dwm-stream's settings: a mapping against a dataclass schema, key by key.

:func:`check` merges a mapping into its schema key by key: OmegaConf checks the types (and fills the defaults), and
every error is a :class:`ConfigError` that names the full key path (``algorithms.dwm.weighter.d_model``) and, for
unknown keys, the valid ones. It is stricter than OmegaConf in one way: a string (or a number) where a bool belongs,
and a string where a number belongs, are errors, not conversions (``shuffle: "false"`` is not ``True``).

A component's schema is its own signature (:func:`signature_schema`), read from its source when the check must come
before the imports (:func:`source_signature`): its arguments and their defaults are written once, in the component.
The YAML of ``dwm-stream train`` (:mod:`dwm_stream.train.config`), LLM Foundry's raw sections and the data
constructors' keyword arguments (:func:`check_arguments`) all go through it. This module imports neither torch nor
any library that does.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import os
import types
import typing
from dataclasses import field
from typing import Any, Mapping, Optional, Sequence, TypeVar, Union

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = ['ConfigError', 'check', 'check_arguments', 'check_ranges', 'signature_schema', 'source_signature', 'key_path',
           'field_names', 'set_keys']

T = TypeVar('T')


class ConfigError(ValueError):
    """A config value that does not fit the schema; the message names the full key path."""


def signature_schema(fn: Any, leave_out: tuple[str, ...] = (), name: Optional[str] = None,
                     fields: Sequence[tuple[str, Any, Any]] = ()) -> type:
    """A structured-config dataclass of a callable's keyword arguments.

    ``fn`` is a callable (a class: its ``__init__``'s arguments), or a list of ``inspect.Parameter`` (e.g. from
    :func:`source_signature`, or several signatures joined). A parameter annotated ``int``, ``float``, ``bool`` or
    ``str`` (``Optional`` of one, or a union of them) is typed so; any other one takes any value (the callee checks
    it). A parameter without a default is required; the others default to ``None``, meaning 'not given' (the callee
    keeps its own default: a default is written once, in the callee's signature). A ``**kwargs`` parameter is recorded
    as ``__var_keyword__`` on the schema. ``fields`` (``(name, type, default)``) are added as they are.
    """
    if isinstance(fn, (list, tuple)):
        parameters, hints = list(fn), {p.name: p.annotation for p in fn if p.annotation is not p.empty}
    else:
        target = fn.__init__ if isinstance(fn, type) else fn
        try:
            hints = typing.get_type_hints(target)
        except Exception:  # noqa: BLE001 - unresolvable annotations: the values are checked by the class itself
            hints = {}
        parameters = list(inspect.signature(fn).parameters.values())
    own, var_keyword, required = [], False, set()
    for p in parameters:
        if p.name in ('self', *leave_out) or p.kind == p.VAR_POSITIONAL:
            continue
        if p.kind == p.VAR_KEYWORD:
            var_keyword = True
            continue
        kind = _simple_kind(hints.get(p.name, Any))
        if p.default is p.empty:
            own.append((p.name, kind, field(default=MISSING)))
            required.add(p.name)
        else:
            own.append((p.name, Optional[kind] if kind is not Any else Any, field(default=None)))
    own += [(n, kind, field(default=default)) for n, kind, default in fields]
    schema_name = name or f'{getattr(fn, "__name__", "Component")}Settings'
    schema = dataclasses.make_dataclass(schema_name, own)
    schema.__var_keyword__ = var_keyword  # type: ignore[attr-defined]
    schema.__required__ = frozenset(required)  # type: ignore[attr-defined]
    return schema


_SCALARS = (int, float, bool, str)


def _simple_kind(annotation: Any) -> Any:
    """What :func:`check` can hold a value to: a scalar type, a union of scalars (an int and a float: float), a
    sequence of one scalar type (a YAML list: ``list[float]`` for ``tuple[float, float]``), else ``Any``."""
    kind, _ = _unwrap_optional(annotation)
    if kind in _SCALARS:
        return kind
    if typing.get_origin(kind) in (list, tuple, Sequence, typing.Sequence):
        items = {a for a in typing.get_args(kind) if a is not Ellipsis}
        if len(items) == 1 and next(iter(items)) in _SCALARS:
            return list[next(iter(items))]
    if typing.get_origin(kind) in (Union, types.UnionType) and set(typing.get_args(kind)) <= set(_SCALARS):
        args = set(typing.get_args(kind))
        return float if args == {int, float} else Union[tuple(a for a in _SCALARS if a in args)]
    return Any


# A signature read from source: the annotations a data-loading signature uses, and nothing else (an unknown name
# makes the parameter untyped).
_ANNOTATION_NAMES = {'Optional': Optional, 'Union': Union, 'Any': Any, 'Sequence': Sequence, 'Mapping': Mapping,
                     'Iterable': typing.Iterable, 'int': int, 'float': float, 'bool': bool, 'str': str, 'dict': dict,
                     'list': list, 'tuple': tuple, 'None': None, 'NoneType': type(None)}


def source_signature(module: str, qualname: str) -> list[inspect.Parameter]:
    """The parameters of ``module.qualname`` (``'Class.__init__'`` or a function), read from the module's source
    without importing it: so a config is checked against a signature before the libraries that define it (torch,
    streaming) are loaded. Defaults are read as literals, annotations in typing's names (others: untyped).

    Raises:
        LookupError: The module's source or the definition is not found.
    """
    parts = module.split('.')
    spec = importlib.util.find_spec(parts[0])  # a top-level package is found without being imported
    if spec is None or not spec.submodule_search_locations and len(parts) > 1:
        raise LookupError(f'no source for {module}')
    base = os.path.join(list(spec.submodule_search_locations)[0], *parts[1:]) if len(parts) > 1 else spec.origin
    path = base if base.endswith('.py') else (base + '.py' if os.path.isfile(base + '.py') else
                                              os.path.join(base, '__init__.py'))
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
    node: Any = tree
    for name in qualname.split('.'):
        node = next((n for n in getattr(node, 'body', []) if isinstance(n, (ast.ClassDef, ast.FunctionDef))
                     and n.name == name), None)
        if node is None:
            raise LookupError(f'{module}.{qualname} not found in {path}')
    args = node.args
    positional = args.posonlyargs + args.args
    defaults = [inspect.Parameter.empty] * (len(positional) - len(args.defaults)) + list(args.defaults)
    out = [_parameter(a, d, inspect.Parameter.POSITIONAL_OR_KEYWORD) for a, d in zip(positional, defaults)]
    out += [_parameter(a, d if d is not None else inspect.Parameter.empty, inspect.Parameter.KEYWORD_ONLY)
            for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg is not None:
        out.append(inspect.Parameter(args.kwarg.arg, inspect.Parameter.VAR_KEYWORD))
    return out


def _parameter(arg: ast.arg, default: Any, kind: Any) -> inspect.Parameter:
    if isinstance(default, ast.AST):
        try:
            default = ast.literal_eval(default)
        except ValueError:  # not a literal: a default all the same, which the callee applies
            default = None
    annotation: Any = inspect.Parameter.empty
    if arg.annotation is not None:
        try:
            annotation = eval(ast.unparse(arg.annotation), {'__builtins__': {}}, dict(_ANNOTATION_NAMES))  # noqa: S307
        except Exception:  # noqa: BLE001 - a name outside typing's: untyped
            annotation = Any
    return inspect.Parameter(arg.arg, kind, default=default, annotation=annotation)


def check_arguments(schema: type, values: Mapping[str, Any], where: str = '') -> None:
    """Check the keyword arguments of a call against ``schema`` (:func:`signature_schema` of the callee), as
    :func:`check` checks a config: the keys ``schema`` does not know, and ``None`` values, are left to the callee.

    Raises:
        ConfigError: A value of the wrong type, naming ``where.key``.
    """
    known = {f.name for f in dataclasses.fields(schema)}
    given = {k: v for k, v in values.items() if k in known and v is not None}
    if given:  # the types of what is given; a key the schema requires may come another way (the dataset section)
        _fill(schema, OmegaConf.structured(schema), given, where)


def check_ranges(values: Mapping[str, Any], where: str = '', positive: Sequence[str] = (),
                 non_negative: Sequence[str] = ()) -> None:
    """``values[key] > 0`` for the ``positive`` keys and ``>= 0`` for the ``non_negative`` ones (``None``: not given).

    Raises:
        ConfigError: ``<where>.<key>: must be > 0, got <value>.``
    """
    prefix = f'{where}.' if where else ''
    for key in positive:
        if values.get(key) is not None and values[key] <= 0:
            raise ConfigError(f'{prefix}{key}: must be > 0, got {values[key]!r}.')
    for key in non_negative:
        if values.get(key) is not None and values[key] < 0:
            raise ConfigError(f'{prefix}{key}: must be >= 0, got {values[key]!r}.')


# ------------------------------------------------------------------------------------------------ checking
def check(schema: type[T], cfg: Optional[Mapping[str, Any]], where: str = '') -> T:
    """Check ``cfg`` against the dataclass ``schema``; return it as a ``schema`` instance (defaults filled in).

    Args:
        schema (type): A structured-config dataclass of this module (or any OmegaConf-compatible dataclass).
        cfg (Mapping, optional): The section as plain Python values (``None``: all defaults).
        where (str): The section's key path, for messages (``'algorithms.dwm'``). Default: ``''`` (the top level).

    Raises:
        ConfigError: An unknown key (the valid keys listed), a value of the wrong type, a mapping expected, or a
            required key missing; the message names the full key path.
    """
    node = OmegaConf.structured(schema)
    _fill(schema, node, cfg or {}, where)
    missing = sorted(OmegaConf.missing_keys(node))
    if missing:
        keys = ', '.join(f'`{key_path(where, key)}`' for key in missing)
        raise ConfigError(f'{keys} {"is" if len(missing) == 1 else "are"} required.')
    return OmegaConf.to_object(node)  # type: ignore[return-value]



def _fill(schema: type, node: DictConfig, cfg: Any, where: str) -> None:
    """Assign ``cfg`` into ``node`` (a structured config of ``schema``) key by key, naming the key of any error."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f'{where or "the top level"}: expected a mapping of {sorted(field_names(schema))}, got '
                          f'{type(cfg).__name__} ({cfg!r}).')
    hints = typing.get_type_hints(schema)
    unknown = [key for key in cfg if key not in hints]
    if unknown:
        section = f'{where}: unknown key(s)' if where else 'unknown top-level key(s)'
        raise ConfigError(f'{section} {sorted(map(str, unknown))}; valid keys are {sorted(hints)}.')
    for key, value in cfg.items():
        path = key_path(where, key)
        kind, optional = _unwrap_optional(hints[key])
        if value is None and key in getattr(schema, '__required__', ()):  # an untyped argument the callee needs
            raise ConfigError(f'`{path}` is required.')
        if value is None and optional:
            node[key] = None
        elif dataclasses.is_dataclass(kind):
            node[key] = OmegaConf.structured(kind)
            _fill(kind, node[key], value, path)
        elif _is_dict_of_dataclass(kind):
            entries = _named_entries(value, path)
            node[key] = {}
            entry_kind = typing.get_args(kind)[1]
            for name, entry in entries.items():
                node[key][name] = OmegaConf.structured(entry_kind)
                _fill(entry_kind, node[key][name], entry, key_path(path, name))
        else:
            value = _exact(value, kind, path)
            try:
                node[key] = value
            except OmegaConfBaseException as e:
                raise ConfigError(f'{path}: expected {_type_name(kind)}, got {type(value).__name__} '
                                  f'({value!r}).') from e


def _exact(value: Any, kind: Any, path: str) -> Any:
    """``value`` in the declared type ``kind``, converting only where nothing can be lost or misread.

    OmegaConf would take ``"false"`` or ``1`` for a bool and ``"5"`` for a number; those are errors here. An int
    for a float and a number for a str are converted explicitly (OmegaConf deprecates doing it implicitly).
    """
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f'{path}: expected bool (true/false, unquoted), got {type(value).__name__} ({value!r}).')
    if kind in (int, float) and isinstance(value, (str, bool)):
        raise ConfigError(f'{path}: expected {kind.__name__}, got {type(value).__name__} ({value!r}).')
    if kind is float and isinstance(value, int):
        return float(value)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if typing.get_origin(kind) is list and isinstance(value, (list, tuple)):
        (item_kind,) = typing.get_args(kind) or (Any,)
        return [_exact(item, item_kind, f'{path}[{i}]') for i, item in enumerate(value)]
    return value


def _named_entries(value: Any, path: str) -> Mapping[str, Any]:
    """``{name: entry}``; a list is named by position (``streams: [{...}, {...}]``)."""
    if isinstance(value, (list, tuple)):
        return {str(i): entry for i, entry in enumerate(value)}
    if not isinstance(value, Mapping):
        raise ConfigError(f'{path}: expected a mapping of name -> settings, got {type(value).__name__} ({value!r}).')
    return {str(name): entry for name, entry in value.items()}


def _unwrap_optional(kind: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``Optional[X]``, else ``(kind, False)``; a wider union stays as it is."""
    if typing.get_origin(kind) in (Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        optional = len(args) < len(typing.get_args(kind))
        return (args[0] if len(args) == 1 else Union[tuple(args)]), optional
    return kind, False


def _is_dict_of_dataclass(kind: Any) -> bool:
    args = typing.get_args(kind)
    return typing.get_origin(kind) is dict and len(args) == 2 and dataclasses.is_dataclass(args[1])


def _type_name(kind: Any) -> str:
    return getattr(kind, '__name__', None) if isinstance(kind, type) else str(kind).replace('typing.', '')


def field_names(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def key_path(where: str, key: Any) -> str:
    return f'{where}.{key}' if where else str(key)


def set_keys(section: Any) -> dict[str, Any]:
    """The keys a checked section sets, as plain values: its fields that are not ``None`` (an unset key of a
    signature schema is ``None``, so that the callee's own default applies), nested sections and mappings of them
    likewise. What a builder passes on as keyword arguments."""
    if dataclasses.is_dataclass(section):
        items = ((f.name, getattr(section, f.name)) for f in dataclasses.fields(section))
    else:
        items = dict(section or {}).items()
    out = {}
    for key, value in items:
        if value is None:
            continue
        if dataclasses.is_dataclass(value):
            value = set_keys(value)
        elif isinstance(value, Mapping) and any(dataclasses.is_dataclass(v) for v in value.values()):
            value = {k: set_keys(v) for k, v in value.items()}
        out[key] = value
    return out
