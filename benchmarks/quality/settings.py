"""The quality bench's settings: its constants, the :class:`Budget` of an experiment (DWM's own
:class:`~algorithms.dwm.config.DWMConfig` inside it), the full and quick budgets, and the method grammar
(``NAME:key=value,...``, ``/null``)."""

from __future__ import annotations


import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any


from algorithms.dwm.config import DWMConfig, WeighterConfig
from dwm_stream.demo.data import DataBudget


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BEGIN_MARK = '<!-- quality:begin -->'
END_MARK = '<!-- quality:end -->'
SCHEMA = 2
# Base methods and the settings each one changes before the method string's own overrides.
BASES: dict[str, dict[str, Any]] = {
    'uniform': {}, 'oracle': {}, 'oracle_select': {}, 'random_select': {}, 'noise_floor': {}, 'dwm': {},
    'dwm_paper': {'refit_kl': 0.0}, 'dwm_select': {}, 'loss_reweighting': {}, 'rho': {}, 'static_domain': {},
}
DWM_BASES = ('dwm', 'dwm_paper', 'dwm_select')
SELECT_BASES = ('dwm_select', 'oracle_select', 'random_select')  # train on 1/select_factor of a larger pool
NULL_SUFFIX = '/null'
# The null of a selection method (a permuted 0/1 mask of a fixed size is a uniformly random subset of the pool).
SELECT_NULL = 'random_select'
# The reported run: uniform, both oracles and their nulls, the baselines issue 18 asks for in the same run, and DWM as
# the development screening chose it (results/issue18_dev: round 4, the only variant that passed its screen; rounds 3,
# 5, 6 and 7 chose nothing new). Nothing here is chosen from this run: it is the reported corpus.
DWM_DEFAULT = ('dwm_select:refit_fit=regression,dwm_validation=balanced,val_batches_per_step=16,refit_kl=0.3,'
               'refit_target=domain')
DEFAULT_METHODS = ('uniform', 'oracle', 'oracle/null', 'oracle_select', 'random_select', 'loss_reweighting', 'rho',
                   'static_domain', DWM_DEFAULT)
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
PROXY_SEED = 1000  # the static baseline's proxy run: its own seed, shared by every main seed
REPORT_SEED = 12345  # draws the balanced report set (and so the held-out DWM target) from the validation split
ESS_BOUND = 0.5


# DWM as the bench runs it (the settings of yamls/demo-cpu.yaml, plus issue 12's trust region chosen by the dev
# screening): DWM's own config, so that no option of DWM is written out here again. A method string or `--set` changes
# any of its fields (`refit_kl=1`), and the weighter's as `weighter.FIELD` (`weighter.embed_norm=batch`).
BENCH_DWM = DWMConfig(refit_lr=0.003, lookahead_lr=0.003, tau=1.0, mix_uniform=0.1,
                      weighter=WeighterConfig(d_model=64, n_layers=1, n_heads=4, batch_layers=1))
WEIGHTER_PREFIX = 'weighter.'



