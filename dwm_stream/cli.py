"""The ``dwm-stream`` command line. Nothing imports this module; it imports the rest lazily."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
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
    from dwm_stream.demo.corpus import build_corpus
    info = build_corpus(args.out, size=args.size, seed=args.seed, progress=not args.no_progress)
    print(info)
    return 0


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    from dwm_stream.convert.tokenizer import train_tokenizer
    path = train_tokenizer(args.corpus, args.out, vocab_size=args.vocab_size, progress=not args.no_progress)
    print(f'tokenizer saved to {path} (load it with AutoTokenizer.from_pretrained({path!r}))')
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from dwm_stream.convert.pipeline import convert
    report = convert(args.src, args.out, tokenizer=args.tokenizer, seq_len=args.seq_len, workers=args.workers,
                     skip_bad=args.skip_bad, overwrite=args.overwrite, resume=args.resume,
                     progress=not args.no_progress)
    print(report)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from dwm_stream.train.precheck import check_before_imports
    check_before_imports([args.config, *args.overrides])  # a schema error in a second, not after the imports
    from dwm_stream.train.entry import main as train_main
    quiet = ['progress_bar=false'] if args.no_progress else []  # Composer's bar: the global flag applies too
    return train_main([args.config, *args.overrides, *quiet])


def _cmd_demo(args: argparse.Namespace) -> int:
    from dwm_stream.demo.run import run_demo
    run_demo(out_dir=args.out, quick=args.quick, seed=args.seed, progress=not args.no_progress, tiny=args.tiny)
    return 0


def _checkout_root() -> str:
    """The source checkout that holds ``benchmarks/`` (they are scripts, not part of the installed package)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, 'benchmarks', '__init__.py')):
        raise SystemExit('dwm-stream bench needs a source checkout: benchmarks/ is not installed with the package '
                         f'(looked in {root}). Clone the repository and `pip install -e .` from it, or run '
                         '`python -m benchmarks.<name>` from its root.')
    return root


def _run_benchmark(module: str, argv: list[str]) -> int:
    root = _checkout_root()
    if root not in sys.path:
        sys.path.insert(0, root)
    mod = importlib.import_module(f'benchmarks.{module}')
    return int(mod.main(argv) or 0)


_BENCHES = {'loader': 'loader_throughput', 'overhead': 'dwm_overhead', 'convert': 'convert_throughput',
            'quality': 'quality', 'gpu': 'gpu'}
_NOT_IN_ALL = ('gpu',)  # `bench all` is the CPU benchmarks; `bench gpu` (8 minutes on a GPU) runs on its own


def _cmd_bench(args: argparse.Namespace) -> int:
    which = [b for b in _BENCHES if b not in _NOT_IN_ALL] if 'all' in args.which else args.which
    rc = 0
    for name in which:  # every benchmark takes --quick and --out DIR (benchmarks.common.output_options)
        argv = (['--quick'] if args.quick else []) + (['--out', args.out] if args.out else [])
        print(f'== bench {name} ==', flush=True)
        started = time.perf_counter()
        rc |= _run_benchmark(_BENCHES[name], argv + list(args.extra or []))
        print(f'== bench {name}: {time.perf_counter() - started:.0f}s ==', flush=True)
    return rc


def _token_count(text: str) -> int:
    """A token count: an integer, or with a K/M/B/T suffix (``30B`` = 30e9)."""
    scale = {'K': 10**3, 'M': 10**6, 'B': 10**9, 'T': 10**12}
    t = text.strip().upper().replace('_', '').replace(',', '')
    try:
        return int(float(t[:-1]) * scale[t[-1]]) if t and t[-1] in scale else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a token count (e.g. 500000000, 30B, 2.5M)') from None


