"""Load a benchmark script from benchmarks/ as a module, as `dwm-stream bench` does."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_bench(name: str):
    """``load_bench('quality')`` -> the module ``benchmarks/quality.py``, freshly executed."""
    path = os.path.join(ROOT, 'benchmarks', f'{name}.py')
    spec = importlib.util.spec_from_file_location(f'{name}_under_test', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
