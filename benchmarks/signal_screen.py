"""Signal screen: which per-sample signal tells the quality bench's real training samples from its degraded ones?

A cheap screen before any more full training runs. Per seed it trains the quality bench's ``uniform`` baseline (its
own :func:`benchmarks.quality.run_one`, so the same model, optimizer, schedule and sample order) and, at the starts of
stages 2 and 3 of a 3-stage run and at the end (~1/3, ~2/3 and all of the steps), computes over ``R`` refit batches
(the training set in a separate shuffle, ``shuffle_seed = 18 + seed``, as DWM's refit loader reads it) one value per
training sample for each signal:

* ``domain_is_real``: 1 for a real-domain sample, 0 for a degraded one. The sanity signal: its AUC is exactly 1.
* ``h_sgd_lambada``: DWM's one-step hypergradient ``h_i = -eta <grad L_val(theta'), grad c_i>`` at uniform weights
  (SGD look-ahead, ``eta`` = the bench's ``lookahead_lr``), validation batch from the LAMBADA fit file; computed by
  the algorithm's own code (:func:`algorithms.dwm.refit.lookahead_functions`,
  :func:`algorithms.dwm.hypergradient.hypergradient_multistep`, one look-ahead step, forward-mode JVP).
* ``h_sgd_heldout``: the same, validation batch from the held-out samples of the real domains (the bench's
  ``dwm_validation=heldout``: in shard order, a batch mostly of one domain).
* ``h_sgd_balanced``: the same, validation batch from the balanced held-out target (``dwm_validation=balanced``: as
  many samples of every real domain, shuffled).
* ``h_sgd_balanced_x16``: the same with 16 balanced validation batches per refit batch (256 samples, DWM's
  ``val_batches_per_step=16``): whether a less noisy validation gradient makes the hypergradient see quality.
* ``h_adam_heldout``: the same with the Adam look-ahead: ``P`` from the LLM optimizer's second moments
  (:func:`algorithms.dwm.hypergradient.adam_preconditioner`, as DWM's ``lookahead='adam'``).
* ``h_cos_heldout``: ``-cos(grad L_val(theta'), grad l_i)`` with the SGD look-ahead and held-out target (``h_i``
  divided by ``eta ||grad L_val(theta')|| ||grad l_i||`` with ``l_i`` the sample's token-mean loss). A diagnostic
  only, NOT the paper's method: it takes away each sample's gradient length.
* ``loss``: the sample's token-mean training loss.
* ``reducible``: ``loss`` minus the sample's loss under the quality bench's RHO "irreducible-loss" model (a short run
  on the held-out target samples only, seed 1000; trained once per invocation).

Each refit batch is paired with the next batch of each validation source, as DWM's refit pairs them. Per signal and
checkpoint: the **AUC** of telling real from degraded samples (pooled over the ``R`` batches), oriented so that
AUC > 0.5 means the samples the signal *prefers* are real (low ``h``, since DWM's weights are ``∝ exp(-h / beta)``;
low ``loss``; high ``reducible``, as RHO selects), and the same AUC against each degraded domain alone; the share
of degraded samples among the top quarter of each batch by preference (as ``dwm_select`` keeps 1 of
``select_factor = 4``) against their share of the pool; the share of the signal's variance that its domain explains
(between-domain / total); per domain, the signal's mean; and for the ``h`` signals the mean trust-region weight of
degraded samples over that of real ones (and per domain), ``w ∝ exp(-h / beta)`` on each batch's RMS-normalised
``h`` with ``beta = refit_kl = 3`` and the weighter's uniform mix (DWM's refit target with its defaults).

    python -m benchmarks.signal_screen [--quick] [--seeds 0 1 2 3 4] [--corpus-seed 1] [--corruptions standard|alt]
                                       [--refit-batches 8] [--checkpoints 0.3333 0.6667 1] [--out DIR]
    python -m benchmarks.signal_screen --render-only [--out DIR]   # re-aggregate and re-render DIR/signal.json

Writes ``DIR/signal.json`` and ``DIR/signal.md`` (default DIR ``benchmarks/results/issue18_dev/signal``). Same seed on
the same machine: identical figures (only the ``seconds`` fields differ).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch
from composer.core import Callback

from algorithms.dwm.functional import ensure_labels, per_sample_loss, trust_region_target
from algorithms.dwm.hypergradient import (ParamDict, adam_preconditioner, hypergradient_multistep,
                                          iter_named_trainable, jvp_attention, lookahead)
from algorithms.dwm.refit import BatchCycle, lookahead_functions
from benchmarks import quality
from benchmarks.common import library_versions, machine_info, utc_now, write_json
from dwm_stream.convert.tokenizer import load_tokenizer
from dwm_stream.demo.corpus import CORRUPTIONS
from dwm_stream.train.builders import WidenedLoader

SCHEMA = 1
DEFAULT_OUT = os.path.join(quality.REPO, 'benchmarks', 'results', 'issue18_dev', 'signal')
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
DEFAULT_CORPUS_SEED = 1  # the development corpus; corpus seed 0 is the reported one
DEFAULT_CHECKPOINTS = (1 / 3, 2 / 3, 1.0)  # starts of stages 2 and 3 of a 3-stage run, and the end
REFIT_BATCHES = 8
QUICK_REFIT_BATCHES = 2
SELECT_BETAS = (3.0, 1.0, 0.3)  # refit_kl values at which select_degraded_share is reported
H_SIGNALS = ('h_sgd_lambada', 'h_sgd_heldout', 'h_sgd_balanced', 'h_sgd_balanced_x16', 'h_adam_heldout',
             'h_cos_heldout')
WIDE_VAL_BATCHES = 16  # h_sgd_balanced_x16
SIGNALS = ('domain_is_real',) + H_SIGNALS + ('loss', 'reducible')
# +1: a high value is preferred (kept / up-weighted); -1: a low one.
PREFERENCE = {'domain_is_real': 1.0, **{s: -1.0 for s in H_SIGNALS}, 'loss': -1.0, 'reducible': 1.0}


def _say(msg: str) -> None:
    print(f'[signal] {msg}', flush=True)


# ------------------------------------------------------------------------------------------------------ statistics
def auc(scores: np.ndarray, positive: np.ndarray) -> Optional[float]:
    """Mann-Whitney AUC: ``P(score of a positive > score of a negative)``, ties counting one half.

    Args:
        scores (np.ndarray): ``[n]`` scores (higher = more likely positive).
        positive (np.ndarray): ``[n]`` booleans.

    Returns:
        float | None: the AUC in ``[0, 1]``, or ``None`` without both classes.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind='mergesort')
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):  # average ranks over ties (1-based)
        stop = start
        while stop + 1 < len(scores) and sorted_scores[stop + 1] == sorted_scores[start]:
            stop += 1
        ranks[order[start:stop + 1]] = (start + stop) / 2.0 + 1.0
        start = stop + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def domain_variance_share(values: np.ndarray, domains: np.ndarray) -> Optional[float]:
    """Between-domain variance over total variance (eta squared) of ``values`` grouped by ``domains``."""
    values = np.asarray(values, dtype=np.float64)
    total = float(((values - values.mean()) ** 2).sum())
    if total <= 0.0:
        return None
    between = sum(float((domains == d).sum()) * (float(values[domains == d].mean()) - float(values.mean())) ** 2
                  for d in np.unique(domains))
    return between / total


