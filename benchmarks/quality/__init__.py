"""Quality proxy: does a data weighting method beat uniform training of a tiny Llama by more than noise?

The corpus has real and degraded domains; the metric is the held-out loss on the real ones. Every method trains the
same tiny Llama, from the same initialisation and in the same sample order for a given seed, for the same number of
steps and trained samples, and puts its per-sample weights into the loss the same way (``batch['dwm_weight']``, DWM's
loss terms). Methods (``--methods``; ``NAME`` or ``NAME:key=value,...``, where a key is a :class:`Budget` field, an
option of DWM (its :class:`~algorithms.dwm.config.DWMConfig`) or ``weighter.FIELD``, set for that method only, and the
whole string is its label):

* ``uniform``: plain training.
* ``oracle``: knows the answer: weight 0 on every degraded domain, the rest renormalised to mean 1 per batch.
  **Headroom** (checked first, printed first): the oracle must beat uniform by at least 3x the RMS change of its
  own null on at least 4 of 5 seeds, or the bench says it cannot rank weighting methods and ranks none.
* ``oracle_select``: the loader yields ``select_factor`` x the batch; each trained batch is filled with clean
  samples drawn at random from that pool (the oracle of ``dwm_select``).
* ``random_select``: the same pool, a random subset: the null of every selection method.
* ``NAME/null`` (``oracle/null``, ``dwm/null``, ``loss_reweighting/null``, ...): the method with its weights
  permuted within each batch: the same spread of weights, none of their knowledge. Each method is reported against
  its own null.
* ``noise_floor``: tiny random weights, ``1 + noise_sigma * N(0, 1)`` (``algorithms.baselines.NoiseFloorWeighting``):
  how much a method that knows nothing moves the loss. The *noise floor* is the RMS over seeds of its change.
* ``dwm``: DWM with 5 stages and the refit trust region ``refit_kl`` (``algorithms.dwm``).
* ``dwm_paper``: ``dwm`` with ``refit_kl=0``, the paper's unregularised refit objective.
* ``dwm_select``: DWM ``mode='select'``: the loader yields ``select_factor`` x the batch, DWM trains on the top
  ``1 / select_factor`` by the weighter's scores (the same number of trained samples per step).
* ``loss_reweighting``: Sow et al. 2025 (LinUpper, r = 1, 5% uniform warm-up).
* ``rho``: a RHO-LOSS rule (Mindermann et al. 2022): the same LinUpper mapping on the *reducible* loss, the training
  loss minus the loss under a model trained on the held-out target samples only (its own short run, seed 1000).
* ``static_domain``: fixed per-domain weights from a short uniform proxy run: each domain's first-order effect on
  DWM's validation target, ``<grad L_fit, grad L_domain>``, clipped at 0, mean 1 over the training mix, mixed with
  uniform (λ = 0.1).

DWM's validation target (``dwm_validation``): ``lambada`` (the *fit* half of the LAMBADA-format file), ``heldout``
(held-out samples of the real domains, disjoint from the report set, in shard order: a batch is mostly one domain),
``both`` (alternating batches), or ``balanced`` (the same number of held-out samples per real domain, shuffled: the
report metric's shape).

Reported: the **macro-average over the real domains of the token-mean held-out loss** on a balanced report set (the
same number of validation samples per domain, drawn by a fixed seed), per domain too; LAMBADA-format continuation
loss and accuracy on the *report* half; the cross-entropy of unigram and bigram models of the training tokens on the
same report tokens (reference lines); per method and seed, the change against uniform of the same seed; targets.

    python -m benchmarks.quality [--quick] [--out DIR] [--seeds 0 1 2 3 4] [--jobs 2] [--methods M ...]
                                 [--corpus-seed N] [--corpus DIR --degraded NAME,NAME [--lambada FILE]]
                                 [--rerun-check]
    python -m benchmarks.quality --write-corpus DIR --corruptions {standard,alt} [--corpus-seed N] [--quick]

Writes ``DIR/quality.json`` (default ``benchmarks/results``), ``quality_curves.png``, ``quality_weights.png``, and
regenerates the section between the quality markers of ``benchmarks/RESULTS.md`` (beside ``DIR``).

The modules, in import order: :mod:`~benchmarks.quality.settings` (constants, the :class:`Budget` with DWM's own
config, the method grammar), :mod:`~benchmarks.quality.data` (corpus, report set, held-out targets, n-gram
references), :mod:`~benchmarks.quality.runs` (one run, the proxies, every run with the run cache),
:mod:`~benchmarks.quality.analysis` (paired changes, nulls, headroom, targets), :mod:`~benchmarks.quality.report`
(the RESULTS.md section and the plots) and :mod:`~benchmarks.quality.cli` (the command line and the JSON).
"""

from benchmarks.quality.analysis import (analyse, beats_null, family_headroom, headroom, paired_deltas, paired_t,
                                         targets)
from benchmarks.quality.cli import apply_overrides, main, parse_args
from benchmarks.quality.data import ngram_references, prepare, split_report
from benchmarks.quality.report import _images, plot, read_section, render_section, replace_section
from benchmarks.quality.runs import (code_digest, composer_device, file_name, irreducible_losses, run_all, run_one,
                                     uses_reference_losses, validation_batches)
from benchmarks.quality.settings import (BASES, BEGIN_MARK, DEFAULT_METHODS, DEFAULT_SEEDS, DWM_BASES, DWM_DEFAULT,
                                         END_MARK, FULL, PROXY_SEED, QUICK, REPO, SCHEMA, SELECT_BASES, Budget,
                                         apply_settings, method_budget, null_of, parse_method, setting_types,
                                         target_dwm)

__all__ = [
    'BASES', 'BEGIN_MARK', 'Budget', 'DEFAULT_METHODS', 'DEFAULT_SEEDS', 'DWM_BASES', 'DWM_DEFAULT', 'END_MARK', 'FULL', 'PROXY_SEED',
    'QUICK', 'REPO', 'SCHEMA', 'SELECT_BASES', '_images', 'analyse', 'apply_overrides', 'apply_settings', 'beats_null',
    'code_digest', 'composer_device', 'family_headroom', 'file_name', 'headroom', 'irreducible_losses', 'main',
    'method_budget', 'ngram_references', 'null_of', 'paired_deltas', 'paired_t', 'parse_args', 'parse_method', 'plot',
    'prepare', 'read_section', 'render_section', 'replace_section', 'run_all', 'run_one', 'setting_types',
    'split_report', 'target_dwm', 'targets', 'uses_reference_losses', 'validation_batches',
]
