"""The quality bench's analysis, from the raw runs alone: paired changes against uniform, each method against its
own null, the headroom checks, the targets."""

from __future__ import annotations


import math
from typing import Any

import numpy as np

from benchmarks.common import min_median_max
from benchmarks.quality.settings import DWM_BASES, ESS_BOUND, SELECT_BASES, null_of, parse_method, target_dwm


# ------------------------------------------------------------------------------------------------------- analysis
def paired_deltas(values: dict[str, dict[int, float]], seeds: list[int], reference: str = 'uniform'
                  ) -> dict[str, dict[str, Any]]:
    """Per method, the per-seed change ``value(method, seed) - value(reference, seed)`` and its summary: ``mean``,
    ``sd`` (sample, n-1; 0 for one seed), ``better`` (seeds with a negative change), ``n``."""
    out = {}
    for m, per_seed in values.items():
        deltas = [per_seed[s] - values[reference][s] for s in seeds]
        mean = sum(deltas) / len(deltas)
        sd = math.sqrt(sum((d - mean) ** 2 for d in deltas) / (len(deltas) - 1)) if len(deltas) > 1 else 0.0
        out[m] = {'per_seed': deltas, 'mean': mean, 'sd': sd, 'better': sum(d < 0 for d in deltas), 'n': len(deltas)}
    return out


def noise_floor(deltas: list[float]) -> float:
    """RMS over seeds of the noise-floor method's change against uniform."""
    return math.sqrt(sum(d * d for d in deltas) / len(deltas))


def paired_t(delta: dict[str, Any] | None) -> float | None:
    """``mean / (sd / sqrt(n))`` of a method's per-seed Δ (``None`` without a spread to divide by)."""
    if not delta or delta['n'] < 2 or not delta['sd']:
        return None
    return delta['mean'] / (delta['sd'] / math.sqrt(delta['n']))


HEADROOM_FACTOR = 3.0   # the oracle's gain must be at least this many times the RMS of its null's change
HEADROOM_SEED_SHARE = 0.8  # ... on at least this share of the seeds (4 of 5)
MIN_SEEDS = 5


def headroom(deltas: dict[str, dict[str, Any]], oracle: str = 'oracle') -> dict[str, Any] | None:
    """Can this bench tell good weighting from bad? The oracle (weight 0 on every degraded domain) must beat uniform
    by at least ``HEADROOM_FACTOR`` x the RMS over seeds of its own null's change (the oracle's weights permuted
    within each batch: the same spread, no knowledge), on at least ``HEADROOM_SEED_SHARE`` of ``MIN_SEEDS`` or more
    seeds. ``None`` if the oracle or its null was not run."""
    null = null_of(oracle)
    if oracle not in deltas or null not in deltas:
        return None
    gains = [-d for d in deltas[oracle]['per_seed']]
    null_rms = noise_floor(deltas[null]['per_seed'])
    bound = HEADROOM_FACTOR * null_rms
    n = len(gains)
    met = sum(g >= bound and g > 0 for g in gains)
    need = math.ceil(HEADROOM_SEED_SHARE * n)
    return {'oracle': oracle, 'null': null, 'gain_per_seed': gains, 'gain_mean': sum(gains) / n,
            'null_per_seed': deltas[null]['per_seed'], 'null_rms': null_rms, 'bound': bound, 'seeds_met': met,
            'seeds_needed': need, 'n': n, 'holds': n >= MIN_SEEDS and met >= need}


def beats_null(deltas: dict[str, dict[str, Any]], method: str) -> dict[str, Any] | None:
    """Per seed, whether ``method`` is below uniform *and* below its own null (same seed); ``None`` without a null."""
    null = null_of(method)
    if method not in deltas or null not in deltas:
        return None
    per_seed = [d < 0 and d < z for d, z in zip(deltas[method]['per_seed'], deltas[null]['per_seed'])]
    return {'null': null, 'per_seed': per_seed, 'seeds': sum(per_seed), 'n': len(per_seed),
            'vs_null_per_seed': [d - z for d, z in zip(deltas[method]['per_seed'], deltas[null]['per_seed'])],
            'null_rms': noise_floor(deltas[null]['per_seed'])}


