"""The embedded end-to-end demo: ``make demo`` / ``dwm-stream demo [--quick]``.

1. Build the embedded SlimPajama-format corpus and a BPE tokenizer (``demo.data``, cached across runs).
2. Convert train/ and validation/ to MDS shards (cached).
3. Start a loopback S3 endpoint and upload the shards.
4. Train a tiny Llama from ``s3://`` twice with the same seed and budget: uniform weights, and DWM.
5. Print a table (validation loss, LAMBADA-format accuracy, mean DWM weight per domain per stage).
6. Write a PNG: weights by domain across stages, and both validation-loss curves.

The config is ``yamls/demo-cpu.yaml``; the demo only fills in paths and, with ``--quick``, a
smaller budget. Nothing is tuned to the demo's seed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

from matplotlib.figure import Figure

from algorithms.dwm import ValidationBatches
from dwm_stream.demo.corpus import DEGRADED_DOMAINS
from dwm_stream.demo.data import DataBudget, prepare_data
from dwm_stream.demo.loopback_s3 import LoopbackS3, upload_dir
from dwm_stream.train.builders import WidenedLoader, build_tokenizer
from dwm_stream.train.config import TokenizerConfig
from dwm_stream.train.entry import build_trainer, load_config
from dwm_stream.train.evaluation import heldout_loss, lambada_metrics
from dwm_stream.train.loggers import read_metrics

__all__ = ['run_demo']

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_YAML = os.path.join(_REPO, 'yamls', 'demo-cpu.yaml')
QUALITY_JSON = os.path.join(_REPO, 'benchmarks', 'results', 'quality.json')
# The same bench, bigger, on a GPU (benchmarks/results/gpu_quality/README.md): quoted beside the CPU bench when present.
GPU_QUALITY_JSON = os.path.join(_REPO, 'benchmarks', 'results', 'gpu_quality', 'quality.json')
# The CPU bench on its other corruptions (``--corruptions alt``), the CPU corpus with selection headroom: its latest
# reported run, every baseline beside DWM's development-screened variant.
ALT_QUALITY_JSON = os.path.join(_REPO, 'benchmarks', 'results', 'alt_round4', 'quality.json')
BUCKET = 'dwm-demo'


@dataclass(frozen=True)
class DemoBudget:
    """The demo's size: its data, and the training overrides of ``yamls/demo-cpu.yaml``."""
    data: DataBudget
    max_duration: str
    num_stages: int
    refit_steps: int
    eval_interval: str


FULL = DemoBudget(DataBudget(corpus_size='8MB', vocab_size=4096, seq_len=128), max_duration='400ba', num_stages=4,
                  refit_steps=12, eval_interval='50ba')
QUICK = DemoBudget(DataBudget(corpus_size='2MB', vocab_size=2048, seq_len=128), max_duration='40ba', num_stages=3,
                   refit_steps=2, eval_interval='20ba')
# Every step of the demo, as small as it goes (the tests' size): 3 stages of 4 batches, one refit step each.
TINY = DemoBudget(DataBudget(corpus_size='1MB', vocab_size=1024, seq_len=64), max_duration='12ba', num_stages=3,
                  refit_steps=1, eval_interval='6ba')
_STEP_TAGS = {'corpus': '[1/6]', 'tokenizer': '     ', 'convert': '[2/6]'}


def _say(msg: str) -> None:
    print(msg, flush=True)


def _say_step(step: str, msg: str) -> None:
    _say(f'{_STEP_TAGS[step]} {msg}')


def _train(name: str, overrides: list[str], with_dwm: bool) -> dict[str, Any]:
    if not with_dwm:
        overrides = overrides + ['algorithms=null']
    cfg = load_config(DEMO_YAML, overrides)
    trainer = build_trainer(cfg, config_path=DEMO_YAML)
    started = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - started
    dwm = next((a for a in trainer.state.algorithms if type(a).__name__.endswith('DWM')), None)
    lm = trainer.state.model.model
    result = {'name': name, 'seconds': seconds, 'lm': lm, 'dwm': dwm, 'run_dir': cfg['save_folder'],
              'domain_names': list(trainer.state.train_dataloader.dataset.domain_names)}
    trainer.close()
    return result


