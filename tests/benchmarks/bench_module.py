"""Import a benchmark as ``dwm-stream bench`` does: ``benchmarks.<name>``, with the checkout's root on sys.path."""

import importlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_bench(name: str):
    """``load_bench('quality')`` -> the module ``benchmarks.quality``."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    return importlib.import_module(f'benchmarks.{name}')


# Another benchmark's section: a benchmark that regenerates its own must leave it untouched.
OTHER_SECTION = '<!-- other:begin -->\n## Other benchmark\n\nkeep me 1.23\n<!-- other:end -->\n'


def quick_run(name: str, root, json_name: str, extra: tuple[str, ...] = ()):
    """Run ``benchmarks.<name> --quick --out ROOT/results`` against a RESULTS.md holding another benchmark's section,
    a stale one of its own and trailing text; ``(module, results JSON, out dir, RESULTS.md path)``."""
    bench = load_bench(name)
    results_md = root / 'RESULTS.md'
    results_md.write_text('# Benchmark results\n\n' + OTHER_SECTION + '\n' + bench.BEGIN_MARK + '\nstale 9.99\n' +
                          bench.END_MARK + '\n\ntrailing text\n')
    out = root / 'results'
    assert bench.main(['--quick', '--out', str(out), *extra]) == 0
    with open(out / json_name) as f:
        results = json.load(f)
    return bench, results, out, results_md
