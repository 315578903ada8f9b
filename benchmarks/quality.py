"""Quality proxy for the paper's claim: does DWM train a tiny Llama faster on the embedded corpus?

Four methods train the same tiny Llama on the same data (the embedded SlimPajama-format corpus with its three
degraded domains), from the same initialisation and in the same sample order for a given seed, for the same
number of steps and hence the same token budget:

* ``uniform``: plain training.
* ``dwm``: DWM with 5 stages (``algorithms.dwm``; settings of ``yamls/demo-cpu.yaml``, not tuned here), refit
  against the *fit* half of the LAMBADA-format file.
* ``static_domain``: fixed per-domain weights from a short uniform proxy run (``algorithms.baselines``): each
  domain's first-order effect on the same LAMBADA fit loss, ``<grad L_fit, grad L_domain>`` at the end of the proxy
  run, clipped at 0, normalised to mean 1 over the training mix, mixed with uniform (λ = 0.1, as DWM's).
* ``loss_reweighting``: Sow et al. 2025 (LinUpper, r = 1, 5% uniform warm-up), per-sample weights from the sample's
  current loss, normalised within the batch.

All four put their weights into the loss the same way (``batch['dwm_weight']``, DWM's loss terms). Reported:
held-out loss curves (the validation shards of the real domains; per domain too), LAMBADA-format continuation
loss and accuracy on the *report* half (never used to fit DWM or the static weights), the steps each method needs
to reach uniform's final validation loss (linear interpolation between evaluations; per seed, then the mean), and
the mean weight per domain per stage.

    python -m benchmarks.quality [--quick] [--out DIR] [--seeds 0 1 2] [--jobs 2]

Writes ``DIR/quality.json`` (default ``benchmarks/results``), ``quality_curves.png``, ``quality_weights.png``,
and regenerates the section between the quality markers of ``benchmarks/RESULTS.md`` (beside ``DIR``).

    python -m benchmarks.quality --investigate heldout_val [adam_lookahead refit_4x] [--jobs 2]

(issue 6) re-runs DWM only, one changed setting per variant, on the seeds, budget and data of ``DIR/quality.json``
(uniform and the baselines are not re-run), merges the runs into ``DIR/quality_investigation.json`` (+ ``.png``)
and renders its ``### Investigation`` subsection into the quality section. ``heldout_val`` fits DWM to the LM loss
of the real domains' validation samples that the reported validation loss never reads (a uid selection overlay).
"""


import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Optional

import numpy as np
import torch
from composer import Trainer
from composer.core import Callback
from composer.loggers import InMemoryLogger
from composer.utils import reproducibility
from matplotlib.figure import Figure
from transformers import LlamaConfig, LlamaForCausalLM

from algorithms.baselines import LossReweighting, StaticDomainWeighting, domain_weights_from_alignment
from algorithms.dwm import ValidationBatches
from algorithms.dwm.functional import WEIGHT_KEY, per_sample_loss_sums
from benchmarks.common import (describe_machine, library_versions, machine_info, min_median_max, output_options,
                               read_section as _read_section, replace_section as _replace_section, results_md_path,
                               utc_now, write_json)
from dwm_stream.convert.tokenizer import load_tokenizer
from dwm_stream.data.selection import write_selection
from dwm_stream.demo.corpus import DEGRADED_DOMAINS
from dwm_stream.demo.data import DataBudget, prepare_data
from dwm_stream.train import builders
from dwm_stream.train.builders import WidenedLoader
from dwm_stream.train.evaluation import lambada_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BEGIN_MARK = '<!-- quality:begin -->'
END_MARK = '<!-- quality:end -->'
METHODS = ('uniform', 'dwm', 'static_domain', 'loss_reweighting')
LABELS = {'uniform': 'uniform', 'dwm': 'DWM (5 stages)', 'static_domain': 'static domain weights',
          'loss_reweighting': 'loss-based (Sow et al.)'}
PROXY_SEED = 1000  # the static baseline's proxy run: its own seed, shared by every main seed
TARGET_STEP_FRACTION = 0.8
TARGET_DEGRADED_WEIGHT = 0.5


@dataclass
class Budget:
    """Everything that sets the size of the experiment: its data (shared with the demo) and its training.

    Recorded in the JSON as one flat dict (:meth:`record`): the data's fields, then the training's.
    """
    data: DataBudget
    batch_size: int
    steps: int
    evals: int                      # evaluations after step 0, evenly spaced
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    lr: float
    warmup_frac: float
    num_stages: int
    refit_steps: int
    weighter_d_model: int
    proxy_frac: float               # static baseline: proxy run length as a fraction of `steps`
    proxy_batches_per_domain: int   # static baseline: batches per domain for its gradient
    max_eval_batches: int
    eval_batch_size: int = 32
    # DWM settings: those of yamls/demo-cpu.yaml (not tuned to this benchmark)
    refit_lr: float = 0.003
    lookahead: str = 'sgd'
    lookahead_lr: float = 0.003
    tau: float = 1.0
    mix_uniform: float = 0.1
    val_batch_size: int = 16
    # DWM refit stabilisation (issue 12; 0 / 'none' / 1.0 / 1 = the earlier behaviour)
    refit_kl: float = 0.0
    embed_norm: str = 'none'
    refit_backbone_lr_scale: float = 1.0
    val_batches_per_step: int = 1
    # Sow et al.'s defaults
    sow_r: float = 1.0
    sow_warmup_frac: float = 0.05

    @property
    def seq_len(self) -> int:
        """Tokens per sample: the data's, and the model's context."""
        return self.data.seq_len

    def record(self) -> dict[str, Any]:
        """The flat dict the JSON holds: ``corpus_size``, ``vocab_size``, ``seq_len``, then the training fields."""
        record = asdict(self)
        return {**record.pop('data'), **record}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> 'Budget':
        """The inverse of :meth:`record`."""
        data_keys = {f.name for f in fields(DataBudget)}
        return cls(data=DataBudget(**{k: record[k] for k in data_keys}),
                   **{k: v for k, v in record.items() if k not in data_keys})


FULL = Budget(data=DataBudget(corpus_size='4MB', vocab_size=2048, seq_len=128), batch_size=16, steps=300, evals=15,
              hidden_size=64, num_layers=2, intermediate_size=176, num_heads=4, lr=0.003, warmup_frac=0.05,
              num_stages=5, refit_steps=12, weighter_d_model=64, proxy_frac=0.2, proxy_batches_per_domain=4,
              max_eval_batches=8)
QUICK = Budget(data=DataBudget(corpus_size='1MB', vocab_size=1024, seq_len=64), batch_size=8, steps=30, evals=3,
               hidden_size=32, num_layers=1, intermediate_size=64, num_heads=2, lr=0.003, warmup_frac=0.1,
               num_stages=5, refit_steps=1, weighter_d_model=16, proxy_frac=0.34, proxy_batches_per_domain=1,
               max_eval_batches=4)


def _say(msg: str) -> None:
    print(f'[quality] {msg}', flush=True)


# ------------------------------------------------------------------------------------------------------- data
def _say_data(step: str, message: str) -> None:
    """``prepare_data``'s progress (corpus, tokenizer, shards: ``dwm_stream.demo.data``, shared with the demo)."""
    _say(message)


def _count_lines(path: str) -> int:
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def _domain_names(mds_dir: str) -> list[str]:
    with open(os.path.join(mds_dir, 'dwm.json')) as f:
        return list(json.load(f)['domains'])


def _eval_batches(paths: dict[str, str], budget: Budget) -> list[dict]:
    """The fixed held-out batches every evaluation uses (validation shards, in order)."""
    loader = WidenedLoader({'local': paths['validation'], 'shuffle': False}, budget.eval_batch_size, 'validation')
    batches = []
    for batch in loader:
        batches.append({k: batch[k].clone() for k in ('input_ids', 'labels', 'domain')})
        if len(batches) >= budget.max_eval_batches:
            break
    return batches


