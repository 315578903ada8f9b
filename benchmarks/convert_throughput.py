"""Throughput of the ingest path: corpus build, tokenizer training, and `convert` at 1..N workers.

Each `convert` run converts the same train split to a fresh directory, checks that the output is
byte-identical to the 1-worker output, and reports tokens/s (scan pass included). Imports happen
before the timings, so they measure steady-state work.

    python benchmarks/convert_throughput.py --size 8MB --workers 1 2 --seq-len 2048
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time


def _digest(root: str) -> str:
    h = hashlib.sha256()
    for d, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(d, f)
            h.update(os.path.relpath(p, root).encode() + open(p, 'rb').read())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', default='8MB', help='corpus size (default: 8MB)')
    parser.add_argument('--vocab-size', type=int, default=8192, help='tokenizer vocabulary (default: 8192)')
    parser.add_argument('--seq-len', type=int, default=2048, help='tokens per sample (default: 2048)')
    parser.add_argument('--workers', type=int, nargs='+', default=[1, 2], help='worker counts (default: 1 2)')
    parser.add_argument('--repeats', type=int, default=2, help='runs per worker count; best kept (default: 2)')
    parser.add_argument('--work-dir', default=None, help='keep files here (default: a temp dir)')
    args = parser.parse_args()

    import streaming  # noqa: F401 - imported before the timings
    import transformers  # noqa: F401

    from dwm_stream.convert import convert
    from dwm_stream.corpus import build_corpus
    from dwm_stream.tokenizer import train_tokenizer

    work = args.work_dir or tempfile.mkdtemp(prefix='dwm-bench-convert-')
    results: dict = {'size': args.size, 'seq_len': args.seq_len, 'vocab_size': args.vocab_size,
                     'cpu_count': os.cpu_count()}
    t = time.perf_counter()
    corpus = build_corpus(os.path.join(work, 'corpus'), size=args.size, progress=False)
    results['corpus_build_s'] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    tok = train_tokenizer(corpus.out_dir, os.path.join(work, 'tokenizer'), vocab_size=args.vocab_size,
                          progress=False)
    results['tokenizer_train_s'] = round(time.perf_counter() - t, 2)
    reference = None
    results['convert'] = []
    for workers in args.workers:
        best = None
        for r in range(args.repeats):
            out = os.path.join(work, f'mds-w{workers}-r{r}')
            report = convert(corpus.train_dir, out, tok, args.seq_len, workers=workers, progress=False)
            digest = _digest(out)
            reference = reference or digest
            if digest != reference:
                raise SystemExit(f'{out}: output differs from the first run; convert is not deterministic')
            if best is None or report.seconds < best.seconds:
                best = report
        results['convert'].append({'workers': workers, 'seconds': round(best.seconds, 2),
                                   'tokens': best.num_tokens,
                                   'tokens_per_s': round(best.tokens_per_second)})
    print(json.dumps(results, indent=2))


if __name__ == '__main__':
    main()
