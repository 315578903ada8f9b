"""Write the samples a selection names as a new corpus, for heavy filtering.

A selection overlay (:mod:`dwm_stream.data.selection`) costs one small file and no copy, but every epoch
still downloads the full shards the selected samples live in. When a selection keeps a small
fraction of a corpus, :func:`materialize` writes the selected samples as a new MDS corpus instead:

* the same columns (``tokens``, ``num_tokens``, ``uid``, ``domain``, ``score_*``), values and uids,
  in corpus order, zstd shards with hashes, and the sidecars ``dwm.json`` and ``uids.npy``;
* the selection's own ``score_<name>`` columns (e.g. ``score_dsir``) become score columns of the new
  corpus when the corpus does not have them already;
* prior weights cannot live in shards: when the selection has any that differ from 1, they are
  written beside the index as ``selection_prior.parquet``, a selection file covering every sample,
  to stream with ``DWMDataset(..., selection=OUT/selection_prior.parquet)``.

So the overlay and the materialised corpus deliver the same multiset of samples (a test pins it).
:func:`materialize_documents` does the same for a DSIR selection of ``.jsonl.zst`` documents, by
writing the selected documents as SlimPajama ``.jsonl.zst`` files to convert.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
from streaming import MDSWriter

from dwm_stream.convert.sources import read_jsonl_zst, write_jsonl_zst
from dwm_stream.data.selection import Selection, read_selection, resolve_selection, write_selection
from dwm_stream.format.reader import CorpusReader
from dwm_stream.format.shards import (COMPRESSION, DOMAIN, HASHES, META_BASENAME, NUM_TOKENS, SHARD_SIZE_LIMIT,
                                     TOKENS, UID, UIDS_BASENAME, CorpusMeta, make_uid, mds_columns, score_column)
from dwm_stream.format.storage import is_remote
from dwm_stream.progress import track

__all__ = ['materialize', 'materialize_documents', 'MaterializeReport', 'PRIOR_BASENAME']

PRIOR_BASENAME = 'selection_prior.parquet'


@dataclass
class MaterializeReport:
    """What was written.

    Args:
        out (str): The new corpus.
        num_samples (int): Samples (or documents) written.
        num_tokens (int): Valid tokens written (MDS only).
        prior_file (str | None): The prior-weight selection file, if one was needed.
        seconds (float): Wall time.
    """
    out: str
    num_samples: int
    num_tokens: int = 0
    prior_file: Optional[str] = None
    seconds: float = 0.0

    def __str__(self) -> str:
        text = (f'materialised {self.num_samples:,} samples, {self.num_tokens:,} tokens to {self.out} '
                f'in {self.seconds:.1f}s')
        if self.prior_file:
            text += f'; prior weights in {self.prior_file} (stream with selection={self.prior_file})'
        return text


def _prepare_out(out: str, overwrite: bool) -> None:
    if is_remote(out):
        raise ValueError(f'--materialize {out}: write the subset to a local directory, then upload it '
                         '(e.g. `aws s3 sync`); the selection overlay needs no copy at all.')
    if os.path.exists(out) and os.listdir(out):
        if not overwrite:
            raise FileExistsError(f'--materialize {out} is not empty; pass --overwrite to replace it.')
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)


def materialize(corpus: str,
                selection: Union[str, Selection],
                out: str,
                overwrite: bool = False,
                progress: bool = False) -> MaterializeReport:
    """Write the samples of ``corpus`` that ``selection`` names as a new MDS corpus at ``out``.

    Args:
        corpus (str): The converted corpus (local or ``s3://``).
        selection (str | Selection): A selection file, or a loaded selection.
        out (str): A local directory (empty, or replaced with ``overwrite``).
        overwrite (bool): Replace a non-empty ``out``. Default: ``False``.
        progress (bool): Progress over shards on stderr. Default: ``False``.

    Raises:
        ValueError: If the selection names uids the corpus does not have (naming the file).
        FileExistsError: If ``out`` is not empty and ``overwrite`` is false.
    """
    start = time.perf_counter()
    reader = CorpusReader(corpus)
    sel = read_selection(selection) if isinstance(selection, str) else selection
    resolved = resolve_selection(sel, reader.uids, reader.samples_per_shard, corpus)
    _prepare_out(out, overwrite)
    meta = reader.meta
    extra = [name for name in sel.scores if name not in meta.score_names]
    score_names = list(meta.score_names) + extra
    shard_scores = [score_column(n) for n in meta.score_names]
    uids: list[np.ndarray] = []
    tokens_per_domain = {name: 0 for name in meta.domains}
    shards = track(range(len(reader.shards)), 'materialize', unit='shards', enabled=progress)
    with MDSWriter(out=out, columns=mds_columns(meta.seq_len, meta.token_dtype, tuple(score_names)),
                   compression=COMPRESSION, hashes=HASHES, size_limit=SHARD_SIZE_LIMIT) as writer:
        for s in shards:
            rows = resolved.rows_per_shard[s]
            if not len(rows):
                continue
            records = reader.read_shard(s)[rows]
            sel_scores = resolved.scores_per_shard[s]
            for k, rec in enumerate(records):
                sample = {TOKENS: rec[TOKENS], NUM_TOKENS: int(rec[NUM_TOKENS]), UID: int(rec[UID]),
                          DOMAIN: int(rec[DOMAIN])}
                for col in shard_scores:
                    sample[col] = float(rec[col])
                for name in extra:
                    sample[score_column(name)] = float(sel_scores[name][k])
                writer.write(sample)
                tokens_per_domain[meta.domains[int(rec[DOMAIN])]] += int(rec[NUM_TOKENS])
            uids.append(records[UID].astype(np.int64))
    all_uids = np.concatenate(uids) if uids else np.zeros(0, np.int64)
    np.save(os.path.join(out, UIDS_BASENAME), all_uids, allow_pickle=False)
    new_meta = CorpusMeta(domains=list(meta.domains), seq_len=meta.seq_len, token_dtype=meta.token_dtype,
                          tokenizer=meta.tokenizer, eos_token_id=meta.eos_token_id,
                          pad_token_id=meta.pad_token_id, score_names=score_names,
                          num_samples=int(len(all_uids)), num_tokens=int(sum(tokens_per_domain.values())),
                          tokens_per_domain={k: v for k, v in tokens_per_domain.items() if v},
                          sources=list(meta.sources), max_token_id=meta.max_token_id)  # the source's: a bound
    with open(os.path.join(out, META_BASENAME), 'w') as f:
        f.write(new_meta.to_json())
    report = MaterializeReport(out=out, num_samples=int(len(all_uids)), num_tokens=new_meta.num_tokens)
    if np.any(sel.prior_weight != 1):
        prior = dict(zip(sel.uids.tolist(), sel.prior_weight.tolist()))
        report.prior_file = os.path.join(out, PRIOR_BASENAME)
        write_selection(report.prior_file, all_uids,
                        prior_weight=np.array([prior[u] for u in all_uids.tolist()], np.float32),
                        info={**sel.info, 'materialized_from': corpus})
    report.seconds = time.perf_counter() - start
    return report


def materialize_documents(raw: str,
                          sources: Sequence[str],
                          selection: Union[str, Selection],
                          out: str,
                          overwrite: bool = False) -> MaterializeReport:
    """Write the ``.jsonl.zst`` documents a document-level selection names, file by file.

    A document's uid is ``make_uid(relpath, line)`` (as :mod:`dwm_stream.select.dsir` assigns it). The
    output mirrors the source layout (``OUT/<relpath>``), ready for ``dwm-stream convert``.

    Raises:
        ValueError: If the selection names uids that no source document has.
    """
    start = time.perf_counter()
    sel = read_selection(selection) if isinstance(selection, str) else selection
    wanted = set(sel.uids.tolist())
    _prepare_out(out, overwrite)
    root = raw if os.path.isdir(raw) else os.path.dirname(raw)
    written = 0
    for rel in sources:
        kept = [d for d in read_jsonl_zst(os.path.join(root, rel), name=rel) if make_uid(rel, d.line) in wanted]
        if kept:  # one source file's selected documents at a time
            write_jsonl_zst(kept, os.path.join(out, rel))
            written += len(kept)
    if written != len(wanted):
        raise ValueError(f'{sel.path}: names {len(wanted) - written} document uid(s) that no .jsonl.zst file '
                         f'under {raw} has; was the selection made for another corpus?')
    return MaterializeReport(out=out, num_samples=written, seconds=time.perf_counter() - start)
