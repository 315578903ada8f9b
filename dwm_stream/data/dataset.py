"""``DWMDataset``: a mosaicml-streaming ``StreamingDataset`` for DWM training.

What it adds to its parent, and nothing more:

* **Sample dicts for DWM**: ``input_ids`` (narrow token ids; widened to int64 by
  :func:`dwm_stream.data.loader.widen_batch`), ``num_tokens``, ``uid``, ``domain`` (an int id into
  :attr:`DWMDataset.domain_names`), ``prior_weight`` and, when any stream has them, ``scores``
  (float32 over :attr:`DWMDataset.score_names`, NaN where a stream lacks a score).
* **Selection overlays** (:class:`DWMStream` ``selection=``): stream only the selected samples of an
  existing corpus without rewriting shards. Each shard is presented to streaming with its selected
  count, so streaming's own partitioning, shuffling, exactly-once delivery and resumption operate on
  the selected subset; rows are mapped back to the shard at read time.
* **A zero-copy read path** (:mod:`dwm_stream.format.view`) and an iterator without the polling
  ready-thread. Downloading still goes through streaming's ``prepare_shard`` in a background
  thread, but that thread visits only the points where the partition enters a shard, not every
  sample (streaming's takes a file lock per sample, which costs the consumer half its throughput
  in GIL hand-offs); the consumer blocks in ``prepare_shard`` only when the next sample's shard is
  not local yet. Per sample, the consumer does a few list and dict lookups and returns views into
  the page cache. ``benchmarks/loader_throughput.py`` measures all of it.

Everything else (arguments, streams and proportions, S3, caching, eviction, ``state_dict``) is the
parent's, unchanged. The few private members of streaming that this needs are used only through
:mod:`dwm_stream.data._streaming_compat`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch.distributed as torch_dist
from streaming import Stream, StreamingDataset

import dwm_stream.data._streaming_compat as compat
from dwm_stream.data._streaming_compat import SHARD_LOCAL, EpochIterator, World
from dwm_stream.data.selection import ResolvedSelection, read_selection, resolve_selection
from dwm_stream.format import integrity
from dwm_stream.format.shards import (DOMAIN, META_BASENAME, NUM_TOKENS, SCORE_PREFIX, TOKENS, UID,
                                      UIDS_BASENAME, CorpusMeta)
from dwm_stream.format.storage import download_file
from dwm_stream.format.view import ShardView, record_dtype

__all__ = ['DWMDataset', 'DWMStream']

logger = logging.getLogger(__name__)

_SIDECAR_WAIT_S = 300.0
_CHUNK = 1 << 16  # samples per vectorised lookup, bounding per-epoch memory
_MAX_MAPPED_SHARDS = 1024  # mmaps kept open per process (oldest unmapped first)


def _dist_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def _stream_location(stream: Stream) -> str:
    base = stream.remote if stream.remote else stream.local
    return os.path.join(base, stream.split) if stream.split else base


class DWMStream(compat.DownloadHookStream):
    """A ``streaming.Stream`` that also reads the corpus sidecars and an optional selection.

    Takes every argument of ``streaming.Stream`` (``remote``, ``local``, ``split``, ``proportion``,
    ``repeat``, ``choose``, ...) plus:

    Args:
        selection (str, optional): A selection file (local path or ``s3://`` URI) naming the
            samples of this stream to deliver; see :mod:`dwm_stream.data.selection`. Default: ``None``
            (every sample).
    """

    def __init__(self, *, selection: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.selection = selection
        self.meta: Optional[CorpusMeta] = None
        self.resolved: Optional[ResolvedSelection] = None

    @classmethod
    def from_stream(cls, stream: Stream, selection: Optional[str] = None) -> 'DWMStream':
        """A new ``DWMStream`` with the constructor arguments of ``stream`` (and ``selection``)."""
        return cls(selection=selection, **compat.stream_arguments(stream))

    def _fetch_sidecar(self, basename: str, world: World, required: bool) -> Optional[str]:
        """Local path of a file beside ``index.json``, downloading it once per node if needed."""
        filename = os.path.join(self.local, self.split, basename)
        missing_marker = filename + '.missing'
        if os.path.exists(filename):
            return filename
        if world.is_local_leader:
            if self.remote:
                try:
                    tmp = self.download_to_cache(basename, basename + '.tmp')
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
            compat.wait_for_file(filename, _SIDECAR_WAIT_S,
                                 f'{self.selection}: timed out waiting for local rank 0 to fetch it.')
        return filename

    def on_download_error(self, error: Exception, from_basename: str, to_basename: Optional[str]) -> Exception:
        """After streaming's bounded retries: an error that names the object and the endpoint (or the cache)."""
        if not self.remote:
            return error
        remote = os.path.join(self.remote, self.split, from_basename)
        local = os.path.join(self.local, self.split, to_basename or from_basename)
        if isinstance(error, OSError) and error.errno in integrity.CACHE_ERRNOS:
            return integrity.cache_error(os.path.join(self.local, self.split), f'downloading {remote}', error)
        return integrity.download_error(remote, local, self.download_retry, error)

    def get_shards(self, world: World, allow_unsafe_types: bool) -> list:
        # Reliability/safety checks (dwm_stream.format.integrity, RELIABILITY.md): pickle columns are refused
        # with the index named, shard paths must stay in the cache, and downloads are hash-checked.
        index_file = os.path.join(_stream_location(self), 'index.json')
        try:
            shards = super().get_shards(world, allow_unsafe_types)
        except ValueError as e:
            if not compat.is_unsafe_type_error(e):
                raise
            raise integrity.unsafe_types_error(index_file, e) from e
        integrity.check_shard_paths(shards, index_file)
        if self.validate_hash is None:
            self.validate_hash = integrity.default_validate_hash(shards)
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
        for attempt in range(8):
            try:
                # Fresh copies each attempt: streaming's apply_weights sets proportion/repeat/choose on
                # the streams it is given, and a retry with mutated streams fails validate_weights.
                super().__init__(streams=[DWMStream.from_stream(s, selection=s.selection) for s in streams],
                                 split=split, **kwargs)
                break
            except FileExistsError as e:
                # Two jobs starting at once can pick the same shared-memory prefix (streaming checks,
                # then creates): the loser retries and gets the next prefix. Single-process only.
                if attempt == 7 or not compat.is_shm_prefix_race(e) or _dist_initialized():
                    raise
                time.sleep(0.05 * (attempt + 1))
            except ValueError as e:  # name the cache when `cache_limit` cannot work
                if not compat.is_cache_limit_error(e):
                    raise
                raise ValueError(f'local cache {[os.path.join(s.local, s.split or "") for s in streams]}: '
                                 f'{e}') from e
        self._build_tables()
        self._decoders: dict[int, _ShardDecoder] = {}

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
        state['_decoders'] = {}  # mmaps are per process; workers map shards themselves
        return state

    # ------------------------------------------------------------------ reading
    def _open_decoder(self, shard_id: int) -> '_ShardDecoder':
        """Prepare shard ``shard_id`` (download/decompress if needed) and map it."""
        stream = self.streams[self.stream_per_shard[shard_id]]
        shard = self.shards[shard_id]
        filename = os.path.join(stream.local, stream.split, shard.raw_data.basename)
        decoders = self._decoders
        decoders.pop(shard_id, None)
        if self.cache_limit:  # unmap evicted shards, so that their disk space is really freed
            states = compat.shard_states(self)
            for stale in [k for k in decoders if states[k] != SHARD_LOCAL]:
                del decoders[stale]
        while len(decoders) >= _MAX_MAPPED_SHARDS:  # oldest first; bounds mmaps per process
            del decoders[next(iter(decoders))]
        last_error: Optional[Exception] = None
        for _ in range(8):
            self.prepare_shard(shard_id, blocking=True)
            try:
                # Once per process and file: the raw shard's index hash (a flipped byte is named, never decoded).
                integrity.verify_raw_shard(filename, shard.raw_data, _stream_location(stream))
                view = ShardView(filename, self._shard_dtype[shard_id], shard.dwm_raw_samples)
            except FileNotFoundError as e:  # evicted between prepare and open; prepare again
                last_error = e
                continue
            decoder = _ShardDecoder(self, shard_id, view)
            decoders[shard_id] = decoder
            return decoder
        raise RuntimeError(f'shard {filename} of {_stream_location(stream)} could not be prepared: '
                           f'{last_error}. If `cache_limit` is set, raise it.')

    def _decoder(self, shard_id: int) -> '_ShardDecoder':
        decoder = self._decoders.get(shard_id)
        if decoder is None or compat.shard_states(self)[shard_id] != SHARD_LOCAL:
            decoder = self._open_decoder(shard_id)
        return decoder

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
        return self._decoder(shard_id).sample(row, vrow)

    def on_exception(self, future: Any) -> None:
        """The prepare thread failed: keep its error for the consumer to raise, and stop."""
        error = future.exception()
        if error is not None:
            self._background_error = error
            compat.background_event(self).set()

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """Streaming's ``prepare_shard``, except when it fails (``RELIABILITY.md``).

        Streaming leaves a shard whose download or decompression raised in the ``PREPARING`` state,
        so every process waiting for it would spin forever; here it goes back to ``REMOTE`` (a later
        attempt starts over) and the error names the shard, the stream and, for cache writes, the
        path.
        """
        stream = self.streams[self.stream_per_shard[shard_id]]
        # A shard fetched from a remote that fails its hash or does not decompress was most likely
        # damaged in transfer (a truncated body that the HTTP stack did not catch): prepare_failed
        # deletes the bad copy, so download it again, up to the stream's download_retry. A copy that
        # is bad on the remote itself still fails, naming the shard.
        attempts = 1 + (int(stream.download_retry or 0) if stream.remote else 0)
        for attempt in range(attempts):
            try:
                super().prepare_shard(shard_id, blocking)
                return
            except Exception as e:  # noqa: BLE001 - re-raised, named
                compat.release_failed_shard(self, shard_id)
                error = integrity.prepare_failed(self, shard_id, stream, _stream_location(stream), e)
                if isinstance(error, integrity.ShardIntegrityError) and attempt + 1 < attempts:
                    logger.warning('%s; downloading it again (attempt %d of %d).', error, attempt + 2, attempts)
                    continue
                raise error

    def _prepare_ahead(self, it: EpochIterator, run_starts: np.ndarray, run_shards: np.ndarray) -> None:
        """The background prepare thread: download/decompress shards ahead of the consumer.

        Replaces ``StreamingDataset._prepare_thread``, which calls ``prepare_shard`` (a file lock,
        i.e. syscalls that hand the GIL back and forth with the consumer) for every sample. This
        visits only the positions where the partition enters a shard (``run_starts``), skips
        shards this process has already prepared and that are still local, and keeps the same
        ``predownload`` window ahead of the consumer.
        """
        states = compat.shard_states(self)
        event_is_set = compat.background_event(self).is_set
        prepared: set[int] = set()
        predownload = self.predownload
        try:
            for begin in range(0, len(run_starts), _CHUNK):
                for pos, shard_id in zip(run_starts[begin:begin + _CHUNK].tolist(),
                                         run_shards[begin:begin + _CHUNK].tolist()):
                    if not it.running or event_is_set():
                        return
                    if shard_id in prepared and states[shard_id] == SHARD_LOCAL:
                        continue
                    while predownload is not None and pos - it.yield_index > predownload:
                        if not it.running or event_is_set():
                            return
                        time.sleep(compat.POLL_INTERVAL_S)
                    self.prepare_shard(shard_id, False)
                    if states[shard_id] == SHARD_LOCAL:  # else another worker is preparing it
                        prepared.add(shard_id)
                    it.prepare_index = pos
            it.prepare_index = it.total
        finally:
            it.on_exit()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Iterate this worker's partition, exactly as ``StreamingDataset`` orders it.

        Same partition, order and resumption as the parent (:func:`compat.begin_epoch` starts the
        epoch as streaming's ``__iter__`` does) and the same ``predownload`` window; the consumer
        reads through the zero-copy views and needs no polling ready-thread.
        """
        sample_ids = compat.begin_epoch(self)
        if not hasattr(self, '_decoders'):
            self._decoders = {}
        if not len(sample_ids):
            return

        # Vectorised sample -> shard lookup for the whole partition (-1 marks padding).
        shard_ids = np.full(len(sample_ids), -1, np.int64)
        valid = sample_ids >= 0
        shard_ids[valid] = np.searchsorted(self._shard_bounds, sample_ids[valid], side='right') - 1
        # Where the partition enters a shard. Without a cache limit nothing is evicted, so a
        # shard's first entry is the only one that can need preparing.
        positions = np.flatnonzero(valid)
        entered = shard_ids[positions]
        change = np.ones(len(entered), bool)
        change[1:] = entered[1:] != entered[:-1]
        run_starts, run_shards = positions[change], entered[change]
        if not self.cache_limit:
            _, first = np.unique(run_shards, return_index=True)
            first.sort()
            run_starts, run_shards = run_starts[first], run_shards[first]

        it = compat.start_epoch(self, sample_ids)  # exits through the prepare thread and this consumer
        prepare_future = compat.background_executor(self).submit(self._prepare_ahead, it, run_starts, run_shards)
        prepare_future.add_done_callback(self.on_exception)
        try:
            yield from self._consume(it, sample_ids, shard_ids)
        finally:
            it.non_blocking_exit()  # also stops the prepare thread if the consumer stopped early
            it.on_exit()
            if compat.background_event(self).is_set():
                error = getattr(self, '_background_error', None)  # set by on_exception
                raise RuntimeError(f'Background thread failed: {error}') from error

    def _consume(self, it: EpochIterator, sample_ids: np.ndarray, shard_ids: np.ndarray) -> Iterator[dict[str, Any]]:
        """The consumer loop: per sample, a few list and dict lookups and one row view."""
        decoders = self._decoders
        states = compat.shard_states(self)
        access_times = compat.shard_access_times(self)
        event_is_set = compat.background_event(self).is_set
        bounds = self._shard_bounds
        shard_rows = self._shard_rows
        shard_dtype = self._shard_dtype
        # A mapped shard stays readable even if its file is evicted (the mapping holds the inode).
        # Only with a cache limit does streaming evict; then re-prepare and remap, so that the
        # evicted file's space is freed and the shard comes back through streaming's accounting.
        evicts = bool(self.cache_limit)
        last_shard = -1
        for begin in range(0, it.total, _CHUNK):
            chunk_shards = shard_ids[begin:begin + _CHUNK]
            vrows = sample_ids[begin:begin + _CHUNK] - bounds[np.maximum(chunk_shards, 0)]
            rows = vrows.copy()
            for shard_id in np.unique(chunk_shards).tolist():  # selected row -> physical row
                if shard_id >= 0 and shard_rows[shard_id] is not None:
                    mask = chunk_shards == shard_id
                    rows[mask] = shard_rows[shard_id][vrows[mask]]
            i = begin
            for shard_id, row, vrow in zip(chunk_shards.tolist(), rows.tolist(), vrows.tolist()):
                if not it.running or event_is_set():
                    return
                if shard_id >= 0:
                    if shard_id != last_shard:
                        access_times[shard_id] = time.time_ns()
                        last_shard = shard_id
                    it.yield_index = i  # the prepare thread keeps `predownload` ahead of this
                    if shard_dtype[shard_id] is None:
                        yield self.get_item(int(sample_ids[i]))
                    else:
                        decoder = decoders.get(shard_id)
                        if decoder is None or (evicts and states[shard_id] != SHARD_LOCAL):
                            decoder = self._open_decoder(shard_id)
                        yield decoder.sample(row, vrow)
                i += 1


class _ShardDecoder:
    """One mapped shard and what turning a row into a sample dict needs, as O(1) lookups.

    Per process (never pickled). ``sample`` is the whole per-sample cost of the read path: a row
    view of the token ids (zero-copy, into the page cache), four scalar reads and, when the
    corpus has scores, a view of the adjacent ``score_*`` columns (or a small array when a
    selection or another stream contributes scores).
    """

    __slots__ = ('view', 'tokens', 'num_tokens', 'seq_len', 'uid', 'domain', 'remap', 'prior',
                 'num_scores', 'score_block', 'score_cols', 'sel_scores')

    def __init__(self, dataset: DWMDataset, shard_id: int, view: ShardView) -> None:
        cols = view.columns
        self.view = view
        self.tokens = cols[TOKENS]
        self.seq_len = int(self.tokens.shape[1])
        self.num_tokens = cols.get(NUM_TOKENS)
        self.uid = cols[UID]
        self.domain = cols.get(DOMAIN)
        self.remap = dataset._domain_remap[dataset.stream_per_shard[shard_id]].tolist()
        self.prior = dataset._shard_prior[shard_id]
        self.num_scores = len(dataset.score_names)
        self.score_cols = [(i, cols[name]) for i, name in dataset._shard_score_cols[shard_id]]
        self.sel_scores = dataset._shard_sel_scores[shard_id]
        self.score_block = None
        if self.num_scores and not self.sel_scores and \
                [i for i, _ in self.score_cols] == list(range(self.num_scores)):
            self.score_block = view.column_block([name for _, name in dataset._shard_score_cols[shard_id]])

    def sample(self, row: int, vrow: int) -> dict[str, Any]:
        """The sample dict of physical row ``row`` (``vrow``: its index among the selected rows)."""
        sample: dict[str, Any] = {
            'input_ids': self.tokens[row],
            'num_tokens': self.num_tokens.item(row) if self.num_tokens is not None else self.seq_len,
            'uid': self.uid.item(row),
            'domain': self.remap[self.domain.item(row) if self.domain is not None else 0],
            'prior_weight': self.prior.item(vrow) if self.prior is not None else 1.0,
        }
        if self.num_scores:
            if self.score_block is not None:
                sample['scores'] = self.score_block[row]
            else:
                scores = np.empty(self.num_scores, np.float32)
                scores.fill(np.nan)
                for i, column in self.score_cols:
                    scores[i] = column[row]
                for i, values in self.sel_scores:
                    scores[i] = values[vrow]
                sample['scores'] = scores
        return sample
