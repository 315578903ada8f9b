"""``DWM``: the Composer algorithm. Thin glue that decides *when* to call the pure functions of this package.

The method, in the order a run meets it:

* ``INIT``: refuse FSDP; build the weighter (or load the saved weighters to replay); check everything the run needs
  (:mod:`~algorithms.dwm.startup`, :func:`~algorithms.dwm.export.save_dir_problem`).
* ``FIT_START``: check the stage plan against ``max_duration``; claim ``save_dir``; enter stage 1 (refit the
  weighter unless ``warmup_uniform``).
* ``AFTER_DATALOADER``: the weights of the whole device batch under ``no_grad`` (embeddings all-gathered under DDP,
  so the softmax spans the global batch), stored as ``batch['dwm_weight']`` for Composer's splitter; in
  ``mode='select'``, keep the top ``1/select_factor`` of the pool instead.
* ``BEFORE_FORWARD`` / ``AFTER_FORWARD``: for a Composer ``HuggingFaceModel``, ``labels`` are held back from the
  HF forward (so it does not compute a cross-entropy that DWM would discard) and restored right after it; the
  weighted loss is computed there from the logits and handed to Composer as ``outputs['loss']``.
* ``AFTER_LOSS``: ``state.loss`` becomes the weighted loss of the microbatch.
* ``BATCH_END``: metrics; at a stage boundary, with the LLM frozen, the bi-level refit of the weighter
  (:func:`~algorithms.dwm.refit.refit`), and the new stage's weighter saved to ``save_dir``.
* ``FIT_END``: the last stage's ESS metrics.
"""

from __future__ import annotations

import copy
import hashlib
import time
import warnings
from typing import Any, Optional, Union

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import dist

from algorithms.dwm.config import DWMConfig, WeighterConfig
from algorithms.dwm.export import (claim_save_dir, export_stage, load_saved_weighters, run_record,
                                   save_dir_problem)
from algorithms.dwm.functional import (WEIGHT_KEY, ensure_labels, gumbel_top_k, logits_of, subset_batch,
                                       uniform_if_nonfinite, weighted_loss)
from algorithms.dwm.hypergradient import adam_preconditioner, iter_named_trainable
from algorithms.dwm.inputs import INPUTS_KEY, load_reference_losses, weighter_inputs
from algorithms.dwm.metrics import TrainingMetrics, refit_report
from algorithms.dwm.refit import BatchCycle, LoaderLike, global_weights, make_weighter_optimizer, refit
from algorithms.dwm.stages import boundary_reached, check_against_duration, stage_boundaries
from algorithms.dwm.startup import loader_problem, lookahead_lr_problem, replay_problem
from algorithms.dwm.weighter import Weighter

