"""One (method, seed) run of the quality bench (:func:`run_one`: the tiny Llama, the method's algorithm, the
evaluations), its proxies (the static baseline's, the RHO rule's), and every run of a bench (:func:`run_all`: in
process or in subprocesses, with a run cache keyed by spec and code)."""

from __future__ import annotations


import gc
import hashlib
import inspect
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from composer import Trainer
from composer.core import Callback
from composer.loggers import InMemoryLogger
from composer.utils import reproducibility

from algorithms.baselines import (
    DomainSelection,
    LossReweighting,
    NoiseFloorWeighting,
    ReducibleLossWeighting,
    PermutedWeights,
    StaticDomainWeighting,
    domain_weights_from_alignment,
)
from algorithms.dwm import DWM, ValidationBatches
from algorithms.dwm.functional import WEIGHT_KEY, per_sample_loss, per_sample_loss_sums
from benchmarks.common import write_json
from dwm_stream.train import builders, config
from dwm_stream.train.builders import WidenedLoader
from dwm_stream.train.evaluation import lambada_metrics
from benchmarks.quality.data import read_samples, report_batches
from benchmarks.quality.settings import (BASES, DWM_BASES, PROXY_SEED, REPO, REPORT_SEED, SELECT_BASES, Budget,
                                         method_budget, parse_method, say, target_dwm)