def _cmd_select_dsir(args: argparse.Namespace) -> int:
    from dwm_stream.select.dsir import select_dsir
    report = select_dsir(args.raw, args.target, args.out, budget_tokens=args.budget_tokens, sample=args.sample,
                         seed=args.seed, prior_weight=args.prior_weight, min_words=args.min_words,
                         materialize=args.materialize, overwrite=args.overwrite, tokenizer=args.tokenizer,
                         ngrams=args.ngrams, num_buckets=args.num_buckets, workers=args.workers,
                         raw_fit_features=args.raw_fit_features, target_domains=args.target_domain,
                         progress=not args.no_progress)
    print(report)
    return 0


def _cmd_select_qurating(args: argparse.Namespace) -> int:
    from dwm_stream.select.qurating import select_qurating
    report = select_qurating(args.corpus, args.criterion, args.out, args.budget_tokens, tau=args.tau,
                             sample=not args.no_sample, per_domain=args.per_domain, zscore=args.zscore,
                             annotations=args.annotations, seed=args.seed, workers=args.workers,
                             materialize=args.materialize, overwrite=args.overwrite, progress=not args.no_progress)
    print(report)
    return 0


def _cmd_annotate(args: argparse.Namespace) -> int:
    from dwm_stream.select.qurating import annotate_qurating
    report = annotate_qurating(args.model, args.corpus, args.out, labels=args.labels, tokenizer=args.tokenizer,
                               window=args.window, batch_size=args.batch_size, device=args.device,
                               overwrite=args.overwrite, progress=not args.no_progress)
    print(report)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from dwm_stream.train.report import write_report
    text, png = write_report(args.run_dir, out=args.out)
    print(text)
    print(f'plot written to {png}')
    return 0


def _add_selection_output(p: argparse.ArgumentParser) -> None:
    """What every selector writes (the steps of ``dwm_stream.select.pipeline``)."""
    p.add_argument('--out', required=True, help='selection file to write (.parquet)')
    p.add_argument('--materialize', default=None, metavar='OUT', help='also write the selected subset there')
    p.add_argument('--overwrite', action='store_true', help='replace an existing --out / --materialize')


