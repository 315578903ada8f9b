"""Throughput of `dwm-stream convert` against its two bounds: the bare tokenizer and zstd decoding.

On the embedded corpus (``*.jsonl.zst``, SlimPajama's layout), each repetition measures, in a rotated order:

* ``zstd``: stream-decompressing every train file (MB/s of decoded JSON lines, 1 process);
* ``tokenizer@Nw``: the bare fast tokenizer (the same ``tokenizers`` backend and batch encoding convert uses)
  over the same documents, already decoded and in memory, in N forked processes each encoding its share of the
  files (tokens/s; process start-up excluded);
* ``convert@Nw``: ``convert(...)`` end to end at N workers: scan, decode, parse, tokenize, pack, write zstd MDS
  shards (tokens/s over the wall time of the call).

The target is convert at N workers >= 0.8x the tokenizer-bound rate at N processes, measured in the same run.
Every process runs the tokenizer single-threaded (``TOKENIZERS_PARALLELISM=false``, as convert's workers do), so
N workers use N cores.

    python -m benchmarks.convert_throughput [--quick] [--out DIR] [--size 8MB] [--workers 1 2] [--reps 3]

Writes ``DIR/convert.json`` (default ``benchmarks/results``) and regenerates the section between the convert
markers of ``benchmarks/RESULTS.md`` (beside ``DIR``; ``--results-md`` to change).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Optional

os.environ['TOKENIZERS_PARALLELISM'] = 'false'  # one core per process, in this process too (before tokenizers loads)

import streaming  # noqa: E402,F401 - imported before the timings
import zstandard  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from benchmarks.common import (describe_machine, library_versions, machine_info, min_median_max,  # noqa: E402
                               output_options, section_io,
                               results_md_path, utc_now, write_json)
from dwm_stream.convert.pipeline import convert  # noqa: E402
from dwm_stream.convert.tokenizer import train_tokenizer  # noqa: E402
from dwm_stream.demo.corpus import build_corpus  # noqa: E402

BEGIN_MARK = '<!-- convert:begin -->'
END_MARK = '<!-- convert:end -->'
TARGET = 0.8
ENCODE_BATCH_DOCS = 256  # convert's batch (dwm_stream.convert.pipeline._BATCH_DOCS)


def _say(msg: str) -> None:
    print(f'[convert] {msg}', flush=True)


def _digest(root: str) -> str:
    h = hashlib.sha256()
    for d, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for f in sorted(files):
            if f == 'plan.json' or f.endswith('part.json'):
                continue  # hold timings
            p = os.path.join(d, f)
            with open(p, 'rb') as fh:
                h.update(os.path.relpath(p, root).encode() + fh.read())
    return h.hexdigest()


def _source_files(train_dir: str) -> list[str]:
    out = []
    for d, dirs, files in sorted(os.walk(train_dir)):
        dirs.sort()
        out += [os.path.join(d, f) for f in sorted(files) if f.endswith('.jsonl.zst')]
    return out


def measure_zstd(files: list[str]) -> dict[str, float]:
    """Stream-decompress every file; decoded bytes per second."""
    started = time.perf_counter()
    decoded = 0
    for path in files:
        with open(path, 'rb') as f:
            reader = zstandard.ZstdDecompressor().stream_reader(f)
            while True:
                chunk = reader.read(1 << 20)
                if not chunk:
                    break
                decoded += len(chunk)
    seconds = time.perf_counter() - started
    return {'seconds': seconds, 'bytes': decoded, 'mb_per_s': decoded / seconds / 1e6}


def read_texts(files: list[str]) -> list[list[str]]:
    """The documents' texts, per file (what convert tokenizes)."""
    out = []
    for path in files:
        with open(path, 'rb') as f:
            raw = zstandard.ZstdDecompressor().decompress(f.read(), max_output_size=1 << 34)
        out.append([json.loads(line)['text'] for line in raw.decode('utf-8').splitlines() if line.strip()])
    return out


def _encoder(tokenizer_dir: str):
    backend = Tokenizer.from_file(os.path.join(tokenizer_dir, 'tokenizer.json'))
    backend.encode_special_tokens = True
    backend.no_truncation()
    backend.no_padding()
    return getattr(backend, 'encode_batch_fast', backend.encode_batch)


