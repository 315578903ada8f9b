"""``DWM``: the Composer algorithm. Thin glue that decides *when* to call the pure functions of this package.

Events:

* ``INIT``: refuse FSDP; build the weighter (or load a saved schedule).
* ``FIT_START``: compute the stage boundaries; enter stage 1 (refit it unless ``warmup_uniform``).
* ``AFTER_DATALOADER``: weights of the whole device batch under ``no_grad`` (embeddings all-gathered under DDP,
  so the softmax spans the global batch), stored as ``batch['dwm_weight']`` for Composer's splitter; in
  ``mode='select'``, keep the top ``1/select_factor`` of the pool instead.
* ``BEFORE_FORWARD`` / ``AFTER_FORWARD``: for a Composer ``HuggingFaceModel``, ``labels`` are held back from the
  HF forward (so it does not compute a cross-entropy that DWM would discard) and restored right after it; the
  weighted loss is computed there from the logits and handed to Composer as ``outputs['loss']``.
* ``AFTER_LOSS``: ``state.loss`` becomes the weighted loss of the microbatch.
* ``BATCH_END``: metrics; at a stage boundary, with the LLM frozen, ``refit_steps`` Adam updates of the weighter.
* ``FIT_END``: the last stage's ESS metrics.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import dist
from torch.func import functional_call

from algorithms.dwm.distributed import all_gather_cat, all_reduce_sum_, all_reduce_sum_dict, gather_with_local_grad
from algorithms.dwm.export import (SCHEDULE_FILE, listed_stage_files, load_schedule, read_schedule_run, save_weighter,
                                   schedule_file, write_schedule)
from algorithms.dwm.hypergradient import (adam_preconditioner, hypergradient_multistep, iter_named_trainable,
                                          jvp_attention, lookahead)
from algorithms.dwm.functional import (IGNORE_INDEX, WEIGHT_KEY, ensure_labels, gumbel_top_k, logits_of,
                                       log_weight_regression_loss, loss_contributions, normalize_with_prior,
                                       per_sample_loss_sums, refit_objective, spearman, spread_reached, subset_batch,
                                       trust_region_target, uniform_if_nonfinite, weight_statistics, weighted_loss)
from algorithms.dwm.schedule import boundary_reached, check_against_duration
from algorithms.dwm.schedule import stage_boundaries as compute_stage_boundaries  # `stage_boundaries` is an argument
from algorithms.dwm.weighter import Weighter, WeighterConfig

log = logging.getLogger(__name__)

__all__ = ['DWM']

LoaderLike = Union[Iterable[dict], Callable[[], Iterable[dict]]]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The HuggingFace causal LM inside a Composer ``HuggingFaceModel`` (or the module itself)."""
    model = _unwrap(model)
    return getattr(model, 'model', model)


class _Cycler:
    """Endless iterator over a re-iterable loader (or a factory of one) that counts what it hands out."""

    def __init__(self, loader: Optional[LoaderLike], name: str):
        self._source, self.name = loader, name
        self._loader: Optional[Iterable[dict]] = None
        self._iterator: Optional[Iterator[dict]] = None
        self.drawn = 0

    def _resolve(self) -> Iterable[dict]:
        if self._loader is None:
            if self._source is None:
                raise ValueError(f'DWM needs a {self.name} to refit the weighter; pass {self.name}= '
                                 '(an iterable of batches or a zero-argument factory), or refit=False')
            source = self._source
            is_iterable = hasattr(source, '__iter__')
            self._loader = source if is_iterable else source()  # type: ignore[operator]
        return self._loader

    def fast_forward(self, count: int) -> None:
        """Re-create the position after ``count`` draws (the loader must iterate deterministically)."""
        self._iterator, self.drawn = None, 0
        for _ in range(count):
            self.next()

    def next(self) -> dict:
        loader = self._resolve()
        for attempt in range(2):
            if self._iterator is None:
                self._iterator = iter(loader)
            try:
                batch = next(self._iterator)
                self.drawn += 1
                return batch
            except StopIteration:
                self._iterator = None
        raise ValueError(f'DWM {self.name} yielded no batches')


