"""The ``dwm-stream`` command line. Nothing imports this module; it imports the rest lazily."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Optional, Sequence

__all__ = ['main']

_EPILOG = """\
typical flow:
  dwm-stream corpus build --out data/corpus            # embedded SlimPajama-format corpus
  dwm-stream tokenizer train --corpus data/corpus --out data/tokenizer
  dwm-stream convert --src data/corpus/train --out s3://bucket/mds --tokenizer data/tokenizer --seq-len 2048
  dwm-stream train yamls/demo-cpu.yaml max_duration=50ba
  dwm-stream demo --quick                              # all of the above, end to end, on loopback S3
"""


def _cmd_corpus(args: argparse.Namespace) -> int:
    from dwm_stream.corpus import build_corpus
    info = build_corpus(args.out, size=args.size, seed=args.seed, progress=not args.no_progress)
    print(info)
    return 0


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    from dwm_stream.tokenizer import train_tokenizer
    path = train_tokenizer(args.corpus, args.out, vocab_size=args.vocab_size, progress=not args.no_progress)
    print(f'tokenizer saved to {path} (load it with AutoTokenizer.from_pretrained({path!r}))')
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from dwm_stream.convert import convert
    report = convert(args.src, args.out, tokenizer=args.tokenizer, seq_len=args.seq_len, workers=args.workers,
                     skip_bad=args.skip_bad, overwrite=args.overwrite, resume=args.resume,
                     progress=not args.no_progress)
    print(report)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from dwm_stream.train import main as train_main
    return train_main([args.config, *args.overrides])


def _cmd_demo(args: argparse.Namespace) -> int:
    from dwm_stream.demo import run_demo
    run_demo(out_dir=args.out, quick=args.quick, seed=args.seed)
    return 0


def _benchmarks_dir() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(here, 'benchmarks')
    if not os.path.isdir(path):
        raise SystemExit(f'benchmarks/ not found next to the package ({path}); run from a source checkout '
                         f'(pip install -e .).')
    return path


def _run_benchmark(module: str, argv: list[str]) -> int:
    path = os.path.join(_benchmarks_dir(), f'{module}.py')
    if not os.path.exists(path):
        raise SystemExit(f'benchmark {path} does not exist.')
    spec = importlib.util.spec_from_file_location(f'benchmarks.{module}', path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return int(mod.main(argv) or 0)


_BENCHES = {'loader': 'loader_throughput', 'overhead': 'dwm_overhead'}


def _cmd_bench(args: argparse.Namespace) -> int:
    which = list(_BENCHES) if 'all' in args.which else args.which
    rc = 0
    for name in which:
        argv = (['--quick'] if args.quick else []) + (['--out', args.out] if args.out else [])
        print(f'== bench {name} ==', flush=True)
        rc |= _run_benchmark(_BENCHES[name], argv + list(args.extra or []))
    return rc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='dwm-stream',
        description='DWM (Data Weighting Model, ICML 2025) for Composer and mosaicml-streaming: build or convert '
                    'SlimPajama-format corpora to MDS shards, stream them (optionally through a DSIR/QuRating '
                    'selection) from S3 or a local directory, and train with per-sample weights from a '
                    'batch-aware weighter refit by bi-level optimisation.',
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

    p = sub.add_parser('corpus', help='build the embedded SlimPajama-format corpus (no network)')
    psub = p.add_subparsers(dest='action', required=True, metavar='ACTION')
    b = psub.add_parser('build', help='write train/, validation/ (.jsonl.zst) and lambada.jsonl from text on '
                                      'this machine: Python docs, stdlib source, licences, plus degraded domains')
    b.add_argument('--out', required=True, help='output directory (must not hold a corpus already)')
    b.add_argument('--size', default='8MB', help='train text size, e.g. 8MB, 200MB (default: 8MB)')
    b.add_argument('--seed', type=int, default=0, help='seed for every random choice (default: 0)')
    b.add_argument('--no-progress', action='store_true', help='no progress bar')
    b.set_defaults(func=_cmd_corpus)

    p = sub.add_parser('tokenizer', help='train a local BPE tokenizer')
    psub = p.add_subparsers(dest='action', required=True, metavar='ACTION')
    t = psub.add_parser('train', help='train a byte-level BPE on a corpus\'s train split; AutoTokenizer loads it')
    t.add_argument('--corpus', required=True, help='corpus root (with train/)')
    t.add_argument('--out', required=True, help='directory to save the tokenizer (cached: re-runs are free)')
    t.add_argument('--vocab-size', type=int, default=8192, help='vocabulary size (default: 8192)')
    t.add_argument('--no-progress', action='store_true', help='no progress bar')
    t.set_defaults(func=_cmd_tokenizer)

    c = sub.add_parser('convert', help='tokenize and pack documents into MDS shards (local or s3://)',
                       description='Convert SlimPajama *.jsonl.zst, WebDataset .tar or QuRatedPajama parquet '
                                   'into zstd MDS shards with columns tokens, num_tokens, uid, domain and scores, '
                                   'plus dwm.json and uids.npy beside index.json.')
    c.add_argument('--src', required=True, help='source directory, file, or s3://bucket/prefix')
    c.add_argument('--out', required=True, help='output directory or s3://bucket/prefix')
    c.add_argument('--tokenizer', required=True, help='tokenizer directory or HF name')
    c.add_argument('--seq-len', type=int, required=True, help='tokens per sample, e.g. 2048')
    c.add_argument('--workers', type=int, default=1, help='parallel processes over source files (default: 1)')
    c.add_argument('--skip-bad', action='store_true', help='skip malformed records, count and report them')
    c.add_argument('--overwrite', action='store_true', help='replace an existing output')
    c.add_argument('--resume', action='store_true', help='keep completed parts of an interrupted conversion')
    c.add_argument('--no-progress', action='store_true', help='no progress bar')
    c.set_defaults(func=_cmd_convert)

    tr = sub.add_parser('train', help='train from a YAML in LLM Foundry\'s layout',
                        description='Train with Composer from a YAML (see yamls/). Data-parallel: '
                                    'composer -n N -m dwm_stream.train CONFIG.yaml [overrides].')
    tr.add_argument('config', help='YAML config')
    tr.add_argument('overrides', nargs='*', help='key.sub=value overrides, e.g. max_duration=20ba')
    tr.set_defaults(func=_cmd_train)

    d = sub.add_parser('demo', help='the embedded end-to-end demo: corpus -> shards -> loopback S3 -> '
                                    'uniform vs DWM training -> table and plot')
    d.add_argument('--quick', action='store_true', help='a ~2-minute version')
    d.add_argument('--out', default='runs/demo', help='output directory (default: runs/demo)')
    d.add_argument('--seed', type=int, default=0, help='seed of both runs (default: 0)')
    d.set_defaults(func=_cmd_demo)

    be = sub.add_parser('bench', help='run benchmarks; results go to benchmarks/RESULTS.md',
                        description='Run benchmarks (each compares against a baseline measured in the same run) '
                                    'and regenerate their sections of benchmarks/RESULTS.md.')
    be.add_argument('which', nargs='+', choices=[*_BENCHES, 'all'], help='which benchmarks')
    be.add_argument('--quick', action='store_true', help='small sizes, for CI')
    be.add_argument('--out', default=None, help='results directory (default: benchmarks/results)')
    be.add_argument('extra', nargs=argparse.REMAINDER, help='further arguments passed to the benchmark')
    be.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f'dwm-stream {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
