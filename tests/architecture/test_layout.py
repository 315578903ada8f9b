"""The package layout's rules: imports point one way, and training never pulls in test or demo tooling."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _imported_modules(path: str) -> set[str]:
    """Every module a file imports (absolute names; relative imports resolved against its package)."""
    tree = ast.parse(open(path).read(), path)
    package = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, '.')
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parts = package.split('.')
                base = '.'.join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f'{base}.{alias.name}' for alias in node.names)
    return names


def _python_files(folder: str) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
        out += [os.path.join(dirpath, f) for f in files if f.endswith('.py')]
    assert out, f'no Python files under {folder}/'
    return out


def test_algorithms_import_nothing_from_dwm_stream():
    offenders = {os.path.relpath(p, ROOT): sorted(m for m in _imported_modules(p) if m.split('.')[0] == 'dwm_stream')
                 for p in _python_files('algorithms')}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_no_library_module_imports_the_cli_benchmarks_or_tests():
    for path in _python_files('dwm_stream') + _python_files('algorithms'):
        bad = {m for m in _imported_modules(path)
               if m == 'dwm_stream.cli' or m.split('.')[0] in ('benchmarks', 'tests')}
        assert not bad, f'{os.path.relpath(path, ROOT)} imports {sorted(bad)}'


def test_no_module_imports_another_modules_private_names():
    for path in _python_files('dwm_stream') + _python_files('algorithms') + _python_files('benchmarks'):
        for m in _imported_modules(path):
            parts = m.split('.')
            if parts[0] not in ('dwm_stream', 'algorithms', 'benchmarks'):
                continue
            private = [p for p in parts[1:] if p.startswith('_') and not p.startswith('__')]
            # a package may import its own private module (dwm_stream.data._streaming_compat from dwm_stream.data)
            own = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, '.')
            if private and not m.startswith(own + '.'):
                raise AssertionError(f'{os.path.relpath(path, ROOT)} imports the private {m}')


_TRAINING_IMPORTS = '''
import sys
import dwm_stream.train.entry, dwm_stream.train.foundry, dwm_stream.train.builders
import dwm_stream.data.dataset, dwm_stream.data.loader, algorithms.dwm, algorithms.baselines
import dwm_stream.convert.pipeline, dwm_stream.select.dsir, dwm_stream.select.qurating
# (matplotlib and scipy are not checked: Composer and transformers import them on their own)
banned = ('dwm_stream.testing', 'dwm_stream.demo', 'moto', 'pytest', 'benchmarks')
print(sorted(m for m in sys.modules if any(m == b or m.startswith(b + '.') for b in banned)))
'''


def test_training_code_imports_nothing_test_or_demo_only():
    """Importing every training, conversion and selection module loads no test tooling, demo code or extra."""
    out = subprocess.run([sys.executable, '-c', _TRAINING_IMPORTS], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == '[]', out.stdout
