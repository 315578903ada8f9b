"""What DWM reports: the ``dwm/*`` metrics of training batches, stages and refits, and the warnings about them.

* :class:`TrainingMetrics`: per batch, the weight statistics (``dwm/weight/*``) and per-domain weight and loss
  (``dwm/domain/<name>/*``); per stage, the ESS share of its training batches (``dwm/stage/*``) and the Spearman
  correlation of the weights with each score column (``dwm/spearman/<name>``).
* :class:`RefitDiagnostics`: what one refit measured, step by step, as the ``dwm/refit/*`` figures.
* :func:`refit_report`: those figures with the run's counts, and the warning about a dead or out-of-band refit.

Nothing here changes training; it reads weights, losses and scores and logs them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from composer.loggers import Logger

from algorithms.dwm.distributed import all_gather_cat
from algorithms.dwm.functional import WEIGHT_KEY, spearman, weight_statistics

__all__ = ['TrainingMetrics', 'RefitDiagnostics', 'refit_report', 'out_of_band']


def out_of_band(shares: Sequence[float], band: Sequence[float]) -> int:
    """How many ESS shares lie outside ``band`` (``(low, high)``)."""
    low, high = band
    return sum(1 for e in shares if e < low or e > high)


class TrainingMetrics:
    """The metrics of the training batches: recorded at ``AFTER_DATALOADER`` and the loss, logged at ``BATCH_END`` and
    at the end of each stage.

    Args:
        score_names (Sequence[str], optional): Names of the columns of ``batch['scores']``.
        domain_names (Sequence[str], optional): Names of the ids in ``batch['domain']``.
        log_every (int): Log the per-batch metrics every this many batches.
        ess_band (Sequence[float]): ``(low, high)``: a stage whose training batches leave it gives a warning.
    """

    def __init__(self, score_names: Optional[Sequence[str]], domain_names: Optional[Sequence[str]], log_every: int,
                 ess_band: Sequence[float]) -> None:
        self.score_names = list(score_names) if score_names is not None else None
        self.domain_names = list(domain_names) if domain_names is not None else None
        self.log_every, self.ess_band = max(1, int(log_every)), (float(ess_band[0]), float(ess_band[1]))
        self._stage_ess: list[float] = []
        self._stage_weights: list[torch.Tensor] = []
        self._stage_scores: list[torch.Tensor] = []
        self.reset_batch()

    def reset_batch(self) -> None:
        self._batch_losses: list[torch.Tensor] = []
        self._batch_domains: Optional[torch.Tensor] = None
        self._batch_local_weights: Optional[torch.Tensor] = None

    def record_batch(self, batch: dict[str, Any], weights: torch.Tensor, weighting: bool, batch_index: int,
                     stage: int, logger: Logger) -> None:
        """A batch's global ``weights`` (``weighting``: they weight the loss, not select the batch)."""
        self.reset_batch()
        self._batch_local_weights = batch[WEIGHT_KEY].detach().cpu()
        if 'domain' in batch:
            self._batch_domains = batch['domain'].detach().cpu()
        if 'scores' in batch and weighting:
            scores, _ = all_gather_cat(batch['scores'].to(weights.device).float())
            self._stage_weights.append(weights.detach().cpu())
            self._stage_scores.append(scores.cpu())
        if weighting:
            self._stage_ess.append(weight_statistics(weights)['ess'])
        if batch_index % self.log_every == 0:
            stats = weight_statistics(weights)
            logger.log_metrics({f'dwm/weight/{k}': v for k, v in stats.items()})
            logger.log_metrics({'dwm/stage': stage})

    def record_losses(self, per_sample: torch.Tensor) -> None:
        """The per-sample losses of a microbatch (for the per-domain loss)."""
        self._batch_losses.append(per_sample.float().cpu())

    def log_domains(self, batch_index: int, device: torch.device, logger: Logger) -> None:
        """``dwm/domain/<name>/weight`` and ``.../loss`` of the batch just trained (global under DDP)."""
        if self._batch_domains is None or self._batch_local_weights is None:
            return
        if batch_index % self.log_every != 0:
            return
        losses = torch.cat(self._batch_losses) if self._batch_losses else None
        n = self._batch_local_weights.shape[0]
        if losses is None or losses.shape[0] != n or self._batch_domains.shape[0] != n:
            return
        rows = torch.stack([self._batch_domains.double(), self._batch_local_weights.double(), losses.double()], 1)
        rows, _ = all_gather_cat(rows.to(device))
        rows = rows.cpu()
        metrics = {}
        for domain_id in torch.unique(rows[:, 0]).tolist():
            sel = rows[:, 0] == domain_id
            name = self.domain_name(int(domain_id))
            metrics[f'dwm/domain/{name}/weight'] = float(rows[sel, 1].mean())
            metrics[f'dwm/domain/{name}/loss'] = float(rows[sel, 2].mean())
        logger.log_metrics(metrics)

    def domain_name(self, domain_id: int) -> str:
        if self.domain_names is not None and 0 <= domain_id < len(self.domain_names):
            return self.domain_names[domain_id]
        return str(domain_id)

    def end_stage(self, stage: int, logger: Logger) -> None:
        """The stage's ESS figures and the Spearman correlations of its weights with each score column."""
        self.log_stage_ess(stage, logger)
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

    def log_stage_ess(self, stage: int, logger: Logger) -> None:
        """Min/mean ESS share of the stage's training batches; a warning when some left ``ess_band``."""
        if not self._stage_ess:
            return
        out = out_of_band(self._stage_ess, self.ess_band)
        logger.log_metrics({'dwm/stage/ess_min': min(self._stage_ess),
                            'dwm/stage/ess_mean': sum(self._stage_ess) / len(self._stage_ess),
                            'dwm/stage/ess_out_of_band': out})
        if out:
            warnings.warn(f'DWM: {out} of {len(self._stage_ess)} training batches of stage {stage} had an '
                          f'ESS share outside {list(self.ess_band)} (min {min(self._stage_ess):.3f})')
        self._stage_ess = []