def evaluate(lm, batches: list[dict], domain_names: list[str]) -> dict[str, float]:
    """Token-mean loss by domain, over the real domains (``clean``: the validation loss of this benchmark), and over
    all domains (``all``)."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    was_training = lm.training
    lm.eval()
    with torch.no_grad():
        for batch in batches:
            loss_sum, count = per_sample_loss_sums(lm(input_ids=batch['input_ids']).logits, batch['labels'])
            for d, s, n in zip(batch['domain'].tolist(), loss_sum.tolist(), count.tolist()):
                name = domain_names[d]
                group = 'degraded' if name in DEGRADED_DOMAINS else 'clean'
                for key in (name, group, 'all'):
                    sums[key] = sums.get(key, 0.0) + s
                    counts[key] = counts.get(key, 0.0) + n
    lm.train(was_training)
    return {k: sums[k] / max(counts[k], 1.0) for k in sums}


# ------------------------------------------------------------------------------------------------------- one run
class QualityProbe(Callback):
    """Evaluations at step 0 and every ``steps / evals`` batches, and the mean weight per domain per stage (stages:
    ``num_stages`` equal parts of the run, DWM's stage boundaries)."""

    def __init__(self, eval_batches: list[dict], domain_names: list[str], budget: Budget):
        self.eval_batches, self.domain_names, self.budget = eval_batches, domain_names, budget
        self.curve: list[dict[str, Any]] = []
        self.batches_done = 0
        self.weight_sums: dict[tuple[int, str], float] = {}
        self.weight_counts: dict[tuple[int, str], int] = {}
        self.eval_seconds = 0.0
        self.spread_sums: dict[int, float] = {}  # per stage: sum over batches of the batch's weight std
        self.spread_counts: dict[int, int] = {}

    def _eval(self, state):
        started = time.perf_counter()
        losses = evaluate(state.model.model, self.eval_batches, self.domain_names)
        self.eval_seconds += time.perf_counter() - started
        self.curve.append({'step': self.batches_done, **losses})

    def fit_start(self, state, logger):
        self._eval(state)

    def batch_end(self, state, logger):
        budget, domain_names = self.budget, self.domain_names
        stage = min(self.batches_done * budget.num_stages // budget.steps, budget.num_stages - 1)
        batch = state.batch
        domains = batch['domain'].tolist()
        weights = batch[WEIGHT_KEY].tolist() if WEIGHT_KEY in batch else [1.0] * len(domains)
        mean_w = sum(weights) / max(len(weights), 1)
        std_w = (sum((w - mean_w) ** 2 for w in weights) / max(len(weights), 1)) ** 0.5
        self.spread_sums[stage] = self.spread_sums.get(stage, 0.0) + float(std_w)
        self.spread_counts[stage] = self.spread_counts.get(stage, 0) + 1
        for d, w in zip(domains, weights):
            key = (stage, domain_names[d])
            self.weight_sums[key] = self.weight_sums.get(key, 0.0) + float(w)
            self.weight_counts[key] = self.weight_counts.get(key, 0) + 1
        self.batches_done += 1
        every = max(1, budget.steps // budget.evals)
        if self.batches_done % every == 0 or self.batches_done == budget.steps:
            if not self.curve or self.curve[-1]['step'] != self.batches_done:
                self._eval(state)

    def stage_weight_std(self) -> list[Optional[float]]:
        """Per stage, the mean over batches of the within-batch std of the weights (0 = uniform)."""
        return [self.spread_sums[k] / self.spread_counts[k] if k in self.spread_counts else None
                for k in range(self.budget.num_stages)]

    def stage_weights(self) -> list[dict[str, float]]:
        table = [{} for _ in range(self.budget.num_stages)]
        for (stage, name), total in sorted(self.weight_sums.items()):
            table[stage][name] = total / self.weight_counts[(stage, name)]
        return table


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one (method, seed) and evaluate it; returns plain JSON-able numbers (and, for the proxy, weights)."""
    torch.set_num_threads(int(spec.get('threads', 1)))
    budget = Budget.from_record(spec['budget'])
    paths, method, seed = spec['paths'], spec['method'], int(spec['seed'])
    steps = int(spec.get('steps') or budget.steps)
    run_budget = replace(budget, steps=steps)
    domain_names = _domain_names(paths['train'])
    reproducibility.seed_all(seed)
    tokenizer = builders.build_tokenizer({'name': paths['tokenizer']})
    model = builders.build_model({'name': 'llama', 'config_overrides': {
        'hidden_size': budget.hidden_size, 'intermediate_size': budget.intermediate_size,
        'num_hidden_layers': budget.num_layers, 'num_attention_heads': budget.num_heads,
        'num_key_value_heads': budget.num_heads, 'max_position_embeddings': budget.seq_len,
        'tie_word_embeddings': True}}, tokenizer)
    train_dataset = {'local': paths['train'], 'shuffle': True, 'shuffle_seed': 17 + seed}
    train_spec = builders.build_train_dataloader({'name': 'dwm', 'dataset': train_dataset}, budget.batch_size)
    eval_batches = _eval_batches(paths, budget) if spec.get('evaluate', True) else []
    probe = QualityProbe(eval_batches, domain_names, run_budget)
    algorithms = []
    if method == 'dwm':
        algorithms.append(builders.ConfiguredDWM(
            train_dataset=train_dataset, tokenizer=tokenizer, device_batch_size=budget.batch_size,
            num_stages=budget.num_stages, refit_steps=budget.refit_steps, refit_lr=budget.refit_lr,
            lookahead=budget.lookahead, lookahead_lr=budget.lookahead_lr, hypergrad='jvp', tau=budget.tau,
            mix_uniform=budget.mix_uniform, domain_names=domain_names,
            refit_kl=budget.refit_kl, refit_backbone_lr_scale=budget.refit_backbone_lr_scale,
            val_batches_per_step=budget.val_batches_per_step,
            weighter={'d_model': budget.weighter_d_model, 'n_layers': 1, 'n_heads': 4,
                      'max_seq_len': budget.seq_len, 'batch_layers': 1, 'embed_norm': budget.embed_norm},
            validation=_dwm_validation(spec, paths, budget)))
    elif method == 'static_domain':
        algorithms.append(StaticDomainWeighting(spec['static_weights'], domain_names=domain_names))
    elif method == 'loss_reweighting':
        algorithms.append(LossReweighting(r=budget.sow_r, warmup=f'{budget.sow_warmup_frac}dur',
                                          domain_names=domain_names))
    elif method != 'uniform':
        raise ValueError(f'unknown method {method!r}; one of {METHODS}')
    memory = InMemoryLogger()
    trainer = Trainer(
        model=model, train_dataloader=train_spec, max_duration=f'{steps}ba',
        optimizers=builders.build_optimizer({'name': 'decoupled_adamw', 'lr': budget.lr, 'betas': [0.9, 0.95],
                                             'eps': 1e-8, 'weight_decay': 0.0}, model),
        schedulers=builders.build_scheduler({'name': 'cosine_with_warmup',
                                             't_warmup': f'{max(1, round(budget.warmup_frac * steps))}ba',
                                             'alpha_f': 0.1}),
        algorithms=algorithms, callbacks=[probe] if spec.get('evaluate', True) else [], loggers=[memory],
        device='cpu', precision='fp32', seed=seed, device_train_microbatch_size=budget.batch_size,
        progress_bar=False, log_to_console=False, python_log_level=None)
    started = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - started
    lm = trainer.state.model.model
    result: dict[str, Any] = {'method': method, 'seed': seed, 'steps': steps,
                              **({'variant': spec['variant']} if spec.get('variant') else {}),
                              'tokens': steps * budget.batch_size * budget.seq_len, 'train_seconds': seconds}
    if spec.get('evaluate', True):
        report = ValidationBatches(paths['lambada_report'], tokenizer, batch_size=32, max_length=budget.seq_len)
        result.update({'curve': probe.curve, 'final': evaluate(lm, eval_batches, domain_names),
                       'lambada': lambada_metrics(lm, report), 'stage_weights': probe.stage_weights(),
                       'stage_weight_std': probe.stage_weight_std(),
                       'eval_seconds': probe.eval_seconds})
    if method == 'dwm':
        refit = {}
        for key in sorted(k for k in memory.data if k.startswith(('dwm/refit/', 'dwm/stage/'))):
            refit[key[len('dwm/'):].replace('refit/', '')] = [float(v) for _, v in memory.data.get(key, [])]
        result['refit'] = refit
    if spec.get('proxy'):
        result['proxy'] = static_weights_from_proxy(lm, tokenizer, paths, budget, domain_names)
    trainer.close()
    return result


def _dwm_validation(spec: dict[str, Any], paths: dict[str, str], budget: Budget) -> dict[str, Any]:
    """DWM's upper-level validation: the LAMBADA fit half (default), or (``dwm_validation: heldout``, the
    investigation) the held-out LM loss on the real domains' validation samples that evaluation never reads, through
    a selection overlay on the validation shards (``ConfiguredDWM``'s ``validation: {dataset: ...}``)."""
    kind = spec.get('dwm_validation', 'lambada')
    if kind == 'lambada':
        return {'lambada': paths['lambada_fit'], 'batch_size': budget.val_batch_size, 'max_length': budget.seq_len}
    if kind == 'heldout':
        return {'dataset': {'local': paths['validation'], 'selection': spec['heldout_selection'], 'shuffle': False},
                'batch_size': budget.val_batch_size}
    raise ValueError(f'unknown dwm_validation {kind!r}; lambada or heldout')


def static_weights_from_proxy(lm, tokenizer, paths: dict[str, str], budget: Budget,
                              domain_names: list[str]) -> dict[str, Any]:
    """The static baseline's weights from the proxy model: per domain, ``<grad L_fit, grad L_domain>``."""
    params = [p for p in lm.parameters() if p.requires_grad]

    def gradient(batches) -> torch.Tensor:
        lm.zero_grad(set_to_none=True)
        total = sum(int((b['labels'][:, 1:] != -100).sum()) for b in batches)
        for b in batches:
            loss_sum, _ = per_sample_loss_sums(lm(input_ids=b['input_ids'],
                                                  attention_mask=b.get('attention_mask')).logits, b['labels'])
            (loss_sum.sum() / max(total, 1)).backward()
        flat = torch.cat([p.grad.reshape(-1) for p in params]).double()
        lm.zero_grad(set_to_none=True)
        return flat

    # Per-domain batches from the training set (its own shuffle seed) and the domain shares of the whole set.
    need = budget.proxy_batches_per_domain * budget.batch_size
    samples: dict[int, list[dict]] = {}
    counts: dict[int, int] = {}
    loader = WidenedLoader({'local': paths['train'], 'shuffle': True, 'shuffle_seed': PROXY_SEED + 1},
                           budget.batch_size, 'train')
    for batch in loader:
        for i, d in enumerate(batch['domain'].tolist()):
            counts[d] = counts.get(d, 0) + 1
            if len(samples.setdefault(d, [])) < need:
                samples[d].append({k: batch[k][i] for k in ('input_ids', 'labels')})
    val = list(ValidationBatches(paths['lambada_fit'], tokenizer, batch_size=budget.val_batch_size,
                                 max_length=budget.seq_len))
    lm.train()
    g_val = gradient(val)
    alignment, cosine = {}, {}
    for d, rows in sorted(samples.items()):
        batches = [{k: torch.stack([r[k] for r in rows[i:i + budget.batch_size]]) for k in ('input_ids', 'labels')}
                   for i in range(0, len(rows), budget.batch_size)]
        g = gradient(batches)
        alignment[domain_names[d]] = float(g_val @ g)
        cosine[domain_names[d]] = float(g_val @ g / (g_val.norm() * g.norm()).clamp(min=1e-30))
    total = sum(counts.values())
    shares = {domain_names[d]: c / total for d, c in counts.items()}
    weights = domain_weights_from_alignment(alignment, shares, mix_uniform=budget.mix_uniform)
    return {'alignment': alignment, 'cosine': cosine, 'shares': shares, 'weights': weights,
            'samples_per_domain': {domain_names[d]: len(r) for d, r in samples.items()},
            'fit_examples': sum(int(b['input_ids'].shape[0]) for b in val)}


# ------------------------------------------------------------------------------------------------------- running
def _run_subprocess(spec: dict[str, Any], work: str) -> dict[str, Any]:
    name = (f'{spec["method"]}{"-" + spec["variant"] if spec.get("variant") else ""}-{spec["seed"]}'
            f'{"-proxy" if spec.get("proxy") else ""}')
    spec_path = os.path.join(work, f'{name}.spec.json')
    result_path = os.path.join(work, f'{name}.result.json')
    with open(spec_path, 'w') as f:
        json.dump(spec, f)
    log_path = os.path.join(work, f'{name}.log')
    with open(log_path, 'w') as log:
        rc = subprocess.call([sys.executable, '-m', 'benchmarks.quality', '--_worker', spec_path, result_path],
                             stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if rc != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f'quality run {name} failed (exit {rc}); log {log_path}:\n{tail}')
    with open(result_path) as f:
        return json.load(f)


def run_all(paths: dict[str, str], budget: Budget, seeds: list[int], jobs: int, work: str) -> dict[str, Any]:
    """The proxy run, then every (method, seed); ``jobs`` > 1 runs them in that many subprocesses."""
    base = {'paths': paths, 'budget': budget.record(), 'threads': 1}
    proxy_spec = {**base, 'method': 'uniform', 'seed': PROXY_SEED, 'proxy': True, 'evaluate': False,
                  'steps': max(2, round(budget.proxy_frac * budget.steps))}
    specs = [{**base, 'method': m, 'seed': s} for s in seeds for m in METHODS if m != 'static_domain']
    runs: list[dict[str, Any]] = []

    def label(spec):
        return f'{spec["method"]} seed {spec["seed"]}' + (' (proxy)' if spec.get('proxy') else '')

    def execute(spec):
        started = time.perf_counter()
        result = run_one(spec) if jobs <= 1 else _run_subprocess(spec, work)
        _say(f'{label(spec)}: {time.perf_counter() - started:.0f}s')
        return result

    if jobs <= 1:
        proxy = execute(proxy_spec)
        for spec in specs:
            runs.append(execute(spec))
        for s in seeds:
            runs.append(execute({**base, 'method': 'static_domain', 'seed': s,
                                 'static_weights': proxy['proxy']['weights']}))
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            proxy_future = pool.submit(execute, proxy_spec)
            futures = [pool.submit(execute, spec) for spec in specs]
            proxy = proxy_future.result()
            futures += [pool.submit(execute, {**base, 'method': 'static_domain', 'seed': s,
                                              'static_weights': proxy['proxy']['weights']}) for s in seeds]
            runs = [f.result() for f in futures]
    return {'proxy': {'seed': PROXY_SEED, 'steps': proxy['steps'], 'train_seconds': proxy['train_seconds'],
                      **proxy['proxy']},
            'runs': sorted(runs, key=lambda r: (METHODS.index(r['method']), r['seed']))}


# ------------------------------------------------------------------------------------------------------- analysis
def steps_to_reach(curve: list[dict[str, Any]], target: float, key: str = 'clean') -> Optional[float]:
    """First step at which the eval curve reaches ``target`` (linear interpolation between evaluations), or
    ``None`` if it never does."""
    for i, point in enumerate(curve):
        if point[key] <= target:
            if i == 0:
                return float(point['step'])
            prev = curve[i - 1]
            frac = (prev[key] - target) / (prev[key] - point[key])
            return float(prev['step'] + frac * (point['step'] - prev['step']))
    return None


def _mean_stage_weights(runs: list[dict[str, Any]], domains: list[str], num_stages: int) -> list[dict[str, float]]:
    """Per stage, each domain's mean weight over the runs that saw it (a domain may be absent from a short stage)."""
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


def analyse(raw: dict[str, Any], budget: Budget, domain_names: list[str]) -> dict[str, Any]:
    """Per-method summaries, the steps-to-target figures and the two targets."""
    runs = raw['runs']
    by = {m: {r['seed']: r for r in runs if r['method'] == m} for m in METHODS}
    seeds = sorted(by['uniform'])
    methods = {}
    for m in METHODS:
        rs = [by[m][s] for s in seeds if s in by[m]]
        reach = []
        for s in seeds:
            target = by['uniform'][s]['final']['clean']
            step = steps_to_reach(by[m][s]['curve'], target)
            reach.append({'seed': s, 'target': target, 'step': step,
                          'fraction': None if step is None else step / by[m][s]['steps']})
        fractions = [x['fraction'] for x in reach]
        stage_weights = _mean_stage_weights(rs, domain_names, budget.num_stages)
        methods[m] = {
            'label': LABELS[m],
            'final_clean': _stats([r['final']['clean'] for r in rs]),
            'final_all': _stats([r['final']['all'] for r in rs]),
            'final_degraded': _stats([r['final']['degraded'] for r in rs]),
            'final_by_domain': {d: sum(r['final'][d] for r in rs) / len(rs) for d in domain_names
                                if all(d in r['final'] for r in rs)},
            'lambada_accuracy': _stats([r['lambada']['accuracy'] for r in rs]),
            'lambada_loss': _stats([r['lambada']['loss'] for r in rs]),
            'lambada_examples': rs[0]['lambada']['examples'],
            'train_seconds': _stats([r['train_seconds'] for r in rs]),
            'reach_uniform_final': reach,
            'reach_fraction_mean': (sum(fractions) / len(fractions)) if all(f is not None for f in fractions)
                                   else None,
            'seeds_reached': sum(f is not None for f in fractions),
            'stage_weights': stage_weights,
        }
    degraded = [d for d in domain_names if d in DEGRADED_DOMAINS]
    last = {d: w for d, w in methods['dwm']['stage_weights'][-1].items() if d in degraded}
    frac = methods['dwm']['reach_fraction_mean']
    targets = [
        {'name': 'DWM reaches uniform\'s final validation loss in <= 80% of the steps (mean over seeds)',
         'measured': frac, 'bound': TARGET_STEP_FRACTION,
         'met': frac is not None and frac <= TARGET_STEP_FRACTION},
        {'name': 'degraded domains\' mean DWM weight <= 0.5 in the last stage',
         'measured': sum(last.values()) / max(len(last), 1), 'bound': TARGET_DEGRADED_WEIGHT,
         'per_domain': last, 'met': bool(last) and sum(last.values()) / len(last) <= TARGET_DEGRADED_WEIGHT},
    ]
    return {'methods': methods, 'targets': targets, 'degraded_domains': degraded, 'seeds': seeds}


# ------------------------------------------------------------------------------------------------------- report
def _f(x: Optional[float], fmt: str = '.3f') -> str:
    return '-' if x is None else format(x, fmt)


def _mmm(s: dict[str, float], fmt: str = '.3f') -> str:
    return f'{format(s["mean"], fmt)} ({format(s["min"], fmt)}–{format(s["max"], fmt)})'


def render_section(results: dict[str, Any], images: Optional[list[str]] = None,
                   investigation: Optional[dict[str, Any]] = None) -> str:
    """The RESULTS.md section, from the JSON alone (and the investigation JSON, when there is one)."""
    b = results['budget']
    m = results['machine']
    v = results['versions']
    a = results['analysis']
    seeds = a['seeds']
    n = len(seeds)
    degraded = a['degraded_domains']
    label = 'QUICK RUN (CI size; not the full benchmark)' if results['quick'] else 'full run'
    lines = [
        BEGIN_MARK,
        '## Quality proxy',
        '',
        f'_Generated by `benchmarks/quality.py{" --quick" if results["quick"] else ""}` on {results["date"]} from '
        f'`results/quality.json` ({label}); do not edit by hand._',
        '',
        f'- **Machine:** {describe_machine(m)}, Python {m["python"]}; '
        f'each run on 1 torch thread, {results["jobs"]} run(s) at a time; wall time {results["seconds"] / 60:.1f} min.',
        '- **Libraries:** ' + ', '.join(f'{k} {v[k]}' for k in sorted(v)) + '.',
        f'- **Data:** the embedded corpus ({b["corpus_size"]}, {results["data"]["train_samples"]:,} train samples of '
        f'{b["seq_len"]} tokens; degraded domains: {", ".join(degraded)}), BPE vocabulary {b["vocab_size"]}. '
        f'Validation loss = token-mean loss on the validation shards of the real domains '
        f'({results["data"]["eval_samples"]} samples, fixed); LAMBADA-format: {results["data"]["lambada_fit"]} '
        f'passages fit DWM and the static weights, {results["data"]["lambada_report"]} others are reported.',
        f'- **Model and budget:** Llama {b["num_layers"]}x{b["hidden_size"]} ({results["model_params"]:,} params), '
        f'{b["steps"]} steps x {b["batch_size"]} samples x {b["seq_len"]} tokens = '
        f'{b["steps"] * b["batch_size"] * b["seq_len"]:,} tokens for every method, AdamW lr {b["lr"]}, cosine; '
        f'{b["evals"]} evaluations + step 0. **{n} seed(s)** ({", ".join(map(str, seeds))}): a seed fixes the '
        f'initialisation and the sample order, identical across methods; figures are mean (min–max) over seeds.',
        f'- **DWM:** {b["num_stages"]} stages, {b["refit_steps"]} refit steps per stage (Adam lr {b["refit_lr"]}), '
        f'{b["lookahead"]} look-ahead lr {b["lookahead_lr"]}, weighter d_model {b["weighter_d_model"]}, '
        f'τ {b["tau"]}, λ {b["mix_uniform"]} (the settings of `yamls/demo-cpu.yaml`, not tuned here).',
        f'- **Static domain weights:** one uniform proxy run ({results["proxy"]["steps"]} steps, seed '
        f'{results["proxy"]["seed"]}); per domain, `<∇L_fit, ∇L_domain>` on {b["proxy_batches_per_domain"]} '
        f'batch(es) of that domain vs the {results["proxy"]["fit_examples"]} LAMBADA fit passages, clipped at 0, '
        f'scaled to mean 1 over the training mix, mixed with uniform (λ {b["mix_uniform"]}); fixed for every seed.',
        f'- **Loss-based (Sow et al. 2025):** LinUpper, r {b["sow_r"]}, uniform for the first '
        f'{b["sow_warmup_frac"]:.0%} of steps; weights from the batch\'s own losses, mean 1 per batch.',
        '',
        '### Results',
        '',
        '| method | val loss (real domains) | val loss (degraded) | LAMBADA loss | LAMBADA acc | '
        'steps to uniform\'s final val loss | train s |',
        '|---|---:|---:|---:|---:|---:|---:|',
    ]
    for key, s in a['methods'].items():
        frac = s['reach_fraction_mean']
        if frac is not None:
            steps = f'{frac:.0%} ({", ".join(_f(x["step"], ".0f") for x in s["reach_uniform_final"])})'
        else:
            steps = (f'not reached in {n - s["seeds_reached"]} of {n} seed(s) '
                     f'({", ".join(_f(x["step"], ".0f") for x in s["reach_uniform_final"])})')
        lines.append(f'| {s["label"]} | {_mmm(s["final_clean"], ".4f")} | {_mmm(s["final_degraded"], ".4f")} | '
                     f'{_mmm(s["lambada_loss"], ".4f")} | {_mmm(s["lambada_accuracy"], ".3f")} | {steps} | '
                     f'{s["train_seconds"]["median"]:.0f} |')
    lines += [
        '',
        f'Steps to uniform\'s final val loss: per seed, the first step at which the method\'s validation curve '
        f'reaches the uniform run\'s final value of the same seed (linear interpolation between evaluations), as a '
        f'share of the {b["steps"]} steps (mean over seeds), then the per-seed steps. Uniform itself reaches it at '
        f'its last step by definition. LAMBADA acc: share of the {a["methods"]["uniform"]["lambada_examples"]} '
        f'report passages whose final word is predicted exactly (greedy); tiny models score near 0, so the '
        f'continuation loss is the more informative figure. Train time includes DWM\'s refits.',
        '',
        '### Targets',
        '',
        '| target | measured | bound | met |',
        '|---|---:|---:|:---:|',
    ]
    for t in a['targets']:
        measured = 'not reached' if t['measured'] is None else (
            f'{t["measured"]:.0%}' if 'steps' in t['name'] else f'{t["measured"]:.3f}')
        bound = f'{t["bound"]:.0%}' if 'steps' in t['name'] else f'{t["bound"]:.2f}'
        lines.append(f'| {t["name"]} | {measured} | {bound} | {"yes" if t["met"] else "**no**"} |')
    lines += ['', '### Mean weight per domain per stage (1 = uniform; mean over seeds)', '']
    domains = results['data']['domains']
    for key in ('dwm', 'static_domain', 'loss_reweighting'):
        s = a['methods'][key]
        k = len(s['stage_weights'])
        lines += [f'**{s["label"]}**', '',
                  '| domain | ' + ' | '.join(f'stage {i + 1}' for i in range(k)) + ' |',
                  '|---|' + '---:|' * k]
        for d in domains:
            mark = ' (degraded)' if d in degraded else ''
            lines.append(f'| {d}{mark} | ' + ' | '.join(_f(s['stage_weights'][i].get(d)) for i in range(k)) + ' |')
        lines.append('')
    p = results['proxy']
    lines += ['**Static baseline, from the proxy run:** ' + ', '.join(
        f'{d} {p["weights"][d]:.2f} (cos {p["cosine"][d]:+.2f})' for d in domains if d in p['weights']) + '.', '']
    dwm_refit = results.get('dwm_refit')
    if dwm_refit:
        lines += ['**DWM refits** (look-ahead validation loss on the first refit pair, before -> after each refit; '
                  'seed ' + str(seeds[0]) + '): ' + ', '.join(
                      f'{x:.3f} -> {y:.3f}' for x, y in zip(dwm_refit['val_loss_before'], dwm_refit['val_loss_after']))
                  + '.', '']
    if results.get('notes'):
        lines += ['### Notes', ''] + [f'- {x}' for x in results['notes']] + ['']
    for image in images or []:
        lines.append(f'![quality]({image})')
    if investigation is not None:
        lines += [''] + render_investigation(investigation, results)
    lines += ['', END_MARK]
    return '\n'.join(lines)


def notes(results: dict[str, Any]) -> list[str]:
    """Plain statements of what the numbers say (generated, so they follow the JSON)."""
    a = results['analysis']
    out = []
    for t in a['targets']:
        if not t['met']:
            out.append(f'Target missed: {t["name"]}: measured '
                       f'{"not reached" if t["measured"] is None else format(t["measured"], ".3f")} against '
                       f'{t["bound"]}.')
    uni = a['methods']['uniform']['final_clean']['mean']
    for key in ('dwm', 'static_domain', 'loss_reweighting'):
        s = a['methods'][key]
        diff = s['final_clean']['mean'] - uni
        wins = sum(r['final']['clean'] < u['final']['clean'] for r, u in zip(
            [r for r in results['runs'] if r['method'] == key],
            [r for r in results['runs'] if r['method'] == 'uniform']))
        out.append(f'{s["label"]}: final validation loss {diff:+.4f} vs uniform (mean over seeds; lower than uniform '
                   f'in {wins} of {len(a["seeds"])} seed(s)).')
    # What the validation signal itself says about the degraded domains (the proxy model's gradient alignment).
    cos = results['proxy']['cosine']
    helpful = [d for d in a['degraded_domains'] if cos.get(d, 0.0) > 0]
    if helpful:
        out.append('At the end of the proxy run the LAMBADA fit loss (the signal DWM and the static baseline both fit) '
                   'is itself lowered by training on degraded domain(s) ' + ', '.join(
                       f'{d} (cos {cos[d]:+.2f})' for d in helpful) + ': they carry the prose vocabulary, and a '
                   'LAMBADA example scores one final word. At this scale, down-weighting them is not what that '
                   'validation signal asks for.')
    if results['quick']:
        out.append('These are --quick figures (CI size): too few steps to mean anything about quality.')
    out.extend(results.get('extra_notes', []))
    return out


def replace_section(path: str, section: str) -> None:
    """Replace the text between the quality markers of ``path`` (appending it if absent)."""
    _replace_section(path, section, BEGIN_MARK, END_MARK)


def read_section(path: str) -> str:
    """The quality section of ``path``, markers included."""
    return _read_section(path, BEGIN_MARK, END_MARK)


def plot(results: dict[str, Any], curves_path: str, weights_path: str) -> None:
    a = results['analysis']
    colors = {'uniform': 'tab:gray', 'dwm': 'tab:blue', 'static_domain': 'tab:green', 'loss_reweighting': 'tab:orange'}
    fig = Figure(figsize=(13, 4.8))  # no pyplot: no GUI backend, no global figure state
    axes = fig.subplots(1, 2)
    for ax, key, title in ((axes[0], 'clean', 'real domains'), (axes[1], 'degraded', 'degraded domains')):
        for m in METHODS:
            runs = [r for r in results['runs'] if r['method'] == m]
            for i, r in enumerate(runs):
                ax.plot([p['step'] for p in r['curve']], [p[key] for p in r['curve']], color=colors[m], alpha=0.8,
                        lw=1.2, label=a['methods'][m]['label'] if i == 0 else None)
        ax.set_xlabel('training step')
        ax.set_ylabel('held-out loss (nats/token)')
        ax.set_title(f'Validation loss, {title} (one line per seed)')
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(curves_path, dpi=100)

    domains = results['data']['domains']
    fig = Figure(figsize=(16, 4.6))
    axes = fig.subplots(1, 3, sharey=True)
    for ax, m in zip(axes, ('dwm', 'static_domain', 'loss_reweighting')):
        sw = a['methods'][m]['stage_weights']
        xs = list(range(1, len(sw) + 1))
        for d in domains:
            style = '--' if d in a['degraded_domains'] else '-'
            ax.plot(xs, [sw[k].get(d, float('nan')) for k in range(len(sw))], style, marker='o',
                    label=d + (' (degraded)' if d in a['degraded_domains'] else ''))
        ax.axhline(1.0, color='grey', lw=0.8)
        ax.axhline(TARGET_DEGRADED_WEIGHT, color='red', lw=0.6, ls=':')
        ax.set_xticks(xs)
        ax.set_xlabel('stage')
        ax.set_title(f'{a["methods"][m]["label"]}: mean weight by domain')
    axes[0].set_ylabel('mean weight (1 = uniform)')
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(weights_path, dpi=100)


# ------------------------------------------------------------------------------------------------------- investigation
INVESTIGATION_JSON = 'quality_investigation.json'
# Issue 6: DWM missed both targets; find out why by changing ONE factor at a time, for DWM only, on the same seeds,
# budget, model and data as results/quality.json (uniform and the baselines are not re-run). Every setting change
# applies to all seeds and is recorded in the JSON.
VARIANTS: dict[str, dict[str, Any]] = {
    'heldout_val': {
        'label': 'V1: held-out LM validation',
        'change': 'upper-level validation = token-mean LM loss on held-out validation samples of the real domains '
                  '(those the reported validation loss never reads) instead of the 60 LAMBADA fit passages',
        'dwm_validation': 'heldout', 'budget': {}},
    'adam_lookahead': {
        'label': 'V2a: Adam look-ahead',
        'change': 'look-ahead preconditioned by the LLM optimizer\'s second moments (lookahead: adam) instead of '
                  'sgd; LAMBADA validation kept',
        'dwm_validation': 'lambada', 'budget': {'lookahead': 'adam'}},
    'refit_4x': {
        'label': 'V2b: 4x refit steps',
        'change': '4x the refit steps per stage; LAMBADA validation kept',
        'dwm_validation': 'lambada', 'budget': {'refit_steps': '4x'}},
}


def _variant_budget(budget: Budget, variant: str) -> Budget:
    overrides = {}
    for key, value in VARIANTS[variant]['budget'].items():
        if isinstance(value, str) and value.endswith('x') and value[:-1].isdigit():
            value = int(value[:-1]) * getattr(budget, key)
        overrides[key] = value
    return replace(budget, **overrides)


def heldout_selection(paths: dict[str, str], budget: Budget) -> dict[str, Any]:
    """The held-out DWM validation split: every validation sample of a real (non-degraded) domain that is NOT one
    of the fixed evaluation samples (the first ``max_eval_batches x eval_batch_size`` of the validation shards in
    order, see :func:`_eval_batches`). Written as a selection overlay (by uid) next to the shards; disjoint from the
    reported validation loss by construction (checked)."""
    names = _domain_names(paths['validation'])
    eval_uids = {int(u) for b in _eval_batches_uids(paths, budget) for u in b}
    uids, per_domain = [], {}
    for batch in WidenedLoader({'local': paths['validation'], 'shuffle': False}, 1, 'validation'):
        uid, d = int(batch['uid'][0]), names[int(batch['domain'][0])]
        if uid in eval_uids or d in DEGRADED_DOMAINS:
            continue
        uids.append(uid)
        per_domain[d] = per_domain.get(d, 0) + 1
    assert not set(uids) & eval_uids
    path = os.path.join(paths['root'], f'dwm_val_heldout-e{budget.max_eval_batches}x{budget.eval_batch_size}.parquet')
    write_selection(path, np.asarray(uids, dtype=np.int64),
                    info={'what': 'quality investigation: held-out DWM validation (real domains, not evaluated)'})
    return {'path': path, 'samples': len(uids), 'per_domain': per_domain, 'eval_samples_excluded': len(eval_uids),
            'batches_per_pass': len(uids) // budget.val_batch_size}


def _eval_batches_uids(paths: dict[str, str], budget: Budget) -> list[list[int]]:
    loader = WidenedLoader({'local': paths['validation'], 'shuffle': False}, budget.eval_batch_size, 'validation')
    out = []
    for batch in loader:
        out.append(batch['uid'].tolist())
        if len(out) >= budget.max_eval_batches:
            break
    return out


def _summarise_dwm_runs(runs: list[dict[str, Any]], uniform: dict[int, dict[str, Any]],
                        degraded: list[str], domains: list[str], num_stages: int) -> dict[str, Any]:
    """Per seed: final val loss against uniform's, the steps to uniform's final loss; and the weights by stage."""
    per_seed = []
    for r in sorted(runs, key=lambda r: r['seed']):
        u = uniform[r['seed']]
        step = steps_to_reach(r['curve'], u['final']['clean'])
        per_seed.append({'seed': r['seed'], 'final_clean': r['final']['clean'], 'uniform_final_clean':
                         u['final']['clean'], 'diff_vs_uniform': r['final']['clean'] - u['final']['clean'],
                         'final_degraded': r['final']['degraded'], 'lambada_loss': r['lambada']['loss'],
                         'reach_step': step, 'reach_fraction': None if step is None else step / r['steps'],
                         'refit_before': r.get('refit', {}).get('val_loss_before', []),
                         'refit_after': r.get('refit', {}).get('val_loss_after', []),
                         'train_seconds': r['train_seconds']})
    stage_weights = _mean_stage_weights(runs, domains, num_stages)
    fractions = [x['reach_fraction'] for x in per_seed]
    spread = None  # within-batch weight std by stage (runs made before the probe recorded it have none)
    if runs and all(r.get('stage_weight_std') for r in runs):
        spread = [None if any(r['stage_weight_std'][k] is None for r in runs) else
                  sum(r['stage_weight_std'][k] for r in runs) / len(runs) for k in range(num_stages)]
    last_degraded = [stage_weights[-1][d] for d in degraded if d in stage_weights[-1]]
    clean = [d for d in domains if d not in degraded]

    def group(row, names):
        vals = [row[d] for d in names if d in row]
        return sum(vals) / len(vals) if vals else None

    by_domain = {d: sum(r['final'][d] - uniform[r['seed']]['final'][d] for r in runs) / len(runs)
                 for d in domains if all(d in r['final'] and d in uniform[r['seed']]['final'] for r in runs)}
    return {
        'per_seed': per_seed,
        'final_by_domain_diff_vs_uniform': by_domain,
        'diff_vs_uniform_mean': sum(x['diff_vs_uniform'] for x in per_seed) / len(per_seed),
        'seeds_below_uniform': sum(x['diff_vs_uniform'] < 0 for x in per_seed),
        'seeds_reached': sum(f is not None for f in fractions),
        'reach_fraction_mean': (sum(fractions) / len(fractions)) if all(f is not None for f in fractions) else None,
        'stage_weights': stage_weights,
        'weight_std_by_stage': spread,
        'degraded_weight_by_stage': [group(row, degraded) for row in stage_weights],
        'clean_weight_by_stage': [group(row, clean) for row in stage_weights],
        'last_stage_degraded_weight': sum(last_degraded) / len(last_degraded) if last_degraded else None,
        'curves': {str(r['seed']): [{'step': p['step'], 'clean': p['clean']} for p in r['curve']] for r in runs},
    }


def analyse_investigation(quality: dict[str, Any], variant_runs: dict[str, list[dict[str, Any]]],
                          variant_info: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The baseline DWM (from quality.json) and each variant, summarised the same way."""
    a = quality['analysis']
    degraded, domains = a['degraded_domains'], quality['data']['domains']
    n = quality['budget']['num_stages']
    uniform = {r['seed']: r for r in quality['runs'] if r['method'] == 'uniform'}
    out = {'baseline': {'label': 'DWM as benchmarked (LAMBADA validation, sgd look-ahead)',
                        'change': 'none (the DWM runs of results/quality.json)', 'settings': {},
                        **_summarise_dwm_runs([r for r in quality['runs'] if r['method'] == 'dwm'], uniform,
                                              degraded, domains, n)}}
    for name, runs in variant_runs.items():
        out[name] = {**variant_info[name], **_summarise_dwm_runs(runs, uniform, degraded, domains, n)}
    return out


def run_investigation(args: argparse.Namespace) -> int:
    """Run the named DWM variants against ``OUT/quality.json``'s seeds, budget and data; merge them into
    ``OUT/quality_investigation.json``; re-render the quality section of RESULTS.md (quality.json untouched)."""
    started = time.perf_counter()
    with open(os.path.join(args.out, 'quality.json')) as f:
        quality = json.load(f)
    budget = Budget.from_record(quality['budget'])
    seeds = args.seeds if args.seeds is not None else quality['analysis']['seeds']
    missing = sorted(set(seeds) - {r['seed'] for r in quality['runs'] if r['method'] == 'uniform'})
    if missing:
        raise SystemExit(f'quality.json has no uniform run for seed(s) {missing}; run the benchmark first')
    jobs = args.jobs or min(2, os.cpu_count() or 1)
    paths = prepare_data(args.data_dir, budget.data, say=_say_data)
    inv_path = os.path.join(args.out, INVESTIGATION_JSON)
    previous: dict[str, Any] = {}
    if os.path.exists(inv_path):
        with open(inv_path) as f:
            previous = json.load(f)
        if previous.get('quality_date') != quality['date']:
            previous = {}  # made against another quality.json: start over
    variant_runs: dict[str, list[dict[str, Any]]] = dict(previous.get('variant_runs', {}))
    variant_info: dict[str, dict[str, Any]] = dict(previous.get('variant_info', {}))
    selection = previous.get('heldout_selection')
    specs = []
    for name in args.investigate:
        if name not in VARIANTS:
            raise SystemExit(f'unknown variant {name!r}; one of {sorted(VARIANTS)}')
        v = VARIANTS[name]
        vb = _variant_budget(budget, name)
        spec = {'paths': paths, 'budget': vb.record(), 'threads': 1, 'method': 'dwm', 'variant': name,
                'dwm_validation': v['dwm_validation']}
        if v['dwm_validation'] == 'heldout':
            selection = heldout_selection(paths, budget)
            spec['heldout_selection'] = selection['path']
        changed = {k: v for k, v in vb.record().items() if v != budget.record()[k]}
        variant_info[name] = {'label': v['label'], 'change': v['change'],
                              'settings': {**changed, 'dwm_validation': v['dwm_validation']}}
        specs += [{**spec, 'seed': s} for s in seeds]
    _say(f'investigation: {len(specs)} DWM run(s) ({", ".join(args.investigate)}; seeds {seeds}), {jobs} at a time')
    with tempfile.TemporaryDirectory(prefix='dwm-bench-quality-inv-') as work:
        def execute(spec):
            t = time.perf_counter()
            if jobs <= 1:
                result = run_one(spec)
            else:
                try:
                    result = _run_subprocess(spec, work)
                except RuntimeError as e:  # seen once: a start-up race of two streaming datasets; retry once
                    _say(f'{spec["variant"]} seed {spec["seed"]} failed at start, retrying: {str(e)[-200:]}')
                    time.sleep(5)
                    result = _run_subprocess(spec, work)
            _say(f'{spec["variant"]} seed {spec["seed"]}: {time.perf_counter() - t:.0f}s')
            return result
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            results = list(pool.map(execute, specs))
    for name in args.investigate:
        variant_runs[name] = sorted([r for r in results if r.get('variant') == name], key=lambda r: r['seed'])
    inv = {'benchmark': 'quality_investigation', 'quality_date': quality['date'], 'quick': quality['quick'],
           'date': utc_now(), 'machine': machine_info(), 'jobs': jobs, 'seeds': seeds,
           'seconds': previous.get('seconds', 0.0) + time.perf_counter() - started,
           'heldout_selection': selection, 'variant_info': variant_info, 'variant_runs': variant_runs,
           'command': 'python -m benchmarks.quality --investigate ' + ' '.join(
               n for n in VARIANTS if n in variant_runs)}
    inv['analysis'] = analyse_investigation(quality, variant_runs, variant_info)
    write_json(inv_path, inv)
    png = os.path.join(args.out, 'quality_investigation.png')
    plot_investigation(quality, inv, png)
    results_md = results_md_path(args)
    replace_section(results_md, render_section(quality, _images(args.out, results_md), inv))
    _say(f'wrote {inv_path}, {png} and the quality section of {results_md}')
    for line in render_investigation(inv, quality):
        if line.startswith('|') or line.startswith('- '):
            _say(line)
    return 0


def _images(out: str, results_md: str) -> list[str]:
    return [os.path.relpath(os.path.join(out, p), os.path.dirname(os.path.abspath(results_md)))
            for p in ('quality_curves.png', 'quality_weights.png')]


def _pct(x: Optional[float]) -> str:
    return '-' if x is None else f'{x:.0%}'


def render_investigation(inv: dict[str, Any], quality: dict[str, Any]) -> list[str]:
    """The ``### Investigation`` subsection, from the investigation JSON alone (plus quality.json's date)."""
    lines = ['### Investigation: why DWM misses (one factor at a time, DWM only)', '']
    if inv.get('quality_date') != quality.get('date'):
        return lines + [f'_`results/{INVESTIGATION_JSON}` was made against the quality run of '
                        f'{inv.get("quality_date")}, not this one ({quality.get("date")}); re-run '
                        f'`{inv.get("command", "benchmarks/quality.py --investigate ...")}`._', '']
    a = inv['analysis']
    b = quality['budget']
    lines += [
        f'_Generated by `benchmarks/quality.py --investigate` on {inv["date"]} from `results/{INVESTIGATION_JSON}` '
        f'(wall time {inv["seconds"] / 60:.1f} min, {inv["jobs"]} run(s) at a time); do not edit by hand._',
        '',
        f'Same seeds ({", ".join(map(str, inv["seeds"]))}), model, data, sample order and {b["steps"]}-step budget as '
        'above; uniform and the baselines are not re-run: every figure is compared with the uniform run of the same '
        'seed in `results/quality.json`. Each variant changes one DWM setting, for every seed:',
        '']
    for key, s in a.items():
        settings = ', '.join(f'{k} = {v}' for k, v in s.get('settings', {}).items())
        lines.append(f'- **{s["label"]}**: {s["change"]}' + (f' ({settings})' if settings else '') + '.')
    sel = inv.get('heldout_selection')
    if sel and 'heldout_val' in a:
        lines.append(f'- Held-out split (V1): the validation shards\' samples of the real domains that are not among '
                     f'the {sel["eval_samples_excluded"]} evaluated ones (the first {b["max_eval_batches"]} x '
                     f'{b["eval_batch_size"]} in shard order): {sel["samples"]} samples (' + ', '.join(
                         f'{d} {c}' for d, c in sorted(sel['per_domain'].items())) + f'), a uid selection overlay, '
                     f'{sel["batches_per_pass"]} batches of {b["val_batch_size"]} cycled in order; disjoint from the '
                     'reported validation loss by construction.')
    lines += ['', '| variant | final val loss − uniform, per seed | mean | below uniform | steps to uniform\'s final '
              'val loss | degraded weight, last stage | LAMBADA loss |', '|---|---|---:|---:|---:|---:|---:|']
    for key, s in a.items():
        per = ', '.join(f'{x["diff_vs_uniform"]:+.4f}' for x in s['per_seed'])
        steps = ', '.join(_f(x['reach_step'], '.0f') for x in s['per_seed'])
        reach = (f'{_pct(s["reach_fraction_mean"])} ({steps})' if s['reach_fraction_mean'] is not None else
                 f'{s["seeds_reached"]} of {len(s["per_seed"])} seeds ({steps})')
        lam = sum(x['lambada_loss'] for x in s['per_seed']) / len(s['per_seed'])
        lines.append(f'| {s["label"]} | {per} | {s["diff_vs_uniform_mean"]:+.4f} | {s["seeds_below_uniform"]} of '
                     f'{len(s["per_seed"])} | {reach} | {_f(s["last_stage_degraded_weight"])} | {lam:.4f} |')
    lines += ['', 'Per seed, the final validation loss (real domains) minus the uniform run\'s of the same seed; steps '
              'to uniform\'s final val loss as above (per seed, "-" = not reached); targets: <= 80% of the steps and '
              f'a degraded weight <= {TARGET_DEGRADED_WEIGHT}.', '',
              '**Mean weight by stage (mean over seeds; 1 = uniform):** degraded domains / real domains', '',
              '| variant | ' + ' | '.join(f'stage {i + 1}' for i in range(b['num_stages'])) + ' |',
              '|---|' + '---:|' * b['num_stages']]
    for key, s in a.items():
        lines.append(f'| {s["label"]} | ' + ' | '.join(
            f'{_f(d)} / {_f(c)}' for d, c in zip(s['degraded_weight_by_stage'], s['clean_weight_by_stage'])) + ' |')
    evaluated = [d for d in quality['data']['domains'] if all(d in s['final_by_domain_diff_vs_uniform']
                                                               for s in a.values())]
    lines += ['', '**Final validation loss by evaluated domain, minus uniform\'s** (mean over seeds; the fixed '
              'evaluation samples hold these domains only):', '',
              '| variant | ' + ' | '.join(evaluated) + ' |', '|---|' + '---:|' * len(evaluated)]
    for s in a.values():
        lines.append(f'| {s["label"]} | ' + ' | '.join(f'{s["final_by_domain_diff_vs_uniform"][d]:+.3f}'
                                                        for d in evaluated) + ' |')
    spread = [(s['label'], s['weight_std_by_stage']) for s in a.values() if s.get('weight_std_by_stage')]
    if spread:
        lines += ['', '**Within-batch std of the weights by stage** (mean over batches and seeds; 0 = uniform; '
                  'variants whose runs recorded it; a batch with weight std σ has an effective sample size of '
                  '1/(1+σ²) of the batch):', '',
                  '| variant | ' + ' | '.join(f'stage {i + 1}' for i in range(b['num_stages'])) + ' |',
                  '|---|' + '---:|' * b['num_stages']]
        for label, row in spread:
            lines.append(f'| {label} | ' + ' | '.join(_f(x) for x in row) + ' |')
    domains = quality['data']['domains']
    degraded = quality['analysis']['degraded_domains']
    for key, s in a.items():
        if key == 'baseline':
            continue  # its per-domain table is above
        k = len(s['stage_weights'])
        lines += ['', f'**{s["label"]}: mean weight per domain per stage**', '',
                  '| domain | ' + ' | '.join(f'stage {i + 1}' for i in range(k)) + ' |', '|---|' + '---:|' * k]
        for d in domains:
            mark = ' (degraded)' if d in degraded else ''
            lines.append(f'| {d}{mark} | ' + ' | '.join(_f(s['stage_weights'][i].get(d)) for i in range(k)) + ' |')
    lines += ['', '**Refits** (look-ahead validation loss on the first refit pair, before -> after, per stage; '
              f'seed {inv["seeds"][0]}):', '']
    for key, s in a.items():
        x = s['per_seed'][0]
        lines.append(f'- {s["label"]}: ' + ', '.join(f'{p:.3f} -> {q:.3f}' for p, q in zip(x['refit_before'],
                                                                                            x['refit_after'])) + '.')
    lines += ['', f'![quality investigation]({"results/quality_investigation.png"})', '']
    return lines


def plot_investigation(quality: dict[str, Any], inv: dict[str, Any], path: str) -> None:
    a = inv['analysis']
    fig = Figure(figsize=(13, 4.6))
    axes = fig.subplots(1, 2)
    uniform = {r['seed']: r for r in quality['runs'] if r['method'] == 'uniform'}
    seeds = inv['seeds']

    def mean_curve(curves):
        steps = [p['step'] for p in curves[0]]
        return steps, [sum(c[i]['clean'] for c in curves) / len(curves) for i in range(len(steps))]

    xs, ys = mean_curve([uniform[s]['curve'] for s in seeds])
    axes[0].plot(xs, ys, color='tab:gray', lw=2, label='uniform')
    for key, s in a.items():
        xs, ys = mean_curve([s['curves'][str(seed)] for seed in seeds])
        axes[0].plot(xs, ys, lw=1.3, label=s['label'])
        axes[1].plot(range(1, len(s['degraded_weight_by_stage']) + 1),
                     [float('nan') if w is None else w for w in s['degraded_weight_by_stage']], marker='o',
                     label=s['label'])
    axes[0].set_ylim(top=min(axes[0].get_ylim()[1], 6.5))
    axes[0].set_xlabel('training step')
    axes[0].set_ylabel('held-out loss, real domains (mean over seeds)')
    axes[0].set_title('Validation loss: DWM variants vs uniform')
    axes[0].legend(fontsize=8)
    axes[1].axhline(1.0, color='grey', lw=0.8)
    axes[1].axhline(TARGET_DEGRADED_WEIGHT, color='red', lw=0.6, ls=':')
    axes[1].set_xlabel('stage')
    axes[1].set_ylabel('mean weight of the degraded domains')
    axes[1].set_title('Degraded domains\' weight by stage (mean over seeds)')
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ------------------------------------------------------------------------------------------------------- main
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m benchmarks.quality', description=__doc__.splitlines()[0],
                                     parents=[output_options('CI size: 1 seed, a few steps (< ~2 min)')])
    parser.add_argument('--seeds', type=int, nargs='+', default=None,
                        help='seeds (default: 0 1 2; --quick: 0)')
    parser.add_argument('--steps', type=int, default=None, help='override the training steps of every run')
    parser.add_argument('--jobs', type=int, default=None,
                        help='runs at a time, each in its own process on 1 thread (default: 1 with --quick, else '
                             'min(2, CPUs))')
    parser.add_argument('--data-dir', default=os.path.join(REPO, '.cache', 'bench-quality'),
                        help='cache of the corpus, tokenizer and shards (default: .cache/bench-quality)')
    parser.add_argument('--render-only', action='store_true',
                        help='only regenerate the plots and the RESULTS.md section from OUT/quality.json')
    parser.add_argument('--investigate', nargs='+', default=None, metavar='VARIANT',
                        help='issue 6: re-run DWM only, one changed setting per variant (' + ', '.join(VARIANTS) +
                             '), on OUT/quality.json\'s seeds, budget and data; writes OUT/' + INVESTIGATION_JSON +
                             ' and its subsection of the quality section')
    parser.add_argument('--_worker', nargs=2, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args._worker:
        spec_path, result_path = args._worker
        with open(spec_path) as f:
            result = run_one(json.load(f))
        with open(result_path, 'w') as f:
            json.dump(result, f)
        return 0
    if args.investigate:
        return run_investigation(args)
    if args.render_only:
        with open(os.path.join(args.out, 'quality.json')) as f:
            results = json.load(f)
        refresh_investigation(args.out, results)
        write_report(results, args)
        return 0
    started = time.perf_counter()
    budget = QUICK if args.quick else FULL
    if args.steps:
        budget = replace(budget, steps=args.steps)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    jobs = args.jobs or (1 if args.quick else min(2, os.cpu_count() or 1))
    machine = machine_info()
    os.makedirs(args.out, exist_ok=True)
    paths = prepare_data(args.data_dir, budget.data, say=_say_data)
    domain_names = _domain_names(paths['train'])
    with tempfile.TemporaryDirectory(prefix='dwm-bench-quality-') as work:
        _say(f'{len(seeds)} seed(s) x {len(METHODS)} methods, {budget.steps} steps each, {jobs} at a time')
        raw = run_all(paths, budget, seeds, jobs, work)
    with open(os.path.join(paths['train'], 'dwm.json')) as f:
        train_samples = json.load(f)['num_samples']
    eval_samples = _eval_sample_count(paths, budget, domain_names)
    params = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(
        hidden_size=budget.hidden_size, intermediate_size=budget.intermediate_size,
        num_hidden_layers=budget.num_layers, num_attention_heads=budget.num_heads,
        num_key_value_heads=budget.num_heads, vocab_size=_vocab(paths), max_position_embeddings=budget.seq_len,
        tie_word_embeddings=True)).parameters())
    results: dict[str, Any] = {
        'benchmark': 'quality', 'quick': bool(args.quick),
        'date': utc_now(), 'machine': machine, 'jobs': jobs, 'budget': budget.record(),
        'versions': library_versions(('torch', 'mosaicml', 'mosaicml-streaming', 'transformers', 'tokenizers')),
        'model_params': params,
        'data': {'domains': domain_names, 'train_samples': train_samples, 'eval_samples': eval_samples,
                 'lambada_fit': _count_lines(paths['lambada_fit']),
                 'lambada_report': _count_lines(paths['lambada_report'])},
        'proxy': raw['proxy'], 'runs': raw['runs'],
    }
    results['analysis'] = analyse(raw, budget, domain_names)
    dwm_runs = [r for r in raw['runs'] if r['method'] == 'dwm']
    if dwm_runs and dwm_runs[0].get('refit'):
        results['dwm_refit'] = dwm_runs[0]['refit']
    results['seconds'] = time.perf_counter() - started
    write_report(results, args)
    return 0


def write_report(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Notes, JSON, plots and the RESULTS.md section, all from ``results``."""
    results['notes'] = notes(results)
    json_path = os.path.join(args.out, 'quality.json')
    write_json(json_path, results)
    curves_png = os.path.join(args.out, 'quality_curves.png')
    weights_png = os.path.join(args.out, 'quality_weights.png')
    plot(results, curves_png, weights_png)
    results_md = results_md_path(args)
    images = [os.path.relpath(p, os.path.dirname(os.path.abspath(results_md))) for p in (curves_png, weights_png)]
    replace_section(results_md, render_section(results, images, _load_investigation(args.out)))
    _say(f'wrote {json_path}, {curves_png}, {weights_png} and the quality section of {results_md} '
         f'({results["seconds"] / 60:.1f} min)')
    for line in results['notes']:
        _say(line)


def _load_investigation(out: str) -> Optional[dict[str, Any]]:
    path = os.path.join(out, INVESTIGATION_JSON)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def refresh_investigation(out: str, quality: dict[str, Any]) -> None:
    """Recompute the investigation's analysis and plot from its stored runs (``--render-only``)."""
    inv = _load_investigation(out)
    if inv is None or inv.get('quality_date') != quality.get('date'):
        return
    inv['analysis'] = analyse_investigation(quality, inv['variant_runs'], inv['variant_info'])
    write_json(os.path.join(out, INVESTIGATION_JSON), inv)
    plot_investigation(quality, inv, os.path.join(out, 'quality_investigation.png'))


def _vocab(paths: dict[str, str]) -> int:
    return len(load_tokenizer(paths['tokenizer']))


def _eval_sample_count(paths: dict[str, str], budget: Budget, domain_names: list[str]) -> int:
    return sum(sum(domain_names[d] not in DEGRADED_DOMAINS for d in b['domain'].tolist())
               for b in _eval_batches(paths, budget))


if __name__ == '__main__':
    sys.exit(main())