def _stage_table(metrics_file: str, domain_names: list[str]) -> dict[int, dict[str, float]]:
    """Mean DWM weight per domain per stage, from the run's metrics.jsonl."""
    values: dict[tuple[int, str], list[float]] = {}
    stage = None
    for rec in read_metrics(metrics_file):  # chronological: a record belongs to the latest stage logged
        if rec['metrics'].get('dwm/stage') is not None:
            stage = int(rec['metrics']['dwm/stage'])
        if stage is None:
            continue
        for name in domain_names:
            v = rec['metrics'].get(f'dwm/domain/{name}/weight')
            if v is not None:
                values.setdefault((stage, name), []).append(v)
    table: dict[int, dict[str, float]] = {}
    for (stage, name), vs in values.items():
        table.setdefault(stage, {})[name] = sum(vs) / len(vs)
    return dict(sorted(table.items()))


def _eval_curve(metrics_file: str) -> list[tuple[int, float]]:
    curve = []
    for rec in read_metrics(metrics_file):
        v = rec['metrics'].get('metrics/eval/LanguageCrossEntropy')
        if v is not None:
            curve.append((rec['batch'], v))
    return curve


def _plot(path: str, stages: dict[int, dict[str, float]], domain_names: list[str],
          curves: dict[str, list[tuple[int, float]]], degraded: set[str]) -> None:
    fig = Figure(figsize=(13, 4.8))  # no pyplot: no GUI backend, no global figure state
    ax1, ax2 = fig.subplots(1, 2)
    xs = sorted(stages)
    for name in domain_names:
        ys = [stages[s].get(name, float('nan')) for s in xs]
        style = '--' if name in degraded else '-'
        ax1.plot([x + 1 for x in xs], ys, style, marker='o', label=name + (' (degraded)' if name in degraded else ''))
    ax1.axhline(1.0, color='grey', lw=0.8)
    ax1.set_xlabel('stage')
    ax1.set_ylabel('mean DWM weight (1 = uniform)')
    ax1.set_title('What DWM weights up and down, stage by stage')
    ax1.set_xticks([x + 1 for x in xs])
    ax1.legend(fontsize=7)
    for label, curve in curves.items():
        if curve:
            ax2.plot([b for b, _ in curve], [v for _, v in curve], marker='.', label=label)
    ax2.set_xlabel('training batch')
    ax2.set_ylabel('held-out loss (nats/token)')
    ax2.set_title('Validation loss, same seed and budget')
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_demo(out_dir: str = 'runs/demo', quick: bool = False, seed: int = 0,
             progress: bool = True, tiny: bool = False) -> dict[str, Any]:
    """Run the demo; returns the numbers it printed. See the module docstring.

    Args:
        out_dir (str): Where the data cache, both runs, ``demo.json`` and ``demo.png`` go. Default: ``'runs/demo'``.
        quick (bool): The small budget (about a minute on a laptop CPU). Default: ``False``.
        seed (int): Seed of the corpus and of both training runs. Default: ``0``.
        progress (bool): Progress bars while preparing the data and training. Default: ``True``.
        tiny (bool): The smallest budget that still runs every step (``TINY``; what the tests run), whatever
            ``quick`` says. Default: ``False``.
    """
    budget = TINY if tiny else QUICK if quick else FULL
    started = time.perf_counter()
    paths = prepare_data(os.path.join(out_dir, 'data'), budget.data, seed=seed,
                         workers=min(2, os.cpu_count() or 1), progress=progress, say=_say_step)

    _say('[3/6] starting a loopback S3 endpoint (moto on 127.0.0.1) and uploading the shards')
    with LoopbackS3(buckets=[BUCKET]) as s3:
        client = s3.client()
        n = upload_dir(client, paths['train'], BUCKET, 'mds/train')
        n += upload_dir(client, paths['validation'], BUCKET, 'mds/validation')
        _say(f'      {n} objects in s3://{BUCKET}/mds/ at {s3.endpoint_url}')
        runs = {}
        for label, with_dwm in (('uniform', False), ('DWM', True)):
            run_dir = os.path.join(out_dir, f'run-{label.lower()}')
            cache = os.path.join(out_dir, f'cache-{label.lower()}')
            for stale in (run_dir, cache):
                shutil.rmtree(stale, ignore_errors=True)
            overrides = [
                f'run_name=demo-{label.lower()}', f'seed={seed}', f'save_folder={run_dir}',
                f'tokenizer.name={paths["tokenizer"]}',
                f'train_loader.dataset.remote=s3://{BUCKET}/mds/train',
                f'train_loader.dataset.local={cache}/train',
                f'eval_loader.dataset.remote=s3://{BUCKET}/mds/validation',
                f'eval_loader.dataset.local={cache}/validation',
                f'algorithms.dwm.validation.lambada={paths["lambada_fit"]}',
                f'algorithms.dwm.num_stages={budget.num_stages}',
                f'algorithms.dwm.refit_steps={budget.refit_steps}',
                f'max_duration={budget.max_duration}', f'eval_interval={budget.eval_interval}',
                'save_interval=1000ep',
                # progress: Composer's bar on a terminal, a short line per interval in a log (dwm-stream train's
                # rule); quiet: neither
                *([] if progress else ['progress_bar=false', 'log_to_console=false']),
            ]
            _say(f'[4/6] training a tiny Llama from s3:// with {label} weights ({budget.max_duration})')
            runs[label] = _train(label, overrides, with_dwm)

    _say('[5/6] evaluating on held-out data (never used for training or for fitting DWM)')
    tokenizer = build_tokenizer(TokenizerConfig(name=paths['tokenizer']))
    val_loader = WidenedLoader({'local': paths['validation'], 'shuffle': False}, 32, 'validation')
    lambada_report = ValidationBatches(paths['lambada_report'], tokenizer, batch_size=32,
                                       max_length=budget.data.seq_len)
    domain_names = runs['DWM']['domain_names']
    for label, run in runs.items():
        run['heldout'] = heldout_loss(run['lm'], val_loader, domain_names)
        run['lambada'] = lambada_metrics(run['lm'], lambada_report)
    stages = _stage_table(os.path.join(runs['DWM']['run_dir'], 'metrics.jsonl'), domain_names)
    curves = {label: _eval_curve(os.path.join(run['run_dir'], 'metrics.jsonl')) for label, run in runs.items()}
    degraded = set(DEGRADED_DOMAINS) & set(domain_names)

    lines = _report(runs, stages, domain_names, degraded)
    _say('[6/6] results')
    _say('\n'.join(lines))
    plot_path = os.path.join(out_dir, 'demo.png')
    _plot(plot_path, stages, domain_names, curves, degraded)
    summary = {
        'quick': quick, 'tiny': tiny, 'seed': seed, 'seconds': time.perf_counter() - started,
        'runs': {label: {'heldout': run['heldout'], 'lambada': run['lambada'], 'train_seconds': run['seconds']}
                 for label, run in runs.items()},
        'dwm_weight_by_stage': {str(k): v for k, v in stages.items()},
        'degraded_domains': sorted(degraded), 'plot': plot_path,
    }
    with open(os.path.join(out_dir, 'demo.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    _say(f'plot: {plot_path}    numbers: {os.path.join(out_dir, "demo.json")}    '
         f'total {summary["seconds"] / 60:.1f} min')
    return summary


def bench_verdict(path: str = QUALITY_JSON, label: str = 'quality bench') -> list[str]:
    """What the multi-seed quality bench (``benchmarks/RESULTS.md``) says about DWM, from its committed JSON: one
    demo run cannot tell a gain from seed noise, so the demo's verdict defers to the bench, and first quotes the
    bench's headroom (whether an oracle that drops every degraded domain beats uniform beyond its null)."""
    try:
        with open(path) as f:
            analysis = json.load(f)['analysis']
        method = analysis['target_method']
        delta = analysis['methods'][method]['delta_vs_uniform']
        met = [t for t in analysis['targets'] if t['met']]
        room = analysis.get('target_headroom', analysis.get('headroom'))  # the oracle of the method's family
        vs_null = analysis['methods'][method].get('vs_null')
    except (OSError, KeyError, TypeError, ValueError):
        return ['', f'Verdict across seeds: no quality-bench record at {path}; one seed cannot tell a gain from noise '
                    '(run python -m benchmarks.quality).']
    if room is None:
        headroom = 'the bench\'s headroom was not measured (no oracle run), so it ranks nothing'
    else:
        headroom = (f'the bench {"has" if room["holds"] else "has NO"} headroom ({room.get("oracle", "oracle")} gain '
                    f'{room["gain_mean"]:+.4f}, '
                    f'{room["seeds_met"]} of {room["n"]} seeds beyond 3x its null\'s RMS {room["null_rms"]:.4f})')
    ranked = bool(room and room['holds'])
    better = ('beats' if ranked and len(met) == len(analysis['targets']) else
              'does not reliably beat' if ranked and delta['mean'] < 0 else
              'does not beat' if ranked else 'cannot be ranked against')
    null_text = (f', below its own null in {vs_null["seeds"]} of {vs_null["n"]}' if vs_null else '')
    return ['', f'Verdict across seeds (benchmarks/RESULTS.md, {label}, {delta["n"]} seeds): {headroom}; DWM '
                f'({method}) {better} uniform: held-out macro loss change {delta["mean"]:+.4f} on average, lower in '
                f'{delta["better"]} of {delta["n"]} seeds{null_text}; targets met: {len(met)} of '
                f'{len(analysis["targets"])}.']


def _report(runs: dict[str, Any], stages: dict[int, dict[str, float]], domain_names: list[str],
            degraded: set[str]) -> list[str]:
    uni, dwm = runs['uniform'], runs['DWM']
    lines = [
        '',
        'Held-out quality (lower loss is better; accuracy = share of LAMBADA-format passages whose final word',
        'the model predicts exactly, on passages never used to fit DWM):',
        f'  {"":10s} {"val loss":>9s} {"LAMBADA loss":>13s} {"LAMBADA acc":>12s} {"train time":>11s}',
    ]
    for label, run in (('uniform', uni), ('DWM', dwm)):
        lines.append(f'  {label:10s} {run["heldout"]["all"]:9.4f} {run["lambada"]["loss"]:13.4f} '
                     f'{run["lambada"]["accuracy"]:12.3f} {run["seconds"]:10.0f}s')
    lines += ['', 'Held-out loss by domain (the same validation shards, split by domain):',
              f'  {"domain":28s} {"uniform":>8s} {"DWM":>8s}']
    for name in domain_names:
        if name in uni['heldout']:
            mark = '  (degraded)' if name in degraded else ''
            lines.append(f'  {name:28s} {uni["heldout"][name]:8.4f} {dwm["heldout"].get(name, float("nan")):8.4f}{mark}')
    lines += ['', 'Mean DWM weight per domain in each stage (1.0 = uniform; < 1 means DWM trains less on it):',
              '  ' + f'{"domain":28s}' + ''.join(f'{"stage " + str(s + 1):>9s}' for s in stages)]
    for name in domain_names:
        mark = '  (degraded)' if name in degraded else ''
        lines.append('  ' + f'{name:28s}' + ''.join(f'{stages[s].get(name, float("nan")):9.3f}' for s in stages) + mark)
    if stages and degraded:
        last = stages[max(stages)]
        # A mean weight within 5% of 1 is no preference: it is what an untrained weighter's noise gives.
        down = [n for n in degraded if last.get(n, 1.0) < 0.95]
        lines += ['', f'Verdict (this run, one seed): in the last stage DWM down-weights (mean weight < 0.95) '
                      f'{len(down)} of {len(degraded)} degraded domains ({", ".join(sorted(down)) or "none"}); its '
                      f'held-out loss is {"lower" if dwm["heldout"]["all"] < uni["heldout"]["all"] else "not lower"} '
                      f'than uniform ({dwm["heldout"]["all"]:.4f} vs {uni["heldout"]["all"]:.4f}).']
    lines += bench_verdict(label='CPU bench, standard corpus')
    for path, label in ((ALT_QUALITY_JSON, 'CPU bench, other corruptions'),
                        (GPU_QUALITY_JSON, 'the same bench bigger, on one H200')):
        if os.path.exists(path):
            lines += bench_verdict(path, label)
    return lines