def top_share_degraded(preference: np.ndarray, degraded: np.ndarray, batch: np.ndarray, fraction: float) -> float:
    """Share of degraded samples among the top ``fraction`` of each batch by ``preference`` (ties: the earlier
    sample), pooled over batches."""
    chosen = []
    for b in np.unique(batch):
        idx = np.flatnonzero(batch == b)
        k = max(1, int(round(fraction * len(idx))))
        order = np.argsort(-preference[idx], kind='mergesort')
        chosen.append(idx[order[:k]])
    chosen_idx = np.concatenate(chosen)
    return float(degraded[chosen_idx].mean())


def trust_region_weights(h: np.ndarray, batch: np.ndarray, beta: float, mix_uniform: float) -> np.ndarray:
    """DWM's refit target per batch: ``h`` divided by the batch's RMS (``normalize_hypergradient``), then
    :func:`~algorithms.dwm.functional.trust_region_target` (``w ∝ exp(-h / beta)``, mean 1, mixed with uniform)."""
    weights = np.empty(len(h), dtype=np.float64)
    for b in np.unique(batch):
        idx = np.flatnonzero(batch == b)
        hb = torch.as_tensor(h[idx], dtype=torch.float64)
        hb = hb / hb.pow(2).mean().sqrt().clamp(min=1e-30)
        weights[idx] = trust_region_target(hb, beta, mix_uniform).numpy()
    return weights