def targets(deltas: dict[str, dict[str, Any]], dwm: str, room: dict[str, Any] | None, refit: dict[str, Any] | None,
            rerun_diff: float | None) -> list[dict[str, Any]]:
    """Issue 18's targets for the method ``dwm``, each with ``name``, ``measured``, ``bound`` and ``met``. Without
    headroom, no ranking target is met (the bench cannot tell)."""
    d = deltas.get(dwm)
    gain = -d['mean'] if d else None
    ranked = bool(room and room['holds'])
    vs_null = beats_null(deltas, dwm)
    oracle_gain = room['gain_mean'] if room else None
    oracle = room['oracle'] if room else 'oracle'
    rows = [
        {'name': (f'headroom: {oracle} gain ≥ {HEADROOM_FACTOR:g} × its null\'s RMS change, on ≥ '
                  f'{HEADROOM_SEED_SHARE:.0%} of ≥ {MIN_SEEDS} seeds'),
         'measured': f'{room["seeds_met"]}/{room["n"]}' if room else None,
         'bound': f'{room["seeds_needed"]}/{max(room["n"], MIN_SEEDS)}' if room else None, 'met': ranked},
        {'name': f'{dwm} takes ≥ 50% of {oracle}\'s mean gain',
         'measured': gain, 'bound': None if oracle_gain is None else 0.5 * oracle_gain, 'format': '+.4f',
         'met': ranked and gain is not None and oracle_gain is not None and gain >= 0.5 * oracle_gain},
        {'name': f'{dwm} below uniform and below its own null on every seed (≥ {MIN_SEEDS})',
         'measured': f'{vs_null["seeds"]}/{vs_null["n"]}' if vs_null else None, 'bound': f'all, n ≥ {MIN_SEEDS}',
         'met': ranked and bool(vs_null) and vs_null['seeds'] == vs_null['n'] >= MIN_SEEDS},
    ]
    for rule in ('loss_reweighting', 'rho'):
        other = deltas.get(rule)
        rows.append({'name': f'{dwm} mean gain ≥ {rule}\'s',
                     'measured': gain, 'bound': None if other is None else -other['mean'], 'format': '+.4f',
                     'met': ranked and gain is not None and other is not None and gain >= -other['mean']})
    rows += [
        {'name': f'{dwm} refit ESS share, every refit batch of every stage and seed',
         'measured': None if refit is None else refit['ess_min'], 'bound': ESS_BOUND, 'format': '.3f',
         'met': refit is not None and refit['ess_min'] is not None and refit['ess_min'] >= ESS_BOUND},
        {'name': f're-run of {dwm}, first seed: max abs difference of every reported figure',
         'measured': rerun_diff, 'bound': 0.0, 'format': '.3g', 'met': rerun_diff == 0.0},
    ]
    return rows


def _numbers(run: dict[str, Any]) -> list[float]:
    """Every reported figure of a run, in a fixed order (for the re-run check)."""
    out: list[float] = []
    for point in run['curve']:
        out += [float(point[k]) for k in sorted(point)]
    out += [float(v) for k, v in sorted((run.get('lambada') or {}).items())]
    for stage in run['stage_weights']:
        out += [float(stage[k]) for k in sorted(stage)]
    return out


def rerun_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Max abs difference between the reported figures of two runs (``inf`` if their shapes differ)."""
    x, y = _numbers(a), _numbers(b)
    if len(x) != len(y):
        return math.inf
    return max((abs(p - q) for p, q in zip(x, y)), default=0.0)


def _refit_summary(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Over the runs' refits: the lowest ESS share of any refit batch (steps and the after-refit check), dead refits,
    and the lowest training-batch ESS of any stage."""
    refits = [r['refit'] for r in runs if r.get('refit')]
    if not refits:
        return None
    ess = [e for x in refits for key in ('refit/ess_min', 'refit/ess_after') for e in x.get(key, [])]
    ess = [e for e in ess if not math.isnan(e)]
    stage = [e for x in refits for e in x.get('stage/ess_min', [])]
    return {'ess_min': min(ess) if ess else None, 'dead': int(sum(sum(x.get('refit/dead', [])) for x in refits)),
            'refits': sum(len(x.get('refit/dead', [])) for x in refits),
            'stage_ess_min': min(stage) if stage else None,
            'ess_min_per_seed': [min([e for key in ('refit/ess_min', 'refit/ess_after') for e in x.get(key, [])
                                      if not math.isnan(e)], default=None) for x in refits],
            'lookahead_gain_mean': float(np.mean([g for x in refits for g in x.get('refit/lookahead_gain', [])]))
            if any(x.get('refit/lookahead_gain') for x in refits) else None}