# ------------------------------------------------------------------------------------------------------- one run
def _on(lm, batch: dict) -> dict:
    """``batch`` with its tensors on ``lm``'s device (``--device cuda``); a no-op on the CPU."""
    device = next(lm.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def evaluate(lm, batches: list[dict], domain_names: list[str], real: list[str]) -> dict[str, float]:
    """Token-mean loss per domain; ``macro``: their mean over the real domains (the benchmark's metric);
    ``degraded``: over the degraded domains."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    was_training = lm.training
    lm.eval()
    with torch.no_grad():
        for batch in batches:
            batch = _on(lm, batch)
            loss_sum, count = per_sample_loss_sums(lm(input_ids=batch['input_ids']).logits, batch['labels'])
            name = domain_names[int(batch['domain'][0])]
            sums[name] = sums.get(name, 0.0) + float(loss_sum.sum())
            counts[name] = counts.get(name, 0.0) + float(count.sum())
    lm.train(was_training)
    out = {d: sums[d] / max(counts[d], 1.0) for d in sorted(sums)}
    clean = [out[d] for d in real if d in out]
    dirty = [out[d] for d in out if d not in real]
    out['macro'] = sum(clean) / len(clean)
    if dirty:
        out['degraded'] = sum(dirty) / len(dirty)
    return out


class QualityProbe(Callback):
    """Evaluations at step 0 and every ``steps / evals`` batches; per stage (``num_stages`` equal parts of the run,
    DWM's stage boundaries) the mean weight per domain, the domains' sample counts and the within-batch weight std."""

    def __init__(self, eval_batches: list[dict], domain_names: list[str], real: list[str], budget: Budget):
        self.eval_batches, self.domain_names, self.real, self.budget = eval_batches, domain_names, real, budget
        self.curve: list[dict[str, Any]] = []
        self.batches_done = 0
        self.weight_sums: dict[tuple[int, str], float] = {}
        self.counts: dict[tuple[int, str], int] = {}
        self.spread: dict[int, list[float]] = {}
        self.eval_seconds = 0.0

    def _eval(self, state):
        started = time.perf_counter()
        self.curve.append({'step': self.batches_done,
                           **evaluate(state.model.model, self.eval_batches, self.domain_names, self.real)})
        self.eval_seconds += time.perf_counter() - started

    def fit_start(self, state, logger):
        self._eval(state)

    def batch_end(self, state, logger):
        budget = self.budget
        stages = budget.dwm.num_stages
        stage = min(self.batches_done * stages // budget.steps, stages - 1)
        domains = state.batch['domain'].tolist()
        weights = state.batch[WEIGHT_KEY].tolist() if WEIGHT_KEY in state.batch else [1.0] * len(domains)
        self.spread.setdefault(stage, []).append(float(np.std(weights)))
        for d, w in zip(domains, weights):
            key = (stage, self.domain_names[d])
            self.weight_sums[key] = self.weight_sums.get(key, 0.0) + float(w)
            self.counts[key] = self.counts.get(key, 0) + 1
        self.batches_done += 1
        every = max(1, budget.steps // budget.evals)
        at_eval = self.batches_done % every == 0 or self.batches_done == budget.steps
        if at_eval and self.curve[-1]['step'] != self.batches_done:
            self._eval(state)

    def stage_weights(self, train_shares: dict[str, float] | None = None) -> list[dict[str, float]]:
        """Per stage, each domain's mean weight; with ``train_shares`` (selection), its share of the trained samples
        over its share of the training set (1 = as often as uniform sampling)."""
        table: list[dict[str, float]] = [{} for _ in range(self.budget.dwm.num_stages)]
        totals = [sum(n for (k, _), n in self.counts.items() if k == stage) for stage in range(len(table))]
        for (stage, name), n in sorted(self.counts.items()):
            if train_shares is None:
                table[stage][name] = self.weight_sums[(stage, name)] / n
            else:
                table[stage][name] = n / totals[stage] / max(train_shares[name], 1e-12)
        return table

    def stage_weight_std(self) -> list[float | None]:
        return [float(np.mean(self.spread[k])) if k in self.spread else None
                for k in range(self.budget.dwm.num_stages)]


class _RoundRobin:
    """Re-iterable: one batch of each loader in turn, until one of them ends (DWM then starts it over)."""

    def __init__(self, *loaders):
        self.loaders = loaders

    def __iter__(self):
        iterators = [iter(loader) for loader in self.loaders]
        while True:
            for it in iterators:
                batch = next(it, None)
                if batch is None:
                    return
                yield batch


def validation_batches(kind: str, spec: dict[str, Any], tokenizer, budget: Budget):
    """DWM's validation batches: the LAMBADA fit half (``lambada``), the held-out real-domain samples in shard order
    (``heldout``: a batch, and the batches in a row, mostly of one domain), both in turn (``both``), or ``balanced``:
    the same number of held-out samples from every real domain, shuffled (a fixed seed), so that every batch mixes the
    domains and the target is the report metric's macro average in expectation."""
    paths = spec['paths']
    if kind == 'lambada' and not paths['lambada_fit']:
        kind = 'heldout'
    lam = (ValidationBatches(paths['lambada_fit'], tokenizer, batch_size=budget.val_batch_size,
                             max_length=budget.seq_len) if kind in ('lambada', 'both') else None)
    held = (WidenedLoader({'local': paths['validation'], 'selection': spec['heldout_path'], 'shuffle': False},
                          budget.val_batch_size, 'heldout') if kind in ('heldout', 'both') else None)
    if kind == 'lambada':
        return lam
    if kind == 'heldout':
        return held
    if kind == 'both':
        if lam is None:
            raise ValueError('dwm_validation=both needs a LAMBADA file')
        return _RoundRobin(lam, held)
    if kind == 'balanced':
        return WidenedLoader({'local': paths['validation'], 'selection': spec['balanced_path'], 'shuffle': True,
                              'shuffle_seed': REPORT_SEED}, budget.val_batch_size, 'balanced')
    raise ValueError(f'unknown dwm_validation {kind!r}; lambada, heldout, both or balanced')


def composer_device(device: str) -> str:
    """Composer's name for a torch device: ``cuda``/``cuda:N`` is Composer's ``gpu`` (it takes the local rank's)."""
    return 'gpu' if device.split(':')[0] in ('cuda', 'gpu') else device


def run_one(spec: dict[str, Any], callbacks: tuple[Callback, ...] = ()) -> dict[str, Any]:
    """Train one (method, seed) and evaluate it; returns plain JSON-able numbers (and, for the proxy, weights).
    ``callbacks`` join the run's ``Trainer`` (a measurement along the run, :mod:`benchmarks.signal_screen`); they
    must not change the training."""
    torch.set_num_threads(int(spec.get('threads', 1)))
    budget = Budget.from_record(spec['budget'])
    paths, label, seed = spec['paths'], spec['method'], int(spec['seed'])
    base = parse_method(label)[0]
    steps = int(spec.get('steps') or budget.steps)
    domain_names, real = spec['domains'], spec['real']
    reproducibility.seed_all(seed)
    tokenizer = builders.build_tokenizer(config.TokenizerConfig(name=paths['tokenizer']))
    model = builders.build_model(config.ModelConfig(name='llama', config_overrides={
        'hidden_size': budget.hidden_size, 'intermediate_size': budget.intermediate_size,
        'num_hidden_layers': budget.num_layers, 'num_attention_heads': budget.num_heads,
        'num_key_value_heads': budget.num_heads, 'max_position_embeddings': budget.seq_len,
        'tie_word_embeddings': True}), tokenizer)
    train_dataset = {'local': paths['train'], 'shuffle': True, 'shuffle_seed': 17 + seed}
    if spec.get('il_proxy'):  # the RHO rule's irreducible-loss model: trained on the held-out target samples only
        train_dataset = {'local': paths['validation'], 'selection': spec['heldout_path'], 'shuffle': True,
                         'shuffle_seed': 17 + seed}
    loader_batch = budget.batch_size * (budget.dwm.select_factor if base in SELECT_BASES else 1)
    train_spec = builders.build_train_dataloader(
        config.LoaderConfig(dataset=config.DatasetConfig(**train_dataset)), loader_batch)
    evaluating = spec.get('evaluate', True)
    eval_batches = []
    if evaluating:
        eval_batches = report_batches(read_samples(paths['validation']), spec['report'], domain_names,
                                       budget.eval_batch_size)
    probe = QualityProbe(eval_batches, domain_names, real, replace(budget, steps=steps))
    algorithms = []
    if base in DWM_BASES:
        reference = ({int(k): v for k, v in spec['irreducible_loss'].items()} if uses_reference_losses(label)
                     else None)
        algorithms.append(DWM(
            config=replace(budget.dwm, mode='select' if base == 'dwm_select' else 'weight', seed=seed,
                           domain_names=domain_names, reference_losses=reference),
            refit_dataloader=WidenedLoader({**train_dataset, 'shuffle_seed': 18 + seed}, budget.batch_size, 'refit'),
            val_dataloader=validation_batches(budget.dwm_validation, spec, tokenizer, budget)))
    elif base == 'static_domain':
        algorithms.append(StaticDomainWeighting(spec['static_weights'], domain_names=domain_names))
    elif base == 'oracle':  # knows which domains are degraded: weight 0 on them, the rest renormalised to mean 1
        algorithms.append(StaticDomainWeighting({d: 0.0 for d in spec['degraded']}, domain_names=domain_names))
    elif base in ('oracle_select', 'random_select'):
        keep = [d for d in budget.oracle_keep.split('+') if d]
        unknown = sorted(set(keep) - set(spec['degraded']))
        if unknown:
            raise ValueError(f'method {label!r}: oracle_keep names {unknown}, not degraded domains of this corpus '
                             f'({", ".join(spec["degraded"])})')
        algorithms.append(DomainSelection(real + keep if base == 'oracle_select' else None, budget.dwm.select_factor,
                                          domain_names=domain_names, seed=seed))
    elif base == 'loss_reweighting':
        algorithms.append(LossReweighting(r=budget.sow_r, warmup=f'{budget.sow_warmup_frac}dur',
                                          domain_names=domain_names, permute_seed=seed if budget.null else None))
    elif base == 'rho':
        algorithms.append(ReducibleLossWeighting({int(k): v for k, v in spec['irreducible_loss'].items()},
                                                 r=budget.sow_r, warmup=f'{budget.sow_warmup_frac}dur',
                                                 domain_names=domain_names,
                                                 permute_seed=seed if budget.null else None))
    elif base == 'noise_floor':
        algorithms.append(NoiseFloorWeighting(sigma=budget.noise_sigma, seed=seed))
    if budget.null and base not in ('loss_reweighting', 'rho'):
        algorithms = [PermutedWeights(a, seed=seed) for a in algorithms]
    memory = InMemoryLogger()
    trainer = Trainer(
        model=model, train_dataloader=train_spec, max_duration=f'{steps}ba',
        optimizers=builders.build_optimizer(config.Component('decoupled_adamw', {
            'lr': budget.lr, 'betas': [0.9, 0.95], 'eps': 1e-8, 'weight_decay': 0.0}), model),
        schedulers=builders.build_scheduler(config.Component('cosine_with_warmup', {
            't_warmup': f'{max(1, round(budget.warmup_frac * steps))}ba', 'alpha_f': budget.lr_final_frac})),
        algorithms=algorithms, callbacks=([probe] if evaluating else []) + list(callbacks), loggers=[memory],
        device=composer_device(spec.get('device', 'cpu')), precision='fp32', seed=seed,
        device_train_microbatch_size=budget.batch_size,
        progress_bar=False, log_to_console=False, python_log_level=None)
    started = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - started
    lm = trainer.state.model.model
    result: dict[str, Any] = {'method': label, 'base': base, 'seed': seed, 'steps': steps,
                              'tokens': steps * budget.batch_size * budget.seq_len, 'train_seconds': seconds}
    if evaluating:
        lambada = None
        if paths['lambada_report']:
            lambada = lambada_metrics(lm, (_on(lm, b) for b in ValidationBatches(
                paths['lambada_report'], tokenizer, batch_size=32, max_length=budget.seq_len)))
        last = probe.curve[-max(1, budget.final_evals):]
        final = {k: sum(p[k] for p in last) / len(last) for k in last[-1] if k != 'step'}
        result.update({'curve': probe.curve, 'final': final, 'final_steps': [p['step'] for p in last],
                       'lambada': lambada,
                       'stage_weights': probe.stage_weights(spec['train_shares'] if base in SELECT_BASES else None),
                       'stage_weight_std': probe.stage_weight_std(), 'eval_seconds': probe.eval_seconds})
    if base in DWM_BASES:
        result['refit'] = {key[len('dwm/'):]: [float(v) for _, v in memory.data[key]]
                           for key in sorted(memory.data) if key.startswith(('dwm/refit/', 'dwm/stage/'))}
    if spec.get('proxy'):
        result['proxy'] = static_weights_from_proxy(lm, tokenizer, spec, budget)
    if spec.get('il_proxy'):
        result['irreducible_loss'] = irreducible_losses(lm, spec['paths']['train'], budget.eval_batch_size)
    trainer.close()
    return result


def uses_reference_losses(method: str) -> bool:
    """Whether a method needs the irreducible-loss model's per-sample losses: the RHO rule, and a DWM whose
    weighter takes the reducible loss as an input."""
    base, overrides = parse_method(method)
    if base == 'rho':
        return True
    return base in DWM_BASES and 'reducible_loss' in ({**BASES[base], **overrides}.get('weighter.inputs') or [])


def irreducible_losses(lm, train_dir: str, batch_size: int) -> dict[str, float]:
    """Each training sample's token-mean loss under ``lm`` (the RHO rule's irreducible loss), keyed by uid; every
    sample, the last partial batch too."""
    out: dict[str, float] = {}
    lm.eval()
    with torch.no_grad():
        for batch in WidenedLoader({'local': train_dir, 'shuffle': False}, batch_size, train_dir, drop_last=False):
            ids = batch['input_ids']
            labels = ids.clone()
            for row, n in enumerate(batch['num_tokens'].tolist()):
                labels[row, int(n):] = -100
            losses = per_sample_loss(lm(input_ids=ids.to(next(lm.parameters()).device)).logits,
                                     labels.to(next(lm.parameters()).device))
            out.update({str(int(u)): float(v) for u, v in zip(batch['uid'], losses)})
    return out


def static_weights_from_proxy(lm, tokenizer, spec: dict[str, Any], budget: Budget) -> dict[str, Any]:
    """The static baseline's weights from the proxy model: per domain, ``<grad L_fit, grad L_domain>``, with
    ``L_fit`` DWM's validation target (the LAMBADA fit half, or the held-out samples without a LAMBADA file)."""
    params = [p for p in lm.parameters() if p.requires_grad]
    paths, domain_names = spec['paths'], spec['domains']

    def gradient(batches) -> torch.Tensor:
        lm.zero_grad(set_to_none=True)
        total = sum(int((b['labels'][:, 1:] != -100).sum()) for b in batches)
        for b in batches:
            b = _on(lm, b)
            loss_sum, _ = per_sample_loss_sums(lm(input_ids=b['input_ids'],
                                                  attention_mask=b.get('attention_mask')).logits, b['labels'])
            (loss_sum.sum() / max(total, 1)).backward()
        flat = torch.cat([p.grad.reshape(-1) for p in params]).double()
        lm.zero_grad(set_to_none=True)
        return flat

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
    target = 'lambada' if paths['lambada_fit'] else 'heldout'
    val = list(validation_batches(target, spec, tokenizer, budget))[:32]
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
    weights = domain_weights_from_alignment(alignment, shares, mix_uniform=budget.dwm.mix_uniform)
    return {'alignment': alignment, 'cosine': cosine, 'shares': shares, 'weights': weights, 'target': target,
            'samples_per_domain': {domain_names[d]: len(r) for d, r in samples.items()},
            'fit_examples': sum(int(b['input_ids'].shape[0]) for b in val)}


# ------------------------------------------------------------------------------------------------------- running
def _run_subprocess(spec: dict[str, Any], work: str, name: str) -> dict[str, Any]:
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


def code_digest(paths: dict[str, Any] | None = None) -> str:
    """A digest of what a run's result depends on beyond its spec: the code (``algorithms/``, ``dwm_stream/`` and this
    module's training code) and the data's shard indexes (their sizes and hashes), so that the run cache never serves
    a result of other code or of a rebuilt corpus."""
    digest = hashlib.sha256()
    for package in ('algorithms', 'dwm_stream'):
        for folder, _, files in sorted(os.walk(os.path.join(REPO, package))):
            for name in sorted(files):
                if name.endswith('.py'):
                    with open(os.path.join(folder, name), 'rb') as f:
                        digest.update(f.read())
    for obj in (run_one, irreducible_losses, static_weights_from_proxy, evaluate, QualityProbe, validation_batches):
        digest.update(inspect.getsource(obj).encode())
    for split in ('train', 'validation'):
        index = os.path.join((paths or {}).get(split) or '', 'index.json')
        if os.path.isfile(index):
            with open(index, 'rb') as f:
                digest.update(f.read())
    return digest.hexdigest()


def file_name(name: str) -> str:
    """A run's name as a file name (method labels hold ``/``, ``:``, ``=`` and ``,``)."""
    return ''.join(c if c.isalnum() or c in '-_.' else '~' for c in name)


def run_all(ctx: dict[str, Any], budget: Budget, methods: list[str], seeds: list[int], jobs: int, work: str,
            rerun_check: bool, cache_dir: str | None = None) -> dict[str, Any]:
    """The proxy runs (if ``static_domain`` or ``rho`` is measured), then every (method, seed), then the re-run;
    ``jobs`` > 1 runs them in that many subprocesses (one torch thread each). With ``cache_dir``, each run's result is
    kept there under a digest of its whole spec, and a run whose result is there is not run again (an interrupted
    bench resumes; a changed budget, corpus or method runs afresh). The re-run is never taken from the cache."""
    base = {'paths': ctx['paths'], 'threads': 1, 'domains': ctx['domains'], 'real': ctx['real'],
            'degraded': ctx['degraded'], 'device': ctx.get('device', 'cpu'),
            'report': ctx['report'], 'heldout_path': ctx['heldout_path'], 'balanced_path': ctx['balanced_path'],
            'train_shares': ctx['data']['train_shares']}

    def spec(method: str, seed: int, **extra) -> dict[str, Any]:
        return {**base, 'method': method, 'seed': seed, 'budget': method_budget(budget, method).record(), **extra}

    code = code_digest(ctx['paths']) if cache_dir is not None else ''

    def execute(s: dict[str, Any], name: str) -> dict[str, Any]:
        started = time.perf_counter()
        cached = None
        if cache_dir is not None and not name.endswith('-rerun'):
            digest = hashlib.sha256((json.dumps(s, sort_keys=True) + code).encode()).hexdigest()[:16]
            cached = os.path.join(cache_dir, f'{file_name(name)}-{digest}.json')
            if os.path.exists(cached):
                with open(cached) as f:
                    say(f'{name}: cached ({cached})')
                    return json.load(f)
        if jobs <= 1:
            result = run_one(s)
            # The run's Trainer holds its loaders in reference cycles: collect them now, so that their
            # datasets' shared memory is given back before the next run rather than at some later GC.
            gc.collect()
        else:
            result = _run_subprocess(s, work, file_name(name))
        say(f'{name}: {time.perf_counter() - started:.0f}s')
        if cached is not None:
            os.makedirs(cache_dir, exist_ok=True)
            write_json(cached, result)
        return result

    def execute_all(specs: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        if jobs <= 1:
            return [execute(s, name) for name, s in specs]
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            return list(pool.map(lambda item: execute(item[1], item[0]), specs))

    static = [m for m in methods if parse_method(m)[0] == 'static_domain']
    rho = [m for m in methods if uses_reference_losses(m)]  # wait for the irreducible-loss model
    first = [(f'{m}-seed{s}', spec(m, s)) for s in seeds for m in methods if m not in static + rho]
    target = target_dwm(methods)
    rerun_name = f'{target}-seed{seeds[0]}-rerun'
    if rerun_check and target not in rho:
        first.append((rerun_name, spec(target, seeds[0])))
    if static:
        first.insert(0, ('proxy', spec('uniform', PROXY_SEED, proxy=True, evaluate=False,
                                       steps=max(2, round(budget.proxy_frac * budget.steps)))))
    if rho:
        first.insert(0, ('il_proxy', spec('uniform', PROXY_SEED, il_proxy=True, evaluate=False,
                                          steps=max(2, round(budget.proxy_frac * budget.steps)))))
    results = dict(zip([name for name, _ in first], execute_all(first)))
    proxy = results.pop('proxy', None)
    il_proxy = results.pop('il_proxy', None)
    if il_proxy is not None:
        losses = il_proxy['irreducible_loss']
        later = [(f'{m}-seed{s}', spec(m, s, irreducible_loss=losses)) for s in seeds for m in rho]
        if rerun_check and target in rho:  # a DWM with the reducible-loss input waits for the model too
            later.append((rerun_name, spec(target, seeds[0], irreducible_loss=losses)))
        results.update(zip([name for name, _ in later], execute_all(later)))
    rerun = results.pop(rerun_name, None)
    if proxy is not None:
        results.update(zip([f'{m}-seed{s}' for s in seeds for m in static], execute_all(
            [(f'{m}-seed{s}', spec(m, s, static_weights=proxy['proxy']['weights'])) for s in seeds for m in static])))
    return {'proxy': None if proxy is None else {'seed': PROXY_SEED, 'steps': proxy['steps'],
                                                 'train_seconds': proxy['train_seconds'], **proxy['proxy']},
            'runs': sorted(results.values(), key=lambda r: (methods.index(r['method']), r['seed'])), 'rerun': rerun}