def select_degraded_share(h: np.ndarray, degraded: np.ndarray, batch: np.ndarray, beta: float, fraction: float,
                          draws: int = 64, seed: int = 0) -> float:
    """What ``dwm_select`` would train on if its weighter matched its refit target exactly: DWM selects the top
    ``fraction`` of ``log-weight + Gumbel noise``, and the regression refit fits the log-weights to the trust-region
    target's, ``-h / beta`` with ``h`` divided by its batch RMS. The expected share of degraded samples among the
    selected, over ``draws`` Gumbel draws per batch (a fixed seed). ``beta`` sets how much of the signal's ranking
    survives the noise: at ``beta = 3`` (the default ``refit_kl``) the logits spread about a third of the noise's."""
    rng = np.random.default_rng(seed)
    chosen, total = 0.0, 0
    for b in np.unique(batch):
        idx = np.flatnonzero(batch == b)
        hb = h[idx] / max(float(np.sqrt(np.mean(h[idx] ** 2))), 1e-30)
        k = max(1, int(round(fraction * len(idx))))
        logits = -hb / beta + rng.gumbel(size=(draws, len(idx)))
        top = np.argsort(-logits, axis=1, kind='stable')[:, :k]
        chosen += float(degraded[idx][top].sum())
        total += draws * k
    return chosen / total


def _stats(values: list[Optional[float]]) -> dict[str, Any]:
    """mean, min, max over the values that are not ``None``, and how many there are."""
    kept = [v for v in values if v is not None]
    if not kept:
        return {'mean': None, 'min': None, 'max': None, 'n': 0}
    return {'mean': float(np.mean(kept)), 'min': float(min(kept)), 'max': float(max(kept)), 'n': len(kept)}


@dataclass
class ScreenSettings:
    """What the screen measures with, beyond the quality bench's budget."""

    refit_batches: int
    checkpoints: tuple[float, ...]
    lookahead_lr: float
    beta: float
    mix_uniform: float
    select_fraction: float

    @classmethod
    def from_budget(cls, budget: quality.Budget, refit_batches: int, checkpoints: tuple[float, ...]
                    ) -> 'ScreenSettings':
        """The bench's DWM settings: ``eta = lookahead_lr``, ``beta = refit_kl``, ``mix_uniform``, ``1 /
        select_factor``."""
        return cls(refit_batches=refit_batches, checkpoints=tuple(checkpoints), lookahead_lr=budget.dwm.lookahead_lr,
                   beta=budget.dwm.refit_kl, mix_uniform=budget.dwm.mix_uniform,
                   select_fraction=1.0 / budget.dwm.select_factor)


def checkpoint_figures(samples: dict[str, np.ndarray], real_names: list[str], domain_names: list[str],
                       settings: ScreenSettings) -> dict[str, Any]:
    """Per signal: AUC (and against each degraded domain alone), top-fraction degraded share, domain variance share,
    per-domain mean; for the ``h`` signals the trust-region weight ratio (degraded / real) and per-domain mean
    weight."""
    domains = samples['domain']
    real = np.isin(np.asarray(domain_names)[domains], real_names)
    degraded = ~real
    batch = samples['batch']
    out: dict[str, Any] = {'samples': int(len(domains)), 'pool_degraded_share': float(degraded.mean()),
                           'signals': {}}
    present = [d for d in range(len(domain_names)) if (domains == d).any()]
    for name in SIGNALS:
        values = samples[name]
        preference = PREFERENCE[name] * values
        fig: dict[str, Any] = {
            'auc': auc(preference, real),
            'auc_by_degraded_domain': {domain_names[d]: auc(preference[real | (domains == d)],
                                                            real[real | (domains == d)])
                                       for d in present if degraded[domains == d].any()},
            'top_degraded_share': top_share_degraded(preference, degraded, batch, settings.select_fraction),
            'domain_variance_share': domain_variance_share(values, domains),
            'mean_by_domain': {domain_names[d]: float(values[domains == d].mean()) for d in present},
        }
        if name in H_SIGNALS:
            w = trust_region_weights(values, batch, settings.beta, settings.mix_uniform)
            fig['weight_ratio'] = (float(w[degraded].mean() / w[real].mean())
                                   if degraded.any() and real.any() else None)
            fig['weight_by_domain'] = {domain_names[d]: float(w[domains == d].mean()) for d in present}
            fig['select_degraded_share'] = {str(beta): select_degraded_share(values, degraded, batch, beta,
                                                                             settings.select_fraction)
                                            for beta in SELECT_BETAS}
        out['signals'][name] = fig
    return out