def _add_selection_parsers(sub) -> None:
    """`select dsir|qurating`, `annotate qurating` and `report`: compose DWM with static selectors."""
    CRITERIA = ('writing_style', 'required_expertise', 'facts_and_trivia', 'educational_value')  # qurating.CRITERIA
    p = sub.add_parser('select', help='preselect a corpus with DSIR or QuRating into a selection file',
                       description='Write a selection file (Parquet: uid, prior_weight, score_*) that DWMDataset '
                                   'streams as an overlay, without rewriting shards; --materialize also writes '
                                   'the subset as a new corpus.')
    psub = p.add_subparsers(dest='action', required=True, metavar='SELECTOR')
    d = psub.add_parser('dsir', help='DSIR: hashed n-gram importance resampling toward target text',
                        description='DSIR (Xie et al. 2023): unigram+bigram hashed features, log ratio of target to '
                                    'raw feature distributions, per-sample log importance weights (stored per token '
                                    'as score_dsir), then top-k or Gumbel-top-k selection to a token budget.')
    d.add_argument('--raw', required=True, help='the raw corpus: an MDS corpus (local or s3://, decoded with its '
                                                'tokenizer) or a local .jsonl.zst file or directory (one unit per '
                                                'document; materialise and convert the result)')
    d.add_argument('--target', nargs='+', required=True, metavar='TEXT',
                   help='target text: .jsonl.zst (SlimPajama), .jsonl (`text` or LAMBADA context+continuation), '
                        '.txt, or directories of them')
    d.add_argument('--target-domain', nargs='+', default=None, metavar='DOMAIN',
                   help='keep only these SlimPajama domains of .jsonl.zst targets, e.g. RedPajamaBook')
    d.add_argument('--budget-tokens', type=_token_count, default=None,
                   help='tokens to select, e.g. 30B (default: keep every sample, scored)')
    d.add_argument('--sample', action='store_true',
                   help='sample ∝ importance weight without replacement (Gumbel-top-k) instead of top-k')
    d.add_argument('--seed', type=int, default=0, help='seed of --sample (default: 0)')
    d.add_argument('--prior-weight', action='store_true',
                   help='store prior_weight = exp(per-token log importance), mean 1 over the selection')
    d.add_argument('--min-words', type=int, default=0, help='never select samples with fewer words (default: 0)')
    d.add_argument('--tokenizer', default=None, help='MDS: decode with it instead of dwm.json\'s; .jsonl.zst: '
                                                     'count budget tokens with it (default: words)')
    d.add_argument('--ngrams', type=int, default=2, help='largest n-gram (default: 2, unigrams+bigrams)')
    d.add_argument('--num-buckets', type=int, default=10000, help='hash buckets (default: 10000)')
    d.add_argument('--raw-fit-features', type=_token_count, default=None,
                   help='fit the raw distribution on about this many n-grams (default: all)')
    d.add_argument('--workers', type=int, default=1, help='parallel processes over shards/files (default: 1)')
    _add_selection_output(d)
    d.set_defaults(func=_cmd_select_dsir)

    q = psub.add_parser('qurating', help='QuRating: sample ∝ softmax(score/tau) by one quality criterion',
                        description='Select by one QuRating criterion from the corpus\'s score columns or an '
                                    'annotation file: sampling ∝ softmax(score/tau) without replacement '
                                    '(Gumbel-top-k), or top-k, to a token budget.')
    q.add_argument('--corpus', required=True, help='converted MDS corpus (local or s3://)')
    q.add_argument('--criterion', default='educational_value',
                   help=f'score to select by, one of {", ".join(CRITERIA)} (default: educational_value)')
    q.add_argument('--tau', type=float, default=2.0, help='softmax temperature (default: 2.0)')
    q.add_argument('--budget-tokens', type=_token_count, required=True, help='tokens to select, e.g. 30B')
    q.add_argument('--per-domain', action='store_true', help='split the budget across domains by token share')
    q.add_argument('--no-sample', action='store_true', help='top-k instead of sampling')
    q.add_argument('--zscore', action='store_true', help='z-score the criterion over the corpus first')
    q.add_argument('--annotations', default=None,
                   help='annotation file from `dwm-stream annotate qurating` (default: the corpus\'s score columns)')
    q.add_argument('--seed', type=int, default=0, help='seed of the sampling (default: 0)')
    q.add_argument('--workers', type=int, default=1, help='parallel processes over shards (default: 1)')
    _add_selection_output(q)
    q.set_defaults(func=_cmd_select_qurating)

    p = sub.add_parser('annotate', help='rate a corpus with a local model, for `select --annotations`')
    psub = p.add_subparsers(dest='action', required=True, metavar='RATER')
    a = psub.add_parser('qurating', help='rate with a local QuRater-style sequence-classification model',
                        description='Rate every sample with an HF sequence-classification model (one output per '
                                    'criterion) over windows of --window tokens, averaged by token count; write '
                                    'Parquet with uid and score_<criterion>.')
    a.add_argument('--model', required=True, help='local model directory (save_pretrained)')
    a.add_argument('--corpus', required=True, help='converted MDS corpus (local or s3://)')
    a.add_argument('--out', required=True, help='annotation file to write (.parquet)')
    a.add_argument('--labels', nargs='+', default=list(CRITERIA), help='criterion of each model output, in order '
                                                                      f'(default: {" ".join(CRITERIA)})')
    a.add_argument('--tokenizer', default=None, help='the model\'s tokenizer if not in --model (default: corpus '
                                                     'token ids are used as they are)')
    a.add_argument('--window', type=int, default=512, help='tokens per window (default: 512)')
    a.add_argument('--batch-size', type=int, default=16, help='windows per forward pass (default: 16)')
    a.add_argument('--device', default=None, help='torch device (default: cuda if available, else cpu)')
    a.add_argument('--overwrite', action='store_true', help='replace an existing --out')
    a.set_defaults(func=_cmd_annotate)

    r = sub.add_parser('report', help='table + PNG of what DWM preferred, by criterion and domain, per stage',
                       description='Read RUN_DIR/metrics.jsonl: the Spearman correlation of DWM weights with each '
                                   'score at each stage end, and the mean weight per domain per stage.')
    r.add_argument('run_dir', metavar='RUN_DIR', help='run directory (with metrics.jsonl), or the file itself')
    r.add_argument('--out', default=None, help='PNG path (default: RUN_DIR/preferences.png)')
    r.set_defaults(func=_cmd_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='dwm-stream',
        description='DWM (Data Weighting Model, ICML 2025) for Composer and mosaicml-streaming: build or convert '
                    'SlimPajama-format corpora to MDS shards, stream them (optionally through a DSIR/QuRating '
                    'selection) from S3 or a local directory, and train with per-sample weights from a '
                    'batch-aware weighter refit by bi-level optimisation.',
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--no-progress', action='store_true',
                        help='no progress output; by default a bar on a terminal, else a line every few seconds '
                             '(also accepted after the command)')
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

    p = sub.add_parser('corpus', help='build the embedded SlimPajama-format corpus (no network)')
    psub = p.add_subparsers(dest='action', required=True, metavar='ACTION')
    b = psub.add_parser('build', help='write train/, validation/ (.jsonl.zst) and lambada.jsonl from text on '
                                      'this machine: Python docs, stdlib source, licences, plus degraded domains')
    b.add_argument('--out', required=True, help='output directory (must not hold a corpus already)')
    b.add_argument('--size', default='8MB', help='train text size, e.g. 8MB, 200MB (default: 8MB)')
    b.add_argument('--seed', type=int, default=0, help='seed for every random choice (default: 0)')
    b.set_defaults(func=_cmd_corpus)

    p = sub.add_parser('tokenizer', help='train a local BPE tokenizer')
    psub = p.add_subparsers(dest='action', required=True, metavar='ACTION')
    t = psub.add_parser('train', help='train a byte-level BPE on a corpus\'s train split; AutoTokenizer loads it')
    t.add_argument('--corpus', required=True, help='corpus root (with train/)')
    t.add_argument('--out', required=True, help='directory to save the tokenizer (cached: re-runs are free)')
    t.add_argument('--vocab-size', type=int, default=8192, help='vocabulary size (default: 8192)')
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
    d.add_argument('--tiny', action='store_true',
                   help='the smallest run that still goes through every step (what the tests run; its numbers say '
                        'nothing about DWM)')
    d.add_argument('--out', default='runs/demo', help='output directory (default: runs/demo)')
    d.add_argument('--seed', type=int, default=0, help='seed of both runs (default: 0)')
    d.set_defaults(func=_cmd_demo)

    be = sub.add_parser('bench', help='run benchmarks; results go to benchmarks/RESULTS.md',
                        description='Run benchmarks (each compares against a baseline measured in the same run) '
                                    'and regenerate their sections of benchmarks/RESULTS.md.')
    be.add_argument('which', nargs='+', choices=[*_BENCHES, 'all'], help='which benchmarks')
    be.add_argument('--quick', action='store_true', help='small sizes, for CI')
    be.add_argument('--out', default=None, help='results directory (default: benchmarks/results)')
    # Any other option (e.g. --device gpu, --seeds 0 1) is passed to the benchmark(s): see main().
    be.set_defaults(func=_cmd_bench, extra=[])

    _add_selection_parsers(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if '--no-progress' in unknown:  # given after the command: the one global flag all the same
        unknown = [a for a in unknown if a != '--no-progress']
        args.no_progress = True
    if unknown and args.command != 'bench':
        parser.error(f'unrecognized arguments: {" ".join(unknown)}')
    if args.command == 'bench':
        args.extra = unknown  # further options for the benchmark(s) themselves
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f'dwm-stream {args.command}: error: {e}', file=sys.stderr)
        return 2
    except OSError as e:
        from dwm_stream.format.storage import StorageError
        if not isinstance(e, StorageError):
            raise
        print(f'dwm-stream {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
