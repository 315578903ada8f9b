"""The quality bench's data: the corpus (cached), the balanced report set and the held-out DWM targets, and the
n-gram reference lines."""

from __future__ import annotations


import argparse
import json
import os
from typing import Any

import numpy as np
import torch

from dwm_stream.convert.tokenizer import load_tokenizer
from dwm_stream.data.selection import write_selection
from dwm_stream.demo.corpus import degraded_domains
from dwm_stream.demo.data import prepare_data
from dwm_stream.train.builders import WidenedLoader
from benchmarks.quality.settings import REPORT_SEED, Budget, say


# ------------------------------------------------------------------------------------------------------- data
def _domain_names(mds_dir: str) -> list[str]:
    with open(os.path.join(mds_dir, 'dwm.json')) as f:
        return list(json.load(f)['domains'])


def read_samples(mds_dir: str) -> list[dict[str, Any]]:
    """Every sample of an MDS folder, in shard order: ``uid``, ``domain`` (id), ``tokens`` (int64, ``num_tokens``)."""
    out = []
    for batch in WidenedLoader({'local': mds_dir, 'shuffle': False}, 1, mds_dir):
        n = int(batch['num_tokens'][0])
        out.append({'uid': int(batch['uid'][0]), 'domain': int(batch['domain'][0]),
                    'tokens': batch['input_ids'][0, :n].numpy().copy()})
    return out