def aggregate(per_seed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per checkpoint and signal, over seeds: AUC mean/min/max and how many seeds are above 0.5; the weight ratio,
    the top-fraction degraded share and the domain variance share (mean/min/max); the per-domain means (of the
    signal, and of the trust-region weight for the ``h`` signals) averaged over seeds."""
    out = []
    for c, first in enumerate(per_seed[0]['checkpoints']):
        rows = [run['checkpoints'][c] for run in per_seed]
        signals = {}
        for name in SIGNALS:
            figs = [r['signals'][name] for r in rows]
            aucs = [f['auc'] for f in figs]
            entry = {'auc': {**_stats(aucs), 'seeds_above_half': sum(1 for a in aucs if a is not None and a > 0.5)},
                     'auc_by_degraded_domain': {
                         d: _stats([f['auc_by_degraded_domain'].get(d) for f in figs])
                         for d in sorted({d for f in figs for d in f['auc_by_degraded_domain']})},
                     'top_degraded_share': _stats([f['top_degraded_share'] for f in figs]),
                     'domain_variance_share': _stats([f['domain_variance_share'] for f in figs])}
            by_domain = ('mean_by_domain', 'weight_by_domain') if name in H_SIGNALS else ('mean_by_domain',)
            for key in by_domain:
                names = sorted({d for f in figs for d in f[key]})
                entry[key] = {d: float(np.mean([f[key][d] for f in figs if d in f[key]])) for d in names}
            if name in H_SIGNALS:
                entry['weight_ratio'] = _stats([f['weight_ratio'] for f in figs])
                entry['select_degraded_share'] = {beta: _stats([f['select_degraded_share'][beta] for f in figs])
                                                  for beta in figs[0]['select_degraded_share']}
            signals[name] = entry
        out.append({'fraction': first['fraction'], 'step': first['step'],
                    'pool_degraded_share': _stats([r['pool_degraded_share'] for r in rows]), 'signals': signals})
    return out


# ------------------------------------------------------------------------------------------------------ signals
def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


def cosine_signal(lm: torch.nn.Module, params: ParamDict, batch: dict[str, Any], val_batch: dict[str, Any],
                  eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``-cos(u, grad l_i)`` with ``u = grad L_val(theta')`` at the SGD look-ahead of uniform weights (the direction of
    ``h_sgd``), and the same ``h`` rebuilt from the per-sample gradients (``-eta <u, grad c_i>``, ``c_i = l_i n_i /
    N``) to check the JVP against.

    Per-sample gradients by one backward per sample (the bench's model is tiny)."""
    contributions_fn, val_loss_fn = lookahead_functions(lm, batch, [val_batch])
    n = batch['input_ids'].shape[0]
    theta_prime = lookahead(contributions_fn, params, torch.ones(n, device=batch['input_ids'].device), eta)
    leaves = {k: p.detach().requires_grad_(True) for k, p in theta_prime.items()}
    with torch.enable_grad():
        u = _flat_grad(val_loss_fn(leaves), list(leaves.values())).double()
    live = [p for _, p in iter_named_trainable(lm)]
    tokens = (batch['labels'][:, 1:] != -100).sum(dim=1).double()
    dots, norms = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    mask = batch.get('attention_mask')
    for i in range(n):
        with torch.enable_grad():
            kwargs = {'input_ids': batch['input_ids'][i:i + 1], 'use_cache': False}
            if mask is not None:
                kwargs['attention_mask'] = mask[i:i + 1]
            loss = per_sample_loss(lm(**kwargs).logits, batch['labels'][i:i + 1]).sum()
            g = _flat_grad(loss, live).double()
        dots[i], norms[i] = g @ u, g.norm()
    cos = dots / (norms * u.norm()).clamp(min=1e-30)
    h_rebuilt = -eta * dots * tokens / tokens.sum().clamp(min=1)
    return -cos, h_rebuilt


class SignalProbe(Callback):
    """At the end of the chosen batches, every signal of ``refit_batches`` refit batches (nothing in training
    changes: the LLM, its optimizer and the RNG are as before).

    Args:
        spec (dict): The quality bench's run spec (``paths``, ``heldout_path``, ``seed``...).
        budget (quality.Budget): The run's budget.
        settings (ScreenSettings): What to measure with.
        il_model (torch.nn.Module): The RHO rule's irreducible-loss model.
        il_table (dict[str, float]): The quality bench's irreducible loss per training uid (checked against).
    """

    def __init__(self, spec: dict[str, Any], budget: quality.Budget, settings: ScreenSettings,
                 il_model: torch.nn.Module, il_table: dict[str, float]):
        self.settings, self.il_model, self.il_table = settings, il_model, il_table
        self.domain_names, self.real = list(spec['domains']), list(spec['real'])
        self.at = {max(1, round(f * budget.steps)): f for f in settings.checkpoints}
        seed = int(spec['seed'])
        paths = spec['paths']
        tokenizer = load_tokenizer(paths['tokenizer'])  # the validation batches pad on their own
        refit = WidenedLoader({'local': paths['train'], 'shuffle': True, 'shuffle_seed': 18 + seed},
                              budget.batch_size, 'refit')
        self.refit = BatchCycle(refit, 'refit_dataloader')
        self.val = {kind: BatchCycle(quality.validation_batches(kind, spec, tokenizer, budget), f'{kind} validation')
                    for kind in ('lambada', 'heldout', 'balanced')}
        # its own cycle, so that the one-batch balanced signal sees the same batches with or without it
        self.wide = BatchCycle(quality.validation_batches('balanced', spec, tokenizer, budget),
                               'wide balanced validation')
        self.batches_done = 0
        self.samples: list[dict[str, np.ndarray]] = []
        self.meta: list[dict[str, Any]] = []
        self.seconds: list[float] = []

    def batch_end(self, state, logger) -> None:
        self.batches_done += 1
        if self.batches_done in self.at:
            started = time.perf_counter()
            rng = torch.get_rng_state()
            try:
                samples, meta = self.measure(state.model.model, state.optimizers[0])
            finally:
                torch.set_rng_state(rng)
            self.samples.append(samples)
            self.meta.append({'fraction': self.at[self.batches_done], 'step': self.batches_done, **meta})
            self.seconds.append(time.perf_counter() - started)
            _say(f'  step {self.batches_done}: {len(samples["domain"])} samples, {self.seconds[-1]:.0f}s')

    @staticmethod
    def _loss(model: torch.nn.Module, batch: dict[str, Any]) -> np.ndarray:
        """Each sample's token-mean loss under ``model``."""
        kwargs = {'input_ids': batch['input_ids'], 'use_cache': False}
        if batch.get('attention_mask') is not None:
            kwargs['attention_mask'] = batch['attention_mask']
        with torch.no_grad():
            return per_sample_loss(model(**kwargs).logits, batch['labels']).double().cpu().numpy()

    def measure(self, lm: torch.nn.Module, optimizer: torch.optim.Optimizer
                ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Every signal of the next ``refit_batches`` refit batches at the LLM's current parameters."""
        device = next(lm.parameters()).device
        eta = self.settings.lookahead_lr
        live = dict(iter_named_trainable(lm))
        params = {k: p.detach() for k, p in live.items()}
        adam = adam_preconditioner(optimizer, live)
        columns: dict[str, list[np.ndarray]] = {name: [] for name in ('domain', 'batch') + SIGNALS}
        val_losses: dict[str, list[float]] = {name: [] for name in H_SIGNALS if name != 'h_cos_heldout'}
        check = il_check = 0.0
        il_missing = 0
        for b in range(self.settings.refit_batches):
            batch = _to(ensure_labels(dict(self.refit.next())), device)
            val = {kind: [_to(ensure_labels(dict(cycle.next())), device)] for kind, cycle in self.val.items()}
            val['wide'] = [_to(ensure_labels(dict(self.wide.next())), device) for _ in range(WIDE_VAL_BATCHES)]
            n = batch['input_ids'].shape[0]
            ones = torch.ones(n, device=device)
            for name, kind, precond in (('h_sgd_lambada', 'lambada', None), ('h_sgd_heldout', 'heldout', None),
                                        ('h_sgd_balanced', 'balanced', None), ('h_sgd_balanced_x16', 'wide', None),
                                        ('h_adam_heldout', 'heldout', adam)):
                contributions_fn, val_loss_fn = lookahead_functions(lm, batch, val[kind])
                result = hypergradient_multistep([contributions_fn], val_loss_fn, params, [ones], eta, precond,
                                                 method='jvp', jvp_context=lambda: jvp_attention(lm))
                columns[name].append(result.hypergradients[0].double().cpu().numpy())
                val_losses[name].append(result.val_loss)
            cos, rebuilt = cosine_signal(lm, params, batch, val['heldout'][0], eta)
            columns['h_cos_heldout'].append(cos.numpy())
            h = columns['h_sgd_heldout'][-1]
            check = max(check, float(np.abs(rebuilt.numpy() - h).max() / max(np.abs(h).max(), 1e-30)))
            loss, il = (self._loss(model, batch) for model in (lm, self.il_model))
            columns['loss'].append(loss)
            columns['reducible'].append(loss - il)
            uids = [str(int(u)) for u in batch['uid']]
            known = [i for i, u in enumerate(uids) if u in self.il_table]
            il_missing += len(uids) - len(known)
            if known:
                table = np.array([self.il_table[uids[i]] for i in known])
                il_check = max(il_check, float(np.abs(il[known] - table).max()))
            domains = batch['domain'].cpu().numpy().astype(np.int64)
            columns['domain'].append(domains)
            columns['batch'].append(np.full(n, b, dtype=np.int64))
            columns['domain_is_real'].append(np.isin(np.asarray(self.domain_names)[domains], self.real).astype(float))
        samples = {k: np.concatenate(v) for k, v in columns.items()}
        meta = {'lookahead_val_loss': {k: float(np.mean(v)) for k, v in val_losses.items()},
                'h_jvp_vs_per_sample_grad_rel_err': check,
                'il_vs_bench_table_max_abs_diff': il_check, 'il_missing_in_bench_table': il_missing}
        return samples, meta


# ------------------------------------------------------------------------------------------------------ runs
def base_spec(ctx: dict[str, Any], budget: quality.Budget) -> dict[str, Any]:
    """The quality bench's run spec for ``uniform`` (as its ``run_all`` builds it), without evaluations."""
    return {'paths': ctx['paths'], 'threads': 1, 'domains': ctx['domains'], 'real': ctx['real'],
            'degraded': ctx['degraded'], 'device': ctx.get('device', 'cpu'), 'report': ctx['report'],
            'heldout_path': ctx['heldout_path'], 'balanced_path': ctx['balanced_path'],
            'train_shares': ctx['data']['train_shares'], 'method': 'uniform',
            'budget': budget.record(), 'evaluate': False}


class KeepModel(Callback):
    """Keeps a copy of the trained LM (in eval mode) when the fit ends."""

    def __init__(self) -> None:
        self.model: Optional[torch.nn.Module] = None

    def fit_end(self, state, logger) -> None:
        self.model = copy.deepcopy(state.model.model).eval()


def irreducible_model(ctx: dict[str, Any], budget: quality.Budget) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The RHO rule's irreducible-loss model: the quality bench's ``il_proxy`` run (trained on the held-out target
    samples only, seed ``PROXY_SEED``, ``proxy_frac`` of the steps), and that run's result (with its table of every
    training sample's irreducible loss, ``irreducible_loss``, by uid).

    The screen scores the refit samples with the model itself: the bench's table leaves out the last partial batch of
    its pass over the training set (its loader drops it), and the screen checks that the two agree elsewhere."""
    spec = {**base_spec(ctx, budget), 'seed': quality.PROXY_SEED, 'il_proxy': True,
            'steps': max(2, round(budget.proxy_frac * budget.steps))}
    keep = KeepModel()
    result = quality.run_one(spec, callbacks=(keep,))
    assert keep.model is not None
    return keep.model, result


def screen_seed(ctx: dict[str, Any], budget: quality.Budget, settings: ScreenSettings, seed: int,
                il_model: torch.nn.Module, il_table: dict[str, float]) -> dict[str, Any]:
    """Train ``uniform`` for one seed and measure every signal at each checkpoint."""
    spec = {**base_spec(ctx, budget), 'seed': seed}
    probe = SignalProbe(spec, budget, settings, il_model, il_table)
    started = time.perf_counter()
    run = quality.run_one(spec, callbacks=(probe,))
    checkpoints = []
    for samples, meta in zip(probe.samples, probe.meta):
        checkpoints.append({**meta, **checkpoint_figures(samples, ctx['real'], ctx['domains'], settings)})
    return {'seed': seed, 'checkpoints': checkpoints,
            'seconds': {'total': time.perf_counter() - started, 'train': run['train_seconds'] - sum(probe.seconds),
                        'signals': probe.seconds}}


# ------------------------------------------------------------------------------------------------------ report
def _f(x: Optional[float], fmt: str = '.3f') -> str:
    return '-' if x is None else format(x, fmt)


def _domain_table(checkpoint: dict[str, Any], degraded: list[str]) -> list[str]:
    """Per domain (degraded ones marked ``*``), mean over seeds: each ``h`` signal's trust-region weight, and the
    mean ``loss`` and ``reducible`` loss."""
    domains = sorted(checkpoint['signals']['loss']['mean_by_domain'], key=lambda d: (d in degraded, d))
    short = [d.replace('RedPajama', '').replace('Degraded', '') + ('*' if d in degraded else '') for d in domains]
    lines = ['| by domain (* degraded) | ' + ' | '.join(short) + ' |', '|---|' + '---:|' * len(domains)]
    for name, e in checkpoint['signals'].items():
        key = 'weight_by_domain' if name in H_SIGNALS else 'mean_by_domain'
        if name == 'domain_is_real' or key not in e:
            continue
        label = f'{name} weight' if name in H_SIGNALS else f'{name} mean'
        lines.append(f'| {label} | ' + ' | '.join(_f(e[key].get(d)) for d in domains) + ' |')
    bad = [d for d in domains if d in degraded]
    lines += ['', '| AUC real vs one degraded domain | ' + ' | '.join(short[domains.index(d)] for d in bad) + ' |',
              '|---|' + '---:|' * len(bad)]
    for name, e in checkpoint['signals'].items():
        if name != 'domain_is_real' and 'auc_by_degraded_domain' in e:
            lines.append(f'| {name} | ' + ' | '.join(_f(e['auc_by_degraded_domain'].get(d, {}).get('mean'))
                                                      for d in bad) + ' |')
    return lines + ['']


def render_markdown(results: dict[str, Any]) -> str:
    """The aggregate as terminal-readable tables, one per checkpoint."""
    s = results['settings']
    lines = ['# Signal screen: which per-sample signal tells real from degraded samples?', '',
             f'`{results["command"]}` — {results["date"]}, corpus seed {results["corpus"]["corpus_seed"]} '
             f'({results["corpus"]["corruptions"]} corruptions), seeds {results["seeds"]}, '
             f'{s["refit_batches"]} refit batches of {results["budget"]["batch_size"]} per checkpoint, '
             f'eta {s["lookahead_lr"]}, beta {s["beta"]}, top {s["select_fraction"]:.2f} per batch.'
             + (' **QUICK RUN**' if results['quick'] else ''), '',
             'AUC > 0.5: the samples the signal prefers (low h, low loss, high reducible loss) are real. '
             'w ratio: mean trust-region weight of degraded / real samples (< 1: degraded down-weighted). '
             'top-1/4 deg: share of degraded samples among the top quarter of each batch (pool: their share of '
             'the batches). dom var: share of the variance explained by the domain. Mean [min, max] over seeds.', '']
    for c in results['aggregate']:
        pool = c['pool_degraded_share']['mean']
        lines += [f'## step {c["step"]} ({c["fraction"]:.2f} of the run), degraded share of the pool {_f(pool)}', '',
                  '| signal | AUC mean [min, max] | seeds > 0.5 | w ratio deg/real | top-1/4 deg share | dom var |',
                  '|---|---|---:|---|---|---:|']
        for name, e in c['signals'].items():
            a = e['auc']
            ratio = e.get('weight_ratio')
            top = e['top_degraded_share']
            lines.append(f'| {name} | {_f(a["mean"])} [{_f(a["min"])}, {_f(a["max"])}] | {a["seeds_above_half"]}/'
                         f'{a["n"]} | ' + (f'{_f(ratio["mean"])} [{_f(ratio["min"])}, {_f(ratio["max"])}]'
                                           if ratio else '-')
                         + f' | {_f(top["mean"])} [{_f(top["min"])}, {_f(top["max"])}] | '
                           f'{_f(e["domain_variance_share"]["mean"], ".2f")} |')
        lines.append('')
        betas = next((list(e['select_degraded_share']) for e in c['signals'].values()
                      if 'select_degraded_share' in e), [])
        if betas:
            lines += ['dwm_select at its refit target (Gumbel top-1/4 of -h/beta): degraded share of the selected, '
                      'by refit_kl beta (pool: ' + _f(pool) + ')', '',
                      '| signal | ' + ' | '.join(f'beta {b}' for b in betas) + ' |', '|---|' + '---|' * len(betas)]
            for name, e in c['signals'].items():
                if 'select_degraded_share' in e:
                    lines.append(f'| {name} | ' + ' | '.join(
                        f'{_f(e["select_degraded_share"][b]["mean"])} [{_f(e["select_degraded_share"][b]["min"])}, '
                        f'{_f(e["select_degraded_share"][b]["max"])}]' for b in betas) + ' |')
            lines.append('')
        lines += _domain_table(c, results['data']['degraded_domains'])
    lines += ['`h_cos_heldout` is a diagnostic (cosine), not the paper\'s method. `domain_is_real` is the sanity '
              'signal (AUC 1 by construction).', '']
    return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------------ main
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    doc = __doc__.split('\n\n')
    parser = argparse.ArgumentParser(
        prog='python -m benchmarks.signal_screen', formatter_class=argparse.RawDescriptionHelpFormatter,
        description='\n\n'.join(doc[:3]),
        epilog='Runs on the DEVELOPMENT corpus (--corpus-seed 1) by default. Corpus seed 0 is the reported corpus of '
               'the quality bench: do not use this screen on it to choose anything.')
    parser.add_argument('--quick', action='store_true',
                        help=f'test size: the quality bench\'s QUICK budget, {QUICK_REFIT_BATCHES} refit batches, '
                             'seed 0')
    parser.add_argument('--seeds', type=int, nargs='+', default=None,
                        help='training seeds (default: 0 1 2 3 4; --quick: 0)')
    parser.add_argument('--corpus-seed', type=int, default=DEFAULT_CORPUS_SEED,
                        help='seed of the embedded corpus (default: 1, the development corpus; 0 is the reported one '
                             'and must not be used to choose anything)')
    parser.add_argument('--corruptions', choices=CORRUPTIONS, default='standard',
                        help='the embedded corpus\'s degraded domains (default: standard)')
    parser.add_argument('--refit-batches', type=int, default=None,
                        help=f'refit batches per checkpoint (default: {REFIT_BATCHES}; --quick: {QUICK_REFIT_BATCHES})')
    parser.add_argument('--checkpoints', type=float, nargs='+', default=list(DEFAULT_CHECKPOINTS),
                        help='fractions of the steps at which to measure (default: 1/3 2/3 1, the starts of stages '
                             '2 and 3 of a 3-stage run and the end)')
    parser.add_argument('--out', default=DEFAULT_OUT, help='where signal.json and signal.md go '
                                                          '(default: benchmarks/results/issue18_dev/signal)')
    parser.add_argument('--render-only', action='store_true',
                        help='only recompute the aggregate and rewrite signal.json and signal.md from OUT/signal.json')
    parser.add_argument('--data-dir', default=os.path.join(quality.REPO, '.cache', 'bench-quality'),
                        help='the quality bench\'s data cache (default: .cache/bench-quality)')
    args = parser.parse_args(argv)
    if any(not 0.0 < f <= 1.0 for f in args.checkpoints):
        parser.error('--checkpoints: fractions in (0, 1]')
    return args


def write_results(results: dict[str, Any], out: str) -> None:
    """``OUT/signal.json`` and ``OUT/signal.md``."""
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, 'signal.json'), results)
    with open(os.path.join(out, 'signal.md'), 'w') as f:
        f.write(render_markdown(results))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.render_only:
        with open(os.path.join(args.out, 'signal.json')) as f:
            results = json.load(f)
        results['aggregate'] = aggregate(results['per_seed'])
        write_results(results, args.out)
        _say(f'rewrote {os.path.join(args.out, "signal.md")} from its JSON')
        return 0
    torch.set_num_threads(1)
    started = time.perf_counter()
    budget = quality.QUICK if args.quick else quality.FULL
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else list(DEFAULT_SEEDS))
    settings = ScreenSettings.from_budget(
        budget, args.refit_batches or (QUICK_REFIT_BATCHES if args.quick else REFIT_BATCHES),
        tuple(sorted(set(args.checkpoints))))
    machine = machine_info()
    ctx = quality.prepare(argparse.Namespace(corpus=None, data_dir=args.data_dir, corpus_seed=args.corpus_seed,
                                             corruptions=args.corruptions, degraded=None, lambada=None,
                                             device='cpu'), budget)
    _say(f'corpus seed {args.corpus_seed} ({args.corruptions}): real {", ".join(ctx["real"])}; degraded '
         f'{", ".join(ctx["degraded"])}')
    t0 = time.perf_counter()
    il_model, il = irreducible_model(ctx, budget)
    il_seconds = time.perf_counter() - t0
    _say(f'irreducible-loss model: {il["steps"]} steps, {il_seconds:.0f}s')
    per_seed = []
    for seed in seeds:
        _say(f'seed {seed}: uniform, {budget.steps} steps, signals at {sorted(settings.checkpoints)}')
        per_seed.append(screen_seed(ctx, budget, settings, seed, il_model, il['irreducible_loss']))
        _say(f'seed {seed}: {per_seed[-1]["seconds"]["total"]:.0f}s; AUC at the end: ' + ', '.join(
            f'{name} {_f(fig["auc"])}' for name, fig in per_seed[-1]['checkpoints'][-1]['signals'].items()))
    command = ' '.join(['python -m benchmarks.signal_screen', *(argv if argv is not None else sys.argv[1:])])
    results: dict[str, Any] = {
        'benchmark': 'signal_screen', 'schema': SCHEMA, 'quick': bool(args.quick), 'command': command.strip(),
        'date': utc_now(), 'machine': machine, 'torch_threads': torch.get_num_threads(),
        'versions': library_versions(('torch', 'mosaicml', 'mosaicml-streaming', 'transformers')),
        'corpus': {'kind': 'embedded', 'corpus_seed': args.corpus_seed, 'corruptions': args.corruptions},
        'budget': budget.record(), 'settings': asdict(settings),
        'signals': list(SIGNALS), 'preference': PREFERENCE, 'data': ctx['data'], 'seeds': seeds,
        'irreducible_model': {'seed': quality.PROXY_SEED, 'steps': il['steps']},
        'per_seed': per_seed, 'aggregate': aggregate(per_seed),
        'seconds': {'total': time.perf_counter() - started, 'irreducible_model': il_seconds},
    }
    write_results(results, args.out)
    _say(f'wrote {os.path.join(args.out, "signal.json")} and signal.md ({results["seconds"]["total"]:.0f}s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