@dataclass
class Budget:
    """Everything that sets the size of the experiment: its data (shared with the demo), its training, DWM's config,
    and the other methods' settings (a method string ``NAME:key=value`` overrides any of them for one method).

    Recorded in the JSON as one flat dict (:meth:`record`): the data's fields, the others, then DWM's (the weighter's
    as ``weighter.FIELD``).
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
    proxy_frac: float               # static baseline: proxy run length as a fraction of `steps`
    proxy_batches_per_domain: int   # static baseline: batches per domain for its gradient
    report_per_domain: int          # report set: validation samples per domain
    # DWM's options; its `num_stages` is also the stages of every method's per-stage tables, its `select_factor` the
    # pool of the selection baselines, its `mix_uniform` the static baseline's.
    dwm: DWMConfig = field(default_factory=lambda: BENCH_DWM)
    eval_batch_size: int = 32
    val_batch_size: int = 16         # DWM's validation batches
    dwm_validation: str = 'lambada'  # lambada | heldout | both | balanced ('lambada': 'heldout' without a LAMBADA file)
    # noise floor
    noise_sigma: float = 0.02
    # Sow et al.'s defaults
    sow_r: float = 1.0
    sow_warmup_frac: float = 0.05
    # a diagnostic oracle: degraded domains (joined by '+') that `oracle_select` draws from as if they were real,
    # e.g. `oracle_select:oracle_keep=DegradedRepeated` measures how much of the oracle's gain dropping that one costs
    oracle_keep: str = ''
    # the run's own null: its weights permuted within each batch (set by the method suffix `/null`)
    null: int = 0
    # schedule: cosine from lr to lr * lr_final_frac; the reported figure: the mean of the last `final_evals`
    # evaluations (of `evals` + step 0)
    lr_final_frac: float = 0.1
    final_evals: int = 1

    def __post_init__(self) -> None:  # the weighter embeds whole samples: its context is the data's
        weighter = replace(WeighterConfig.from_any(self.dwm.weighter), max_seq_len=self.seq_len)
        if weighter != self.dwm.weighter:
            self.dwm = replace(self.dwm, weighter=weighter)

    @property
    def seq_len(self) -> int:
        """Tokens per sample: the data's, and the model's context."""
        return self.data.seq_len

    def record(self) -> dict[str, Any]:
        """The flat dict the JSON holds: ``corpus_size``, ``vocab_size``, ``seq_len``, ..., the other fields, then
        DWM's (``num_stages``, ``refit_kl``, ..., ``weighter.d_model``, ...)."""
        record = asdict(self)
        dwm = record.pop('dwm')
        weighter = dwm.pop('weighter')
        return {**record.pop('data'), **record, **dwm, **{WEIGHTER_PREFIX + k: v for k, v in weighter.items()}}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> 'Budget':
        """The inverse of :meth:`record`."""
        data_keys = {f.name for f in fields(DataBudget)}
        budget = cls(data=DataBudget(**{k: record[k] for k in data_keys if k in record}),
                     **{k: record[k] for k in _own_fields() if k in record})
        return apply_settings(budget, {k: v for k, v in record.items() if k not in _own_fields() | data_keys})


def _own_fields() -> set[str]:
    return {f.name for f in fields(Budget)} - {'data', 'dwm'}


def setting_types() -> dict[str, Any]:
    """Every key a method string or ``--set`` may set, with its type: a :class:`Budget` field, a :class:`DataBudget`
    field, an option of DWM (:class:`~algorithms.dwm.config.DWMConfig`) or ``weighter.FIELD``."""
    hints = {**typing.get_type_hints(DataBudget), **typing.get_type_hints(DWMConfig),
             **{WEIGHTER_PREFIX + k: v for k, v in typing.get_type_hints(WeighterConfig).items()},
             **{k: v for k, v in typing.get_type_hints(Budget).items() if k not in ('data', 'dwm')}}
    hints.pop('weighter')
    return hints


