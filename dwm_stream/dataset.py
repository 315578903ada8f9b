"""``DWMDataset``: a mosaicml-streaming ``StreamingDataset`` for DWM training.

What it adds to its parent, and nothing more:

* **Sample dicts for DWM**: ``input_ids`` (narrow token ids; widened to int64 by
  :func:`dwm_stream.loader.widen_batch`), ``num_tokens``, ``uid``, ``domain`` (an int id into
  :attr:`DWMDataset.domain_names`), ``prior_weight`` and, when any stream has them, ``scores``
  (float32 over :attr:`DWMDataset.score_names`, NaN where a stream lacks a score).
* **Selection overlays** (:class:`DWMStream` ``selection=``): stream only the selected samples of an
  existing corpus without rewriting shards. Each shard is presented to streaming with its selected
  count, so streaming's own partitioning, shuffling, exactly-once delivery and resumption operate on
  the selected subset; rows are mapped back to the shard at read time.
* **A zero-copy read path** (:mod:`dwm_stream.shard_view`) and an iterator without the polling
  consumer thread. Downloading still happens in streaming's background prepare thread; the consumer
  blocks in ``prepare_shard`` only when the next sample's shard is not local yet.

Everything else (arguments, streams and proportions, S3, caching, eviction, ``state_dict``) is the
parent's, unchanged.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from streaming import Stream, StreamingDataset
from streaming.base.dataset import _Iterator, _ShardState
from streaming.base.util import wait_for_file_to_exist
from streaming.base.world import World

from dwm_stream.selection import ResolvedSelection, read_selection, resolve_selection
from dwm_stream.shard_format import (DOMAIN, META_BASENAME, NUM_TOKENS, SCORE_PREFIX, TOKENS, UID,
                                     UIDS_BASENAME, CorpusMeta)
from dwm_stream.shard_view import ShardView, record_dtype
from dwm_stream.storage import download_file

__all__ = ['DWMDataset', 'DWMStream']

_SIDECAR_WAIT_S = 300.0


def _stream_location(stream: Stream) -> str:
    base = stream.remote if stream.remote else stream.local
    return os.path.join(base, stream.split) if stream.split else base


class DWMStream(Stream):
    """A ``streaming.Stream`` that also reads the corpus sidecars and an optional selection.

    Takes every argument of ``streaming.Stream`` (``remote``, ``local``, ``split``, ``proportion``,
    ``repeat``, ``choose``, ...) plus:

    Args:
        selection (str, optional): A selection file (local path or ``s3://`` URI) naming the
            samples of this stream to deliver; see :mod:`dwm_stream.selection`. Default: ``None``
            (every sample).
    """

    def __init__(self, *, selection: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.selection = selection
        self.meta: Optional[CorpusMeta] = None
        self.resolved: Optional[ResolvedSelection] = None

    @classmethod
    def from_stream(cls, stream: Stream) -> 'DWMStream':
        """Wrap a plain ``streaming.Stream`` (same arguments, no selection)."""
        return cls(remote=stream.remote, local=stream.local, split=stream.split or None,
                   proportion=stream._proportion, repeat=stream._repeat, choose=stream._choose,
                   download_retry=stream._download_retry, download_timeout=stream._download_timeout,
                   validate_hash=stream.validate_hash, keep_zip=stream._keep_zip)

    def _fetch_sidecar(self, basename: str, world: World, required: bool) -> Optional[str]:
        """Local path of a file beside ``index.json``, downloading it once per node if needed."""
        filename = os.path.join(self.local, self.split, basename)
        missing_marker = filename + '.missing'
        if os.path.exists(filename):
            return filename
        if world.is_local_leader:
            if self.remote:
                try:
                    tmp = self._download_file(basename, basename + '.tmp')
                    os.rename(tmp, filename)
                except Exception as e:  # noqa: BLE001 - re-raised with context below if required
                    if required:
                        raise FileNotFoundError(
                            f'{os.path.join(self.remote, self.split, basename)}: could not be fetched '
                            f'({type(e).__name__}). It is written by `dwm-stream convert`; re-convert or '
                            f'copy it beside index.json.') from e
                    open(missing_marker, 'w').close()
            elif required:
                raise FileNotFoundError(f'{filename} does not exist. It is written by `dwm-stream convert` '
                                        f'beside index.json.')
            else:
                return None
        else:
            deadline = time.monotonic() + _SIDECAR_WAIT_S
            while not (os.path.exists(filename) or os.path.exists(missing_marker)):
                if time.monotonic() > deadline:
                    raise TimeoutError(f'{filename}: timed out waiting for local rank 0 to fetch it.')
                time.sleep(0.05)
        return filename if os.path.exists(filename) else None

    def _fetch_selection(self, world: World) -> str:
        assert self.selection is not None
        if '://' not in self.selection:
            if not os.path.exists(self.selection):
                raise FileNotFoundError(f'selection file {self.selection} does not exist.')
            return self.selection
        digest = hashlib.blake2s(self.selection.encode(), digest_size=8).hexdigest()
        filename = os.path.join(self.local, self.split, f'selection-{digest}.parquet')
        if world.is_local_leader and not os.path.exists(filename):
            download_file(self.selection, filename, self.download_timeout)
        else:
            wait_for_file_to_exist(filename, 0.05, _SIDECAR_WAIT_S,
                                   f'{self.selection}: timed out waiting for local rank 0 to fetch it.')
        return filename

    def get_shards(self, world: World, allow_unsafe_types: bool) -> list:
        shards = super().get_shards(world, allow_unsafe_types)
        for shard in shards:  # the physical count, before a selection replaces `samples`
            shard.dwm_raw_samples = shard.samples
        meta_file = self._fetch_sidecar(META_BASENAME, world, required=False)
        if meta_file is not None:
            with open(meta_file) as f:
                self.meta = CorpusMeta.from_json(f.read(), where=meta_file)
        if self.selection is not None:
            selection = read_selection(self._fetch_selection(world))
            uids_file = self._fetch_sidecar(UIDS_BASENAME, world, required=True)
            corpus_uids = np.load(uids_file, allow_pickle=False)
            samples_per_shard = np.array([shard.samples for shard in shards], np.int64)
            self.resolved = resolve_selection(selection, corpus_uids, samples_per_shard,
                                              corpus=_stream_location(self))
            # Present each shard to streaming with its selected count: partitioning, shuffling and
            # resumption then work on the selected subset. Rows map back in DWMDataset.get_item.
            for shard, rows in zip(shards, self.resolved.rows_per_shard):
                shard.samples = len(rows)
        return shards


class DWMDataset(StreamingDataset):
    """A ``StreamingDataset`` that yields DWM sample dicts, with selection overlays.

    Takes every argument of ``streaming.StreamingDataset`` unchanged (``streams``, ``remote``,
    ``local``, ``split``, ``batch_size``, ``shuffle``, ``shuffle_seed``, ``predownload``,
    ``cache_limit``, ...). Plain ``streaming.Stream`` objects are accepted and wrapped.

    Args:
        selection (str, optional): With ``remote``/``local``: a selection file for that corpus.
            With ``streams``, give each :class:`DWMStream` its own ``selection`` instead.
            Default: ``None``.
        **kwargs: Passed to ``StreamingDataset``.

    Attributes:
        domain_names (list[str]): ``sample['domain']`` indexes this list (union over streams).
        score_names (list[str]): ``sample['scores']`` columns (union over streams and selections).
        seq_len (int | None): Tokens per sample, when the corpora have ``dwm.json``.
    """

    def __init__(self,
                 *,
                 streams: Optional[Sequence[Stream]] = None,
                 remote: Optional[str] = None,
                 local: Optional[str] = None,
                 split: Optional[str] = None,
                 selection: Optional[str] = None,
                 **kwargs: Any) -> None:
        if streams:
            if selection is not None:
                raise ValueError('`selection` applies with `remote`/`local`; with `streams`, pass '
                                 '`DWMStream(..., selection=PATH)` for each stream instead.')
            streams = [s if isinstance(s, DWMStream) else DWMStream.from_stream(s) for s in streams]
        else:
            if not (remote or local):
                raise ValueError('DWMDataset needs `streams`, or `remote` and/or `local`.')
            streams = [DWMStream(remote=remote, local=local, split=split, selection=selection)]
        super().__init__(streams=streams, split=split, **kwargs)
        self._build_tables()
        self._views: dict[int, ShardView] = {}

    # ------------------------------------------------------------------ tables built once
    def _build_tables(self) -> None:
        streams: list[DWMStream] = self.streams  # type: ignore[assignment]
        self.domain_names: list[str] = []
        self.score_names: list[str] = []
        seq_lens = set()
        for stream in streams:
            meta = stream.meta
            names = meta.domains if meta else [os.path.basename(_stream_location(stream).rstrip('/')) or 'default']
            for name in names:
                if name not in self.domain_names:
                    self.domain_names.append(name)
            for name in (meta.score_names if meta else []):
                if name not in self.score_names:
                    self.score_names.append(name)
            if stream.resolved is not None:
                for name in (stream.resolved.scores_per_shard[0] if stream.resolved.scores_per_shard else {}):
                    if name not in self.score_names:
                        self.score_names.append(name)
            if meta:
                seq_lens.add(meta.seq_len)
        if len(seq_lens) > 1:
            where = {_stream_location(s): s.meta.seq_len for s in streams if s.meta}
            raise ValueError(f'streams have different seq_len {where}; samples of one batch must have '
                             f'the same length. Convert them with the same --seq-len.')
        self.seq_len: Optional[int] = seq_lens.pop() if seq_lens else None
        score_index = {name: i for i, name in enumerate(self.score_names)}

        # Per-stream domain remap: local domain id -> global id.
        self._domain_remap = []
        for stream in streams:
            names = stream.meta.domains if stream.meta else [self.domain_names[0]]
            self._domain_remap.append(np.array([self.domain_names.index(n) for n in names], np.int64))

        # Per-shard decode plan.
        self._shard_dtype: list[Optional[np.dtype]] = []
        self._shard_rows: list[Optional[np.ndarray]] = []
        self._shard_prior: list[Optional[np.ndarray]] = []
        self._shard_score_cols: list[list[tuple[int, str]]] = []
        self._shard_sel_scores: list[list[tuple[int, np.ndarray]]] = []
        for shard_id, shard in enumerate(self.shards):
            stream = streams[self.stream_per_shard[shard_id]]
            local_shard = shard_id - int(self.shard_offset_per_stream[self.stream_per_shard[shard_id]])
            names = getattr(shard, 'column_names', None)
            dtype = None
            if names is not None and {TOKENS, UID} <= set(names):
                dtype = record_dtype(shard.column_names, shard.column_encodings, shard.column_sizes)
            self._shard_dtype.append(dtype)
            cols = [(score_index[c[len(SCORE_PREFIX):]], c) for c in (names or [])
                    if c.startswith(SCORE_PREFIX) and c[len(SCORE_PREFIX):] in score_index]
            self._shard_score_cols.append(cols)
            if stream.resolved is not None:
                self._shard_rows.append(stream.resolved.rows_per_shard[local_shard])
                self._shard_prior.append(stream.resolved.prior_per_shard[local_shard])
                self._shard_sel_scores.append([(score_index[k], v) for k, v in
                                               stream.resolved.scores_per_shard[local_shard].items()])
            else:
                self._shard_rows.append(None)
                self._shard_prior.append(None)
                self._shard_sel_scores.append([])
        self._shard_bounds = np.concatenate([[0], np.cumsum(self.samples_per_shard)]).astype(np.int64)

    # ------------------------------------------------------------------ pickling to workers
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state['_views'] = {}  # mmaps are per process; workers map shards themselves
        return state

    # ------------------------------------------------------------------ reading
    def _open_view(self, shard_id: int) -> ShardView:
        stream = self.streams[self.stream_per_shard[shard_id]]
        shard = self.shards[shard_id]
        filename = os.path.join(stream.local, stream.split, shard.raw_data.basename)
        last_error: Optional[Exception] = None
        for _ in range(8):
            self.prepare_shard(shard_id, blocking=True)
            try:
                view = ShardView(filename, self._shard_dtype[shard_id], self.shards[shard_id].dwm_raw_samples)
            except FileNotFoundError as e:  # evicted between prepare and open; prepare again
                last_error = e
                continue
            self._views[shard_id] = view
            return view
        raise RuntimeError(f'shard {filename} of {_stream_location(stream)} could not be prepared: '
                           f'{last_error}. If `cache_limit` is set, raise it.')

    def _decode(self, shard_id: int, row: int, vrow: int) -> dict[str, Any]:
        """Decode one sample. ``row`` is the physical row in the shard, ``vrow`` the selected row."""
        view = self._views.get(shard_id)
        if view is None or self._shard_states[shard_id] != _ShardState.LOCAL:
            view = self._open_view(shard_id)
        cols = view.columns
        sample: dict[str, Any] = {
            'input_ids': cols[TOKENS][row],
            'num_tokens': int(cols[NUM_TOKENS][row]) if NUM_TOKENS in cols else cols[TOKENS].shape[1],
            'uid': int(cols[UID][row]),
            'domain': int(self._domain_remap[self.stream_per_shard[shard_id]][cols[DOMAIN][row]])
            if DOMAIN in cols else int(self._domain_remap[self.stream_per_shard[shard_id]][0]),
            'prior_weight': float(self._shard_prior[shard_id][vrow]) if self._shard_prior[shard_id] is not None else 1.0,
        }
        if self.score_names:
            scores = np.full(len(self.score_names), np.nan, np.float32)
            for i, name in self._shard_score_cols[shard_id]:
                scores[i] = cols[name][row]
            for i, values in self._shard_sel_scores[shard_id]:
                scores[i] = values[vrow]
            sample['scores'] = scores
        return sample

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        """Get a sample by global (selected-space) index, preparing its shard if needed."""
        shard_id = int(np.searchsorted(self._shard_bounds, sample_id, side='right') - 1)
        vrow = int(sample_id - self._shard_bounds[shard_id])
        rows = self._shard_rows[shard_id]
        row = int(rows[vrow]) if rows is not None else vrow
        if self._shard_dtype[shard_id] is None:
            # A foreign shard (variable-size columns): streaming's own decoder.
            shard = self.shards[shard_id]
            for _ in range(1 + retry):
                try:
                    return shard.get_item(row)
                except FileNotFoundError:
                    self.prepare_shard(shard_id)
            raise RuntimeError(f'shard {shard_id} could not be prepared after {retry} retries.')
        return self._decode(shard_id, row, vrow)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Iterate this worker's partition, exactly as ``StreamingDataset`` orders it.

        Same partition, order and resumption as the parent (``_resume_incr_epoch``, ``_get_work``)
        and the same background prepare thread; the consumer reads through the zero-copy views
        and needs no polling ready-thread.
        """
        if hasattr(self, '_iterator'):
            self._iterator.exit()
        from concurrent.futures import ThreadPoolExecutor
        from threading import Event
        if not hasattr(self, '_executor'):
            self._executor = ThreadPoolExecutor()
        if not hasattr(self, '_event'):
            self._event = Event()
        elif self._event.is_set():
            raise RuntimeError('Background thread failed. Check other traceback.')
        if not hasattr(self, '_views'):
            self._views = {}

        self._unique_worker_world = self._unique_rank_world.detect_workers()
        self._parallel_worker_world = self._parallel_rank_world.detect_workers()
        epoch, sample_in_epoch = self._resume_incr_epoch()
        sample_ids = self._get_work(epoch, sample_in_epoch)
        if not len(sample_ids):
            return

        it = _Iterator(sample_ids)
        it._num_threads_to_exit = 2  # the prepare thread and this consumer
        self._iterator = it
        prepare_future = self._executor.submit(self._prepare_thread, it)
        prepare_future.add_done_callback(self.on_exception)

        # Vectorised sample -> (shard, row) lookup for the whole partition.
        valid = sample_ids >= 0
        shard_ids = np.full(len(sample_ids), -1, np.int64)
        shard_ids[valid] = np.searchsorted(self._shard_bounds, sample_ids[valid], side='right') - 1
        vrows = np.where(valid, sample_ids - self._shard_bounds[np.maximum(shard_ids, 0)], -1)
        shard_list = shard_ids.tolist()
        vrow_list = vrows.tolist()
        last_shard = -1
        try:
            for i in range(it.total):
                if it.should_exit() or self._event.is_set():
                    break
                shard_id = shard_list[i]
                if shard_id >= 0:
                    vrow = vrow_list[i]
                    rows = self._shard_rows[shard_id]
                    row = int(rows[vrow]) if rows is not None else vrow
                    if shard_id != last_shard:
                        self._shard_access_times[shard_id] = time.time_ns()
                        last_shard = shard_id
                    if self._shard_dtype[shard_id] is None:
                        sample = self.get_item(int(sample_ids[i]))
                    else:
                        sample = self._decode(shard_id, row, vrow)
                    # Tell the prepare thread how far we are (it throttles on predownload).
                    it.yield_index = i
                    it.ready_index = i
                    yield sample
                it.yield_index = i + 1
                it.ready_index = i + 1
        finally:
            it.on_exit()
            if self._event.is_set():
                raise RuntimeError('Background thread failed. Check other traceback.')

