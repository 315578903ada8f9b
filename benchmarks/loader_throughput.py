"""Loader throughput: ``DWMDataset`` against the loaders users know, on the same samples, in one run.

Usage::

    python -m benchmarks.loader_throughput [--quick] [--out benchmarks/results]
    dwm-stream bench loader [--quick]

It builds its own corpora in a temporary directory, all holding the very same samples
(seeded random token ids, uint16, ``seq_len`` 2048 by default):

* **MDS**, exactly as ``dwm-stream convert`` writes it (zstd, xxh64, ``dwm.json``, ``uids.npy``),
  read by ``DWMDataset`` and by a plain ``streaming.StreamingDataset`` (mosaicml-streaming's own
  read path; its samples are mapped to the same sample dict);
* **WebDataset** tar shards (``.tokens.npy`` + ``.json`` members), read with ``webdataset`` and its
  default decoder, shard-shuffled with a 1,000-sample shuffle buffer;
* a flat **memmap** ``.npy`` read in a shuffled order: the contiguous-read limit;
* a **do-nothing** dataset that yields preallocated samples of the same shape and dtype: with
  workers, the ceiling of the DataLoader itself (collation and inter-process transfer).

Every loader yields the same sample dict, and goes through the same ``DataLoader`` and
``collate_samples``. Directly iterated (no DataLoader), every sample's token ids are copied into a
preallocated buffer, so that a loader that returns views pays for touching the bytes.

Measured: samples/s and tokens/s, steady state (from the first sample delivered, or with
DataLoader workers from the batch after every worker has delivered two, to the last; the time to
the first one is recorded separately as ``ttfb_s``). Within a group, configs run
one after the other in a rotating order, ``reps`` times, and each ratio is taken per repetition
between the two configs of that repetition, then summarised as min/median/max.

Writes ``OUT/loader.json`` and ``OUT/loader.png``, and regenerates the loader section of
``RESULTS.md`` (beside ``OUT``; ``--results-md`` to change), between ``<!-- loader:begin -->`` and
``<!-- loader:end -->``, from the JSON only.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
import webdataset as wds
from matplotlib.figure import Figure
from streaming import MDSWriter, StreamingDataset
from streaming.base.compression import decompress
from streaming.base.format import reader_from_json
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from benchmarks.common import (describe_machine, library_versions, machine_info, min_median_max, output_options,
                               section_io, results_md_path,
                               utc_now, write_json)
from dwm_stream.data.dataset import DWMDataset, release_shared_memory
from dwm_stream.data.loader import collate_samples
from dwm_stream.data.selection import write_selection
from dwm_stream.demo.loopback_s3 import LoopbackS3, upload_dir
from dwm_stream.format.shards import META_BASENAME, UIDS_BASENAME, CorpusMeta
from dwm_stream.testing.synthetic import write_synthetic_corpus

BEGIN_MARK = '<!-- loader:begin -->'
END_MARK = '<!-- loader:end -->'
VOCAB_SIZE = 50257  # GPT-2's: uint16 token ids
BATCH_SIZE = 32
MIN_SECONDS = 0.5  # a directly iterated pass repeats epochs until this long (0 with --quick)
SCORE = 'quality'

LOADER_LABELS = {
    'dwm': 'DWMDataset',
    'streaming': 'StreamingDataset (plain)',
    'webdataset': 'WebDataset',
    'memmap': 'numpy memmap, shuffled',
    'nothing': 'do-nothing dataset',
    'overlay': 'DWMDataset + 50% selection overlay',
    'subset': 'DWMDataset over the materialised 50% subset',
    'nothing_per_field': 'do-nothing, one storage per field',
    'dwm_per_field': 'DWMDataset, one storage per field',
}


# ---------------------------------------------------------------------------- the datasets
def _sample_from_streaming(s: dict[str, Any]) -> dict[str, Any]:
    return {'input_ids': s['tokens'], 'num_tokens': int(s['num_tokens']), 'uid': int(s['uid']),
            'domain': int(s['domain']), 'prior_weight': 1.0,
            'scores': np.array([s['score_' + SCORE]], np.float32)}


class PlainStreamingDataset(StreamingDataset):
    """mosaicml-streaming's own read path; each sample mapped to the DWM sample dict."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._owner_pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop('_owner_pid', None)  # copies in DataLoader workers do not release it
        return state

    def __del__(self, _getpid=os.getpid, _finalizing=sys.is_finalizing, _release=release_shared_memory) -> None:
        # The bench builds a dataset per timed run: without this, streaming holds each one's shared
        # memory (two descriptors per block) until exit, as DWMDataset no longer does.
        super().__del__()
        if not _finalizing() and getattr(self, '_owner_pid', None) == _getpid():
            _release(self)

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        return _sample_from_streaming(super().get_item(sample_id, retry))