__all__ = ['DWM']


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The HuggingFace causal LM inside a Composer ``HuggingFaceModel`` (or the module itself)."""
    model = _unwrap(model)
    return getattr(model, 'model', model)


class DWM(Algorithm):
    """Data Weighting Model (Yu et al., ICML 2025): a batch-aware weighter reweights per-sample losses and is
    refit by bi-level optimisation at stage boundaries.

    Example:
        .. code-block:: python

            from algorithms.dwm import DWM, DWMConfig, ValidationBatches
            dwm = DWM(num_stages=5, refit_steps=20, refit_dataloader=refit_loader,
                      val_dataloader=ValidationBatches('lambada_val.jsonl', tokenizer), save_dir='dwm_schedule')
            # or: DWM(config=DWMConfig(num_stages=5, refit_steps=20), refit_dataloader=..., val_dataloader=...)
            trainer = Trainer(model=model, train_dataloader=train_loader, algorithms=[dwm], max_duration='1000ba')

    Args:
        config (DWMConfig | dict, optional): The method's options (:class:`~algorithms.dwm.config.DWMConfig`, where
            each is documented with its default). Default: ``None`` (``DWMConfig()``).
        refit_dataloader (Iterable[dict] | Callable, optional): Batches from the *training distribution* for the
            refit, with their own seed (so the main loader's order and resumption are untouched); must iterate
            deterministically for exact resumption; under DDP, each rank's own shard. Or a zero-argument factory
            called lazily. Default: ``None`` (required when refitting).
        val_dataloader (Iterable[dict] | Callable, optional): Validation batches (``input_ids``, ``labels`` with
            ``-100`` outside the scored tokens, e.g. :class:`~algorithms.dwm.validation.ValidationBatches`), or a
            factory. Default: ``None`` (required when refitting).
        **options: Any field of :class:`~algorithms.dwm.config.DWMConfig`, replacing the one of ``config``.
    """

    def __init__(self, config: Optional[Union[DWMConfig, dict[str, Any]]] = None,
                 refit_dataloader: Optional[LoaderLike] = None, val_dataloader: Optional[LoaderLike] = None,
                 **options: Any):
        self.config = cfg = DWMConfig.from_any(config, **options)
        self.stage_plan = stage_boundaries(cfg.num_stages, cfg.stage_boundaries)  # the starts of stages 2.., checked
        self.weighter_config = cfg.weighter_config()
        self.refit_batches = BatchCycle(refit_dataloader, 'refit_dataloader')
        self.val_batches = BatchCycle(val_dataloader, 'val_dataloader')
        self.metrics = TrainingMetrics(cfg.score_names, cfg.domain_names, cfg.log_every, cfg.ess_band)
        self.weighter: Optional[Weighter] = None
        self.weighter_optimizer: Optional[torch.optim.Optimizer] = None
        self.replayed: Optional[list[Weighter]] = None  # the saved weighters of `schedule`, stage by stage
        self.stage_index = -1
        self.nonfinite_batches = self.refits_done = self.dead_refits = 0
        self.domain_memory: dict[int, float] = {}  # refit_target_memory: the earlier refits' domain means
        self.exports: list[dict[str, Any]] = []  # the stages this run saved (schedule.json's list)
        self.last_weights: Optional[torch.Tensor] = None  # global weights of the latest batch (for tests/metrics)
        self.last_refit_metrics: dict[str, float] = {}
        self._save_dir_owner: Optional[dict[str, Any]] = None  # schedule.json's run record, INIT -> FIT_START
        self._held_batch: Optional[dict[str, Any]] = None  # the microbatch whose labels are held back
        self._precomputed_loss: Optional[torch.Tensor] = None
        self._pending_state: Optional[dict[str, Any]] = None
        self._device = torch.device('cpu')
        self.reference_losses: Optional[dict[int, float]] = None
        if cfg.reference_losses is not None:
            try:
                self.reference_losses = load_reference_losses(cfg.reference_losses)
            except ValueError as e:
                raise ValueError(f'algorithms.dwm.reference_losses (DWM(reference_losses=...)): {e}') from None

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.FIT_START, Event.AFTER_DATALOADER, Event.BEFORE_FORWARD,
                         Event.AFTER_FORWARD, Event.AFTER_LOSS, Event.BATCH_END, Event.FIT_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._init(state)
        elif event == Event.FIT_START:
            self._fit_start(state, logger)
        elif event == Event.AFTER_DATALOADER:
            self._after_dataloader(state, logger)
        elif event == Event.BEFORE_FORWARD:
            self._before_forward(state)
        elif event == Event.AFTER_FORWARD:
            self._after_forward(state)
        elif event == Event.AFTER_LOSS:
            self._after_loss(state)
        elif event == Event.BATCH_END:
            self._batch_end(state, logger)
        elif event == Event.FIT_END:
            self.metrics.log_stage_ess(self.stage_index, logger)  # the last stage has no boundary after it

    # ------------------------------------------------------------------------------------------------------------
    # Start: the weighter, and every check that can run before the first step.
    def _init(self, state: State) -> None:
        if getattr(state, 'fsdp_enabled', False) or getattr(state, 'fsdp_config', None) is not None:
            raise ValueError('DWM does not support FSDP: its refit needs the full LLM parameters on every rank for '
                             'the look-ahead and the JVP. Train with DDP (no parallelism_config.fsdp), or remove DWM.')
        lm = _causal_lm(state.model)
        try:
            self._device = next(lm.parameters()).device
        except StopIteration:
            pass
        if self.weighter_config.vocab_size is None:
            vocab = getattr(getattr(lm, 'config', None), 'vocab_size', None)
            if vocab is None:
                raise ValueError('algorithms.dwm.weighter.vocab_size (DWM(weighter=...)): unset, and the model has no '
                                 "config.vocab_size to take it from; set it to the tokenizer's vocabulary size")
            self.weighter_config.vocab_size = int(vocab)
        if self.config.schedule is not None:
            try:
                saved = load_saved_weighters(self.config.schedule)
            except (OSError, ValueError) as e:
                raise ValueError(f'algorithms.dwm.schedule (DWM(schedule=...)): {e}; give the schedule.json (or its '
                                 'directory) that a DWM run with save_dir wrote') from e
            self.replayed = [w.to(self._device) for _, w in saved]
            self._set_weighter(copy.deepcopy(self.replayed[0]))
        else:
            self._set_weighter(Weighter(self.weighter_config).to(self._device))
        if self._pending_state is not None:
            self.load_state_dict(self._pending_state)
            self._pending_state = None
        self._check_startup(state)

    def _set_weighter(self, weighter: Weighter) -> None:
        self.weighter = weighter.to(self._device).eval()
        self.weighter_config = weighter.config
        self.weighter_optimizer = make_weighter_optimizer(self.weighter, self.config)

    def _check_startup(self, state: State) -> None:
        """INIT: the refit and validation data yield a batch, a replay has this run's number of stages, a refit can
        move the weighter, and ``save_dir`` holds no other run's saved weighters. Every rank learns every rank's
        verdict (no rank is left waiting in a collective while another raises)."""
        cfg = self.config
        errors: list[str] = []
        first_exception: Optional[BaseException] = None
        if cfg.refits():
            for cycle in (self.val_batches, self.refit_batches):
                message, exc = loader_problem(cycle.source, cycle.name)
                if message:
                    errors.append(message)
                    first_exception = first_exception or exc
        save_dir_message, owner = save_dir_problem(cfg.save_dir, cfg.save_overwrite, cfg.schedule,
                                                   run_record(state.run_name, state.max_duration))
        lr = self._lookahead_lr(state) if cfg.refits() and state.optimizers else None
        replayed = len(self.replayed) if self.replayed is not None else None
        errors += [m for m in (replay_problem(cfg, replayed), save_dir_message, lookahead_lr_problem(cfg, lr)) if m]
        if dist.get_world_size() > 1:
            verdicts = dist.all_gather_object((errors, owner))
            errors = list(dict.fromkeys(m for rank_errors, _ in verdicts for m in rank_errors))
            owner = next((o for _, o in verdicts if o), None)
        self._save_dir_owner = owner
        if errors:
            raise ValueError('\n'.join(errors)) from first_exception

    def _fit_start(self, state: State, logger: Logger) -> None:
        # Composer sets max_duration after INIT: every stage that refits or replays a weighter must train a batch
        # within it (checked before any refit).
        cfg = self.config
        message = check_against_duration(self.stage_plan, state.max_duration, cfg.stage_boundaries is not None,
                                         len(self.stage_plan) + 1)
        if message and (cfg.refits() or self.replayed is not None):
            raise ValueError(message)
        # Domain and score names default to the train dataset's (a DWMDataset has both); the train dataloader is
        # on the State from FIT_START on, not yet at INIT.
        dataset = getattr(state.train_dataloader, 'dataset', None)
        if self.metrics.domain_names is None and getattr(dataset, 'domain_names', None):
            self.metrics.domain_names = list(dataset.domain_names)
        if self.metrics.score_names is None and getattr(dataset, 'score_names', None):
            self.metrics.score_names = list(dataset.score_names)
        owner, self._save_dir_owner = self._save_dir_owner, None
        claim_save_dir(cfg.save_dir, owner, run_record(state.run_name, state.max_duration), self.stage_index >= 0,
                       cfg.save_overwrite, self.exports, writer=dist.get_global_rank() == 0)
        if self.stage_index >= 0:  # resumed mid-run: the stage and the weighter come from the checkpoint
            return
        self._enter_stage(0, state, logger)

    # ------------------------------------------------------------------------------------------------------------
    # Every batch: weigh it, and train on the weighted loss.
    def _after_dataloader(self, state: State, logger: Logger) -> None:
        cfg = self.config
        batch = ensure_labels(dict(state.batch))
        n_local = batch['input_ids'].shape[0]
        chunk = max(1, n_local // cfg.select_factor) if cfg.mode == 'select' else None  # the trained batch's rows
        batch = self._with_inputs(batch, _causal_lm(state.model), chunk)
        with torch.no_grad():
            weights, offset, scores = global_weights(self.weighter, batch, use_prior_weight=cfg.use_prior_weight)
        weights, fell_back = uniform_if_nonfinite(weights)
        if fell_back:
            self.nonfinite_batches += 1
            warnings.warn(f'DWM: non-finite or non-positive weights at batch {int(state.timestamp.batch)}; '
                          'using uniform weights for this batch')
            logger.log_metrics({'dwm/nonfinite_weight_batches': self.nonfinite_batches})
        local_weights = weights[offset:offset + n_local]
        if cfg.mode == 'select':
            keep = max(1, n_local // cfg.select_factor)
            generator = torch.Generator().manual_seed(self._select_seed(int(state.timestamp.batch)))
            logits = scores.float() / (self.weighter_config.tau * cfg.select_temperature)
            if fell_back or not bool(torch.isfinite(logits).all()):
                logits = torch.zeros_like(logits)
            index = gumbel_top_k(logits, keep, generator, offset, offset + n_local)
            batch = subset_batch(batch, index, n_local)
            local_weights = torch.ones(keep)
        batch[WEIGHT_KEY] = local_weights.detach().float().to(batch['input_ids'].device)
        state.batch = batch
        self.last_weights = weights.detach().cpu()
        self.metrics.record_batch(batch, weights, cfg.mode == 'weight', int(state.timestamp.batch), self.stage_index,
                                  logger)

    def _select_seed(self, batch_index: int) -> int:
        digest = hashlib.sha256(f'dwm-select:{self.config.seed}:{batch_index}'.encode()).digest()
        return int.from_bytes(digest[:8], 'little') & ((1 << 63) - 1)

    def _can_hold_labels(self, state: State) -> bool:
        """Whether the HF forward may run without ``labels``: a Composer ``HuggingFaceModel`` whose ``loss`` is the
        stock one (it returns ``outputs['loss']``, which DWM then provides) and that returns dict outputs."""
        if not self.config.single_loss_pass:
            return False
        batch = state.batch
        if not isinstance(batch, dict) or WEIGHT_KEY not in batch or 'labels' not in batch:
            return False
        from composer.models import HuggingFaceModel
        model = _unwrap(state.model)
        if not isinstance(model, HuggingFaceModel) or type(model).loss is not HuggingFaceModel.loss:
            return False
        if type(model).forward is not HuggingFaceModel.forward:
            return False
        return bool(getattr(model.config, 'use_return_dict', False))

    def _before_forward(self, state: State) -> None:
        self._held_batch, self._precomputed_loss = None, None
        if self._can_hold_labels(state):
            self._held_batch = state.batch
            state.batch = {k: v for k, v in state.batch.items() if k != 'labels'}  # the microbatch is not mutated

    def _after_forward(self, state: State) -> None:
        if self._held_batch is None:
            return
        state.batch, self._held_batch = self._held_batch, None
        outputs = state.outputs
        if not hasattr(outputs, 'keys') or outputs.get('loss') is not None:  # pragma: no cover - defensive
            return
        loss = self._weighted_loss(state.batch, outputs['logits'])
        outputs['loss'] = loss  # what HuggingFaceModel.loss returns
        self._precomputed_loss = loss

    def _weighted_loss(self, batch: dict[str, Any], logits: torch.Tensor) -> torch.Tensor:
        loss, per_sample = weighted_loss(logits, batch['labels'], batch[WEIGHT_KEY], self.config.loss_normalization)
        self.metrics.record_losses(per_sample)
        return loss

    def _after_loss(self, state: State) -> None:
        if self._precomputed_loss is not None:
            state.loss, self._precomputed_loss = self._precomputed_loss, None
            return
        if WEIGHT_KEY in state.batch:
            state.loss = self._weighted_loss(state.batch, logits_of(state.outputs))

    # ------------------------------------------------------------------------------------------------------------
    # Stage boundaries: refit the weighter with the LLM frozen, and save it.
    def _batch_end(self, state: State, logger: Logger) -> None:
        self.metrics.log_domains(int(state.timestamp.batch - 1), self._device, logger)
        self.metrics.reset_batch()
        while 0 <= self.stage_index < len(self.stage_plan) and boundary_reached(state,
                                                                                self.stage_plan[self.stage_index]):
            self.metrics.end_stage(self.stage_index, logger)
            self._enter_stage(self.stage_index + 1, state, logger)

    def _enter_stage(self, stage: int, state: State, logger: Logger) -> None:
        self.stage_index = stage
        if self.replayed is not None and (not self.config.refit or stage == 0):
            self._set_weighter(copy.deepcopy(self.replayed[min(stage, len(self.replayed) - 1)]))
        if self.config.refit and not (stage == 0 and self.config.warmup_uniform):
            self._refit(state, logger)
        if self.config.save_dir is not None and dist.get_global_rank() == 0:
            self.exports = export_stage(self.config.save_dir, self.weighter, stage, f'{int(state.timestamp.batch)}ba',
                                        self.exports)
        logger.log_metrics({'dwm/stage': stage})

    def _refit(self, state: State, logger: Logger) -> None:
        """The bi-level step (:func:`~algorithms.dwm.refit.refit`) at the LLM's current parameters."""
        assert self.weighter is not None and self.weighter_optimizer is not None
        started = time.perf_counter()
        lm = _causal_lm(state.model)
        precond = None
        if self.config.lookahead == 'adam' and state.optimizers:
            precond = adam_preconditioner(state.optimizers[0], dict(iter_named_trainable(lm)))
        result = refit(self.weighter, self.weighter_optimizer, lm,
                       lambda: self._with_inputs(self._batch_to_device(self.refit_batches.next()), lm),
                       lambda: self._batch_to_device(self.val_batches.next()),
                       self.config, self._lookahead_lr(state), precond, domain_memory=self.domain_memory)
        self.domain_memory = result.domain_memory
        self.refits_done += 1
        self.dead_refits += int(result.diagnostics.dead)
        self.last_refit_metrics = refit_report(result.diagnostics, self.config.ess_band, self.refits_done,
                                               self.dead_refits, self.stage_index, time.perf_counter() - started)
        logger.log_metrics(self.last_refit_metrics)

    def _lookahead_lr(self, state: State) -> float:
        """``lookahead_lr``, else the LLM optimizer's base (peak) rate: Composer's schedulers keep it as the param
        group's ``initial_lr`` (the scheduled ``lr`` is 0 in warm-up, where the first refit runs)."""
        if self.config.lookahead_lr is not None:
            return float(self.config.lookahead_lr)
        if not state.optimizers:
            raise ValueError('DWM: no optimizer to take lookahead_lr from; pass lookahead_lr=')
        group = state.optimizers[0].param_groups[0]
        return float(group.get('initial_lr', group['lr']))

    def _with_inputs(self, batch: dict[str, Any], lm: torch.nn.Module, chunk: Optional[int] = None) -> dict[str, Any]:
        """``batch`` with the weighter's inputs beside the tokens (:mod:`algorithms.dwm.inputs`) at the LLM's current
        parameters, when the weighter takes any."""
        if not self.weighter_config.inputs:
            return batch
        return {**batch, INPUTS_KEY: weighter_inputs(self.weighter_config.inputs, lm, batch, self.reference_losses,
                                                     chunk)}

    def _batch_to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        batch = ensure_labels(dict(batch))
        return {k: v.to(self._device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints: the stage, the weighter and its optimizer, and how far the refit loaders have been drawn.
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            'stage_index': self.stage_index,
            'refit_batches_drawn': self.refit_batches.drawn,
            'val_batches_drawn': self.val_batches.drawn,
            'nonfinite_batches': self.nonfinite_batches,
            'refits_done': self.refits_done,
            'dead_refits': self.dead_refits,
            'exports': copy.deepcopy(self.exports),
            'weighter_config': self.weighter_config.to_dict(),
            'domain_memory': dict(self.domain_memory),
        }
        if self.weighter is not None and self.weighter_optimizer is not None:
            state['weighter'] = {k: v.detach().cpu().clone() for k, v in self.weighter.state_dict().items()}
            state['weighter_optimizer'] = copy.deepcopy(self.weighter_optimizer.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.weighter is None:  # before INIT: apply once the weighter exists
            self._pending_state = state
            return
        self.stage_index = int(state['stage_index'])
        self.nonfinite_batches = int(state.get('nonfinite_batches', 0))
        self.refits_done = int(state.get('refits_done', 0))
        self.dead_refits = int(state.get('dead_refits', 0))
        self.exports = list(state.get('exports', []))
        self.domain_memory = {int(k): float(v) for k, v in state.get('domain_memory', {}).items()}
        if 'weighter' in state:
            config = WeighterConfig.from_any(state.get('weighter_config', self.weighter_config.to_dict()))
            if config != self.weighter.config:
                self._set_weighter(Weighter(config))
            self.weighter.load_state_dict(state['weighter'])
            self.weighter.to(self._device).eval()
            self.weighter_optimizer = make_weighter_optimizer(self.weighter, self.config)
            self.weighter_optimizer.load_state_dict(state['weighter_optimizer'])
        for cycle, key in ((self.refit_batches, 'refit_batches_drawn'), (self.val_batches, 'val_batches_drawn')):
            if int(state.get(key, 0)) > 0:
                cycle.fast_forward(int(state[key]))
