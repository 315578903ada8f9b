"""Every use of mosaicml-streaming's private API sits in ``dwm_stream/data/_streaming_compat.py``.

A streaming upgrade then means reading one module against the new release. The check is on the syntax
tree of every module of ``dwm_stream``, ``algorithms`` and ``benchmarks``: an import of a private
streaming name or module, or an attribute (also through ``getattr``/``hasattr``/``setattr``) whose name
is one of the underscore names streaming's own source defines or reads. ``self._x`` inside a class that
does not derive from a streaming class is the class's own attribute and is not counted.
"""

import ast
import os
from typing import Optional

import pytest
import streaming

import dwm_stream.data._streaming_compat as compat

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ('dwm_stream', 'algorithms', 'benchmarks')
COMPAT = os.path.join('dwm_stream', 'data', '_streaming_compat.py')
COMPAT_MODULE = 'dwm_stream.data._streaming_compat'
_ATTR_FUNCTIONS = {'getattr', 'hasattr', 'setattr', 'delattr'}


def _is_private(name: str) -> bool:
    return name.startswith('_') and not (name.startswith('__') and name.endswith('__'))


def _streaming_private_names() -> set[str]:
    """Underscore names that streaming defines (functions, classes, globals) or reads as attributes."""
    names = set()
    root = os.path.dirname(streaming.__file__)
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith('.py'):
                continue
            with open(os.path.join(folder, name)) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(node.name)
                elif isinstance(node, ast.Attribute):
                    names.add(node.attr)
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    names.add(node.id)
    return {name for name in names if _is_private(name)}


STREAMING_PRIVATE = _streaming_private_names()


def _root_name(node: ast.expr) -> Optional[str]:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


class _PrivateUseFinder(ast.NodeVisitor):
    """Collects ``line: what`` for each use of a streaming private name in one module."""

    def __init__(self, private: set[str]) -> None:
        self.private = private
        self.found: list[str] = []
        self.streaming_names: set[str] = set()  # names bound to streaming (or compat) modules/classes
        self.class_stack: list[bool] = []  # per enclosing class: does it derive from streaming?

    def visit_Import(self, node: ast.Import) -> None:  # noqa: N802 - ast's naming
        for alias in node.names:
            if alias.name.split('.')[0] == 'streaming' or alias.name == COMPAT_MODULE:
                self.streaming_names.add((alias.asname or alias.name).split('.')[0])
                if alias.name != COMPAT_MODULE and any(_is_private(p) for p in alias.name.split('.')):
                    self.found.append(f'{node.lineno}: import {alias.name}')

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:  # noqa: N802
        module = node.module or ''
        if module.split('.')[0] == 'streaming' or module.startswith(COMPAT_MODULE) or \
                (module == 'dwm_stream.data' and any(a.name == '_streaming_compat' for a in node.names)):
            for alias in node.names:
                self.streaming_names.add(alias.asname or alias.name)
            if module.split('.')[0] == 'streaming':
                private = [a.name for a in node.names if _is_private(a.name)]
                if any(_is_private(p) for p in module.split('.')) or private:
                    self.found.append(f'{node.lineno}: from {module} import {", ".join(a.name for a in node.names)}')

    def visit_ClassDef(self, node: ast.ClassDef) -> None:  # noqa: N802
        derived = any(_root_name(base) in self.streaming_names for base in node.bases)
        if derived:
            self.streaming_names.add(node.name)  # its subclasses in this module derive from streaming too
        self.class_stack.append(derived)
        self.generic_visit(node)
        self.class_stack.pop()

    def _own_attribute(self, receiver: ast.expr) -> bool:
        """``self.x``/``cls.x`` in a class that does not derive from streaming: not streaming's."""
        return isinstance(receiver, ast.Name) and receiver.id in ('self', 'cls') and \
            bool(self.class_stack) and not self.class_stack[-1]

    def visit_Attribute(self, node: ast.Attribute) -> None:  # noqa: N802
        if node.attr in self.private and not self._own_attribute(node.value):
            self.found.append(f'{node.lineno}: .{node.attr}')
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:  # noqa: N802
        if isinstance(node.func, ast.Name) and node.func.id in _ATTR_FUNCTIONS and len(node.args) >= 2:
            name = node.args[1]
            if isinstance(name, ast.Constant) and name.value in self.private and \
                    not self._own_attribute(node.args[0]):
                self.found.append(f'{node.lineno}: {node.func.id}(..., {name.value!r})')
        self.generic_visit(node)


def _private_uses(source: str) -> list[str]:
    finder = _PrivateUseFinder(STREAMING_PRIVATE)
    finder.visit(ast.parse(source))
    return finder.found


def _package_modules() -> list[str]:
    paths = []
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(REPO, package)):
            paths += [os.path.relpath(os.path.join(folder, f), REPO) for f in files if f.endswith('.py')]
    return sorted(paths)


def test_only_the_compat_module_uses_streaming_private_api():
    offenders = {}
    for path in _package_modules():
        if path == COMPAT:
            continue
        with open(os.path.join(REPO, path)) as f:
            found = _private_uses(f.read())
        if found:
            offenders[path] = found
    assert not offenders, (f'streaming private API used outside {COMPAT}: {offenders}. Wrap it in a function '
                           f'there, with a docstring saying what it wraps and why.')


def test_the_compat_module_is_found_using_private_api():
    """The check sees what it must refuse elsewhere: the compat module itself is full of it."""
    with open(os.path.join(REPO, COMPAT)) as f:
        found = _private_uses(f.read())
    assert any('_ShardState' in hit for hit in found) and any('._shard_states' in hit for hit in found)
    assert any("getattr(..., '_cache_filelock')" in hit for hit in found)


@pytest.mark.parametrize('source, flagged', [
    ('from streaming.base.dataset import _ShardState', True),
    ('import streaming.base.dataset as d\nd._ShardState.LOCAL', True),
    ('import streaming._version', True),
    ('def f(dataset):\n    return dataset._shard_states.numpy()', True),
    ('def f(dataset):\n    return getattr(dataset, "_cache_filelock", None)', True),
    ('from streaming import Stream\nclass S(Stream):\n    def f(self):\n        return self._download_file("a")', True),
    ('import dwm_stream.data._streaming_compat as compat\nclass S(compat.DownloadHookStream):\n'
     '    def f(self):\n        return self._keep_zip', True),
    ('import threading\nclass Server:\n    def __init__(self):\n        self._lock = threading.Lock()', False),
    ('from streaming import StreamingDataset\nfrom streaming.base.util import wait_for_file_to_exist', False),
    ('import dwm_stream.data._streaming_compat as compat\ncompat.shard_states', False),
])
def test_the_check_flags_private_uses_only(source, flagged):
    assert bool(_private_uses(source)) == flagged, _private_uses(source)


def test_compat_mirrors_the_iterator_state():
    """``EpochIterator.running`` follows streaming's private ``_state`` through its exit transitions."""
    it = compat.EpochIterator(list(range(3)))
    assert it.running
    it.non_blocking_exit()
    assert not it.running
    it.on_exit()
    it.on_exit()
    it.exit()  # both threads have exited: returns at once
    assert not it.running
