"""DWM's settings, written once: :class:`WeighterConfig` (the weighter's architecture) and :class:`DWMConfig` (the
method's options). Every default lives here and nowhere else.

``DWM(config=DWMConfig(...))``, ``DWM(**fields)`` and a YAML's ``algorithms.dwm`` section all end up as a
:class:`DWMConfig`; ``dwm-stream train`` checks its YAML against these dataclasses (adding only the two loaders the run
builds), and a benchmark derives its variants with :func:`dataclasses.replace`. This module imports neither torch nor
Composer, so a YAML is checked against it before they are loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

__all__ = ['WeighterConfig', 'DWMConfig', 'EMBED_NORMS', 'WEIGHTER_INPUTS', 'missing_loader_message']

EMBED_NORMS = ('none', 'layernorm', 'batch')
WEIGHTER_INPUTS = ('loss', 'reducible_loss')  # the weighter's inputs beside the tokens (algorithms.dwm.inputs)


@dataclass
class WeighterConfig:
    """Configuration of a :class:`~algorithms.dwm.weighter.Weighter`.

    Args:
        vocab_size (int, optional): Token vocabulary, the LLM tokenizer's. ``None`` lets ``DWM`` fill it from the
            model config. Default: ``None``.
        backbone (str): ``'transformer'`` (own small transformer) or a local HuggingFace model directory loaded
            with ``AutoModel.from_pretrained(..., local_files_only=True)``. Default: ``'transformer'``.
        d_model (int): Width of the embeddings and of the batch-attention layers. Default: ``128``.
        n_layers (int): Layers of the own transformer backbone. Default: ``2``.
        n_heads (int): Attention heads, backbone and batch layers. Default: ``4``.
        d_ff (int, optional): MLP width. Default: ``None`` (``4 * d_model``).
        max_seq_len (int): Longest sample the own backbone embeds (longer ones are truncated). Default: ``2048``.
        batch_layers (int): Self-attention layers across the batch (1-2 in the method). Default: ``1``.
        tau (float): Softmax temperature of the weights. Default: ``1.0``.
        mix_uniform (float): ``lambda``, the uniform mix that prevents collapse; weights stay ``>= lambda``.
            Default: ``0.1``.
        pad_token_id (int, optional): Used to build an attention mask when none is given. Default: ``None``.
        seed (int): Initialisation seed, so that every rank builds the same weighter. Default: ``0``.
        embed_norm (str): **[ours]** Normalisation of the per-sample embeddings before the batch layers, against
            representation collapse (the backbone's sample embeddings shrinking toward one vector, after which all
            scores tie and the refit gradient is zero for good). ``'none'`` (no normalisation); ``'layernorm'``
            (each sample's embedding standardised over its features, no affine parameters: fixes the scale of
            each embedding, not the spread between samples); ``'batch'`` (each feature standardised over the
            samples of the (global) batch: the spread between samples is 1 by construction, so it cannot be
            shrunk; a batch of identical samples stays identical). An untrained weighter is uniform in every
            mode (the score head starts at zero). Default: ``'none'``.
        inputs (list[str]): **[ours]** Per-sample inputs beside the tokens (:mod:`algorithms.dwm.inputs`): ``'loss'``
            (the sample's training loss under the LLM now, as in Meta-Weight-Net) and ``'reducible_loss'`` (that loss
            minus a reference loss from a small model fit on held-out data, as in RHO-loss; see
            ``DWMConfig.reference_losses``). Each is standardised over the batch and projected into the embedding
            that the batch layers see. They cost one forward of the LLM, without gradients, over every weighed batch
            (the whole pool in ``mode='select'``). Default: ``[]`` (tokens only, the paper's).
    """

    vocab_size: Optional[int] = None
    backbone: str = 'transformer'
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: Optional[int] = None
    max_seq_len: int = 2048
    batch_layers: int = 1
    tau: float = 1.0
    mix_uniform: float = 0.1
    pad_token_id: Optional[int] = None
    seed: int = 0
    embed_norm: str = 'none'
    inputs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.embed_norm not in EMBED_NORMS:
            raise ValueError(f'WeighterConfig.embed_norm must be one of {EMBED_NORMS}, got {self.embed_norm!r}')
        if isinstance(self.inputs, str):
            raise ValueError(f'WeighterConfig.inputs must be a list of input names, got the string {self.inputs!r}; '
                             f'write [{self.inputs}]')
        self.inputs = list(self.inputs)
        bad = [name for name in self.inputs if name not in WEIGHTER_INPUTS]
        if bad or len(set(self.inputs)) != len(self.inputs):
            raise ValueError(f'WeighterConfig.inputs {self.inputs}: each of {list(WEIGHTER_INPUTS)} at most once'
                             + (f' ({bad} unknown)' if bad else ' (a repeat)'))

    @classmethod
    def from_any(cls, cfg: 'WeighterConfig | dict[str, Any] | None', **overrides: Any) -> 'WeighterConfig':
        """Build from a config, a dict (e.g. a YAML section) or ``None``; ``overrides`` that are not ``None`` win."""
        if cfg is None:
            cfg = cls()
        elif isinstance(cfg, dict):
            unknown = set(cfg) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f'Unknown weighter config key(s) {sorted(unknown)}; valid keys: '
                                 f'{[f.name for f in dataclasses.fields(cls)]}')
            cfg = cls(**cfg)
        elif not isinstance(cfg, cls):
            raise TypeError(f'weighter must be a WeighterConfig or dict, got {type(cfg).__name__}')
        updates = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(cfg, **updates) if updates else cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dict (JSON-safe)."""
        return dataclasses.asdict(self)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        options = ' or '.join(repr(a) for a in allowed)
        raise ValueError(f'DWM {name} must be {options}, got {value!r}')


@dataclass
class DWMConfig:
    """The options of the :class:`~algorithms.dwm.DWM` algorithm (the YAML's ``algorithms.dwm``, without the two
    loaders a run builds). ``DWM(config=DWMConfig(...))`` or ``DWM(**fields)``; values are checked on construction
    (a ``ValueError`` naming the option).

    Args:
        num_stages (int): Stages spread evenly over ``max_duration`` (ignored if ``stage_boundaries`` is given).
            Default: ``5``.
        stage_boundaries (list[str], optional): Explicit starts of stages 2.. as Composer time strings
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
        use_prior_weight (bool): Multiply the DWM weights by ``batch['prior_weight']`` (e.g. from a DSIR/QuRating
            selection) and renormalise to mean 1 over the global batch. Default: ``True``.
        score_names (list[str], optional): Names of the columns of ``batch['scores']``, for the stage-end
            Spearman correlations. Default: ``None`` (the train dataset's ``score_names`` if it has them, else
            ``score0``, ``score1``...).
        domain_names (list[str], optional): Names of the ids in ``batch['domain']``, for per-domain metrics.
            Default: ``None`` (the train dataset's ``domain_names`` if it has them, else the ids).
        save_dir (str, optional): Where to write each stage's weighter and the list of saved weighters,
            ``schedule.json`` (rank 0). A ``schedule.json`` already there from another run (another ``run_name``, or
            the same name with another ``max_duration`` that this run does not resume) is refused at start-up.
            Default: ``None`` (no export).
        save_overwrite (bool): Replace another run's saved weighters in ``save_dir`` (and delete the stage files its
            ``schedule.json`` lists) instead of refusing. Default: ``False``.
        schedule (str, optional): Saved weighters to replay: a ``schedule.json`` (or its directory) that a run with
            ``save_dir`` wrote. Its weighters are used stage by stage; with ``refit=False`` they are replayed frozen
            (transfer); with ``refit=True`` the first one initialises the weighter. Default: ``None``.
        refit (bool): Refit the weighter at stage boundaries. Default: ``True``.
        mode (str): ``'weight'`` (the paper) or ``'select'`` (**[ours]**: the loader yields a pool of
            ``select_factor`` x the batch; the weighter's scores plus Gumbel noise pick the top ``1/select_factor``
            of each rank's pool, trained with weight 1). Default: ``'weight'``.
        select_factor (int): Pool size / trained batch size in ``'select'`` mode. Default: ``4``.
        select_temperature (float): **[ours]** Temperature of the selection in ``'select'`` mode, relative to the
            weights: the Gumbel top-k draws from ``scores / (tau * select_temperature)``. At 1 each pool is sampled
            without replacement in proportion to the (unmixed) weights; below 1 the draw sharpens toward the
            deterministic top-k, so a domain weighted 0.2 against 1.2 is dropped almost outright at 0.25
            (``(0.2 / 1.2) ** 4 ≈ 0.001``) instead of kept at a sixth of its share. Must be > 0. Default: ``1.0``.
        loss_normalization (str): ``'token'`` (``sum_i w_i sum_t l_it / sum_i T_i``: all-ones weights give exactly
            HF's loss) or ``'sample'`` (``mean_i w_i l_i``). Default: ``'token'``.
        normalize_hypergradient (bool): **[ours]** Divide the hypergradient by its RMS before the weighter's
            backward (Adam is scale-invariant up to its ``eps``; this keeps tiny ``eta`` from stalling the refit).
            Default: ``True``.
        seed (int): Seed of the Gumbel noise in ``'select'`` mode. Default: ``0``.
        log_every (int): Log weight/domain metrics every this many batches (at least 1). Default: ``1``.
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
            proxy; ``3`` is the smallest ``beta`` that kept every refit batch's ESS share high on the development
            corpus. The figures, and the run that confirmed them, are in ``benchmarks/RESULTS.md`` ("Why the defaults
            are what they are"). Default: ``3.0`` **[ours]**.
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
        ess_band (list[float]): ``(low, high)`` band of the effective sample size share
            ``ESS = (sum w)^2 / (n sum w^2)`` (1 = uniform). A refit whose refit-batch weights leave it, or a stage
            whose training batches leave it, gives a warning (and the metrics ``dwm/refit/ess_out_of_band``,
            ``dwm/stage/ess_out_of_band``). Default: ``[0.5, 1.0]``.
        dead_tol (float): A refit is *dead* when, at every one of its steps, all weights of the refit batch are
            within ``dead_tol`` of each other (the weighter gives exactly uniform weights and cannot be moved by
            the refit: collapsed embeddings or a zero score head); it is counted (``dwm/refit/dead``,
            ``dwm/refit/dead_refits``) and warned about. Default: ``1e-6``.
        refit_fit (str): **[ours]** How a refit moves the weighter. ``'gradient'``: ``refit_steps`` Adam steps on the
            refit objective, one refit batch each (the paper's). ``'regression'``: the hypergradients of
            ``refit_steps`` refit batches at the current weighter give each batch its trust-region optimum
            ``w ∝ exp(-h / refit_kl)`` (needs ``refit_kl > 0``); the weighter is then fit to all of them at once,
            ``refit_fit_steps`` Adam steps on the squared error of centred log-weights, in the manner of MATES's
            data-influence model. The same LLM passes as ``'gradient'``; the fit itself runs the weighter only.
            Default: ``'gradient'``.
        refit_fit_steps (int): **[ours]** Adam steps of the regression fit (``refit_fit='regression'``), cycling
            over the pooled refit batches. Default: ``100``.
        refit_target (str): **[ours]** What the regression fit (``refit_fit='regression'``) fits each sample to.
            ``'sample'``: its own hypergradient's trust-region weight. ``'domain'``: the mean hypergradient of its
            domain (``batch['domain']``) over all the refit's batches, then the trust-region weight of that: one
            sample's hypergradient is a noisy measure of its worth (``benchmarks/RESULTS.md``, the signal screen), and
            the mean over the hundreds of samples of its domain in one refit is a sharper one. The weighter still sees
            only the tokens and learns to tell the domains apart itself. Default: ``'sample'``.
        refit_target_memory (float): **[ours]** With ``refit_target='domain'``, how much of the earlier refits'
            domain means each refit keeps: the domain mean it fits to is ``m * earlier + (1 - m) * this refit's``, an
            exponential average over the refits (a domain first seen now takes this refit's mean). One refit measures
            one moment of training, and the next refit can reverse it (``benchmarks/RESULTS.md``: the targets of a
            domain swing between refits); the average damps that. The hypergradient is RMS-normalised per refit step,
            so the means of different refits are in the same units. ``0`` keeps no memory. In ``[0, 1)``.
            Default: ``0.0``.
        reference_losses (str | Mapping, optional): **[ours]** Each training sample's reference loss, for the
            weighter input ``reducible_loss``: a JSON file ``{"<uid>": loss, ...}`` (in Python, a mapping too),
            looked up by ``batch['uid']`` for the training and the refit batches. Not needed when the loaders yield a
            ``reference_loss`` field. Default: ``None``.
    """

    num_stages: int = 5
    stage_boundaries: Optional[list[str]] = None
    refit_steps: int = 20
    refit_lr: float = 1e-3
    lookahead_lr: Optional[float] = None
    lookahead: str = 'sgd'
    hypergrad: str = 'jvp'
    fd_eps: float = 1e-3
    warmup_uniform: bool = False
    weighter: Optional[WeighterConfig] = None
    tau: Optional[float] = None
    mix_uniform: Optional[float] = None
    use_prior_weight: bool = True
    score_names: Optional[list[str]] = None
    domain_names: Optional[list[str]] = None
    save_dir: Optional[str] = None
    save_overwrite: bool = False
    schedule: Optional[str] = None
    refit: bool = True
    mode: str = 'weight'
    select_factor: int = 4
    select_temperature: float = 1.0
    loss_normalization: str = 'token'
    normalize_hypergradient: bool = True
    seed: int = 0
    log_every: int = 1
    single_loss_pass: bool = True
    refit_checkpoint_weighter: bool = False
    refit_kl: float = 3.0
    refit_backbone_lr_scale: float = 1.0
    val_batches_per_step: int = 1
    lookahead_steps: int = 1
    ess_band: list[float] = field(default_factory=lambda: [0.5, 1.0])
    dead_tol: float = 1e-6
    refit_fit: str = 'gradient'
    refit_fit_steps: int = 100
    refit_target: str = 'sample'
    refit_target_memory: float = 0.0
    reference_losses: Optional[Union[str, dict]] = None

    def __post_init__(self) -> None:
        _choice('lookahead', self.lookahead, ('sgd', 'adam'))
        _choice('hypergrad', self.hypergrad, ('jvp', 'fd'))
        _choice('mode', self.mode, ('weight', 'select'))
        _choice('loss_normalization', self.loss_normalization, ('token', 'sample'))
        if self.refit_kl < 0:
            raise ValueError(f'DWM refit_kl must be >= 0, got {self.refit_kl}')
        if self.refit_backbone_lr_scale < 0:
            raise ValueError(f'DWM refit_backbone_lr_scale must be >= 0, got {self.refit_backbone_lr_scale}')
        for name in ('val_batches_per_step', 'lookahead_steps'):
            if int(getattr(self, name)) < 1:
                raise ValueError(f'DWM {name} must be >= 1, got {getattr(self, name)}')
        band = self.ess_band
        if len(band) != 2 or not 0.0 <= float(band[0]) <= float(band[1]):
            raise ValueError(f'DWM ess_band must be (low, high) with 0 <= low <= high, got {band}')
        _choice('refit_fit', self.refit_fit, ('gradient', 'regression'))
        if self.refit_fit == 'regression' and float(self.refit_kl) <= 0:
            raise ValueError('DWM refit_fit=regression fits the trust-region optimum exp(-h / refit_kl): '
                             f'refit_kl must be > 0, got {self.refit_kl}')
        _choice('refit_target', self.refit_target, ('sample', 'domain'))
        if self.refit_target == 'domain' and self.refit_fit != 'regression':
            raise ValueError("DWM refit_target=domain pools the targets of the regression fit: set "
                             f"refit_fit: regression (got refit_fit={self.refit_fit!r})")
        if not 0.0 <= float(self.refit_target_memory) < 1.0:
            raise ValueError(f'DWM refit_target_memory must be in [0, 1), got {self.refit_target_memory}')
        if float(self.refit_target_memory) > 0 and self.refit_target != 'domain':
            raise ValueError('DWM refit_target_memory averages the domain means of refit_target=domain over refits: '
                             f'set refit_target: domain (got refit_target={self.refit_target!r})')
        if int(self.refit_fit_steps) < 1:
            raise ValueError(f'DWM refit_fit_steps must be >= 1, got {self.refit_fit_steps}')
        if self.mode == 'select' and self.select_factor < 1:
            raise ValueError(f'DWM select_factor must be >= 1, got {self.select_factor}')
        if not float(self.select_temperature) > 0:
            raise ValueError(f'DWM select_temperature must be > 0 (below 1 sharpens the selection toward the top-k), '
                             f'got {self.select_temperature}')
        if isinstance(self.weighter, dict):
            self.weighter = WeighterConfig.from_any(self.weighter)

    @classmethod
    def from_any(cls, config: 'DWMConfig | dict[str, Any] | None' = None, **overrides: Any) -> 'DWMConfig':
        """A config from a :class:`DWMConfig` (or an instance of a schema that extends it), a dict or ``None``, with
        ``overrides`` (keyword arguments of ``DWM``) replacing its fields.

        Raises:
            TypeError: A key that is not an option of DWM, naming the valid ones.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        if isinstance(config, DWMConfig):
            values = {name: getattr(config, name) for name in names}
        else:
            values = dict(config or {})
        values.update(overrides)
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise TypeError(f'DWM got unknown option(s) {unknown}; valid options: {names}')
        return cls(**values)

    def weighter_config(self) -> WeighterConfig:
        """``weighter`` (a copy) with the ``tau`` and ``mix_uniform`` overrides applied."""
        return dataclasses.replace(WeighterConfig.from_any(self.weighter), **{
            k: v for k, v in (('tau', self.tau), ('mix_uniform', self.mix_uniform)) if v is not None})

    def stage_count(self) -> int:
        """The number of stages: one more than the explicit boundaries, else ``num_stages``."""
        return len(self.stage_boundaries) + 1 if self.stage_boundaries is not None else self.num_stages

    def refits(self) -> bool:
        """Whether the run refits the weighter at all (at stage 1 unless ``warmup_uniform``, and at every boundary)."""
        return bool(self.refit) and (not self.warmup_uniform or self.stage_count() > 1)


def missing_loader_message(loader: str, key: str) -> str:
    """The message for a run that refits without one of its two loaders (``'validation'`` or ``'refit_loader'``);
    ``key`` is how the caller names it (the YAML key, with the Python argument where it helps)."""
    if loader == 'validation':
        return (f'{key}: missing, and the weighter is refit against it; set `lambada: PATH` (a LAMBADA-format file) or '
                '`dataset: {...}` (held-out MDS), or algorithms.dwm.refit: false')
    return (f'{key}: missing, and the weighter is refit on it; set `dataset: {{...}}` (the training corpus, its own '
            'shuffle_seed), or algorithms.dwm.refit: false')