# ----------------------------------------------------------------------------------------------------------------
# The algorithm
# ----------------------------------------------------------------------------------------------------------------
class DWM(Algorithm):
    """Data Weighting Model (Yu et al., ICML 2025): a batch-aware weighter reweights per-sample losses and is
    refit by bi-level optimisation at stage boundaries.

    Example:
        .. code-block:: python

            from algorithms.dwm import DWM, ValidationBatches
            dwm = DWM(num_stages=5, refit_steps=20, refit_dataloader=refit_loader,
                      val_dataloader=ValidationBatches('lambada_val.jsonl', tokenizer), save_dir='dwm_schedule')
            trainer = Trainer(model=model, train_dataloader=train_loader, algorithms=[dwm], max_duration='1000ba')

    Args:
        num_stages (int): Stages spread evenly over ``max_duration`` (ignored if ``stage_boundaries`` is given).
            Default: ``5``.
        stage_boundaries (Sequence[str], optional): Explicit starts of stages 2.. as Composer time strings
            (``"100ba"``, ``"0.5dur"``). Default: ``None``.
        refit_steps (int): Adam updates of the weighter at each boundary. Default: ``20``.
        refit_lr (float): Learning rate of the weighter's Adam. Default: ``1e-3``.
        lookahead_lr (float, optional): ``eta`` of the virtual step. Default: ``None`` (the LLM optimizer's base,
            peak, learning rate: the param group's ``initial_lr`` that Composer's schedulers record, else its ``lr``;
            refused at start-up if it is 0).
        lookahead (str): ``'sgd'`` (``P = 1``) or ``'adam'`` (``P = 1/(sqrt(v_hat)+eps)`` from the LLM optimizer's
            second moments, **[ours]**; SGD before the optimizer has state). Default: ``'sgd'``.
        hypergrad (str): ``'jvp'`` (forward-mode, exact) or ``'fd'`` (central finite difference). Default:
            ``'jvp'``.
        fd_eps (float): Parameter-space step for ``hypergrad='fd'``. Default: ``1e-3``.
        warmup_uniform (bool): Train stage 1 with uniform weights (no refit before it). Default: ``False``.
        weighter (WeighterConfig | dict, optional): Weighter architecture; ``vocab_size`` is taken from the model
            config when unset. Default: ``None`` (``WeighterConfig()``).
        tau (float, optional): Overrides ``weighter.tau``. Default: ``None``.
        mix_uniform (float, optional): Overrides ``weighter.mix_uniform`` (``lambda``). Default: ``None``.
        refit_dataloader (Iterable[dict] | Callable, optional): Batches from the *training distribution* for the
            refit, with their own seed (so the main loader's order and resumption are untouched); must iterate
            deterministically for exact resumption; under DDP, each rank's own shard. Or a zero-argument factory
            called lazily. Default: ``None`` (required when refitting).
        val_dataloader (Iterable[dict] | Callable, optional): Validation batches (``input_ids``, ``labels`` with
            ``-100`` outside the scored tokens, e.g. :class:`~algorithms.dwm.validation.ValidationBatches`), or a
            factory. Default: ``None`` (required when refitting).
        use_prior_weight (bool): Multiply the DWM weights by ``batch['prior_weight']`` (e.g. from a DSIR/QuRating
            selection) and renormalise to mean 1 over the global batch. Default: ``True``.
        score_names (Sequence[str], optional): Names of the columns of ``batch['scores']``, for the stage-end
            Spearman correlations. Default: ``None`` (the train dataset's ``score_names`` if it has them, else
            ``score0``, ``score1``...).
        domain_names (Sequence[str], optional): Names of the ids in ``batch['domain']``, for per-domain metrics.
            Default: ``None`` (the train dataset's ``domain_names`` if it has them, else the ids).
        save_dir (str, optional): Where to write each stage's weighter and ``schedule.json`` (rank 0). A
            ``schedule.json`` already there from another run (another ``run_name``, or the same name with another
            ``max_duration`` that this run does not resume) is refused at start-up. Default: ``None`` (no export).
        save_overwrite (bool): Replace another run's schedule in ``save_dir`` (and delete the stage files it
            lists) instead of refusing. Default: ``False``.
        schedule (str, optional): A saved ``schedule.json`` (or its directory) whose weighters are used stage by
            stage; with ``refit=False`` they are replayed frozen (transfer); with ``refit=True`` the first one
            initialises the weighter. Default: ``None``.
        refit (bool): Refit the weighter at stage boundaries. Default: ``True``.
        mode (str): ``'weight'`` (the paper) or ``'select'`` (**[ours]**: the loader yields a pool of
            ``select_factor`` x the batch; the weighter's scores plus Gumbel noise pick the top ``1/select_factor``
            of each rank's pool, trained with weight 1). Default: ``'weight'``.
        select_factor (int): Pool size / trained batch size in ``'select'`` mode. Default: ``4``.
        loss_normalization (str): ``'token'`` (``sum_i w_i sum_t l_it / sum_i T_i``: all-ones weights give exactly
            HF's loss) or ``'sample'`` (``mean_i w_i l_i``). Default: ``'token'``.
        normalize_hypergradient (bool): **[ours]** Divide the hypergradient by its RMS before the weighter's
            backward (Adam is scale-invariant up to its ``eps``; this keeps tiny ``eta`` from stalling the refit).
            Default: ``True``.
        seed (int): Seed of the Gumbel noise in ``'select'`` mode. Default: ``0``.
        log_every (int): Log weight/domain metrics every this many batches. Default: ``1``.
        single_loss_pass (bool): For a Composer ``HuggingFaceModel`` (whose ``loss`` is HF's own), keep ``labels``
            out of the HF forward and restore them right after it, so the cross-entropy over the vocabulary runs
            once per step (DWM's per-sample loss) instead of twice (HF's discarded token mean, then DWM's). The loss,
            the gradients and Composer's train metrics (computed from its own copy of the batch) are unchanged.
            Set ``False`` if another algorithm reads ``state.batch['labels']`` during the forward. Default:
            ``True``.
        refit_checkpoint_weighter (bool): Activation-checkpoint the weighter's backbone in the refit: its activations
            are not kept through the look-ahead, validation and JVP passes of the LLM but recomputed for the
            weighter's backward (one more weighter forward per refit step; the same gradients). Worth it when the
            weighter is large (ratio ~1) and refit memory matters. Default: ``False``.
        refit_kl (float): **[ours]** ``beta`` of a trust region toward uniform in the refit loss, which becomes
            ``sum_i h_i w_i + beta * sum_i w_i log w_i``, i.e. ``n * (<p, h> + beta * KL(p || u))`` with
            ``p = w / n`` (the weighter's own weights, before any prior, mean 1) and ``u`` uniform. The KL is
            ``KL(p || u)`` (not ``KL(u || p)``): it penalises large weights (runaway onto a few samples), and its
            minimiser is the Gibbs weighting ``w_i ∝ exp(-h_i / beta)`` (before the uniform mix). With
            ``normalize_hypergradient`` the ``h`` have RMS 1, so ``beta`` is a temperature in units of the
            hypergradient's RMS. ``0`` is the paper's objective (linear in the weights), which ran away on the quality
            proxy (refit ESS share down to 0.26); ``3`` kept every refit batch's ESS share >= 0.94 over 5 seeds of the
            development corpus (``benchmarks/RESULTS.md``). Default: ``3.0`` **[ours]**.
        refit_backbone_lr_scale (float): **[ours]** The weighter's backbone (the per-sample embedder) learns at
            ``refit_lr`` times this; the batch layers and the score head at ``refit_lr``. ``0`` freezes the
            backbone (random features); below 1 slows the collapse of the sample embeddings. Default: ``1.0``.
        val_batches_per_step (int): **[ours]** Validation batches per refit step; the upper-level loss is the
            token mean over all of them (one larger validation sample per step, the same cost in LLM passes per
            token). ``1`` is the method as described. Default: ``1``.
        lookahead_steps (int): **[ours]** ``K`` virtual steps per refit step, each on its own refit batch weighted by
            the weighter, and the validation loss after the ``K``-th (a less myopic upper level: it sees the other
            batches' updates). The hypergradient of each step's weights is first order beyond ``K = 1``
            (:func:`~algorithms.dwm.hypergradient.hypergradient_multistep`); memory: ``K`` copies of the LLM's
            parameters. ``1`` is the paper's exact one-step hypergradient. Default: ``1``.
        ess_band (Sequence[float]): ``(low, high)`` band of the effective sample size share
            ``ESS = (sum w)^2 / (n sum w^2)`` (1 = uniform). A refit whose refit-batch weights leave it, or a stage
            whose training batches leave it, gives a warning (and the metrics ``dwm/refit/ess_out_of_band``,
            ``dwm/stage/ess_out_of_band``). Default: ``(0.5, 1.0)``.
        refit_fit (str): **[ours]** How a refit moves the weighter. ``'gradient'``: ``refit_steps`` Adam steps on the
            refit objective, one refit batch each (the paper's). ``'regression'``: the hypergradients of
            ``refit_steps`` refit batches at the current weighter give each batch its trust-region optimum
            ``w ∝ exp(-h / refit_kl)`` (needs ``refit_kl > 0``); the weighter is then fit to all of them at once,
            ``refit_fit_steps`` Adam steps on the squared error of centred log-weights, in the manner of MATES's
            data-influence model. The same LLM passes as ``'gradient'``; the fit itself runs the weighter only.
            Default: ``'gradient'``.
        refit_fit_steps (int): **[ours]** Adam steps of the regression fit (``refit_fit='regression'``), cycling
            over the pooled refit batches. Default: ``100``.
        dead_tol (float): A refit is *dead* when, at every one of its steps, all weights of the refit batch are
            within ``dead_tol`` of each other (the weighter gives exactly uniform weights and cannot be moved by
            the refit: collapsed embeddings or a zero score head); it is counted (``dwm/refit/dead``,
            ``dwm/refit/dead_refits``) and warned about. Default: ``1e-6``.
    """

    def __init__(
        self,
        num_stages: int = 5,
        stage_boundaries: Optional[Sequence[str]] = None,
        refit_steps: int = 20,
        refit_lr: float = 1e-3,
        lookahead_lr: Optional[float] = None,
        lookahead: str = 'sgd',
        hypergrad: str = 'jvp',
        fd_eps: float = 1e-3,
        warmup_uniform: bool = False,
        weighter: Optional[Union[WeighterConfig, dict[str, Any]]] = None,
        tau: Optional[float] = None,
        mix_uniform: Optional[float] = None,
        refit_dataloader: Optional[LoaderLike] = None,
        val_dataloader: Optional[LoaderLike] = None,
        use_prior_weight: bool = True,
        score_names: Optional[Sequence[str]] = None,
        domain_names: Optional[Sequence[str]] = None,
        save_dir: Optional[str] = None,
        save_overwrite: bool = False,
        schedule: Optional[str] = None,
        refit: bool = True,
        mode: str = 'weight',
        select_factor: int = 4,
        loss_normalization: str = 'token',
        normalize_hypergradient: bool = True,
        seed: int = 0,
        log_every: int = 1,
        single_loss_pass: bool = True,
        refit_checkpoint_weighter: bool = False,
        refit_kl: float = 3.0,
        refit_backbone_lr_scale: float = 1.0,
        val_batches_per_step: int = 1,
        lookahead_steps: int = 1,
        ess_band: Sequence[float] = (0.5, 1.0),
        dead_tol: float = 1e-6,
        refit_fit: str = 'gradient',
        refit_fit_steps: int = 100,
    ):
        if lookahead not in ('sgd', 'adam'):
            raise ValueError(f"DWM lookahead must be 'sgd' or 'adam', got {lookahead!r}")
        if hypergrad not in ('jvp', 'fd'):
            raise ValueError(f"DWM hypergrad must be 'jvp' or 'fd', got {hypergrad!r}")
        if mode not in ('weight', 'select'):
            raise ValueError(f"DWM mode must be 'weight' or 'select', got {mode!r}")
        if loss_normalization not in ('token', 'sample'):
            raise ValueError(f"DWM loss_normalization must be 'token' or 'sample', got {loss_normalization!r}")
        if refit_kl < 0:
            raise ValueError(f'DWM refit_kl must be >= 0, got {refit_kl}')
        if refit_backbone_lr_scale < 0:
            raise ValueError(f'DWM refit_backbone_lr_scale must be >= 0, got {refit_backbone_lr_scale}')
        if int(val_batches_per_step) < 1:
            raise ValueError(f'DWM val_batches_per_step must be >= 1, got {val_batches_per_step}')
        if int(lookahead_steps) < 1:
            raise ValueError(f'DWM lookahead_steps must be >= 1, got {lookahead_steps}')
        if len(ess_band) != 2 or not 0.0 <= float(ess_band[0]) <= float(ess_band[1]):
            raise ValueError(f'DWM ess_band must be (low, high) with 0 <= low <= high, got {ess_band}')
        if refit_fit not in ('gradient', 'regression'):
            raise ValueError(f"DWM refit_fit must be 'gradient' or 'regression', got {refit_fit!r}")
        if refit_fit == 'regression' and float(refit_kl) <= 0:
            raise ValueError('DWM refit_fit=regression fits the trust-region optimum exp(-h / refit_kl): '
                             f'refit_kl must be > 0, got {refit_kl}')
        if int(refit_fit_steps) < 1:
            raise ValueError(f'DWM refit_fit_steps must be >= 1, got {refit_fit_steps}')
        if mode == 'select' and select_factor < 1:
            raise ValueError(f'DWM select_factor must be >= 1, got {select_factor}')
        self.num_stages = num_stages
        self.stage_boundaries_spec = list(stage_boundaries) if stage_boundaries is not None else None
        self.boundaries = compute_stage_boundaries(num_stages, self.stage_boundaries_spec)  # validate early
        self.refit_steps = refit_steps
        self.refit_lr = refit_lr
        self.lookahead_lr = lookahead_lr
        self.lookahead = lookahead
        self.hypergrad = hypergrad
        self.fd_eps = fd_eps
        self.warmup_uniform = warmup_uniform
        self.weighter_config = WeighterConfig.from_any(weighter, tau=tau, mix_uniform=mix_uniform)
        self.use_prior_weight = use_prior_weight
        self.score_names = list(score_names) if score_names is not None else None
        self.domain_names = list(domain_names) if domain_names is not None else None
        self.save_dir = save_dir
        self.save_overwrite = bool(save_overwrite)
        self.schedule_path = schedule
        self.refit = refit
        self.mode = mode
        self.select_factor = select_factor
        self.loss_normalization = loss_normalization
        self.normalize_hypergradient = normalize_hypergradient
        self.seed = seed
        self.log_every = max(1, int(log_every))
        self.single_loss_pass = single_loss_pass
        self.refit_checkpoint_weighter = refit_checkpoint_weighter
        self.refit_kl = float(refit_kl)
        self.refit_backbone_lr_scale = float(refit_backbone_lr_scale)
        self.val_batches_per_step = int(val_batches_per_step)
        self.lookahead_steps = int(lookahead_steps)
        self.ess_band = (float(ess_band[0]), float(ess_band[1]))
        self.dead_tol = float(dead_tol)
        self.refit_fit = refit_fit
        self.refit_fit_steps = int(refit_fit_steps)
        self.dead_refits = 0
        self._save_dir_owner: Optional[dict[str, Any]] = None  # schedule.json's run record, INIT -> FIT_START
        self._stage_ess: list[float] = []
        self._held_batch: Optional[dict[str, Any]] = None  # the microbatch whose labels are held back
        self._precomputed_loss: Optional[torch.Tensor] = None

        self.refit_batches = _Cycler(refit_dataloader, 'refit_dataloader')
        self.val_batches = _Cycler(val_dataloader, 'val_dataloader')
        self.weighter: Optional[Weighter] = None
        self.weighter_optimizer: Optional[torch.optim.Optimizer] = None
        self.replay: Optional[list[Weighter]] = None
        self.stage_index = -1
        self.nonfinite_batches = 0
        self.refits_done = 0
        self.exports: list[dict[str, Any]] = []
        self._pending_state: Optional[dict[str, Any]] = None
        self._device = torch.device('cpu')
        self._reset_batch_buffers()
        self._stage_weights: list[torch.Tensor] = []
        self._stage_scores: list[torch.Tensor] = []
        self.last_weights: Optional[torch.Tensor] = None  # global weights of the latest batch (for tests/metrics)
        self.last_refit_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------------------------
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
            self._log_stage_ess(logger)  # the last stage has no boundary after it

    # ------------------------------------------------------------------------------------------------------------
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
        if self.schedule_path is not None:
            try:
                stages = load_schedule(self.schedule_path)
            except (OSError, ValueError) as e:
                raise ValueError(f'algorithms.dwm.schedule (DWM(schedule=...)): {e}; give the schedule.json (or its '
                                 'directory) that a DWM run with save_dir wrote') from e
            self.replay = [w.to(self._device) for _, w in stages]
            self._set_weighter(copy.deepcopy(self.replay[0]))
        else:
            self._set_weighter(Weighter(self.weighter_config).to(self._device))
        if self._pending_state is not None:
            self.load_state_dict(self._pending_state)
            self._pending_state = None
        self._check_startup(state)

    def _set_weighter(self, weighter: Weighter) -> None:
        self.weighter = weighter.to(self._device).eval()
        self.weighter_config = weighter.config
        self.weighter_optimizer = self._make_weighter_optimizer()

    def _make_weighter_optimizer(self) -> torch.optim.Optimizer:
        """Adam over the weighter; with ``refit_backbone_lr_scale != 1`` the backbone is a group of its own."""
        assert self.weighter is not None
        if self.refit_backbone_lr_scale == 1.0:
            return torch.optim.Adam(self.weighter.parameters(), lr=self.refit_lr)
        backbone = self.weighter.backbone_parameter_names()
        named = list(self.weighter.named_parameters())
        groups = [{'params': [p for n, p in named if n in backbone],
                   'lr': self.refit_lr * self.refit_backbone_lr_scale},
                  {'params': [p for n, p in named if n not in backbone], 'lr': self.refit_lr}]
        return torch.optim.Adam(groups, lr=self.refit_lr)

    def _fit_start(self, state: State, logger: Logger) -> None:
        # Composer sets max_duration after INIT: every stage that refits or replays a weighter must train a batch
        # within it (checked before any refit).
        message = check_against_duration(self.boundaries, state.max_duration, self.stage_boundaries_spec is not None,
                                         len(self.boundaries) + 1)
        if message and (self._refits() or self.replay is not None):
            raise ValueError(message)
        # Domain and score names default to the train dataset's (a DWMDataset has both); the train dataloader is
        # on the State from FIT_START on, not yet at INIT.
        dataset = getattr(state.train_dataloader, 'dataset', None)
        if self.domain_names is None and getattr(dataset, 'domain_names', None):
            self.domain_names = list(dataset.domain_names)
        if self.score_names is None and getattr(dataset, 'score_names', None):
            self.score_names = list(dataset.score_names)
        self._claim_save_dir(state)
        if self.stage_index >= 0:  # resumed mid-run: the stage and the weighter come from the checkpoint
            return
        self._enter_stage(0, state, logger)

    # ------------------------------------------------------------------------------------------------------------
    # Start-up checks: everything the run needs is checked at INIT (the Trainer's construction), before any training
    # step; the messages name the YAML key (and the constructor argument, for plain-Python use).
    def _refits(self) -> bool:
        """Whether the run refits the weighter at all (at stage 1 unless ``warmup_uniform``, and at every boundary)."""
        return bool(self.refit) and (not self.warmup_uniform or len(self.boundaries) > 0)

    def _check_startup(self, state: State) -> None:
        """INIT: the refit and validation data yield a batch, a replayed schedule has this run's number of stages, and
        ``save_dir`` holds no other run's schedule. Every rank learns every rank's verdict (no rank is left waiting in
        a collective while another raises)."""
        errors: list[str] = []
        first_exception: Optional[BaseException] = None
        if self._refits():
            for cycler in (self.val_batches, self.refit_batches):
                message, exc = self._check_loader(cycler)
                if message:
                    errors.append(message)
                    first_exception = first_exception or exc
        for message in (self._check_replay(), self._check_save_dir(state), self._check_schedule(state)):
            if message:
                errors.append(message)
        owner = self._save_dir_owner
        if dist.get_world_size() > 1:
            verdicts = dist.all_gather_object((errors, owner))
            errors = list(dict.fromkeys(m for rank_errors, _ in verdicts for m in rank_errors))
            owner = next((o for _, o in verdicts if o), None)
        self._save_dir_owner = owner
        if errors:
            raise ValueError('\n'.join(errors)) from first_exception

    def _check_loader(self, cycler: _Cycler) -> tuple[Optional[str], Optional[BaseException]]:
        """``(message, exception)`` if the loader of ``cycler`` is missing or yields no batch, else ``(None, None)``.

        A loader with a ``peek()`` (``ValidationBatches``, dwm-stream's YAML loaders) or a list is probed for its first
        batch without moving any iteration; any other iterable, or a factory, is only drawn from at the first refit.
        """
        key = {'val_dataloader': 'algorithms.dwm.validation (DWM(val_dataloader=...))',
               'refit_dataloader': 'algorithms.dwm.refit_loader (DWM(refit_dataloader=...))'}[cycler.name]
        source = cycler._source
        if source is None:
            if cycler.name == 'val_dataloader':
                return (f'{key}: missing, and the weighter is refit against it; set `lambada: PATH` (a LAMBADA-format '
                        'file) or `dataset: {...}` (held-out MDS), or algorithms.dwm.refit: false'), None
            return (f'{key}: missing, and the weighter is refit on it; set `dataset: {{...}}` (the training corpus, '
                    'its own shuffle_seed), or algorithms.dwm.refit: false'), None
        try:
            if hasattr(source, 'peek'):
                batch = source.peek()
            elif isinstance(source, (list, tuple)):
                if not source:
                    raise ValueError('the list is empty')
                batch = source[0]
            else:
                return None, None
        except StopIteration as e:
            return f'{key}: yields no batch (it is empty); point it at data with at least one batch', e
        except Exception as e:  # noqa: BLE001 - reported with the key; chained to the error raised
            return f'{key}: yields no batch ({type(e).__name__}: {e}); fix the data it names', e
        if not hasattr(batch, 'keys') or 'input_ids' not in batch:
            kind = sorted(batch.keys()) if hasattr(batch, 'keys') else type(batch).__name__
            return (f'{key}: its batches ({kind}) have no `input_ids`; give batches of token ids (with `labels`, -100 '
                    'where no loss is taken)'), None
        return None, None

    def _check_replay(self) -> Optional[str]:
        """A frozen replay (``refit=False``) uses stage ``k``'s weighter in stage ``k``: the counts must agree."""
        if self.replay is None or self.refit:
            return None
        stages, saved = len(self.boundaries) + 1, len(self.replay)
        if saved == stages:
            return None
        if self.stage_boundaries_spec is not None:
            key, now = 'algorithms.dwm.stage_boundaries (DWM(stage_boundaries=...))', f'{stages - 1} boundaries'
            fix = f'give {saved - 1} stage_boundaries'
        else:
            key, now, fix = 'algorithms.dwm.num_stages (DWM(num_stages=...))', f'{stages} stages', f'set num_stages: {saved}'
        return (f'{key}: {now}, but the replayed schedule {self.schedule_path} (algorithms.dwm.schedule) holds {saved} '
                f'stage{"s" if saved != 1 else ""}; {fix} to replay it stage by stage')

    @staticmethod
    def _run_record(state: State) -> dict[str, Any]:
        """Who owns a ``save_dir``: the run's name and length (written into ``schedule.json``)."""
        duration = state.max_duration
        if duration is not None:
            value = duration.value
            value = int(value) if float(value).is_integer() else value
            duration = f'{value}{duration.unit.value}'
        return {'run_name': str(state.run_name), 'max_duration': duration}

    def _check_save_dir(self, state: State) -> Optional[str]:
        """``save_dir`` must not hold another run's ``schedule.json`` (it would be overwritten, its stage files left
        unreferenced). The same run (same ``run_name`` and ``max_duration``: an autoresume, or a restart after a kill
        before the first checkpoint) continues in it. A run of that name but another length may only continue it by
        resuming a checkpoint: that is known after the checkpoint loads (and Composer sets ``max_duration`` after
        INIT), so it is decided at FIT_START from the record this leaves in ``_save_dir_owner``."""
        self._save_dir_owner = None
        if self.save_dir is None or self.save_overwrite:
            return None
        key = 'algorithms.dwm.save_dir (DWM(save_dir=...))'
        fix = 'set a new save_dir, or algorithms.dwm.save_overwrite: true to replace it'
        path = schedule_file(self.save_dir)
        if self.schedule_path is not None and schedule_file(self.schedule_path).resolve() == path.resolve():
            return f'{key}: {self.save_dir} holds the schedule this run replays (algorithms.dwm.schedule); set another save_dir'
        if not path.is_file():
            return None
        record, ours = read_schedule_run(self.save_dir), self._run_record(state)
        if record is None or record.get('run_name') != ours['run_name']:
            owner = f'run {record.get("run_name")!r}' if record else 'another run (no run recorded)'
            return f'{key}: {path} belongs to {owner}, not to this run {ours["run_name"]!r}; {fix}'
        self._save_dir_owner = record
        return None

    def _claim_save_dir(self, state: State) -> None:
        """FIT_START: decide the case left open at INIT, and record this run as ``save_dir``'s owner (rank 0). A
        fresh start removes the stage files that the schedule it replaces listed."""
        owner, self._save_dir_owner = self._save_dir_owner, None
        resumed, ours = self.stage_index >= 0, self._run_record(state)
        theirs = (owner or {}).get('max_duration')
        if not resumed and None not in (theirs, ours['max_duration']) and theirs != ours['max_duration']:
            raise ValueError(f'algorithms.dwm.save_dir (DWM(save_dir=...)): {schedule_file(self.save_dir)} '
                             f'belongs to a run {ours["run_name"]!r} of max_duration {theirs} (this one: '
                             f'{ours["max_duration"]}) that this run does not resume; set a new save_dir, or '
                             'algorithms.dwm.save_overwrite: true to replace it, or autoresume from its checkpoint')
        if self.save_dir is None or dist.get_global_rank() != 0:
            return
        save_dir = Path(self.save_dir)
        if not resumed and (save_dir / SCHEDULE_FILE).is_file():
            record = read_schedule_run(save_dir)
            if self.save_overwrite and (record or {}).get('run_name') != ours['run_name']:
                log.warning('algorithms.dwm.save_dir: replacing the schedule of %s in %s (save_overwrite: true).',
                            f'run {record["run_name"]!r}' if record else 'another run', save_dir)
            for name in listed_stage_files(save_dir):  # an unreadable old schedule lists nothing to clean up
                (save_dir / name).unlink(missing_ok=True)
        write_schedule(save_dir, self.exports, run=ours)

    # ------------------------------------------------------------------------------------------------------------
    def _global_weights(self, batch: dict[str, Any], grad: bool = False) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Global weights ``[N]``, this rank's offset, and the global scores ``[N]`` (softmax inputs)."""
        assert self.weighter is not None
        ids = batch['input_ids'].to(self._device)
        mask = batch.get('attention_mask')
        mask = mask.to(self._device) if mask is not None else None
        if grad and self.refit_checkpoint_weighter and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint
            embeddings = checkpoint(self.weighter.embed, ids, mask, use_reentrant=False)
        else:
            embeddings = self.weighter.embed(ids, mask)
        if grad:
            global_embeddings, offset = gather_with_local_grad(embeddings)
        else:
            global_embeddings, offset = all_gather_cat(embeddings)
        scores = self.weighter.scores_from_embeddings(global_embeddings)
        weights = self.weighter.weights_from_scores(scores)
        if self.use_prior_weight and 'prior_weight' in batch:
            prior, _ = all_gather_cat(batch['prior_weight'].to(self._device).float())
            weights = normalize_with_prior(weights, prior)
        return weights, offset, scores

    def _after_dataloader(self, state: State, logger: Logger) -> None:
        batch = ensure_labels(dict(state.batch))
        n_local = batch['input_ids'].shape[0]
        with torch.no_grad():
            weights, offset, scores = self._global_weights(batch)
        weights, fell_back = uniform_if_nonfinite(weights)
        if fell_back:
            self.nonfinite_batches += 1
            warnings.warn(f'DWM: non-finite or non-positive weights at batch {int(state.timestamp.batch)}; '
                          'using uniform weights for this batch')
            logger.log_metrics({'dwm/nonfinite_weight_batches': self.nonfinite_batches})
        local_weights = weights[offset:offset + n_local]
        if self.mode == 'select':
            keep = max(1, n_local // self.select_factor)
            generator = torch.Generator().manual_seed(self._select_seed(int(state.timestamp.batch)))
            logits = scores.float() / self.weighter_config.tau
            if fell_back or not bool(torch.isfinite(logits).all()):
                logits = torch.zeros_like(logits)
            index = gumbel_top_k(logits, keep, generator, offset, offset + n_local)
            batch = subset_batch(batch, index, n_local)
            local_weights = torch.ones(keep)
        batch[WEIGHT_KEY] = local_weights.detach().float().to(batch['input_ids'].device)
        state.batch = batch
        self.last_weights = weights.detach().cpu()
        self._record_batch(batch, weights, logger, state)

    def _select_seed(self, batch_index: int) -> int:
        digest = hashlib.sha256(f'dwm-select:{self.seed}:{batch_index}'.encode()).digest()
        return int.from_bytes(digest[:8], 'little') & ((1 << 63) - 1)

    def _can_hold_labels(self, state: State) -> bool:
        """Whether the HF forward may run without ``labels``: a Composer ``HuggingFaceModel`` whose ``loss`` is the
        stock one (it returns ``outputs['loss']``, which DWM then provides) and that returns dict outputs."""
        if not self.single_loss_pass:
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
        loss, per_sample = weighted_loss(logits, batch['labels'], batch[WEIGHT_KEY], self.loss_normalization)
        self._batch_losses.append(per_sample.float().cpu())
        return loss

    def _after_loss(self, state: State) -> None:
        if self._precomputed_loss is not None:
            state.loss, self._precomputed_loss = self._precomputed_loss, None
            return
        batch = state.batch
        if WEIGHT_KEY not in batch:
            return
        state.loss = self._weighted_loss(batch, logits_of(state.outputs))

    # ------------------------------------------------------------------------------------------------------------
    def _reset_batch_buffers(self) -> None:
        self._batch_losses: list[torch.Tensor] = []
        self._batch_domains: Optional[torch.Tensor] = None
        self._batch_local_weights: Optional[torch.Tensor] = None

    def _record_batch(self, batch: dict[str, Any], weights: torch.Tensor, logger: Logger, state: State) -> None:
        self._reset_batch_buffers()
        self._batch_local_weights = batch[WEIGHT_KEY].detach().cpu()
        if 'domain' in batch:
            self._batch_domains = batch['domain'].detach().cpu()
        if 'scores' in batch and self.mode == 'weight':
            scores, _ = all_gather_cat(batch['scores'].to(self._device).float())
            self._stage_weights.append(weights.detach().cpu())
            self._stage_scores.append(scores.cpu())
        if self.mode == 'weight':
            self._stage_ess.append(weight_statistics(weights)['ess'])
        if int(state.timestamp.batch) % self.log_every == 0:
            stats = weight_statistics(weights)
            logger.log_metrics({f'dwm/weight/{k}': v for k, v in stats.items()})
            logger.log_metrics({'dwm/stage': self.stage_index})

    def _log_domains(self, state: State, logger: Logger) -> None:
        if self._batch_domains is None or self._batch_local_weights is None:
            return
        if int(state.timestamp.batch - 1) % self.log_every != 0:
            return
        losses = torch.cat(self._batch_losses) if self._batch_losses else None
        n = self._batch_local_weights.shape[0]
        if losses is None or losses.shape[0] != n or self._batch_domains.shape[0] != n:
            return
        rows = torch.stack([self._batch_domains.double(), self._batch_local_weights.double(), losses.double()], 1)
        rows, _ = all_gather_cat(rows.to(self._device))
        rows = rows.cpu()
        metrics = {}
        for domain_id in torch.unique(rows[:, 0]).tolist():
            sel = rows[:, 0] == domain_id
            name = self._domain_name(int(domain_id))
            metrics[f'dwm/domain/{name}/weight'] = float(rows[sel, 1].mean())
            metrics[f'dwm/domain/{name}/loss'] = float(rows[sel, 2].mean())
        logger.log_metrics(metrics)

    def _domain_name(self, domain_id: int) -> str:
        if self.domain_names is not None and 0 <= domain_id < len(self.domain_names):
            return self.domain_names[domain_id]
        return str(domain_id)

    def _batch_end(self, state: State, logger: Logger) -> None:
        self._log_domains(state, logger)
        self._reset_batch_buffers()
        while 0 <= self.stage_index < len(self.boundaries) and boundary_reached(state,
                                                                                self.boundaries[self.stage_index]):
            self._end_stage(logger)
            self._enter_stage(self.stage_index + 1, state, logger)

    # ------------------------------------------------------------------------------------------------------------
    def _end_stage(self, logger: Logger) -> None:
        self._log_stage_ess(logger)
        if not self._stage_weights:
            return
        weights = torch.cat(self._stage_weights).double()
        scores = torch.cat(self._stage_scores).double()
        metrics = {}
        for k in range(scores.shape[1]):
            name = self.score_names[k] if self.score_names and k < len(self.score_names) else f'score{k}'
            valid = ~torch.isnan(scores[:, k])
            metrics[f'dwm/spearman/{name}'] = spearman(weights[valid], scores[valid, k])
        logger.log_metrics(metrics)
        self._stage_weights, self._stage_scores = [], []

    def _log_stage_ess(self, logger: Logger) -> None:
        """Min/mean ESS share of the stage's training batches; a warning when some left ``ess_band``."""
        if not self._stage_ess:
            return
        low, high = self.ess_band
        out = sum(1 for e in self._stage_ess if e < low or e > high)
        logger.log_metrics({'dwm/stage/ess_min': min(self._stage_ess),
                            'dwm/stage/ess_mean': sum(self._stage_ess) / len(self._stage_ess),
                            'dwm/stage/ess_out_of_band': out})
        if out:
            message = (f'DWM: {out} of {len(self._stage_ess)} training batches of stage {self.stage_index} had an '
                       f'ESS share outside {list(self.ess_band)} (min {min(self._stage_ess):.3f})')
            warnings.warn(message)
        self._stage_ess = []

    def _enter_stage(self, stage: int, state: State, logger: Logger) -> None:
        self.stage_index = stage
        if self.replay is not None and (not self.refit or stage == 0):
            self._set_weighter(copy.deepcopy(self.replay[min(stage, len(self.replay) - 1)]))
        if self.refit and not (stage == 0 and self.warmup_uniform):
            self._refit(state, logger)
        self._export(stage, state)
        logger.log_metrics({'dwm/stage': stage})

    def _export(self, stage: int, state: State) -> None:
        if self.save_dir is None or dist.get_global_rank() != 0:
            return
        assert self.weighter is not None
        start = f'{int(state.timestamp.batch)}ba'
        stem = Path(self.save_dir) / f'stage_{stage}'
        save_weighter(self.weighter, stem, stage=stage, start=start)
        self.exports = [e for e in self.exports if e['stage'] != stage]
        self.exports.append({'stage': stage, 'start': start, 'weights': stem.name + '.safetensors',
                             'config': stem.name + '.json'})
        write_schedule(self.save_dir, self.exports)

    # ------------------------------------------------------------------------------------------------------------
    def _check_schedule(self, state: State) -> Optional[str]:
        """INIT: a refit's look-ahead step is not 0 (``max_duration`` is checked at FIT_START, where it is set)."""
        if not self._refits() or not state.optimizers:
            return None
        lr = self._lookahead_lr(state)
        if lr == 0.0:
            key = ('algorithms.dwm.lookahead_lr' if self.lookahead_lr is not None else
                   'optimizer.lr (the default lookahead_lr)')
            return (f'{key} is 0: the look-ahead step and the hypergradient vanish and no refit can move the weighter; '
                    'set algorithms.dwm.lookahead_lr (DWM(lookahead_lr=...)) to a positive learning rate')
        return None

    def _lookahead_lr(self, state: State) -> float:
        """``lookahead_lr``, else the LLM optimizer's base (peak) rate: Composer's schedulers keep it as the param
        group's ``initial_lr`` (the scheduled ``lr`` is 0 in warm-up, where the first refit runs)."""
        if self.lookahead_lr is not None:
            return float(self.lookahead_lr)
        if not state.optimizers:
            raise ValueError('DWM: no optimizer to take lookahead_lr from; pass lookahead_lr=')
        group = state.optimizers[0].param_groups[0]
        return float(group.get('initial_lr', group['lr']))

    def _batch_to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        batch = ensure_labels(dict(batch))
        return {k: v.to(self._device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _make_functions(self, lm: torch.nn.Module, refit_batch: dict, val_batches: Union[dict, Sequence[dict]]):
        """``contributions_fn`` of the refit batch and ``val_loss_fn``: the token-mean validation loss over all of
        ``val_batches`` (one batch or several, ``val_batches_per_step``), global under DDP."""
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
            return loss_contributions(loss_sum, token_count, self.loss_normalization,
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

    def _refit(self, state: State, logger: Logger) -> None:
        assert self.weighter is not None and self.weighter_optimizer is not None
        started = time.perf_counter()
        lm = _causal_lm(state.model)
        live = dict(iter_named_trainable(lm))
        params = {k: p.detach() for k, p in live.items()}
        precond = None
        if self.lookahead == 'adam' and state.optimizers:
            precond = adam_preconditioner(state.optimizers[0], live)
        lr = self._lookahead_lr(state)
        grad_reduce = all_reduce_sum_dict if dist.get_world_size() > 1 else None
        backbone_names = self.weighter.backbone_parameter_names()
        world = dist.get_world_size()
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        val_losses, hyper_norms, step_times = [], [], []
        ess, stds, kls, gains, grad_norms = [], [], [], [], []
        dead_steps = 0
        first_pair = None
        pooled: list[tuple[dict, torch.Tensor]] = []  # (refit batch, its trust-region target), for every refit_fit
        self.weighter.train()
        try:
            for _ in range(self.refit_steps):
                step_started = time.perf_counter()
                refit_batches = [self._batch_to_device(self.refit_batches.next()) for _ in range(self.lookahead_steps)]
                val_batches = [self._batch_to_device(self.val_batches.next()) for _ in range(self.val_batches_per_step)]
                if first_pair is None:
                    first_pair = (refit_batches[0], val_batches)
                contributions_fns, val_loss_fn = [], None
                with torch.enable_grad():
                    weighted = [self._global_weights(batch, grad=True) for batch in refit_batches]
                local_weights = []
                for batch, (weights, offset, _) in zip(refit_batches, weighted):
                    contributions_fn, val_loss_fn = self._make_functions(lm, batch, val_batches)
                    contributions_fns.append(contributions_fn)
                    n_local = batch['input_ids'].shape[0]
                    local_weights.append(weights[offset:offset + n_local].detach())
                    stats = weight_statistics(weights)
                    ess.append(stats['ess'])
                    stds.append(stats['std'])
                    if stats['max'] - stats['min'] <= self.dead_tol:
                        dead_steps += 1
                result = hypergradient_multistep(contributions_fns, val_loss_fn, params, local_weights, lr, precond,
                                                 method=self.hypergrad, fd_eps=self.fd_eps, grad_reduce=grad_reduce,
                                                 jvp_context=lambda: jvp_attention(lm))
                gains.append(self._val_loss(val_loss_fn, params) - result.val_loss)
                hypers = [all_gather_cat(h.to(w.dtype))[0] for h, (w, _, _) in zip(result.hypergradients, weighted)]
                hyper_norm = float(torch.cat(hypers).norm())
                if self.normalize_hypergradient:
                    rms = torch.cat(hypers).pow(2).mean().sqrt().clamp(min=1e-30)
                    hypers = [h / rms for h in hypers]
                if self.refit_kl > 0:
                    pooled += [(batch, trust_region_target(h, self.refit_kl, self.weighter_config.mix_uniform))
                               for batch, h in zip(refit_batches, hypers)]
                if self.refit_fit == 'regression':  # the weighter moves once every target is in (below)
                    val_losses.append(result.val_loss)
                    hyper_norms.append(hyper_norm)
                    step_times.append(time.perf_counter() - step_started)
                    continue
                self.weighter_optimizer.zero_grad(set_to_none=False)
                step_kls = []
                with torch.enable_grad():
                    refit_loss = None
                    for hyper, (weights, _, scores) in zip(hypers, weighted):
                        own = self.weighter.weights_from_scores(scores)  # before any prior: mean 1
                        loss, kl = refit_objective(hyper, weights, own, self.refit_kl)
                        refit_loss = loss if refit_loss is None else refit_loss + loss
                        step_kls.append(float(kl))
                    (refit_loss / len(hypers)).backward()
                kls.append(sum(step_kls) / len(step_kls))
                self._sync_weighter_grads(backbone_names, world)
                grad_norms.append(math.sqrt(sum(float(p.grad.double().pow(2).sum())
                                                for p in self.weighter.parameters() if p.grad is not None)))
                self.weighter_optimizer.step()
                val_losses.append(result.val_loss)
                hyper_norms.append(hyper_norm)
                step_times.append(time.perf_counter() - step_started)
            fit_loss = self._fit_by_regression(pooled, backbone_names, world) if self.refit_fit == 'regression' \
                else math.nan
            steps = max(len(step_times), 1)
            metrics = {
                'dwm/refit/fit_loss': fit_loss,
                'dwm/refit/target_reached': self._target_reached(pooled),
                'dwm/refit/target_std': (float(torch.stack([t.std(unbiased=False) for _, t in pooled]).mean())
                                         if pooled else math.nan),
                'dwm/refit/val_loss_before': val_losses[0] if val_losses else math.nan,
                'dwm/refit/hypergradient_norm': float(sum(hyper_norms) / steps),
                'dwm/refit/step_time': float(sum(step_times) / steps),
                'dwm/refit/steps': len(step_times),
                'dwm/refit/ess_min': min(ess) if ess else math.nan,
                'dwm/refit/ess_mean': sum(ess) / steps if ess else math.nan,
                'dwm/refit/weight_std': sum(stds) / steps if stds else math.nan,
                'dwm/refit/kl': sum(kls) / steps if kls else math.nan,
                'dwm/refit/lookahead_gain': sum(gains) / steps if gains else math.nan,
                'dwm/refit/grad_norm': sum(grad_norms) / steps if grad_norms else math.nan,
            }
            if first_pair is not None:
                after, after_stats = self._lookahead_val_loss(lm, params, lr, precond, *first_pair)
                metrics['dwm/refit/val_loss_after'] = after
                metrics['dwm/refit/ess_after'] = after_stats['ess']
                metrics['dwm/refit/weight_std_after'] = after_stats['std']
                dead = dead_steps == len(ess) and after_stats['max'] - after_stats['min'] <= self.dead_tol
            else:
                dead = False
        finally:
            self.weighter.eval()
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        self.refits_done += 1
        self.dead_refits += int(dead)
        low, high = self.ess_band
        refit_ess = ess + ([metrics['dwm/refit/ess_after']] if 'dwm/refit/ess_after' in metrics else [])
        out_of_band = sum(1 for e in refit_ess if e < low or e > high)
        metrics['dwm/refit/ess_out_of_band'] = out_of_band
        metrics['dwm/refit/dead'] = int(dead)
        metrics['dwm/refit/dead_refits'] = self.dead_refits
        if dead:
            message = (f'DWM: the weighter is dead at refit {self.refits_done} (stage {self.stage_index}): all weights '
                       f'of every refit batch within {self.dead_tol:g} of each other, the refit cannot move them '
                       f'(weighter grad norm {metrics["dwm/refit/grad_norm"]:.3g})')
            warnings.warn(message)
        elif out_of_band:
            message = (f'DWM: ESS share left {list(self.ess_band)} in {out_of_band} of {len(refit_ess)} refit batches '
                       f'at refit {self.refits_done} (min {min(refit_ess):.3f})')
            warnings.warn(message)
        metrics['dwm/refit/wall_time'] = time.perf_counter() - started
        metrics['dwm/refit/count'] = self.refits_done
        self.last_refit_metrics = metrics
        logger.log_metrics(metrics)

    def _fit_by_regression(self, pooled: list[tuple[dict, torch.Tensor]], backbone_names: set[str],
                           world: int) -> float:
        """``refit_fit='regression'``: ``refit_fit_steps`` Adam steps fitting the weighter's own log-weights to the
        pooled trust-region targets, one pooled batch per step in a fixed cycle. Returns the mean loss of the last
        pass over the pool."""
        assert self.weighter is not None and self.weighter_optimizer is not None
        losses: list[float] = []
        for step in range(self.refit_fit_steps):
            batch, target = pooled[step % len(pooled)]
            self.weighter_optimizer.zero_grad(set_to_none=False)
            with torch.enable_grad():
                _, _, scores = self._global_weights(batch, grad=True)
                loss = log_weight_regression_loss(self.weighter.weights_from_scores(scores), target.to(scores.device))
                loss.backward()
            self._sync_weighter_grads(backbone_names, world)
            self.weighter_optimizer.step()
            losses.append(float(loss))
        return sum(losses[-len(pooled):]) / min(len(losses), len(pooled))

    def _target_reached(self, pooled: list[tuple[dict, torch.Tensor]]) -> float:
        """Mean over the refit's batches of how far the refit weighter's own weights went toward each batch's
        trust-region target (:func:`~algorithms.dwm.functional.spread_reached`; NaN without targets)."""
        reached = []
        with torch.no_grad():
            for batch, target in pooled:
                _, _, scores = self._global_weights(batch)
                reached.append(spread_reached(self.weighter.weights_from_scores(scores), target.to(scores.device)))
        reached = [r for r in reached if not math.isnan(r)]
        return sum(reached) / len(reached) if reached else math.nan

    @staticmethod
    def _val_loss(val_loss_fn: Callable, params: dict[str, torch.Tensor]) -> float:
        """``L_val(theta)`` (global under DDP), for the look-ahead gain ``L_val(theta) - L_val(theta')``."""
        with torch.no_grad():
            loss = val_loss_fn(params).detach().reshape(1).double()
        all_reduce_sum_([loss])
        return float(loss[0])

    def _lookahead_val_loss(self, lm, params, lr, precond, refit_batch, val_batch) -> tuple[float, dict[str, float]]:
        """``L_val(theta'(w))`` with the current weighter on the first refit pair (the 'after' figure), and the
        statistics of those weights."""
        contributions_fn, val_loss_fn = self._make_functions(lm, refit_batch, val_batch)
        with torch.no_grad():
            weights, offset, _ = self._global_weights(refit_batch)
        n_local = refit_batch['input_ids'].shape[0]
        grad_reduce = all_reduce_sum_dict if dist.get_world_size() > 1 else None
        theta_prime = lookahead(contributions_fn, params, weights[offset:offset + n_local], lr, precond, grad_reduce)
        return self._val_loss(val_loss_fn, theta_prime), weight_statistics(weights)

    def _sync_weighter_grads(self, backbone_names: set[str], world: int) -> None:
        """Backbone grads hold only this rank's samples: sum them. Batch-layer grads are already global on every
        rank: average them (identical up to rounding)."""
        if world == 1:
            return
        assert self.weighter is not None
        named = [(n, p) for n, p in self.weighter.named_parameters() if p.grad is not None]
        all_reduce_sum_([p.grad for _, p in named])
        for n, p in named:
            if n not in backbone_names:
                p.grad.div_(world)

    # ------------------------------------------------------------------------------------------------------------
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
        if 'weighter' in state:
            config = WeighterConfig.from_any(state.get('weighter_config', self.weighter_config.to_dict()))
            if config != self.weighter.config:
                self._set_weighter(Weighter(config))
            self.weighter.load_state_dict(state['weighter'])
            self.weighter.to(self._device).eval()
            self.weighter_optimizer = self._make_weighter_optimizer()
            self.weighter_optimizer.load_state_dict(state['weighter_optimizer'])
        for cycler, key in ((self.refit_batches, 'refit_batches_drawn'), (self.val_batches, 'val_batches_drawn')):
            if int(state.get(key, 0)) > 0:
                cycler.fast_forward(int(state[key]))