def _encode_all(encode, texts: list[str]) -> int:
    tokens = 0
    for i in range(0, len(texts), ENCODE_BATCH_DOCS):
        tokens += sum(len(e.ids) for e in encode(texts[i:i + ENCODE_BATCH_DOCS], add_special_tokens=False))
    return tokens


def _tokenize_child(tokenizer_dir: str, texts: list[str], start, queue) -> None:
    encode = _encoder(tokenizer_dir)
    _encode_all(encode, texts[:8])  # warm up
    start.wait()
    queue.put(_encode_all(encode, texts))


def measure_tokenizer(tokenizer_dir: str, texts_by_file: list[list[str]], processes: int) -> dict[str, float]:
    """The bare tokenizer over the documents, files dealt round-robin to ``processes`` forked processes."""
    if processes <= 1:
        encode = _encoder(tokenizer_dir)
        texts = [t for file_texts in texts_by_file for t in file_texts]
        _encode_all(encode, texts[:8])
        started = time.perf_counter()
        tokens = _encode_all(encode, texts)
        seconds = time.perf_counter() - started
        return {'seconds': seconds, 'tokens': tokens, 'tokens_per_s': tokens / seconds}
    # Forked, so that the children inherit the decoded texts. (convert's own workers start from a forkserver,
    # and their start-up, once per process for the server, is inside convert's wall time.)
    ctx = multiprocessing.get_context('fork')
    start, queue = ctx.Event(), ctx.Queue()
    shares = [[t for file_texts in texts_by_file[i::processes] for t in file_texts] for i in range(processes)]
    children = [ctx.Process(target=_tokenize_child, args=(tokenizer_dir, share, start, queue)) for share in shares]
    for c in children:
        c.start()
    time.sleep(0.5)  # let them load the tokenizer and warm up
    started = time.perf_counter()
    start.set()
    tokens = sum(queue.get() for _ in children)
    seconds = time.perf_counter() - started
    for c in children:
        c.join()
    return {'seconds': seconds, 'tokens': tokens, 'tokens_per_s': tokens / seconds}


def measure_convert(train_dir: str, tokenizer_dir: str, out: str, seq_len: int, workers: int) -> dict[str, float]:
    if os.path.exists(out):
        shutil.rmtree(out)
    started = time.perf_counter()
    report = convert(train_dir, out, tokenizer_dir, seq_len, workers=workers, progress=False)
    seconds = time.perf_counter() - started
    return {'seconds': seconds, 'tokens': report.num_tokens, 'tokens_per_s': report.num_tokens / seconds,
            'samples': report.num_samples, 'documents': report.num_documents, 'digest': _digest(out)}


