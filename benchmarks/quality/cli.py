"""``python -m benchmarks.quality``: the command line, and the JSON it writes."""

from __future__ import annotations


import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.common import library_versions, machine_info, output_options, results_md_path, utc_now, write_json
from dwm_stream.demo.corpus import CORRUPTIONS, build_corpus, degraded_domains
from benchmarks.quality.analysis import HEADROOM_FACTOR, analyse
from benchmarks.quality.data import prepare
from benchmarks.quality.report import _images, measured, notes, plot, render_section, replace_section
from benchmarks.quality.runs import run_all, run_one
from benchmarks.quality.settings import (BASES, DEFAULT_METHODS, DEFAULT_SEEDS, FULL, QUICK, REPO, SCHEMA, Budget,
                                         apply_settings, method_budget, parse_method, say)


# ------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m benchmarks.quality', description=__doc__.splitlines()[0],
                                     parents=[output_options('CI size: 1 seed, a tiny model, a few steps')])
    parser.add_argument('--seeds', type=int, nargs='+', default=None,
                        help='training seeds (default: 0 1 2 3 4; --quick: 0)')
    parser.add_argument('--methods', nargs='+', default=list(DEFAULT_METHODS), metavar='M',
                        help='NAME or NAME:key=value,... (keys: Budget fields, options of DWM, weighter.FIELD); '
                             'NAME one of ' + ', '.join(BASES) + ' (default: ' + ' '.join(DEFAULT_METHODS) + ')')
    parser.add_argument('--jobs', type=int, default=None,
                        help='runs at a time, each in its own process on 1 thread (default: 1 with --quick, else '
                             'min(2, CPUs))')
    parser.add_argument('--corpus-seed', type=int, default=0, help='seed of the embedded corpus (default: 0)')
    parser.add_argument('--corpus', default=None, metavar='DIR',
                        help='run on this SlimPajama-layout corpus (train/, validation/ of *.jsonl.zst) instead')
    parser.add_argument('--degraded', default=None, metavar='NAME,NAME',
                        help='with --corpus: the domains (meta.redpajama_set_name) left out of the metric')
    parser.add_argument('--lambada', default=None, metavar='FILE',
                        help='with --corpus: its LAMBADA-format file (without one: no LAMBADA metrics, and DWM\'s '
                             'target is the held-out samples)')
    parser.add_argument('--rerun-check', action='store_true',
                        help='run the first seed of the target DWM twice and record the largest difference')
    parser.add_argument('--write-corpus', default=None, metavar='DIR',
                        help='only write the embedded corpus (this budget\'s size) to DIR and exit')
    parser.add_argument('--corruptions', choices=CORRUPTIONS, default='standard',
                        help='the embedded corpus\'s degraded domains (default: standard; alt: other corruption '
                             'types, for checking that a result transfers)')
    parser.add_argument('--set', dest='overrides', nargs='+', default=[], metavar='KEY=VALUE',
                        help='change the budget of every method: a Budget field (steps=400, batch_size=64, ...), '
                             'a data field (corpus_size=8MB, degraded_share=0.45, ...), an option of DWM '
                             '(refit_kl=1, lookahead=adam, ...) or weighter.FIELD (weighter.d_model=32)')
    parser.add_argument('--device', default='cpu', help='torch device of every run, e.g. cuda (default: cpu)')
    parser.add_argument('--data-dir', default=os.path.join(REPO, '.cache', 'bench-quality'),
                        help='cache of the corpus, tokenizer and shards (default: .cache/bench-quality)')
    parser.add_argument('--render-only', action='store_true',
                        help='only regenerate the analysis, the plots and the RESULTS.md section from the runs in '
                             'OUT/quality.json')
    parser.add_argument('--_worker', nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for m in args.methods:
        try:
            parse_method(m)
        except ValueError as e:
            parser.error(str(e))
    if len(set(args.methods)) != len(args.methods):
        parser.error('--methods: a method is listed twice')
    if args.corpus and not args.degraded:
        parser.error('--corpus needs --degraded NAME,... (the domains that are not in the metric)')
    if (args.degraded or args.lambada) and not args.corpus:
        parser.error('--degraded and --lambada go with --corpus')
    try:
        apply_overrides(FULL, args.overrides)
    except ValueError as e:
        parser.error(str(e))
    return args


def apply_overrides(budget: Budget, items: list[str]) -> Budget:
    """``budget`` with ``KEY=VALUE`` items applied (a setting of :func:`setting_types`); values take the setting's
    type. Raises ``ValueError`` naming the item."""
    settings = {}
    for item in items:
        key, eq, value = item.partition('=')
        if not eq:
            raise ValueError(f'--set {item!r}: not KEY=VALUE')
        settings[key] = value
    try:
        return apply_settings(budget, settings)
    except ValueError as e:
        raise ValueError(f'--set: {e}') from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        spec_path, result_path = args._worker
        with open(spec_path) as f:
            result = run_one(json.load(f))
        with open(result_path, 'w') as f:
            json.dump(result, f)
        return 0
    budget = apply_overrides(QUICK if args.quick else FULL, args.overrides)
    if args.write_corpus:
        info = build_corpus(args.write_corpus, size=budget.data.corpus_size, seed=args.corpus_seed,
                            corruptions=args.corruptions, validation_size=budget.data.validation_size,
                            degraded_share=budget.data.degraded_share)
        say(str(info))
        say(f'run the bench on it: python -m benchmarks.quality --corpus {args.write_corpus} --degraded '
             f'{",".join(degraded_domains(args.corruptions))} --lambada {info.lambada_path}')
        return 0
    if args.render_only:
        with open(os.path.join(args.out, 'quality.json')) as f:
            results = json.load(f)
        if 'uniform' in results['methods']:  # the analysis follows the code that renders it, from the raw runs
            seeds = sorted({r['seed'] for r in results['runs']})
            results['analysis'] = analyse(results, results['methods'], seeds, results['data'],
                                          results['budget']['num_stages'])
        write_report(results, args)
        return 0
    started = time.perf_counter()
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else list(DEFAULT_SEEDS))
    methods = list(args.methods)
    jobs = args.jobs or (1 if args.quick else min(2, os.cpu_count() or 1))
    machine = machine_info()
    os.makedirs(args.out, exist_ok=True)
    ctx = prepare(args, budget)
    if 'uniform' not in methods:
        say('uniform is not among the methods: no changes against uniform, no targets')
    say(f'{len(seeds)} seed(s) x {len(methods)} methods, {budget.steps} steps each, {jobs} at a time')
    with tempfile.TemporaryDirectory(prefix='dwm-bench-quality-') as work:
        raw = run_all(ctx, budget, methods, seeds, jobs, work, args.rerun_check,
                      cache_dir=None if args.quick else os.path.join(args.data_dir, 'runs'))
    params = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(
        hidden_size=budget.hidden_size, intermediate_size=budget.intermediate_size,
        num_hidden_layers=budget.num_layers, num_attention_heads=budget.num_heads,
        num_key_value_heads=budget.num_heads, vocab_size=ctx['vocab'], max_position_embeddings=budget.seq_len,
        tie_word_embeddings=True)).parameters())
    command = ' '.join(['python -m benchmarks.quality', *(argv if argv is not None else sys.argv[1:])])
    results: dict[str, Any] = {
        'benchmark': 'quality', 'schema': SCHEMA, 'quick': bool(args.quick), 'command': command.strip(),
        'date': utc_now(), 'machine': machine, 'jobs': jobs, 'budget': budget.record(),
        'versions': library_versions(('torch', 'mosaicml', 'mosaicml-streaming', 'transformers', 'tokenizers')),
        'model_params': params, 'methods': methods, 'method_budgets': {
            m: {k: v for k, v in method_budget(budget, m).record().items() if v != budget.record()[k]}
            for m in methods},
        'corpus': ({'kind': 'external', 'path': os.path.abspath(args.corpus), 'lambada': args.lambada}
                   if args.corpus else {'kind': 'embedded', 'corpus_seed': args.corpus_seed,
                                        'corruptions': args.corruptions}),
        'data': ctx['data'], 'references': ctx['references'],
        'proxy': raw['proxy'], 'runs': raw['runs'], 'rerun': raw['rerun'],
    }
    if 'uniform' in methods:
        results['analysis'] = analyse(raw, methods, seeds, ctx['data'], budget.dwm.num_stages)
    results['seconds'] = time.perf_counter() - started
    write_report(results, args)
    return 0