def split_report(samples: list[dict[str, Any]], domain_names: list[str], real: list[str],
                 per_domain: int) -> dict[str, Any]:
    """The balanced report set and the held-out DWM target, from the validation samples.

    Per domain, the samples in a fixed random order (``REPORT_SEED``): the first ``per_domain`` are reported; the rest
    of a real domain's samples are the held-out DWM target. A domain with too few samples is *short*: a real one with
    fewer than ``2 * per_domain`` reports half of them (the other half is the target), a degraded one with fewer than
    ``per_domain`` reports all. Report and target are disjoint by uid.
    """
    by_domain: dict[str, list[int]] = {}
    for s in samples:
        by_domain.setdefault(domain_names[s['domain']], []).append(s['uid'])
    rng = np.random.default_rng(REPORT_SEED)
    report, heldout, short = {}, {}, []
    for d in sorted(by_domain):
        uids = [by_domain[d][i] for i in rng.permutation(len(by_domain[d]))]
        k = per_domain
        if d in real and len(uids) < 2 * per_domain:
            k = max(1, len(uids) // 2)
        elif d not in real:
            k = min(per_domain, len(uids))
        if k < per_domain:
            short.append(d)
        report[d] = sorted(uids[:k])
        if d in real:
            heldout[d] = sorted(uids[k:])
    return {'report': report, 'heldout': heldout, 'short': short,
            'validation_samples': {d: len(u) for d, u in sorted(by_domain.items())}}


def report_batches(samples: list[dict[str, Any]], report: dict[str, list[int]], names: list[str],
                    batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The report set as batches of one domain each (``input_ids``, ``labels`` -100 past a sample's tokens,
    ``domain``: the index in ``names``, the training set's domain names)."""
    rows: dict[str, list[dict[str, Any]]] = {}
    wanted = {u: d for d, uids in report.items() for u in uids}
    for s in samples:
        if s['uid'] in wanted and wanted[s['uid']] in names:
            rows.setdefault(wanted[s['uid']], []).append(s)
    seq_len = max(len(s['tokens']) for s in samples)
    batches = []
    for d in sorted(rows):
        for i in range(0, len(rows[d]), batch_size):
            chunk = rows[d][i:i + batch_size]
            ids = torch.zeros(len(chunk), seq_len, dtype=torch.int64)
            labels = torch.full((len(chunk), seq_len), -100, dtype=torch.int64)
            for r, s in enumerate(chunk):
                ids[r, :len(s['tokens'])] = torch.from_numpy(s['tokens'])
                labels[r, :len(s['tokens'])] = torch.from_numpy(s['tokens'])
            batches.append({'input_ids': ids, 'labels': labels,
                            'domain': torch.full((len(chunk),), names.index(d), dtype=torch.int64)})
    return batches


def ngram_references(train: list[np.ndarray], report: dict[str, list[np.ndarray]], vocab_size: int,
                     real: list[str]) -> dict[str, dict[str, Any]]:
    """Held-out cross-entropy (nats/token) of a unigram and a bigram model of the training tokens.

    The tokens scored are the model's: in each report sample, every token after the first, the bigram's history
    being the token before it (as the LM's context begins with it). Unigram: add-one,
    ``p(w) = (c(w) + 1) / (N + V)`` over all training tokens. Bigram: interpolated Witten-Bell (parameter-free),
    ``p(w | h) = (c(h, w) + T(h) p_uni(w)) / (c(h) + T(h))`` with ``c(h)`` the bigrams starting with ``h`` and
    ``T(h)`` the distinct tokens seen after ``h`` (``p_uni(w)`` when ``h`` was never seen); bigrams within samples.

    Returns ``{'unigram': {'by_domain': {d: nats}, 'macro': mean over ``real``}, 'bigram': {...}}``.
    """
    v = int(vocab_size)
    uni_counts = np.bincount(np.concatenate(train), minlength=v).astype(np.float64)
    p_uni = (uni_counts + 1.0) / (uni_counts.sum() + v)
    codes = np.concatenate([s[:-1].astype(np.int64) * v + s[1:] for s in train if len(s) > 1])
    pairs, pair_counts = np.unique(codes, return_counts=True)
    hist_counts = np.bincount(pairs // v, weights=pair_counts, minlength=v)
    hist_types = np.bincount(pairs // v, minlength=v).astype(np.float64)
    out: dict[str, dict[str, Any]] = {'unigram': {'by_domain': {}}, 'bigram': {'by_domain': {}}}
    for d, seqs in sorted(report.items()):
        seqs = [s for s in seqs if len(s) > 1]
        h = np.concatenate([s[:-1] for s in seqs]).astype(np.int64)
        w = np.concatenate([s[1:] for s in seqs]).astype(np.int64)
        at = np.minimum(np.searchsorted(pairs, h * v + w), len(pairs) - 1)
        c_hw = np.where(pairs[at] == h * v + w, pair_counts[at], 0)
        denom = hist_counts[h] + hist_types[h]
        p_bi = np.where(denom > 0, (c_hw + hist_types[h] * p_uni[w]) / np.maximum(denom, 1e-300), p_uni[w])
        out['unigram']['by_domain'][d] = float(-np.log(p_uni[w]).mean())
        out['bigram']['by_domain'][d] = float(-np.log(p_bi).mean())
    for m in out.values():
        m['macro'] = float(np.mean([m['by_domain'][d] for d in real if d in m['by_domain']]))
    return out


def prepare(args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    """Data (cached), the report/held-out split (a selection overlay for the held-out target) and what the runs
    need to know about the corpus."""
    if args.corpus:
        paths = prepare_data(args.data_dir, budget.data, corpus_dir=args.corpus, lambada=args.lambada,
                             say=lambda step, msg: say(msg))
    else:
        paths = prepare_data(args.data_dir, budget.data, seed=args.corpus_seed, corruptions=args.corruptions,
                             say=lambda step, msg: say(msg))
    names = _domain_names(paths['train'])
    named = args.degraded.split(',') if args.corpus else degraded_domains(args.corruptions)
    unknown = sorted(set(named) - set(names)) if args.corpus else []
    if unknown:
        raise SystemExit(f'--degraded: {", ".join(unknown)} not among the corpus\'s domains ({", ".join(names)})')
    degraded = [d for d in names if d in named]
    real = [d for d in names if d not in degraded]
    val = read_samples(paths['validation'])
    split = split_report(val, _domain_names(paths['validation']), real, budget.report_per_domain)
    for d in split['short']:
        say(f'validation split of {d} is short ({split["validation_samples"][d]} samples): '
             f'{len(split["report"][d])} reported' + (', the rest held out for DWM' if d in real else ''))
    heldout_uids = sorted(u for uids in split['heldout'].values() for u in uids)
    heldout_path = os.path.join(paths['root'], f'heldout-r{budget.report_per_domain}-{REPORT_SEED}.parquet')
    write_selection(heldout_path, np.asarray(heldout_uids, dtype=np.int64),
                    info={'what': 'quality bench: held-out DWM target (real domains, never reported)'})
    per_real = min(len(split['heldout'][d]) for d in real)  # the same number from every real domain, as the metric
    balanced_path = os.path.join(paths['root'], f'heldout-balanced-r{budget.report_per_domain}-{REPORT_SEED}.parquet')
    write_selection(balanced_path, np.asarray(sorted(u for d in real for u in split['heldout'][d][:per_real]),
                                              dtype=np.int64),
                    info={'what': f'quality bench: balanced held-out DWM target ({per_real} per real domain)'})
    train = read_samples(paths['train'])
    counts = np.bincount([s['domain'] for s in train], minlength=len(names))
    vocab = len(load_tokenizer(paths['tokenizer']))
    uid_domain = {u: d for d, uids in split['report'].items() for u in uids}
    report_tokens: dict[str, list[np.ndarray]] = {}
    for s in val:
        if s['uid'] in uid_domain:
            report_tokens.setdefault(uid_domain[s['uid']], []).append(s['tokens'])
    references = ngram_references([s['tokens'] for s in train], report_tokens, vocab, real)
    return {
        'paths': paths, 'domains': names, 'real': real, 'degraded': degraded, 'vocab': vocab, 'device': args.device,
        'report': split['report'], 'heldout_path': heldout_path, 'balanced_path': balanced_path,
        'references': references,
        'data': {'domains': names, 'real_domains': real, 'degraded_domains': degraded,
                 'train_samples': len(train), 'train_tokens': int(sum(len(s['tokens']) for s in train)),
                 'train_shares': {names[i]: float(c / counts.sum()) for i, c in enumerate(counts)},
                 'validation_samples': split['validation_samples'],
                 'report_samples': {d: len(u) for d, u in split['report'].items()},
                 'report_tokens': {d: int(sum(len(t) - 1 for t in ts)) for d, ts in report_tokens.items()},
                 'heldout_samples': {d: len(u) for d, u in split['heldout'].items()},
                 'balanced_heldout_per_domain': per_real,
                 'short_domains': split['short'],
                 'lambada_fit': _count_lines(paths['lambada_fit']),
                 'lambada_report': _count_lines(paths['lambada_report'])},
    }


def _count_lines(path: str | None) -> int | None:
    if path is None:
        return None
    with open(path) as f:
        return sum(1 for line in f if line.strip())
