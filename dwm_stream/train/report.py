"""What DWM prefers as training goes on: by score criterion and by domain, per stage.

Reads a run's ``metrics.jsonl`` (:mod:`dwm_stream.train.loggers`), in which the DWM algorithm logs

* ``dwm/stage``: the current stage, when a stage begins and periodically;
* ``dwm/spearman/<score>``: at each stage end, the Spearman correlation of the stage's DWM weights
  with each score column (QuRating criteria, ``dsir``), logged before the next stage's ``dwm/stage``;
* ``dwm/domain/<name>/weight``: the mean DWM weight of each domain in a batch.

Records are chronological, so each value belongs to the latest stage logged before it. The
preference by criterion is the stage's Spearman correlation; the preference by domain is the mean
of its per-batch domain weights over the stage (1 is neutral). :func:`write_report` prints both as
tables and draws them across stages in one PNG.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from dwm_stream.train.loggers import read_metrics

__all__ = ['PreferenceTables', 'preference_tables', 'format_tables', 'plot_preferences', 'write_report']

_SPEARMAN = 'dwm/spearman/'
_DOMAIN = 'dwm/domain/'
_WEIGHT = '/weight'


@dataclass
class PreferenceTables:
    """Per stage: Spearman correlation by criterion, and mean weight by domain.

    Args:
        criterion (dict[int, dict[str, float]]): stage -> score name -> Spearman rho (NaN if undefined).
        domain (dict[int, dict[str, float]]): stage -> domain -> mean DWM weight.
    """
    criterion: dict[int, dict[str, float]] = field(default_factory=dict)
    domain: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def stages(self) -> list[int]:
        return sorted(set(self.criterion) | set(self.domain))

    @property
    def criteria(self) -> list[str]:
        return sorted({k for row in self.criterion.values() for k in row})

    @property
    def domains(self) -> list[str]:
        return sorted({k for row in self.domain.values() for k in row})


def preference_tables(records: list[dict[str, Any]]) -> PreferenceTables:
    """Build the tables from ``read_metrics`` records (chronological)."""
    stage = 0
    criterion: dict[int, dict[str, float]] = {}
    domain_values: dict[int, dict[str, list[float]]] = {}
    for rec in records:
        metrics = rec.get('metrics') or {}
        for name, value in metrics.items():
            if name.startswith(_SPEARMAN):
                criterion.setdefault(stage, {})[name[len(_SPEARMAN):]] = math.nan if value is None else float(value)
            elif name.startswith(_DOMAIN) and name.endswith(_WEIGHT) and value is not None:
                per_domain = domain_values.setdefault(stage, {})
                per_domain.setdefault(name[len(_DOMAIN):-len(_WEIGHT)], []).append(float(value))
        if metrics.get('dwm/stage') is not None:  # after this record's values: a stage end precedes it
            stage = int(metrics['dwm/stage'])
    domain = {s: {d: sum(v) / len(v) for d, v in row.items()} for s, row in domain_values.items()}
    return PreferenceTables(criterion=dict(sorted(criterion.items())), domain=dict(sorted(domain.items())))


def _table(title: str, rows: dict[int, dict[str, float]], columns: list[str], fmt: str) -> list[str]:
    width = max([len(c) for c in columns] + [8]) + 2
    lines = [title, f'{"stage":<7}' + ''.join(f'{c:>{width}}' for c in columns)]
    for stage in sorted(rows):
        cells = []
        for c in columns:
            v = rows[stage].get(c)
            cells.append(f'{"-" if v is None or math.isnan(v) else format(v, fmt):>{width}}')
        lines.append(f'{stage:<7}' + ''.join(cells))
    return lines


def format_tables(tables: PreferenceTables) -> str:
    """Both tables as text."""
    lines: list[str] = []
    if tables.criterion:
        lines += _table('Preference by criterion (Spearman rho of DWM weights with each score, at stage end):',
                        tables.criterion, tables.criteria, '+.3f')
    if tables.domain:
        if lines:
            lines.append('')
        lines += _table('Preference by domain (mean DWM weight; 1 = neutral):', tables.domain, tables.domains, '.3f')
    return '\n'.join(lines)


def plot_preferences(tables: PreferenceTables, path: str, title: Optional[str] = None) -> None:
    """Draw preference by criterion and by domain across stages into a PNG."""
    try:  # the plot is the only use of matplotlib in a training install: an extra, imported on demand
        import matplotlib
    except ImportError as err:
        raise RuntimeError("dwm-stream report draws its plot with matplotlib: pip install 'dwm-stream[demo]'") from err
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    panels = ((ax1, tables.criteria, tables.criterion, 0.0, 'Spearman rho (DWM weight, score)',
               'Preference by criterion', 'no score columns logged'),
              (ax2, tables.domains, tables.domain, 1.0, 'mean DWM weight', 'Preference by domain',
               'no domain weights logged'))
    for ax, names, table, neutral, ylabel, title, empty in panels:
        xs = sorted(table)
        for name in names:
            ax.plot(xs, [table[s].get(name, math.nan) for s in xs], marker='o', label=name)
        ax.axhline(neutral, color='grey', lw=0.8)
        ax.set(xlabel='stage', ylabel=ylabel, title=title)
        if names:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, empty, ha='center', va='center', transform=ax.transAxes)
    for ax in (ax1, ax2):
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(run_dir: str, out: Optional[str] = None) -> tuple[str, str]:
    """Read ``RUN_DIR/metrics.jsonl`` (or a metrics file), print-ready tables and a PNG.

    Args:
        run_dir (str): The run directory (``save_folder``), or its ``metrics.jsonl``.
        out (str, optional): The PNG path. Default: ``RUN_DIR/preferences.png``.

    Returns:
        tuple[str, str]: The tables as text, and the PNG path.

    Raises:
        FileNotFoundError: If there is no ``metrics.jsonl``.
        ValueError: If it holds no DWM preference metrics.
    """
    metrics_file = run_dir if os.path.isfile(run_dir) else os.path.join(run_dir, 'metrics.jsonl')
    if not os.path.exists(metrics_file):
        raise FileNotFoundError(f'{metrics_file} does not exist; give a run directory trained with the '
                                '`metrics_jsonl` logger (see yamls/), or its metrics.jsonl.')
    tables = preference_tables(read_metrics(metrics_file))
    if not tables.criterion and not tables.domain:
        raise ValueError(f'{metrics_file}: no `dwm/spearman/*` or `dwm/domain/*/weight` metrics; was the '
                         'run trained with the DWM algorithm?')
    png = out or os.path.join(os.path.dirname(os.path.abspath(metrics_file)), 'preferences.png')
    plot_preferences(tables, png, title=os.path.basename(os.path.dirname(os.path.abspath(metrics_file))))
    return format_tables(tables), png