def _sample_from_webdataset(s: dict[str, Any]) -> dict[str, Any]:
    meta = s['json']
    return {'input_ids': s['tokens.npy'], 'num_tokens': meta['num_tokens'], 'uid': meta['uid'],
            'domain': meta['domain'], 'prior_weight': 1.0,
            'scores': np.array([meta[SCORE]], np.float32)}


def _webdataset(directory: str, seed: int):
    urls = sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith('.tar'))
    return (wds.WebDataset(urls, shardshuffle=len(urls), seed=seed, empty_check=False)
            .shuffle(1000, rng=random.Random(seed))
            .decode()
            .map(_sample_from_webdataset))


def _worker_share() -> tuple[int, int]:
    """``(this DataLoader worker's id, the number of workers)``; ``(0, 1)`` outside a worker."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class MemmapDataset(IterableDataset):
    """The same samples from a flat ``[n, seq_len]`` memmap, in a shuffled order."""

    def __init__(self, directory: str, seed: int) -> None:
        self.directory, self.seed = directory, seed

    def __iter__(self):
        worker, workers = _worker_share()
        tokens = np.load(os.path.join(self.directory, 'tokens.npy'), mmap_mode='r')
        meta = np.load(os.path.join(self.directory, 'meta.npz'))
        num_tokens, uid, domain = (meta[k].tolist() for k in ('num_tokens', 'uid', 'domain'))
        scores = meta['scores']
        order = np.random.default_rng(self.seed).permutation(len(tokens))[worker::workers]
        for i in order.tolist():
            yield {'input_ids': tokens[i], 'num_tokens': num_tokens[i], 'uid': uid[i],
                   'domain': domain[i], 'prior_weight': 1.0, 'scores': scores[i]}


class NothingDataset(IterableDataset):
    """Preallocated samples of the right shape and dtype: the DataLoader's own ceiling."""

    def __init__(self, num_samples: int, seq_len: int) -> None:
        self.num_samples, self.seq_len = num_samples, seq_len

    def __iter__(self):
        worker, workers = _worker_share()
        pool = [{'input_ids': np.full(self.seq_len, j, np.uint16), 'num_tokens': self.seq_len,
                 'uid': j, 'domain': j % 3, 'prior_weight': 1.0,
                 'scores': np.zeros(1, np.float32)} for j in range(16)]
        for j in range(worker, self.num_samples, workers):
            yield pool[j & 15]


def collate_per_field(samples: list[dict[str, Any]]):
    """The collation before this benchmark: one tensor (one storage) per field. The baseline that
    ``dwm_stream.data.loader.collate_samples`` (one storage per batch) is measured against, so kept as it was."""
    batch = {
        'input_ids': torch.from_numpy(np.stack([s['input_ids'] for s in samples])),
        'num_tokens': torch.tensor([s['num_tokens'] for s in samples], dtype=torch.int32),
        'uid': torch.tensor([s['uid'] for s in samples], dtype=torch.int64),
        'domain': torch.tensor([s['domain'] for s in samples], dtype=torch.int64),
        'prior_weight': torch.tensor([s['prior_weight'] for s in samples], dtype=torch.float32),
    }
    if 'scores' in samples[0]:
        batch['scores'] = torch.from_numpy(np.stack([s['scores'] for s in samples]))
    return batch


