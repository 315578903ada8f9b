"""The bi-level refit of the weighter, the paper's step, as a function anyone can call without a ``Trainer``.

At a stage boundary the LLM is frozen and the weighter is moved so that one virtual SGD (or Adam-preconditioned)
step of the LLM on a weighted refit batch lowers the validation loss (Yu et al., ICML 2025, Sec. 3):

1. draw a refit batch from the training distribution and a validation batch;
2. weigh the refit batch with the weighter (the softmax spans the global batch under DDP);
3. the hypergradient ``h_i = d L_val(theta - eta * P * sum_j w_j grad c_j) / d w_i``, exactly, by one forward-mode
   JVP (:func:`~algorithms.dwm.hypergradient.hypergradient_multistep`);
4. ``refit_fit='gradient'``: one Adam step of the weighter on ``sum_i h_i w_i + beta * sum_i w_i log w_i``
   (:func:`~algorithms.dwm.functional.refit_objective`); repeat ``refit_steps`` times.
   ``refit_fit='regression'``: pool every batch's trust-region optimum ``w ∝ exp(-h / beta)`` and fit the weighter
   to all of them (:func:`~algorithms.dwm.functional.log_weight_regression_loss`).

:func:`refit` takes the weighter and its Adam, the LLM, two batch sources and a
:class:`~algorithms.dwm.config.DWMConfig`, and returns the refit weighter with the refit's diagnostics. It needs no
``Trainer`` and keeps no state of its own; it moves the weighter (and its Adam) in place, as an optimizer step does,
rather than a copy (which would hold the weighter and its Adam state twice, at the refit's memory peak), and changes
nothing else: not the LLM, its gradients or its optimizer, nor the RNG.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Iterator, Optional, Sequence, Union

import torch
from composer.utils import dist
from torch.func import functional_call

from algorithms.dwm.config import DWMConfig
from algorithms.dwm.distributed import all_gather_cat, all_reduce_sum_, all_reduce_sum_dict, gather_with_local_grad
from algorithms.dwm.functional import (IGNORE_INDEX, domain_means, log_weight_regression_loss, loss_contributions,
                                       normalize_with_prior, per_sample_loss_sums, refit_objective,
                                       remembered_domain_means, spread_reached, trust_region_target,
                                       weight_statistics)
from algorithms.dwm.hypergradient import (ParamDict, hypergradient_multistep, iter_named_trainable, jvp_attention,
                                          lookahead)
from algorithms.dwm.inputs import INPUTS_KEY
from algorithms.dwm.metrics import RefitDiagnostics
from algorithms.dwm.weighter import Weighter

__all__ = ['refit', 'RefitResult', 'BatchCycle', 'global_weights', 'make_weighter_optimizer', 'lookahead_functions',
           'validation_loss', 'LoaderLike']

LoaderLike = Union[Iterable[dict], Callable[[], Iterable[dict]]]
RESTART_BELOW = 0.9  # a regression fit that explains under 10% of its targets' spread starts again from a zero head


class BatchCycle:
    """Endless iterator over a re-iterable loader (or a factory of one) that counts what it hands out."""

    def __init__(self, loader: Optional[LoaderLike], name: str):
        self.source, self.name = loader, name
        self._loader: Optional[Iterable[dict]] = None
        self._iterator: Optional[Iterator[dict]] = None
        self.drawn = 0

    def _resolve(self) -> Iterable[dict]:
        if self._loader is None:
            if self.source is None:
                raise ValueError(f'DWM needs a {self.name} to refit the weighter; pass {self.name}= '
                                 '(an iterable of batches or a zero-argument factory), or refit=False')
            source = self.source
            self._loader = source if hasattr(source, '__iter__') else source()  # type: ignore[operator]
        return self._loader

    def fast_forward(self, count: int) -> None:
        """Re-create the position after ``count`` draws (the loader must iterate deterministically)."""
        self._iterator, self.drawn = None, 0
        for _ in range(count):
            self.next()

    def next(self) -> dict:
        loader = self._resolve()
        for _ in range(2):
            if self._iterator is None:
                self._iterator = iter(loader)
            try:
                batch = next(self._iterator)
                self.drawn += 1
                return batch
            except StopIteration:
                self._iterator = None
        raise ValueError(f'DWM {self.name} yielded no batches')


def global_weights(weighter: Weighter, batch: dict[str, Any], grad: bool = False, use_prior_weight: bool = True,
                   checkpoint_backbone: bool = False) -> tuple[torch.Tensor, int, torch.Tensor]:
    """The weights of a batch spread over the ranks: global weights ``[N]``, this rank's offset, and the global scores
    ``[N]`` (the softmax inputs). The per-sample embeddings are all-gathered, so the softmax spans the global batch;
    with ``grad``, this rank's slice keeps its graph (and ``checkpoint_backbone`` recomputes the backbone's
    activations in the backward). ``batch['prior_weight']`` multiplies the weights when ``use_prior_weight``; a
    weighter with ``inputs`` reads them from ``batch['dwm_inputs']`` (:func:`~algorithms.dwm.inputs.weighter_inputs`)."""
    device = next(weighter.parameters()).device
    ids = batch['input_ids'].to(device)
    mask = batch.get('attention_mask')
    mask = mask.to(device) if mask is not None else None
    if grad and checkpoint_backbone and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint
        embeddings = checkpoint(weighter.embed, ids, mask, use_reentrant=False)
    else:
        embeddings = weighter.embed(ids, mask)
    global_embeddings, offset = gather_with_local_grad(embeddings) if grad else all_gather_cat(embeddings)
    inputs = None
    if weighter.config.inputs:
        if INPUTS_KEY not in batch:
            raise ValueError(f'the weighter takes the inputs {weighter.config.inputs}, and this batch has none: '
                             f"batch['{INPUTS_KEY}'] is set by DWM (algorithms.dwm.inputs.weighter_inputs)")
        inputs, _ = all_gather_cat(batch[INPUTS_KEY].to(device).float())
    scores = weighter.scores_from_embeddings(global_embeddings, inputs)
    weights = weighter.weights_from_scores(scores)
    if use_prior_weight and 'prior_weight' in batch:
        prior, _ = all_gather_cat(batch['prior_weight'].to(device).float())
        weights = normalize_with_prior(weights, prior)
    return weights, offset, scores


def make_weighter_optimizer(weighter: Weighter, config: DWMConfig) -> torch.optim.Optimizer:
    """Adam over the weighter at ``refit_lr``; with ``refit_backbone_lr_scale != 1`` the backbone is a group of its
    own."""
    if config.refit_backbone_lr_scale == 1.0:
        return torch.optim.Adam(weighter.parameters(), lr=config.refit_lr)
    backbone = weighter.backbone_parameter_names()
    named = list(weighter.named_parameters())
    groups = [{'params': [p for n, p in named if n in backbone],
               'lr': config.refit_lr * float(config.refit_backbone_lr_scale)},
              {'params': [p for n, p in named if n not in backbone], 'lr': config.refit_lr}]
    return torch.optim.Adam(groups, lr=config.refit_lr)


def lookahead_functions(lm: torch.nn.Module, refit_batch: dict, val_batches: Union[dict, Sequence[dict]],
                        loss_normalization: str = 'token') -> tuple[Callable, Callable]:
    """``contributions_fn(params)`` (each refit sample's contribution to the weighted training loss) and
    ``val_loss_fn(params)`` (the token-mean validation loss over all of ``val_batches``), both global under DDP and
    both running ``lm`` at ``params`` (``torch.func.functional_call``: ``lm`` itself is not changed)."""
    if isinstance(val_batches, dict):
        val_batches = [val_batches]
    ids, mask, labels = refit_batch['input_ids'], refit_batch.get('attention_mask'), refit_batch['labels']
    token_total = (labels[:, 1:] != IGNORE_INDEX).sum().double().reshape(1)
    val_total = sum((b['labels'][:, 1:] != IGNORE_INDEX).sum() for b in val_batches).double().reshape(1)
    sample_total = torch.tensor([float(ids.shape[0])], dtype=torch.float64, device=ids.device)
    all_reduce_sum_([token_total, val_total, sample_total])

    def forward_logits(params, input_ids, attention_mask):
        kwargs = {'input_ids': input_ids, 'use_cache': False}
        if attention_mask is not None:
            kwargs['attention_mask'] = attention_mask
        return functional_call(lm, params, args=(), kwargs=kwargs).logits

    def contributions_fn(params):
        loss_sum, token_count = per_sample_loss_sums(forward_logits(params, ids, mask), labels)
        return loss_contributions(loss_sum, token_count, loss_normalization,
                                  total_tokens=token_total.to(loss_sum.dtype)[0],
                                  total_samples=int(sample_total.item()))

    def val_loss_fn(params):
        total = None
        for b in val_batches:
            loss_sum, _ = per_sample_loss_sums(forward_logits(params, b['input_ids'], b.get('attention_mask')),
                                               b['labels'])
            total = loss_sum.sum() if total is None else total + loss_sum.sum()
        return total / val_total.to(total.dtype)[0].clamp(min=1)

    return contributions_fn, val_loss_fn


def validation_loss(val_loss_fn: Callable, params: ParamDict) -> float:
    """``L_val(params)``, global under DDP."""
    with torch.no_grad():
        loss = val_loss_fn(params).detach().reshape(1).double()
    all_reduce_sum_([loss])
    return float(loss[0])


@dataclass
class RefitResult:
    """The refit weighter (in eval mode) and what the refit measured
    (:meth:`~algorithms.dwm.metrics.RefitDiagnostics.metrics` gives the ``dwm/refit/*`` figures)."""

    weighter: Weighter
    diagnostics: RefitDiagnostics
    domain_memory: dict[int, float] = field(default_factory=dict)  # refit_target_memory's averages, by domain id


def refit(weighter: Weighter, optimizer: torch.optim.Optimizer, lm: torch.nn.Module,
          next_refit_batch: Callable[[], dict], next_val_batch: Callable[[], dict], config: DWMConfig,
          lookahead_lr: float, precond: Optional[ParamDict] = None,
          attention: Callable[[torch.nn.Module], ContextManager] = jvp_attention,
          evaluate_after: bool = True, domain_memory: Optional[dict[int, float]] = None) -> RefitResult:
    """One refit of the weighter (see the module docstring).

    Args:
        weighter (Weighter): The weighter; refit in place.
        optimizer (torch.optim.Optimizer): Its Adam (:func:`make_weighter_optimizer`); stepped in place.
        lm (torch.nn.Module): The causal LM; its trainable parameters are ``theta`` (read, never changed).
        next_refit_batch (Callable[[], dict]): The next refit batch (``input_ids``, ``labels``...), on ``lm``'s device.
        next_val_batch (Callable[[], dict]): The next validation batch, likewise.
        config (DWMConfig): ``refit_steps``, ``lookahead_steps``, ``val_batches_per_step``, ``hypergrad``,
            ``fd_eps``, ``normalize_hypergradient``, ``refit_kl``, ``refit_fit``, ``refit_fit_steps``,
            ``loss_normalization``, ``use_prior_weight``, ``refit_checkpoint_weighter``, ``dead_tol``, ``refit_lr``
            and ``refit_backbone_lr_scale`` are read.
        lookahead_lr (float): ``eta`` of the virtual step.
        precond (ParamDict, optional): ``P`` of the virtual step (``adam_preconditioner``). Default: ``None`` (SGD).
        attention (Callable): The context the JVP runs the LM's attention in. Default: :func:`jvp_attention`.
        evaluate_after (bool): Measure ``L_val(theta'(w))`` with the refit weighter on the first refit pair (the
            ``val_loss_after`` figure, and what decides a dead refit). Default: ``True``.
        domain_memory (dict[int, float], optional): The earlier refits' domain means (``RefitResult.domain_memory``
            of the last refit), for ``refit_target_memory``. Default: ``None`` (none yet).
    """
    live = dict(iter_named_trainable(lm))
    params = {k: p.detach() for k, p in live.items()}
    world = dist.get_world_size()
    grad_reduce = all_reduce_sum_dict if world > 1 else None
    backbone_names = weighter.backbone_parameter_names()
    log = RefitDiagnostics(dead_tol=float(config.dead_tol))
    signals: list[tuple[dict, torch.Tensor]] = []  # (refit batch, its global normalised hypergradient)
    first_pair = None

    def weigh(batch: dict, grad: bool = False) -> tuple[torch.Tensor, int, torch.Tensor]:
        return global_weights(weighter, batch, grad=grad, use_prior_weight=config.use_prior_weight,
                              checkpoint_backbone=config.refit_checkpoint_weighter)

    def step_weighter(loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=False)
        with torch.enable_grad():
            loss = loss_fn()
            loss.backward()
        _sync_weighter_grads(weighter, backbone_names, world)
        return loss

    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    weighter.train()
    try:
        for _ in range(config.refit_steps):
            started = time.perf_counter()
            refit_batches = [next_refit_batch() for _ in range(int(config.lookahead_steps))]
            val_batches = [next_val_batch() for _ in range(int(config.val_batches_per_step))]
            first_pair = first_pair or (refit_batches[0], val_batches)
            with torch.enable_grad():
                weighted = [weigh(batch, grad=True) for batch in refit_batches]
            contributions_fns, local_weights, val_loss_fn = [], [], None
            for batch, (weights, offset, _) in zip(refit_batches, weighted):
                contributions_fn, val_loss_fn = lookahead_functions(lm, batch, val_batches, config.loss_normalization)
                contributions_fns.append(contributions_fn)
                local_weights.append(weights[offset:offset + batch['input_ids'].shape[0]].detach())
                log.batch_weights(weights)
            result = hypergradient_multistep(contributions_fns, val_loss_fn, params, local_weights, lookahead_lr,
                                             precond, method=config.hypergrad, fd_eps=config.fd_eps,
                                             grad_reduce=grad_reduce, jvp_context=lambda: attention(lm))
            log.gains.append(validation_loss(val_loss_fn, params) - result.val_loss)
            hypers = [all_gather_cat(h.to(w.dtype))[0] for h, (w, _, _) in zip(result.hypergradients, weighted)]
            hyper_norm = float(torch.cat(hypers).norm())
            if config.normalize_hypergradient:
                rms = torch.cat(hypers).pow(2).mean().sqrt().clamp(min=1e-30)
                hypers = [h / rms for h in hypers]
            if config.refit_kl > 0:
                signals += [(batch, h) for batch, h in zip(refit_batches, hypers)]
            if config.refit_fit == 'gradient':  # the paper's: one Adam step on the refit objective
                kls = []

                def objective() -> torch.Tensor:
                    total = None
                    for hyper, (weights, _, scores) in zip(hypers, weighted):
                        own = weighter.weights_from_scores(scores)  # before any prior: mean 1
                        loss, kl = refit_objective(hyper, weights, own, config.refit_kl)
                        total = loss if total is None else total + loss
                        kls.append(float(kl))
                    return total / len(hypers)

                step_weighter(objective)
                log.kls.append(sum(kls) / len(kls))
                log.grad_norms.append(math.sqrt(sum(float(p.grad.double().pow(2).sum())
                                                    for p in weighter.parameters() if p.grad is not None)))
                optimizer.step()
            log.end_step(result.val_loss, hyper_norm, time.perf_counter() - started)
        pooled, memory = _targets(signals, config, weighter.config.mix_uniform, domain_memory or {})
        if config.refit_fit == 'regression':  # the weighter moves once every target is in
            _fit_to_targets(pooled, weigh, step_weighter, optimizer, weighter, config.refit_fit_steps, log)
        log.target_reached = _target_reached(pooled, weigh, weighter)
        if pooled:
            log.target_std = float(torch.stack([t.std(unbiased=False) for _, t in pooled]).mean())
        if first_pair is not None and evaluate_after:
            log.after = _lookahead_val_loss(lm, params, lookahead_lr, precond, *first_pair, weigh, config)
    finally:
        weighter.eval()
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return RefitResult(weighter, log, memory)


def _targets(signals: list[tuple[dict, torch.Tensor]], config: DWMConfig, mix_uniform: float,
             memory: dict[int, float]) -> tuple[list[tuple[dict, torch.Tensor]], dict[int, float]]:
    """Each refit batch's trust-region target ``w ∝ exp(-h / refit_kl)`` (none when ``refit_kl`` is 0); with
    ``refit_target='domain'``, ``h`` is first replaced by its domain's mean over all the refit's batches, averaged with
    the earlier refits' (``memory``) when ``refit_target_memory`` > 0. Returns the targets and the new memory."""
    if config.refit_kl <= 0 or not signals:
        return [], memory
    hypers = [h for _, h in signals]
    if config.refit_target == 'domain':
        domains = []
        for batch, h in signals:
            if 'domain' not in batch:
                raise ValueError("DWM refit_target=domain needs the domain of every refit sample: the refit loader's "
                                 "batches have no 'domain' key (use a dwm_stream dataset, or refit_target: sample)")
            domains.append(all_gather_cat(batch['domain'].to(h.device).long().reshape(-1))[0])
        sizes = [h.numel() for h in hypers]
        if config.refit_target_memory > 0:
            pooled, memory = remembered_domain_means(torch.cat(hypers), torch.cat(domains), memory,
                                                     float(config.refit_target_memory))
        else:
            pooled = domain_means(torch.cat(hypers), torch.cat(domains))
        hypers = list(pooled.split(sizes))
    return [(batch, trust_region_target(h, config.refit_kl, mix_uniform))
            for (batch, _), h in zip(signals, hypers)], memory


def _fit_to_targets(pooled, weigh, step_weighter, optimizer, weighter: Weighter, steps: int,
                    log: RefitDiagnostics) -> None:
    """``refit_fit='regression'``: ``steps`` Adam steps fitting the weighter's own log-weights to the pooled
    trust-region targets, one pooled batch per step in a fixed cycle; ``log.fit_loss`` is the mean loss of the last
    pass over the pool.

    Adam's moments start afresh: a fit is a new regression problem, and the second moments of the last fit (scaled to
    its converged, small gradients) made the first steps of the next one many times ``refit_lr`` long, which threw a
    weighter whose old fit pointed against the new targets onto a constant weighting that it never left (2 of 15
    refits on the reported alt bench, ``benchmarks/RESULTS.md`` round 4). Should a fit still end no better than a
    constant weighter (``log.fit_flat_loss``, the targets' own spread), it runs once more from a zero score head (a
    uniform weighter, whose gradient toward the targets is not zero), and the better of the two fits is kept."""
    with torch.no_grad():  # a constant weighter's loss: the targets' own spread of centred log-weights
        flat = sum(float(log_weight_regression_loss(torch.ones_like(t), t)) for _, t in pooled) / len(pooled)
    log.fit_flat_loss = flat

    def fit() -> float:
        optimizer.state.clear()
        losses: list[float] = []
        for step in range(steps):
            batch, target = pooled[step % len(pooled)]

            def loss_fn() -> torch.Tensor:
                _, _, scores = weigh(batch, grad=True)
                return log_weight_regression_loss(weighter.weights_from_scores(scores), target.to(scores.device))

            loss = step_weighter(loss_fn)
            optimizer.step()
            losses.append(float(loss))
        return sum(losses[-len(pooled):]) / min(len(losses), len(pooled))

    def snapshot() -> dict[str, torch.Tensor]:  # on the CPU: no second weighter on the device at the refit's peak
        return {k: v.detach().cpu().clone() for k, v in weighter.state_dict().items()}

    started = snapshot()
    log.fit_loss = fit()
    if flat > 0 and log.fit_loss >= RESTART_BELOW * flat:
        first = (log.fit_loss, snapshot())
        weighter.load_state_dict(started)
        with torch.no_grad():
            weighter.score_head.weight.zero_()
        log.fit_restarted = True
        log.fit_loss = fit()
        if first[0] < log.fit_loss:
            log.fit_loss = first[0]
            weighter.load_state_dict(first[1])


def _target_reached(pooled, weigh, weighter: Weighter) -> float:
    """Mean over the refit's batches of how far the refit weighter's own weights went toward each batch's
    trust-region target (:func:`~algorithms.dwm.functional.spread_reached`; NaN without targets)."""
    reached = []
    with torch.no_grad():
        for batch, target in pooled:
            _, _, scores = weigh(batch)
            reached.append(spread_reached(weighter.weights_from_scores(scores), target.to(scores.device)))
    reached = [r for r in reached if not math.isnan(r)]
    return sum(reached) / len(reached) if reached else math.nan


def _lookahead_val_loss(lm, params, lr, precond, refit_batch, val_batches, weigh,
                        config: DWMConfig) -> tuple[float, dict[str, float]]:
    """``L_val(theta'(w))`` with the refit weighter on the first refit pair (the 'after' figure), and the statistics
    of those weights."""
    contributions_fn, val_loss_fn = lookahead_functions(lm, refit_batch, val_batches, config.loss_normalization)
    with torch.no_grad():
        weights, offset, _ = weigh(refit_batch)
    n_local = refit_batch['input_ids'].shape[0]
    grad_reduce = all_reduce_sum_dict if dist.get_world_size() > 1 else None
    theta_prime = lookahead(contributions_fn, params, weights[offset:offset + n_local], lr, precond, grad_reduce)
    return validation_loss(val_loss_fn, theta_prime), weight_statistics(weights)


def _sync_weighter_grads(weighter: Weighter, backbone_names: set[str], world: int) -> None:
    """Backbone grads hold only this rank's samples: sum them. Batch-layer grads are already global on every rank:
    average them (identical up to rounding)."""
    if world == 1:
        return
    named = [(n, p) for n, p in weighter.named_parameters() if p.grad is not None]
    all_reduce_sum_([p.grad for _, p in named])
    for n, p in named:
        if n not in backbone_names:
            p.grad.div_(world)