def _typed(key: str, value: Any, kind: Any) -> Any:
    """``value`` (a string from the command line, or a JSON value) as the type ``kind`` of ``key``."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1:
        if value is None or value == 'None':
            return None
        kind = args[0]
    if not isinstance(value, str):
        return value
    if kind is bool:
        if value.lower() not in ('true', 'false'):
            raise ValueError(f'{key}={value!r} is not a bool (true or false)')
        return value.lower() == 'true'
    if typing.get_origin(kind) is list and typing.get_args(kind) == (str,):  # 'loss+reducible_loss'
        return [item.strip() for item in value.split('+') if item.strip()]
    if kind not in (int, float, str):
        raise ValueError(f'{key} ({kind}) cannot be set from a string')
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f'{key}={value!r} is not a {kind.__name__}') from None


def apply_settings(budget: Budget, settings: dict[str, Any]) -> Budget:
    """``budget`` with ``settings`` (keys of :func:`setting_types`, values of their type or strings) applied.
    Raises ``ValueError`` naming a key that is not a setting, or a value that is not of its type."""
    kinds = setting_types()
    unknown = sorted(set(settings) - set(kinds))
    if unknown:
        raise ValueError(f'{", ".join(unknown)}: not a budget field, an option of DWM or weighter.FIELD '
                         f'({", ".join(sorted(kinds))})')
    values = {k: _typed(k, v, kinds[k]) for k, v in settings.items()}
    data_keys, dwm_keys = {f.name for f in fields(DataBudget)}, {f.name for f in fields(DWMConfig)}
    weighter = {k[len(WEIGHTER_PREFIX):]: v for k, v in values.items() if k.startswith(WEIGHTER_PREFIX)}
    dwm = replace(budget.dwm, **{k: v for k, v in values.items() if k in dwm_keys},
                  weighter=replace(WeighterConfig.from_any(budget.dwm.weighter), **weighter))
    return replace(budget, data=replace(budget.data, **{k: v for k, v in values.items() if k in data_keys}), dwm=dwm,
                   **{k: v for k, v in values.items() if k in _own_fields()})


# Issue 18's bench: half the corpus degraded (a frequency-preserving word cipher of real documents among them), a
# corpus large enough that the selection oracle repeats its clean half about once, 480 steps of 64 trained to lr 0
# (the loss flattens; 120 steps of 128 left the seeds 0.2 apart), the figure averaged over the last 3 evaluations of a
# report set of 128 samples per real domain. A smaller model than issue 12's, so that 5 seeds of every method fit.
FULL = Budget(data=DataBudget(corpus_size='8MB', vocab_size=1024, seq_len=64, validation_size='600KB',
                              degraded_share=0.5),
              batch_size=64, steps=480, evals=12, hidden_size=64, num_layers=2, intermediate_size=172, num_heads=4,
              lr=0.003, warmup_frac=0.05, dwm=replace(BENCH_DWM, num_stages=3, refit_steps=8), proxy_frac=0.2,
              proxy_batches_per_domain=4, report_per_domain=128, lr_final_frac=0.0, final_evals=3)
QUICK = Budget(data=DataBudget(corpus_size='1MB', vocab_size=1024, seq_len=64, validation_size='200KB'),
               batch_size=8, steps=30, evals=3, hidden_size=32, num_layers=1, intermediate_size=64, num_heads=2,
               lr=0.003, warmup_frac=0.1, proxy_frac=0.34, proxy_batches_per_domain=1, report_per_domain=12,
               dwm=replace(BENCH_DWM, num_stages=5, refit_steps=1, weighter=replace(BENCH_DWM.weighter, d_model=16)))


def say(msg: str) -> None:
    print(f'[quality] {msg}', flush=True)


# ------------------------------------------------------------------------------------------------------- methods
def parse_method(text: str) -> tuple[str, dict[str, Any]]:
    """``'dwm:refit_kl=10,weighter.embed_norm=batch'`` -> ``('dwm', {'refit_kl': 10.0, 'weighter.embed_norm':
    'batch'})``; a key is a setting of :func:`setting_types` (a :class:`Budget` field, an option of DWM, or
    ``weighter.FIELD``) and its value takes that setting's type. A trailing ``/null`` is the method's null: the same
    method with its weights permuted within each batch (``null=1``). Raises ``ValueError`` naming the method if it is
    not valid."""
    overrides: dict[str, Any] = {}
    body = text
    if text.endswith(NULL_SUFFIX):
        body = text[:-len(NULL_SUFFIX)]
        overrides['null'] = 1
    name, _, rest = body.partition(':')
    if overrides and name in ('uniform',) + SELECT_BASES:
        raise ValueError(f'method {text!r}: {name} has no weights to permute'
                         + (f' (the null of a selection method is {SELECT_NULL})' if name in SELECT_BASES else ''))
    if name not in BASES:
        raise ValueError(f'method {text!r}: unknown method {name!r}; one of {", ".join(BASES)}')
    kinds = setting_types()
    data_keys = {f.name for f in fields(DataBudget)}
    for item in filter(None, rest.split(',')):
        key, eq, value = item.partition('=')
        key = key.strip()
        if key in data_keys:
            raise ValueError(f'method {text!r}: {key} is the data\'s, shared by every method; set it with --set')
        if not eq or key not in kinds:
            raise ValueError(f'method {text!r}: {item!r} is not key=value with key a budget field, an option of DWM '
                             f'or weighter.FIELD ({", ".join(sorted(kinds))})')
        try:
            overrides[key] = _typed(key, value.strip(), kinds[key])
        except ValueError as e:
            raise ValueError(f'method {text!r}: {e}') from None
    return name, overrides


def null_of(text: str) -> str | None:
    """The label of a method's null (``None`` for uniform and for a null itself)."""
    base, overrides = parse_method(text)
    if base == 'uniform' or overrides.get('null') or base == SELECT_NULL:
        return None
    return SELECT_NULL if base in SELECT_BASES else text + NULL_SUFFIX


def method_budget(budget: Budget, text: str) -> Budget:
    """The budget one method runs with: its base's settings, then the method string's overrides."""
    base, overrides = parse_method(text)
    return apply_settings(budget, {**BASES[base], **overrides})


def target_dwm(methods: list[str]) -> str:
    """The DWM the targets are about: ``dwm`` if measured, else the first DWM-based method."""
    if 'dwm' in methods:
        return 'dwm'
    return next((m for m in methods if parse_method(m)[0] in DWM_BASES), methods[0])