def _mean_stage_weights(runs: list[dict[str, Any]], domains: list[str], num_stages: int) -> list[dict[str, float]]:
    table = []
    for k in range(num_stages):
        row = {}
        for d in domains:
            seen = [r['stage_weights'][k][d] for r in runs if d in r['stage_weights'][k]]
            if seen:
                row[d] = sum(seen) / len(seen)
        table.append(row)
    return table


def _stats(values: list[float]) -> dict[str, float]:
    return {'mean': sum(values) / len(values), **min_median_max(values), 'n': len(values)}


def analyse(raw: dict[str, Any], methods: list[str], seeds: list[int], data: dict[str, Any],
            num_stages: int) -> dict[str, Any]:
    """Per-method summaries, the paired changes against uniform, the noise floor and the targets."""
    runs = raw['runs']
    by = {m: {r['seed']: r for r in runs if r['method'] == m} for m in methods}
    out: dict[str, Any] = {}
    for m in methods:
        rs = [by[m][s] for s in seeds]
        out[m] = {
            'final_macro': _stats([r['final']['macro'] for r in rs]),
            'final_degraded': _stats([r['final']['degraded'] for r in rs]) if 'degraded' in rs[0]['final'] else None,
            'final_by_domain': {d: sum(r['final'][d] for r in rs) / len(rs) for d in data['domains']
                                if all(d in r['final'] for r in rs)},
            'lambada_loss': _stats([r['lambada']['loss'] for r in rs]) if rs[0]['lambada'] else None,
            'lambada_accuracy': _stats([r['lambada']['accuracy'] for r in rs]) if rs[0]['lambada'] else None,
            'train_seconds': _stats([r['train_seconds'] for r in rs]),
            'stage_weights': _mean_stage_weights(rs, data['domains'], num_stages),
            'refit': _refit_summary(rs),
        }
    deltas: dict[str, dict[str, Any]] = {}
    if 'uniform' in methods:
        deltas = paired_deltas({m: {s: by[m][s]['final']['macro'] for s in seeds} for m in methods}, seeds)
        for m in methods:
            out[m]['delta_vs_uniform'] = deltas[m]
            out[m]['delta_by_domain'] = {d: sum(by[m][s]['final'][d] - by['uniform'][s]['final'][d] for s in seeds)
                                         / len(seeds) for d in out[m]['final_by_domain']}
    floor = noise_floor(deltas['noise_floor']['per_seed']) if 'noise_floor' in deltas else None
    room = headroom(deltas)
    select_room = headroom(deltas, 'oracle_select')
    for m in methods:
        if m in deltas:
            out[m]['vs_null'] = beats_null(deltas, m)
    rerun_diff = None
    if raw.get('rerun'):
        first = next(r for r in runs if r['method'] == raw['rerun']['method'] and r['seed'] == raw['rerun']['seed'])
        rerun_diff = rerun_difference(first, raw['rerun'])
    dwm = target_dwm(methods)
    return {'methods': out, 'seeds': seeds, 'noise_floor': floor, 'rerun_max_abs_diff': rerun_diff,
            'headroom': room, 'select_headroom': select_room, 'target_method': dwm,
            'target_headroom': family_headroom(dwm, room, select_room),
            'targets': (targets(deltas, dwm, family_headroom(dwm, room, select_room),
                                out[dwm]['refit'] if dwm in out else None, rerun_diff)
                        if parse_method(dwm)[0] in DWM_BASES else [])}  # no DWM run: nothing to hold it to


def family_headroom(method: str, room: dict[str, Any] | None, select_room: dict[str, Any] | None
                    ) -> dict[str, Any] | None:
    """The headroom that decides whether ``method`` can be ranked: the selection oracle's for a method that trains
    on a subset of a larger pool (it keeps the trained batch whole), the weighting oracle's for one that reweights
    the batch (it pays for its spread in effective batch size)."""
    return select_room if parse_method(method)[0] in SELECT_BASES else room