# ---------------------------------------------------------------------------- building corpora
def _shard_bytes(num_samples: int, seq_len: int) -> int:
    """At least 8 shards (so that 2 or 4 workers each get several), at most convert's 64 MiB."""
    total = num_samples * (2 * seq_len + 22)
    return int(max(1 << 18, min(1 << 26, total // 8)))


def build_mds(directory: str, num_samples: int, seq_len: int, seed: int) -> str:
    write_synthetic_corpus(directory, num_samples, seq_len=seq_len, vocab_size=VOCAB_SIZE, seed=seed,
                           size_limit=_shard_bytes(num_samples, seq_len), score_names=(SCORE,))
    return directory


def _raw_samples(mds_dir: str) -> Iterable[dict[str, Any]]:
    """Every sample of an MDS corpus in shard order, as mosaicml-streaming decodes it."""
    with open(os.path.join(mds_dir, 'index.json')) as f:
        index = json.load(f)
    for info in index['shards']:
        raw, zipped = info['raw_data']['basename'], (info.get('zip_data') or {}).get('basename')
        if not os.path.exists(os.path.join(mds_dir, raw)) and zipped:
            with open(os.path.join(mds_dir, zipped), 'rb') as f:
                data = decompress(info['compression'], f.read())
            with open(os.path.join(mds_dir, raw), 'wb') as f:
                f.write(data)
        shard = reader_from_json(mds_dir, None, info)
        shard.validate(True)
        for i in range(shard.samples):
            yield shard.get_item(i)


def build_webdataset(mds_dir: str, directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    samples = _raw_samples(mds_dir)
    first = next(samples)
    seq_len = len(first['tokens'])
    num_samples = int(np.load(os.path.join(mds_dir, 'uids.npy')).shape[0])
    maxcount = max(1, _shard_bytes(num_samples, seq_len) // (2 * seq_len + 22))
    with wds.ShardWriter(os.path.join(directory, 'shard-%06d.tar'), maxcount=maxcount, verbose=0) as sink:
        for i, s in enumerate(itertools.chain([first], samples)):
            sink.write({'__key__': f'{i:09d}', 'tokens.npy': np.asarray(s['tokens']),
                        'json': {'num_tokens': int(s['num_tokens']), 'uid': int(s['uid']),
                                 'domain': int(s['domain']), SCORE: float(s['score_' + SCORE])}})
    return directory


def build_memmap(mds_dir: str, directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    rows = list(_raw_samples(mds_dir))
    tokens = np.lib.format.open_memmap(os.path.join(directory, 'tokens.npy'), 'w+', np.uint16,
                                       (len(rows), len(rows[0]['tokens'])))
    for i, s in enumerate(rows):
        tokens[i] = s['tokens']
    tokens.flush()
    del tokens
    np.savez(os.path.join(directory, 'meta.npz'),
             num_tokens=np.array([s['num_tokens'] for s in rows], np.int64),
             uid=np.array([s['uid'] for s in rows], np.int64),
             domain=np.array([s['domain'] for s in rows], np.int64),
             scores=np.array([[s['score_' + SCORE]] for s in rows], np.float32))
    return directory


def build_selection(mds_dir: str, selection_path: str, subset_dir: str, seed: int) -> int:
    """A 50% selection file over ``mds_dir``, and the same samples written as their own corpus."""
    uids = np.load(os.path.join(mds_dir, UIDS_BASENAME))
    chosen = np.random.default_rng(seed).permutation(uids)[:len(uids) // 2]
    write_selection(selection_path, chosen, info={'selector': 'loader benchmark: random half'})
    keep = set(chosen.tolist())
    with open(os.path.join(mds_dir, 'index.json')) as f:
        shard0 = json.load(f)['shards'][0]
    columns = dict(zip(shard0['column_names'], shard0['column_encodings']))
    with open(os.path.join(mds_dir, META_BASENAME)) as f:
        meta = CorpusMeta.from_json(f.read())
    seq_len = meta.seq_len
    kept_uids = []
    with MDSWriter(out=subset_dir, columns=columns, compression=shard0['zip_data'] and 'zstd',
                   hashes=['xxh64'], size_limit=_shard_bytes(len(chosen), seq_len)) as writer:
        for s in _raw_samples(mds_dir):
            if int(s['uid']) in keep:
                writer.write(s)
                kept_uids.append(int(s['uid']))
    np.save(os.path.join(subset_dir, UIDS_BASENAME), np.array(kept_uids, np.int64), allow_pickle=False)
    meta.num_samples = len(kept_uids)
    with open(os.path.join(subset_dir, META_BASENAME), 'w') as f:
        f.write(meta.to_json())
    return len(kept_uids)


def _compressed_or_sidecar(name: str) -> bool:
    """Uploaded to S3: the zstd shards and the sidecars, not the raw shards the warm-up decompressed."""
    return not name.endswith('.mds')


# ---------------------------------------------------------------------------- measuring
def _time_pass(iterable: Iterable, count: Callable[[Any], int], warmup: int = 1,
               min_seconds: float = 0.0) -> dict[str, float]:
    """Steady-state rate of one pass: from the ``warmup``-th item delivered to the last.

    With DataLoader workers, ``warmup`` is two batches per worker, so that every worker has
    started (forked, computed its partition, opened its first shard) before the clock starts.
    ``ttfb_s`` is the time to the first item. Whole epochs are repeated (each ``iter()`` is the
    next epoch) until ``min_seconds`` have passed, so that a fast loader's measurement is not a
    few milliseconds that one scheduler hiccup on a shared machine can double.
    """
    start = time.perf_counter()
    first_at = warm_at = None
    total = warm = items = 0
    while True:
        for item in iterable:
            total += count(item)
            items += 1
            if first_at is None:
                first_at = time.perf_counter()
            if items == warmup:
                warm_at, warm = time.perf_counter(), total
        if warm_at is None or time.perf_counter() - warm_at >= min_seconds:
            break
    end = time.perf_counter()
    if warm_at is None or total <= warm:
        raise RuntimeError(f'a benchmark pass delivered only {items} items (warm-up {warmup}); raise --samples.')
    return {'samples': total, 'seconds': end - warm_at, 'ttfb_s': first_at - start,
            'samples_per_s': (total - warm) / (end - warm_at)}


class Config:
    """One measured loader configuration: ``make()`` builds a fresh dataset for each pass."""

    def __init__(self, name: str, make: Callable[[], Any], workers: Optional[int], seq_len: int,
                 collate: Optional[Callable] = None, before: Optional[Callable[[], None]] = None,
                 **extra: Any) -> None:
        self.name, self.make, self.workers, self.seq_len = name, make, workers, seq_len
        self.collate, self.before, self.extra = collate, before, extra
        # A cold pass is exactly one epoch: a second one would read the cache it just filled.
        self.min_seconds = 0.0 if extra.get('cache') == 'cold' else MIN_SECONDS

    def run(self) -> dict[str, float]:
        if self.before is not None:
            self.before()
        for attempt in range(5):
            try:
                dataset = self.make()
                break
            except FileExistsError:  # streaming's /dev/shm prefix raced with another process's
                if attempt == 4:
                    raise
                time.sleep(0.2)
        try:
            if self.workers is None:  # direct iteration, one process
                buf = np.empty(self.seq_len, np.uint16)

                def touch(sample: dict[str, Any]) -> int:
                    buf[:] = sample['input_ids']
                    return 1

                return _time_pass(dataset, touch, min_seconds=self.min_seconds)
            loader = DataLoader(dataset, batch_size=BATCH_SIZE, num_workers=self.workers,
                                collate_fn=self.collate or collate_samples, drop_last=False)
            return _time_pass(loader, lambda batch: len(batch['uid']), warmup=max(1, 2 * self.workers))
        finally:
            del dataset
            gc.collect()


def run_group(title: str, description: str, units: list, reps: int,
              log: Callable[[str], None]) -> dict[str, Any]:
    """Run every config ``reps`` times, rotating the order each repetition (A/B alternating).

    ``units`` holds configs, or lists of configs that must run back to back in their order (a
    cold pass, then the warm pass over the cache it filled).
    """
    units = [u if isinstance(u, list) else [u] for u in units]
    configs = [c for u in units for c in u]
    runs: dict[str, list[dict[str, float]]] = {c.name: [] for c in configs}
    for rep in range(reps):
        order = units[rep % len(units):] + units[:rep % len(units)]
        if rep % 2:
            order = order[::-1]
        for config in (c for u in order for c in u):
            runs[config.name].append(config.run())
        log(f'  {title} rep {rep + 1}/{reps}: ' + ', '.join(
            f'{c.name} {runs[c.name][-1]["samples_per_s"]:,.0f}/s' for c in configs))
    out: dict[str, Any] = {'description': description, 'configs': {}}
    for c in configs:
        rates = [r['samples_per_s'] for r in runs[c.name]]
        out['configs'][c.name] = {
            'loader': LOADER_LABELS.get(c.name.split('@')[0], c.name),
            'workers': c.workers if c.workers is not None else 'direct',
            'seq_len': c.seq_len,
            'samples': int(statistics.median(r['samples'] for r in runs[c.name])),
            **c.extra,
            'samples_per_s': min_median_max(rates),
            'tokens_per_s': min_median_max([r * c.seq_len for r in rates]),
            'ttfb_s': min_median_max([r['ttfb_s'] for r in runs[c.name]]),
            'runs_samples_per_s': rates,
        }
    return out


def ratio(groups: dict[str, Any], name: str, group: str, a: str, b: str, *, cost: bool = False,
          target: Optional[float] = None) -> dict[str, Any]:
    """Per-repetition ratio of config ``a`` to ``b``: of rates, or of costs per sample (``cost``)."""
    ra = groups[group]['configs'][a]['runs_samples_per_s']
    rb = groups[group]['configs'][b]['runs_samples_per_s']
    values = [(y / x) if cost else (x / y) for x, y in zip(ra, rb)]
    out = {'name': name, 'group': group, 'a': a, 'b': b,
           'metric': 'cost per delivered sample' if cost else 'samples/s', **min_median_max(values),
           'runs': values}
    if target is not None:
        out['target'] = target
        out['target_kind'] = '<=' if cost else '>='
        out['met'] = bool(out['median'] <= target) if cost else bool(out['median'] >= target)
    return out


def _notes(ratios: list[dict[str, Any]]) -> list[str]:
    """Targets missed, stated with their numbers (the analysis is in the text outside the markers)."""
    notes = []
    for r in ratios:
        if 'target' in r and not r['met']:
            notes.append(f'Target missed: {r["name"]} is {_fmt_ratio(r["median"])} (median; '
                         f'{_fmt_ratio(r["min"])}–{_fmt_ratio(r["max"])}) against {r["target_kind"]} '
                         f'{r["target"]:g}.')
    return notes


# ---------------------------------------------------------------------------- rendering
def _fmt_rate(x: float) -> str:
    return f'{x:,.0f}'


def _fmt_tokens(x: float) -> str:
    return f'{x / 1e6:,.1f}M'


def _fmt_ratio(x: float) -> str:
    return f'{x:.2f}'


def render_section(results: dict[str, Any], image: Optional[str] = None) -> str:
    """The loader section of RESULTS.md, markers included, from the JSON alone."""
    m, v, s = results['machine'], results['versions'], results['settings']
    lines = [BEGIN_MARK, '## Loader throughput', '',
             f'_Generated by `benchmarks/loader_throughput.py{" --quick" if results["quick"] else ""}` '
             f'on {results["created"]} from `{results["json"]}`; do not edit by hand._', '',
             f'- **Machine:** {describe_machine(m)}, Python {m["python"]}.',
             '- **Libraries:** ' + ', '.join(f'{k} {val}' for k, val in v.items()) + '.',
             f'- **Samples:** {s["samples"]:,} samples of {s["seq_len"]} uint16 tokens '
             f'(vocabulary {s["vocab_size"]:,}) in {s["mds_shards"]} MDS shards (zstd) / '
             f'{s["wds_shards"]} tar shards; batch size {s["batch_size"]}; '
             f'**{s["reps"]} repetitions** per config, order rotated each repetition; '
             f'min/median/max over repetitions.',
             '- **Rates** are steady state: from the first sample (direct) or from the batch after every worker '
             'has delivered two (DataLoader), to the last; `ttfb` is the time to the first. Directly iterated '
             f'passes (except cold-cache ones: one epoch) repeat whole epochs until they last '
             f'{results["settings"]["min_seconds"]:g} s. '
             'Directly iterated, each sample\'s tokens are copied into a buffer.', '']
    lines += ['### Comparisons (ratios measured in the same run)', '',
              '| comparison | metric | median | min | max | target | met |',
              '|---|---|---:|---:|---:|---:|:---:|']
    for r in results['ratios']:
        target = f'{r["target_kind"]} {r["target"]:g}' if 'target' in r else ''
        met = ('yes' if r['met'] else '**no**') if 'target' in r else ''
        lines.append(f'| {r["name"]} | {r["metric"]} | {_fmt_ratio(r["median"])} | {_fmt_ratio(r["min"])} | '
                     f'{_fmt_ratio(r["max"])} | {target} | {met} |')
    lines.append('')
    for key, group in results['groups'].items():
        lines += [f'### {key}: {group["description"]}', '',
                  '| config | loader | workers | seq_len | samples | samples/s median (min–max) | '
                  'tokens/s median | ttfb median (s) |',
                  '|---|---|---:|---:|---:|---:|---:|---:|']
        for name, c in group['configs'].items():
            sps = c['samples_per_s']
            lines.append(f'| `{name}` | {c["loader"]} | {c["workers"]} | {c["seq_len"]} | {c["samples"]:,} | '
                         f'{_fmt_rate(sps["median"])} ({_fmt_rate(sps["min"])}–{_fmt_rate(sps["max"])}) | '
                         f'{_fmt_tokens(c["tokens_per_s"]["median"])} | {c["ttfb_s"]["median"]:.3f} |')
        lines.append('')
    if results.get('notes'):
        lines += ['### Notes', ''] + [f'- {n}' for n in results['notes']] + ['']
    if image:
        lines += [f'![loader throughput]({image})', '']
    lines.append(END_MARK)
    return '\n'.join(lines)


replace_section, read_section = section_io('loader', BEGIN_MARK, END_MARK)


def plot(results: dict[str, Any], path: str) -> None:
    groups = results['groups']
    fig = Figure(figsize=(13, 9))  # no pyplot: no GUI backend, no global figure state
    axes = fig.subplots(2, 2)

    def bars(ax, group: str, title: str) -> None:
        configs = groups[group]['configs']
        names = list(configs)
        med = [configs[n]['samples_per_s']['median'] for n in names]
        lo = [med[i] - configs[n]['samples_per_s']['min'] for i, n in enumerate(names)]
        hi = [configs[n]['samples_per_s']['max'] - med[i] for i, n in enumerate(names)]
        ax.bar(range(len(names)), med, yerr=[lo, hi], capsize=3,
               color=['tab:red' if n.startswith(('dwm', 'overlay')) else 'tab:gray' for n in names])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=35, ha='right', fontsize=8)
        ax.set_yscale('log')
        ax.set_ylabel('samples/s (median, min–max)')
        ax.set_title(title, fontsize=10)

    bars(axes[0, 0], 'direct', 'direct iteration, local (warm)')
    bars(axes[0, 1], 'dataloader', 'DataLoader, 0 and 2 workers, local (warm)')
    ax = axes[1, 0]
    ws = groups['workers']['configs']
    for kind, style in (('dwm', 'o-'), ('nothing', 's--')):
        pts = sorted((c['workers'], c['samples_per_s']['median']) for n, c in ws.items() if n.startswith(kind + '@'))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=LOADER_LABELS[kind])
    ax.set_xlabel('DataLoader workers')
    ax.set_ylabel('samples/s (median)')
    ax.set_title('worker scaling', fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    sl = groups['seq_len']['configs']
    for kind, style in (('dwm', 'o-'), ('streaming', 's--')):
        pts = sorted((c['seq_len'], c['tokens_per_s']['median']) for n, c in sl.items() if n.startswith(kind + '@'))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=LOADER_LABELS[kind])
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xlabel('seq_len')
    ax.set_ylabel('tokens/s (median), direct iteration')
    ax.set_title('seq_len scaling', fontsize=10)
    ax.legend(fontsize=8)
    m = results['machine']
    fig.suptitle(f'Loader throughput ({m["nproc"]} CPUs, {m["ram_gb"]:.0f} GB; '
                 f'{results["settings"]["reps"]} reps)', fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------- main
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    quick = 'small corpora and 1 repetition (CI, < ~90 s); numbers are indicative only'
    parser = argparse.ArgumentParser(prog='python -m benchmarks.loader_throughput',
                                     description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[output_options(quick)])
    parser.add_argument('--seq-len', type=int, nargs='+', default=None,
                        help='seq_len scaling points; the first 2048 (or the first given) is the main '
                             'corpus (default: 512 2048 8192)')
    parser.add_argument('--workers', type=int, nargs='+', default=None,
                        help='worker-scaling points (default: 1 2 4)')
    parser.add_argument('--samples', type=int, default=None,
                        help='samples in the main corpus (default: 16384; 1024 with --quick)')
    parser.add_argument('--reps', type=int, default=None, help='repetitions (default: 5; 1 with --quick)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--no-s3', action='store_true', help='skip the loopback-S3 group')
    parser.add_argument('--workdir', default=None, help='build corpora here and keep them (default: a temp dir)')
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    samples = args.samples or (1024 if args.quick else 16384)
    reps = args.reps or (1 if args.quick else 5)
    seq_lens = args.seq_len or [512, 2048, 8192]
    main_seq = 2048 if 2048 in seq_lens else seq_lens[0]
    worker_counts = args.workers or [1, 2, 4]
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    results_md = results_md_path(args)
    work = args.workdir or tempfile.mkdtemp(prefix='dwm-loader-bench-')
    os.makedirs(work, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f'[{time.perf_counter() - t_start:6.1f}s] {msg}', flush=True)

    # Every pass makes its own StreamingDataset, then drops it; quiet streaming's notices.
    warnings.filterwarnings('ignore', module='streaming')
    warnings.filterwarnings('ignore', module='webdataset')
    warnings.filterwarnings('ignore', message='This DataLoader will create')  # 4 workers on 2 CPUs: on purpose

    seed = args.seed
    global MIN_SECONDS
    MIN_SECONDS = 0.0 if args.quick else 0.5
    try:
        log(f'building corpora in {work}: {samples} samples x {main_seq} tokens')
        mds = build_mds(os.path.join(work, f'mds-{main_seq}'), samples, main_seq, seed)
        wds_dir = build_webdataset(mds, os.path.join(work, 'wds'))
        mm_dir = build_memmap(mds, os.path.join(work, 'memmap'))
        selection = os.path.join(work, 'half.parquet')
        subset = os.path.join(work, 'subset')
        num_selected = build_selection(mds, selection, subset, seed)
        mds_shards = sum(name.endswith('.mds.zstd') for name in os.listdir(mds))
        wds_shards = sum(name.endswith('.tar') for name in os.listdir(wds_dir))

        def dwm(local: str, remote: Optional[str] = None, **kw: Any) -> Callable[[], Any]:
            return lambda: DWMDataset(local=local, remote=remote, shuffle=True, shuffle_seed=seed,
                                      batch_size=BATCH_SIZE, **kw)

        def plain(local: str, remote: Optional[str] = None) -> Callable[[], Any]:
            return lambda: PlainStreamingDataset(local=local, remote=remote, shuffle=True, shuffle_seed=seed,
                                                 batch_size=BATCH_SIZE)

        # Warm the local caches: decompress the MDS shards once, read every file once.
        for make in (dwm(mds), dwm(subset), dwm(mds, selection=selection)):
            Config('warm', make, None, main_seq).run()
        for d in (wds_dir, mm_dir):
            for name in os.listdir(d):
                with open(os.path.join(d, name), 'rb') as f:
                    while f.read(1 << 22):
                        pass

        def loaders(workers: Optional[int]) -> list[Config]:
            suffix = '' if workers is None else f'@{workers}w'
            return [Config('dwm' + suffix, dwm(mds), workers, main_seq),
                    Config('streaming' + suffix, plain(mds), workers, main_seq),
                    Config('webdataset' + suffix, lambda: _webdataset(wds_dir, seed), workers, main_seq),
                    Config('memmap' + suffix, lambda: MemmapDataset(mm_dir, seed), workers, main_seq),
                    Config('nothing' + suffix, lambda: NothingDataset(samples, main_seq), workers, main_seq)]

        groups: dict[str, Any] = {}
        log('direct iteration (local, warm)')
        groups['direct'] = run_group('direct', 'direct iteration in one process, local, warm cache',
                                     loaders(None), reps, log)
        log('DataLoader, 0 and 2 workers (local, warm)')
        groups['dataloader'] = run_group(
            'dataloader', 'through DataLoader + collate_samples (batch 32), 0 and 2 workers, local, warm cache',
            loaders(0) + loaders(2), reps, log)

        log('collation: one storage per batch vs one per field (2 workers)')
        groups['collate'] = run_group(
            'collate', 'DataLoader with 2 workers: collate_samples (one shared storage per batch) against '
            'one storage per field',
            [Config('nothing@2w', lambda: NothingDataset(samples, main_seq), 2, main_seq),
             Config('nothing_per_field@2w', lambda: NothingDataset(samples, main_seq), 2, main_seq,
                    collate=collate_per_field),
             Config('dwm@2w', dwm(mds), 2, main_seq),
             Config('dwm_per_field@2w', dwm(mds), 2, main_seq, collate=collate_per_field)], reps, log)

        log('selection overlay vs materialised subset')
        groups['selection'] = run_group(
            'selection', f'50% selection overlay ({num_selected:,} of {samples:,} samples) against the '
            'same samples materialised as their own corpus, local, warm cache',
            [Config('overlay', dwm(mds, selection=selection), None, main_seq),
             Config('subset', dwm(subset), None, main_seq),
             Config('overlay@2w', dwm(mds, selection=selection), 2, main_seq),
             Config('subset@2w', dwm(subset), 2, main_seq)], reps, log)

        log('worker scaling')
        groups['workers'] = run_group(
            'workers', 'DWMDataset through the DataLoader against the do-nothing ceiling, by worker count',
            [cfg for w in worker_counts for cfg in (
                Config(f'dwm@{w}w', dwm(mds), w, main_seq),
                Config(f'nothing@{w}w', lambda: NothingDataset(samples, main_seq), w, main_seq))], reps, log)

        log('seq_len scaling')
        tokens_budget = samples * main_seq
        sl_configs = []
        for seq_len in seq_lens:
            if seq_len == main_seq:
                corpus = mds
            else:
                corpus = build_mds(os.path.join(work, f'mds-{seq_len}'), max(64, tokens_budget // seq_len),
                                   seq_len, seed)
                Config('warm', dwm(corpus), None, seq_len).run()
            sl_configs += [Config(f'dwm@{seq_len}', dwm(corpus), None, seq_len),
                           Config(f'streaming@{seq_len}', plain(corpus), None, seq_len)]
        groups['seq_len'] = run_group(
            'seq_len', 'direct iteration by seq_len, at the same token budget, local, warm cache',
            sl_configs, reps, log)

        if not args.no_s3:
            log('loopback S3, cold and warm cache')
            with LoopbackS3(buckets=['bench']) as s3:
                client = s3.client()
                upload_dir(client, mds, 'bench', 'mds', include=_compressed_or_sidecar)
                upload_dir(client, subset, 'bench', 'subset', include=_compressed_or_sidecar)
                remote, remote_subset = 's3://bench/mds', 's3://bench/subset'
                caches: dict[str, str] = {}

                def cold(key: str) -> Callable[[], None]:
                    def fresh() -> None:
                        if key in caches:
                            shutil.rmtree(caches[key], ignore_errors=True)
                        caches[key] = tempfile.mkdtemp(prefix=f'cache-{key}-', dir=work)
                    return fresh

                def lazy(factory: Callable[[str], Callable[[], Any]], key: str) -> Callable[[], Any]:
                    return lambda: factory(caches[key])()

                s3_configs = []
                for workers in (None, 2):
                    w = 'direct' if workers is None else f'{workers}w'
                    for kind, factory in (
                            ('dwm', lambda local: dwm(local, remote)),
                            ('streaming', lambda local: plain(local, remote)),
                            ('overlay', lambda local: dwm(local, remote, selection=selection)),
                            ('subset', lambda local: dwm(local, remote_subset))):
                        if kind in ('overlay', 'subset') and workers is not None:
                            continue
                        key = f'{kind}-{w}'
                        # cold then warm, back to back: the warm pass reuses the cold pass's cache
                        s3_configs.append([
                            Config(f'{kind}@{w}:cold', lazy(factory, key), workers, main_seq,
                                   before=cold(key), cache='cold'),
                            Config(f'{kind}@{w}:warm', lazy(factory, key), workers, main_seq, cache='warm')])
                groups['s3'] = run_group(
                    's3', 'loopback S3 (moto on 127.0.0.1): cold = fresh local cache, warm = the next pass '
                    'over the populated cache', s3_configs, reps, log)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    ratios = [
        ratio(groups, 'direct: DWMDataset / StreamingDataset', 'direct', 'dwm', 'streaming', target=5.0),
        ratio(groups, 'direct: DWMDataset / WebDataset', 'direct', 'dwm', 'webdataset', target=2.0),
        ratio(groups, 'direct: DWMDataset / memmap limit', 'direct', 'dwm', 'memmap'),
        ratio(groups, '0 workers: DWMDataset / StreamingDataset', 'dataloader', 'dwm@0w', 'streaming@0w'),
        ratio(groups, '0 workers: DWMDataset / WebDataset', 'dataloader', 'dwm@0w', 'webdataset@0w'),
        ratio(groups, '2 workers: DWMDataset / StreamingDataset', 'dataloader', 'dwm@2w', 'streaming@2w'),
        ratio(groups, '2 workers: DWMDataset / WebDataset', 'dataloader', 'dwm@2w', 'webdataset@2w'),
        ratio(groups, '2 workers: DWMDataset / do-nothing ceiling', 'dataloader', 'dwm@2w', 'nothing@2w',
              target=0.9),
        ratio(groups, '2 workers: do-nothing, one storage per batch / per field', 'collate', 'nothing@2w',
              'nothing_per_field@2w'),
        ratio(groups, '2 workers: DWMDataset, one storage per batch / per field', 'collate', 'dwm@2w',
              'dwm_per_field@2w'),
        ratio(groups, 'selection overlay / materialised subset, direct', 'selection', 'overlay', 'subset',
              cost=True, target=1.15),
        ratio(groups, 'selection overlay / materialised subset, 2 workers', 'selection', 'overlay@2w',
              'subset@2w', cost=True),
    ]
    for w in worker_counts:
        ratios.append(ratio(groups, f'{w} worker(s): DWMDataset / do-nothing ceiling', 'workers', f'dwm@{w}w',
                            f'nothing@{w}w'))
    for seq_len in seq_lens:
        ratios.append(ratio(groups, f'seq_len {seq_len}: DWMDataset / StreamingDataset', 'seq_len',
                            f'dwm@{seq_len}', f'streaming@{seq_len}'))
    if 's3' in groups:
        for w in ('direct', '2w'):
            for cache in ('cold', 'warm'):
                ratios.append(ratio(groups, f'S3 {cache}, {w}: DWMDataset / StreamingDataset', 's3',
                                    f'dwm@{w}:{cache}', f'streaming@{w}:{cache}'))
        ratios.append(ratio(groups, 'S3 cold: selection overlay / materialised subset', 's3',
                            'overlay@direct:cold', 'subset@direct:cold', cost=True))
        ratios.append(ratio(groups, 'S3 warm: selection overlay / materialised subset', 's3',
                            'overlay@direct:warm', 'subset@direct:warm', cost=True))

    json_path = os.path.join(out_dir, 'loader.json')
    results = {
        'benchmark': 'loader',
        'created': utc_now(),
        'quick': bool(args.quick),
        'json': os.path.relpath(json_path, os.path.dirname(results_md)),
        'machine': machine_info(),
        'versions': library_versions(('mosaicml-streaming', 'webdataset', 'torch', 'numpy', 'zstandard', 'moto')),
        'settings': {'samples': samples, 'seq_len': main_seq, 'seq_lens': seq_lens, 'workers': worker_counts,
                     'vocab_size': VOCAB_SIZE, 'token_dtype': 'uint16', 'batch_size': BATCH_SIZE, 'reps': reps,
                     'selected_samples': num_selected, 'min_seconds': MIN_SECONDS,
                     'mds_shards': mds_shards, 'wds_shards': wds_shards,
                     'seconds': round(time.perf_counter() - t_start, 1)},
        'groups': groups,
        'ratios': ratios,
        'notes': _notes(ratios),
    }
    write_json(json_path, results)
    png = os.path.join(out_dir, 'loader.png')
    plot(results, png)
    replace_section(results_md, render_section(results, os.path.relpath(png, os.path.dirname(results_md))))
    log(f'wrote {json_path}, {png} and the loader section of {results_md}')
    for r in ratios:
        flag = '' if 'target' not in r else (' (target met)' if r['met'] else ' (TARGET MISSED)')
        log(f'  {r["name"]}: median {r["median"]:.2f} [{r["min"]:.2f}, {r["max"]:.2f}]{flag}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