def run_benchmark(args: argparse.Namespace, work: str) -> dict[str, Any]:
    corpus_dir = os.path.join(work, 'corpus')
    if not os.path.exists(os.path.join(corpus_dir, 'dwm_corpus.json')):
        _say(f'building the embedded corpus ({args.size})')
        build_corpus(corpus_dir, size=args.size, seed=0, progress=False)
    tokenizer_dir = train_tokenizer(corpus_dir, os.path.join(work, 'tokenizer'), vocab_size=args.vocab_size,
                                    progress=False)
    train_dir = os.path.join(corpus_dir, 'train')
    files = _source_files(train_dir)
    texts = read_texts(files)
    compressed = sum(os.path.getsize(f) for f in files)
    configs = ['zstd'] + [f'tokenizer@{w}w' for w in args.workers] + [f'convert@{w}w' for w in args.workers]
    runs: dict[str, list[dict[str, float]]] = {c: [] for c in configs}
    reference = None
    for rep in range(args.reps):
        order = configs[rep % len(configs):] + configs[:rep % len(configs)]  # rotate: A/B alternate per rep
        for config in order:
            if config == 'zstd':
                result = measure_zstd(files)
            elif config.startswith('tokenizer@'):
                result = measure_tokenizer(tokenizer_dir, texts, int(config.split('@')[1][:-1]))
            else:
                workers = int(config.split('@')[1][:-1])
                result = measure_convert(train_dir, tokenizer_dir, os.path.join(work, f'mds-{workers}w'),
                                         args.seq_len, workers)
                digest = result.pop('digest')
                reference = reference or digest
                if digest != reference:
                    raise SystemExit(f'convert at {workers} workers wrote different shards than the first run')
            runs[config].append(result)
            _say(f'rep {rep + 1}/{args.reps} {config}: ' + (
                f'{result["mb_per_s"]:.1f} MB/s' if 'mb_per_s' in result else f'{result["tokens_per_s"]:,.0f} tok/s'))
    tokens = runs[f'convert@{args.workers[0]}w'][0]['tokens']
    summary = {}
    for config, results in runs.items():
        metric = 'mb_per_s' if config == 'zstd' else 'tokens_per_s'
        summary[config] = {'metric': metric, 'runs': [r[metric] for r in results],
                           **min_median_max([r[metric] for r in results])}
    ratios = []
    for w in args.workers:
        per_rep = [c['tokens_per_s'] / t['tokens_per_s'] for c, t in zip(runs[f'convert@{w}w'], runs[f'tokenizer@{w}w'])]
        s = min_median_max(per_rep)
        ratios.append({'name': f'convert / bare tokenizer, {w} worker(s)', 'a': f'convert@{w}w',
                       'b': f'tokenizer@{w}w', 'runs': per_rep, **s, 'target': TARGET, 'met': s['median'] >= TARGET})
    if len(args.workers) > 1:
        w0, w1 = args.workers[0], args.workers[-1]
        for kind in ('convert', 'tokenizer'):
            per_rep = [b['tokens_per_s'] / a['tokens_per_s'] for a, b in zip(runs[f'{kind}@{w0}w'], runs[f'{kind}@{w1}w'])]
            ratios.append({'name': f'{kind}: {w1} workers / {w0} worker(s) (scaling)', 'a': f'{kind}@{w1}w',
                           'b': f'{kind}@{w0}w', 'runs': per_rep, **min_median_max(per_rep)})
    decoded = runs['zstd'][0]['bytes']
    return {'settings': {'size': args.size, 'vocab_size': args.vocab_size, 'seq_len': args.seq_len,
                         'workers': args.workers, 'reps': args.reps, 'files': len(files),
                         'documents': sum(len(t) for t in texts), 'compressed_bytes': compressed,
                         'decoded_bytes': decoded, 'tokens': tokens,
                         'samples': runs[f'convert@{args.workers[0]}w'][0]['samples']},
            'configs': summary, 'ratios': ratios}