def write_report(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Notes, JSON, plots and the RESULTS.md section, all from ``results``."""
    json_path = os.path.join(args.out, 'quality.json')
    if 'analysis' not in results:
        write_json(json_path, results)
        say(f'wrote {json_path} (no analysis without uniform)')
        return
    results['notes'] = notes(results)
    write_json(json_path, results)
    curves_png = os.path.join(args.out, 'quality_curves.png')
    weights_png = os.path.join(args.out, 'quality_weights.png')
    plot(results, curves_png, weights_png)
    results_md = results_md_path(args)
    replace_section(results_md, render_section(results, _images(args.out, results_md)))
    say(f'wrote {json_path}, {curves_png}, {weights_png} and the quality section of {results_md} '
         f'({results["seconds"] / 60:.1f} min)')
    room = results['analysis'].get('headroom')
    if room is None:
        say('headroom: not measured (run oracle and oracle/null): no method is ranked')
    else:
        say(f'headroom {"holds" if room["holds"] else "DOES NOT HOLD: this bench cannot rank weighting methods"}: '
             f'oracle gain {room["gain_mean"]:+.4f} (per seed ' + ', '.join(f'{g:+.4f}' for g in room['gain_per_seed'])
             + f') vs {HEADROOM_FACTOR:g} x null RMS {room["bound"]:.4f}, met on {room["seeds_met"]}/{room["n"]}')
    for t in results['analysis']['targets']:
        say(f'target {"met   " if t["met"] else "MISSED"} {t["name"]}: {measured(t["measured"], t.get("format"))}')


if __name__ == '__main__':
    sys.exit(main())