@dataclass
class RefitDiagnostics:
    """What one refit measured. Per step: the validation loss at the current LLM (``L_val(theta)``'s look-ahead
    value), the hypergradient's norm, the step's wall time, the look-ahead gain, and (gradient fit) the KL term and the
    weighter's gradient norm; per refit batch: the ESS share and std of its weights."""

    dead_tol: float
    val_losses: list[float] = field(default_factory=list)
    hypergradient_norms: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    ess: list[float] = field(default_factory=list)
    weight_stds: list[float] = field(default_factory=list)
    kls: list[float] = field(default_factory=list)
    gains: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    uniform_batches: int = 0  # refit batches whose weights all lie within dead_tol of each other
    fit_loss: float = math.nan
    fit_flat_loss: float = math.nan  # a constant weighter's fit loss (the targets' own spread of log-weights)
    fit_restarted: bool = False  # the fit ended no better than a constant weighter and started again
    target_reached: float = math.nan
    target_std: float = math.nan
    after: Optional[tuple[float, dict[str, float]]] = None  # (L_val(theta'(w)), weight statistics) after the refit

    def batch_weights(self, weights: torch.Tensor) -> None:
        stats = weight_statistics(weights)
        self.ess.append(stats['ess'])
        self.weight_stds.append(stats['std'])
        if stats['max'] - stats['min'] <= self.dead_tol:
            self.uniform_batches += 1

    def end_step(self, val_loss: float, hypergradient_norm: float, seconds: float) -> None:
        self.val_losses.append(val_loss)
        self.hypergradient_norms.append(hypergradient_norm)
        self.step_times.append(seconds)

    @property
    def dead(self) -> bool:
        """Every refit batch, and the weights after the refit, within ``dead_tol``: the refit cannot move them."""
        if self.after is None:
            return False
        stats = self.after[1]
        return self.uniform_batches == len(self.ess) and stats['max'] - stats['min'] <= self.dead_tol

    def shares(self) -> list[float]:
        """The ESS share of every refit batch, and of the first one's weights after the refit."""
        return self.ess + ([self.after[1]['ess']] if self.after is not None else [])

    def metrics(self) -> dict[str, float]:
        steps = max(len(self.step_times), 1)

        def mean(xs: list[float]) -> float:  # per step (a step with K look-ahead batches adds K to ess/weight_std)
            return sum(xs) / steps if xs else math.nan

        metrics = {
            'dwm/refit/fit_loss': self.fit_loss,
            'dwm/refit/fit_flat_loss': self.fit_flat_loss,
            'dwm/refit/fit_restarted': float(self.fit_restarted),
            'dwm/refit/target_reached': self.target_reached,
            'dwm/refit/target_std': self.target_std,
            'dwm/refit/val_loss_before': self.val_losses[0] if self.val_losses else math.nan,
            'dwm/refit/hypergradient_norm': float(sum(self.hypergradient_norms) / steps),
            'dwm/refit/step_time': float(sum(self.step_times) / steps),
            'dwm/refit/steps': len(self.step_times),
            'dwm/refit/ess_min': min(self.ess) if self.ess else math.nan,
            'dwm/refit/ess_mean': mean(self.ess),
            'dwm/refit/weight_std': mean(self.weight_stds),
            'dwm/refit/kl': mean(self.kls),
            'dwm/refit/lookahead_gain': mean(self.gains),
            'dwm/refit/grad_norm': mean(self.grad_norms),
        }
        if self.after is not None:
            metrics['dwm/refit/val_loss_after'] = self.after[0]
            metrics['dwm/refit/ess_after'] = self.after[1]['ess']
            metrics['dwm/refit/weight_std_after'] = self.after[1]['std']
        return metrics


def refit_report(diagnostics: RefitDiagnostics, ess_band: Sequence[float], refits_done: int, dead_refits: int,
                 stage: int, wall_time: float) -> dict[str, float]:
    """The ``dwm/refit/*`` metrics of refit number ``refits_done`` (``dead_refits`` dead so far, this one included),
    with a warning when it is dead or some of its ESS shares left ``ess_band``."""
    metrics = diagnostics.metrics()
    shares = diagnostics.shares()
    out = out_of_band(shares, ess_band)
    dead = diagnostics.dead
    metrics['dwm/refit/ess_out_of_band'] = out
    metrics['dwm/refit/dead'] = int(dead)
    metrics['dwm/refit/dead_refits'] = dead_refits
    if dead:
        warnings.warn(f'DWM: the weighter is dead at refit {refits_done} (stage {stage}): all weights '
                      f'of every refit batch within {diagnostics.dead_tol:g} of each other, the refit cannot move them '
                      f'(weighter grad norm {metrics["dwm/refit/grad_norm"]:.3g})')
    elif out:
        warnings.warn(f'DWM: ESS share left {[float(b) for b in ess_band]} in {out} of {len(shares)} refit batches '
                      f'at refit {refits_done} (min {min(shares):.3f})')
    metrics['dwm/refit/wall_time'] = wall_time
    metrics['dwm/refit/count'] = refits_done
    return metrics
