"""Selection files: which samples of an existing corpus to stream, with optional prior weights.

A selection is an overlay on a converted corpus. It names samples by ``uid`` and never rewrites
shards, so a DSIR- or QuRating-selected subset of a 600B-token corpus costs one small file.

Format (Apache Parquet, one row per sample):

================= ========= ========== ====================================================
column            type      required   meaning
================= ========= ========== ====================================================
``uid``           int64     yes        the sample's ``uid`` column in the corpus; unique
``keep``          bool      no         rows with ``keep = false`` are ignored (default true),
                                       so a selector can store scores for every sample
``prior_weight``  float     no         the selector's weight for the sample (default 1);
                                       finite and > 0; multiplies DWM's weight
``score_<name>``  float     no         extra per-sample scores (e.g. ``score_dsir``), exposed
                                       in the batch's ``scores`` like shard score columns
================= ========= ========== ====================================================

Parquet key-value metadata ``dwm.selection`` may hold a JSON object describing how the selection
was made (selector, target, budget, seed); :func:`read_selection` returns it as ``info``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dwm_stream.format.shards import SCORE_PREFIX, score_column

__all__ = ['Selection', 'read_selection', 'write_selection', 'resolve_selection', 'ResolvedSelection']

_META_KEY = b'dwm.selection'


@dataclass
class Selection:
    """A selection, loaded and validated.

    Args:
        uids (np.ndarray): int64 [n], unique, in file order.
        prior_weight (np.ndarray): float32 [n], finite and > 0.
        scores (dict[str, np.ndarray]): score name (without ``score_``) -> float32 [n].
        info (dict): The file's ``dwm.selection`` metadata, if any.
        path (str): Where it was read from, for error messages.
    """
    uids: np.ndarray
    prior_weight: np.ndarray
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    path: str = '<memory>'

    def __len__(self) -> int:
        return len(self.uids)


def write_selection(path: str,
                    uids: np.ndarray,
                    prior_weight: Optional[np.ndarray] = None,
                    keep: Optional[np.ndarray] = None,
                    scores: Optional[dict[str, np.ndarray]] = None,
                    info: Optional[dict[str, Any]] = None) -> None:
    """Write a selection file (Parquet) after validating it.

    Args:
        path (str): Output path (local).
        uids (np.ndarray): Sample uids.
        prior_weight (np.ndarray, optional): Per-sample prior weights. Default: ``None`` (all 1).
        keep (np.ndarray, optional): Per-row keep flags. Default: ``None`` (all kept).
        scores (dict[str, np.ndarray], optional): Extra score columns. Default: ``None``.
        info (dict, optional): JSON-serialisable description stored as metadata. Default: ``None``.
    """
    uids = np.asarray(uids, dtype=np.int64)
    columns: dict[str, Any] = {'uid': pa.array(uids)}
    if keep is not None:
        columns['keep'] = pa.array(np.asarray(keep, dtype=bool))
    if prior_weight is not None:
        columns['prior_weight'] = pa.array(np.asarray(prior_weight, dtype=np.float32))
    for name, values in (scores or {}).items():
        columns[score_column(name)] = pa.array(np.asarray(values, dtype=np.float32))
    table = pa.table(columns)
    _validate_table(table, path)
    table = table.replace_schema_metadata({_META_KEY: json.dumps(info or {}).encode()})
    pq.write_table(table, path)


def read_selection(path: str) -> Selection:
    """Read and validate a selection file.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not a valid selection; the message names the file, the column
            and the offending rows.
    """
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise FileNotFoundError(f'selection file {path} does not exist.') from None
    except Exception as e:  # pyarrow raises ArrowInvalid for non-parquet input
        raise ValueError(f'{path}: not a Parquet selection file ({e}). Selection files are written by '
                         f'`dwm-stream select` or dwm_stream.data.selection.write_selection.') from e
    _validate_table(table, path)
    keep = np.ones(table.num_rows, dtype=bool)
    if 'keep' in table.column_names:
        keep = table.column('keep').to_numpy(zero_copy_only=False).astype(bool)
    uids = table.column('uid').to_numpy(zero_copy_only=False).astype(np.int64)[keep]
    if 'prior_weight' in table.column_names:
        prior = table.column('prior_weight').to_numpy(zero_copy_only=False).astype(np.float32)[keep]
    else:
        prior = np.ones(len(uids), dtype=np.float32)
    scores = {
        name[len(SCORE_PREFIX):]: table.column(name).to_numpy(zero_copy_only=False).astype(np.float32)[keep]
        for name in table.column_names if name.startswith(SCORE_PREFIX)
    }
    meta = table.schema.metadata or {}
    info = json.loads(meta[_META_KEY]) if _META_KEY in meta else {}
    if not len(uids):
        raise ValueError(f'{path}: the selection keeps no samples (all rows have keep=false or the '
                         f'file is empty).')
    return Selection(uids=uids, prior_weight=prior, scores=scores, info=info, path=path)


def _validate_table(table: pa.Table, path: str) -> None:
    known = {'uid', 'keep', 'prior_weight'}
    for name in table.column_names:
        if name not in known and not name.startswith(SCORE_PREFIX):
            raise ValueError(f'{path}: unknown column {name!r}; a selection has `uid`, optional '
                             f'`keep`, `prior_weight` and `{SCORE_PREFIX}<name>` columns.')
    if 'uid' not in table.column_names:
        raise ValueError(f'{path}: missing the required `uid` column.')
    uids = table.column('uid').to_numpy(zero_copy_only=False)
    if uids.dtype.kind not in 'iu':
        raise ValueError(f'{path}: column `uid` must be integer, got {uids.dtype}.')
    uniq, counts = np.unique(uids, return_counts=True)
    if len(uniq) != len(uids):
        dup = uniq[counts > 1]
        raise ValueError(f'{path}: {len(dup)} uid(s) appear more than once, e.g. {dup[:5].tolist()}; '
                         f'each sample may be selected at most once (use prior_weight to up-weight).')
    if 'prior_weight' in table.column_names:
        prior = table.column('prior_weight').to_numpy(zero_copy_only=False).astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(prior) | (prior <= 0))
        if len(bad):
            raise ValueError(f'{path}: column `prior_weight` must be finite and > 0; row {int(bad[0])} '
                             f'has {prior[bad[0]]!r} ({len(bad)} bad row(s) in all).')


@dataclass
class ResolvedSelection:
    """A selection mapped onto one stream's shards.

    Args:
        rows_per_shard (list[np.ndarray]): For each shard, the selected rows (sorted, int64).
        prior_per_shard (list[np.ndarray]): For each shard, float32 prior weights aligned with rows.
        scores_per_shard (list[dict[str, np.ndarray]]): Selection score columns aligned with rows.
    """
    rows_per_shard: list[np.ndarray]
    prior_per_shard: list[np.ndarray]
    scores_per_shard: list[dict[str, np.ndarray]]


def resolve_selection(selection: Selection, corpus_uids: np.ndarray, samples_per_shard: np.ndarray,
                      corpus: str) -> ResolvedSelection:
    """Map selected uids to (shard, row) positions in a corpus.

    Args:
        selection (Selection): The loaded selection.
        corpus_uids (np.ndarray): int64 uid of every sample of the corpus, in shard order.
        samples_per_shard (np.ndarray): Samples in each shard.
        corpus (str): The corpus location, for error messages.

    Raises:
        ValueError: If the selection names uids that the corpus does not have.
    """
    if len(corpus_uids) != int(np.sum(samples_per_shard)):
        raise ValueError(f'{corpus}: uids.npy lists {len(corpus_uids)} samples but index.json has '
                         f'{int(np.sum(samples_per_shard))}; re-run `dwm-stream convert`.')
    order = np.argsort(corpus_uids, kind='stable')
    sorted_uids = corpus_uids[order]
    pos = np.searchsorted(sorted_uids, selection.uids)
    pos_clipped = np.minimum(pos, len(sorted_uids) - 1)
    found = sorted_uids[pos_clipped] == selection.uids
    if not found.all():
        missing = selection.uids[~found]
        raise ValueError(f'{selection.path}: {len(missing)} of {len(selection)} selected uid(s) are not in '
                         f'the corpus {corpus}, e.g. {missing[:5].tolist()}. Was the selection made for '
                         f'another corpus, or the corpus re-converted with other sources?')
    global_rows = order[pos_clipped]  # index in shard order, aligned with selection rows
    shard_starts = np.concatenate([[0], np.cumsum(samples_per_shard)])
    shard_of = np.searchsorted(shard_starts, global_rows, side='right') - 1
    sort = np.lexsort((global_rows, shard_of))  # by shard, then by row within shard
    rows_per_shard, prior_per_shard, scores_per_shard = [], [], []
    bounds = np.searchsorted(shard_of[sort], np.arange(len(samples_per_shard) + 1))
    for s in range(len(samples_per_shard)):
        idx = sort[bounds[s]:bounds[s + 1]]
        rows_per_shard.append((global_rows[idx] - shard_starts[s]).astype(np.int64))
        prior_per_shard.append(selection.prior_weight[idx].astype(np.float32))
        scores_per_shard.append({k: v[idx] for k, v in selection.scores.items()})
    return ResolvedSelection(rows_per_shard, prior_per_shard, scores_per_shard)