def render_section(results: dict[str, Any]) -> str:
    m, v, s = results['machine'], results['versions'], results['settings']
    tok_1w = results['configs'][f'tokenizer@{s["workers"][0]}w']['median']
    zstd = results['configs']['zstd']['median']
    bytes_per_token = s['decoded_bytes'] / max(s['tokens'], 1)
    lines = [
        BEGIN_MARK,
        '## Convert throughput',
        '',
        f'_Generated by `benchmarks/convert_throughput.py{" --quick" if results["quick"] else ""}` on '
        f'{results["date"]} from `results/convert.json`; do not edit by hand._',
        '',
        f'- **Machine:** {describe_machine(m)}, Python {m["python"]}; shared with other jobs.',
        '- **Libraries:** ' + ', '.join(f'{k} {v[k]}' for k in sorted(v)) + '.',
        f'- **Data:** the embedded corpus ({s["size"]}): {s["files"]} `.jsonl.zst` files, {s["documents"]:,} documents, '
        f'{s["compressed_bytes"] / 1e6:.1f} MB compressed, {s["decoded_bytes"] / 1e6:.1f} MB decoded, '
        f'{s["tokens"]:,} tokens (BPE vocabulary {s["vocab_size"]}), packed into {s["samples"]:,} samples of '
        f'{s["seq_len"]}. **{s["reps"]} repetitions**, order rotated each repetition; min/median/max over them.',
        '- Each process tokenizes on one thread (`TOKENIZERS_PARALLELISM=false`, as convert\'s workers); the bare '
        'tokenizer encodes the already-decoded documents in batches of 256, as convert does.',
        '',
        '| config | what | rate median (min–max) |',
        '|---|---|---:|',
    ]
    for name, c in results['configs'].items():
        if name == 'zstd':
            what, fmt = 'zstd stream decode, 1 process', lambda x: f'{x:,.1f} MB/s'
        elif name.startswith('tokenizer'):
            what, fmt = f'bare tokenizer, {name.split("@")[1][:-1]} process(es)', lambda x: f'{x:,.0f} tok/s'
        else:
            what, fmt = f'`dwm-stream convert`, {name.split("@")[1][:-1]} worker(s)', lambda x: f'{x:,.0f} tok/s'
        lines.append(f'| `{name}` | {what} | {fmt(c["median"])} ({fmt(c["min"])}–{fmt(c["max"])}) |')
    lines += ['', '| comparison | median | min | max | target | met |', '|---|---:|---:|---:|---:|:---:|']
    for r in results['ratios']:
        target = f'>= {r["target"]}' if 'target' in r else ''
        met = ('yes' if r['met'] else '**no**') if 'target' in r else ''
        lines.append(f'| {r["name"]} | {r["median"]:.2f} | {r["min"]:.2f} | {r["max"]:.2f} | {target} | {met} |')
    lines += ['', f'zstd decodes {zstd:,.0f} MB/s, about {zstd * 1e6 / bytes_per_token:,.0f} tokens/s worth of '
                  f'JSON lines ({bytes_per_token:.1f} decoded bytes per token), against {tok_1w:,.0f} tokens/s for '
                  'the tokenizer on one core: decoding is not the bound, tokenizing is.']
    missed = [r for r in results['ratios'] if 'target' in r and not r['met']]
    if missed:
        lines += [''] + [f'- Target missed: {r["name"]} is {r["median"]:.2f} against >= {r["target"]}.'
                         for r in missed]
    if results['quick']:
        lines += ['', '- These are `--quick` figures (a small corpus, 1 repetition): start-up costs weigh more.']
    lines += ['', END_MARK]
    return '\n'.join(lines)


replace_section, read_section = section_io('convert', BEGIN_MARK, END_MARK)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m benchmarks.convert_throughput',
                                     description=__doc__.splitlines()[0],
                                     parents=[output_options('CI size: a 1MB corpus, 1 repetition')])
    parser.add_argument('--size', default=None, help='corpus size (default: 8MB; --quick: 1MB)')
    parser.add_argument('--vocab-size', type=int, default=8192, help='tokenizer vocabulary (default: 8192)')
    parser.add_argument('--seq-len', type=int, default=2048, help='tokens per sample (default: 2048)')
    parser.add_argument('--workers', type=int, nargs='+', default=[1, 2], help='worker counts (default: 1 2)')
    parser.add_argument('--reps', type=int, default=None, help='repetitions (default: 3; --quick: 1)')
    parser.add_argument('--work-dir', default=None, help='keep the corpus and outputs here (default: a temp dir)')
    args = parser.parse_args(argv)
    args.size = args.size or ('1MB' if args.quick else '8MB')
    args.reps = args.reps or (1 if args.quick else 3)
    if args.quick and args.vocab_size == 8192:
        args.vocab_size = 2048
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    work = args.work_dir or tempfile.mkdtemp(prefix='dwm-bench-convert-')
    try:
        bench = run_benchmark(args, work)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    results = {'benchmark': 'convert', 'quick': bool(args.quick), 'date': utc_now(), 'machine': machine_info(),
               'versions': library_versions(('tokenizers', 'zstandard', 'mosaicml-streaming')), **bench,
               'seconds': time.perf_counter() - started}
    json_path = os.path.join(args.out, 'convert.json')
    write_json(json_path, results)
    results_md = results_md_path(args)
    replace_section(results_md, render_section(results))
    _say(f'wrote {json_path} and the convert section of {results_md} ({results["seconds"]:.0f}s)')
    for r in results['ratios']:
        _say(f'{r["name"]}: {r["median"]:.2f}' + (f' (target >= {r["target"]}: {"met" if r["met"] else "MISSED"})'
                                                  if 'target' in r else ''))
    return 0


if __name__ == '__main__':
    sys.exit(main())
