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
* **LLM Foundry corpora, unconverted**: MDS written by Foundry's conversion scripts (``tokens`` as an
  integer ``ndarray``, or as ``bytes`` decoded with ``token_encoding_type`` as Foundry's
  ``StreamingTextDataset`` does), with or without ``dwm.json``. The domain is the stream's name, the uid
  the stream + the sample's index; see :mod:`dwm_stream.format.foundry` for the rules and what is refused.
* **Errors at construction, naming the file and the fix**: argument types (:mod:`dwm_stream.data.schemas`),
  shard files missing from a dataset without ``remote``, a missing or damaged ``dwm.json``, a text-only corpus.
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
import sys
import tempfile
import time
from collections import Counter
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch.distributed as torch_dist
from streaming import Stream, StreamingDataset

import dwm_stream.data._streaming_compat as compat
from dwm_stream.data import read_only
from dwm_stream.data._streaming_compat import SHARD_LOCAL, EpochIterator, World, release_shared_memory
from dwm_stream.data.schemas import check_dataset_arguments, check_stream_arguments
from dwm_stream.data.selection import ResolvedSelection, read_selection, resolve_selection
from dwm_stream.format import foundry, integrity
from dwm_stream.format.shards import (DOMAIN, META_BASENAME, NUM_TOKENS, SCORE_PREFIX, TOKENS, UID,
                                      UIDS_BASENAME, CorpusMeta)
from dwm_stream.format.storage import download_file
from dwm_stream.format.view import ShardView, record_dtype

__all__ = ['DWMDataset', 'DWMStream', 'release_shared_memory']

logger = logging.getLogger(__name__)

_SIDECAR_WAIT_S = 300.0
_CHUNK = 1 << 16  # samples per vectorised lookup, bounding per-epoch memory
_MAX_MAPPED_SHARDS = 1024  # mmaps kept open per process (oldest unmapped first)


def _dist_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def _stream_location(stream: Stream) -> str:
    base = stream.remote if stream.remote else stream.local
    return os.path.join(base, stream.split) if stream.split else base


def _is_local_only(stream: Stream) -> bool:
    """No remote to fetch missing files from (streaming treats ``remote == local`` the same way)."""
    return not stream.remote or os.path.abspath(stream.remote) == os.path.abspath(stream.local)


class DWMStream(compat.DownloadHookStream):
    """A ``streaming.Stream`` that also reads the corpus sidecars and an optional selection.

    Takes every argument of ``streaming.Stream`` (``remote``, ``local``, ``split``, ``proportion``,
    ``repeat``, ``choose``, ...) plus:

    Args:
        selection (str, optional): A selection file (local path or ``s3://`` URI) naming the
            samples of this stream to deliver; see :mod:`dwm_stream.data.selection`. Default: ``None``
            (every sample).
        name (str, optional): The stream's name (the key of a ``streams:`` mapping): the domain name of a
            corpus without ``dwm.json`` (an LLM Foundry corpus), and the seed of its uids. Default: ``None``
            (the basename of ``remote``, else of ``local``).
    """

    def __init__(self, *, selection: Optional[str] = None, name: Optional[str] = None, **kwargs: Any) -> None:
        check_stream_arguments({'selection': selection, 'name': name, **kwargs})
        super().__init__(**kwargs)
        self.selection = selection
        self.name = name
        self.meta: Optional[CorpusMeta] = None
        self.meta_file = os.path.join(_stream_location(self), META_BASENAME)  # for messages
        self.columns: Optional[dict[str, str]] = None  # column -> MDS encoding, as index.json lists them
        self.resolved: Optional[ResolvedSelection] = None

    @classmethod
    def from_stream(cls, stream: Stream, selection: Optional[str] = None, name: Optional[str] = None) -> 'DWMStream':
        """A new ``DWMStream`` with the constructor arguments of ``stream`` (and ``selection``, ``name``)."""
        name = name if name is not None else getattr(stream, 'name', None)
        return cls(selection=selection, name=name, **compat.stream_arguments(stream))

    @property
    def domain_name(self) -> str:
        """The domain of a corpus without ``dwm.json``: ``name``, else the basename of ``remote`` or ``local``."""
        if self.name:
            return self.name
        return os.path.basename((self.remote or self.local or '').rstrip('/')) or 'default'

    def _fetch_sidecar(self, basename: str, world: World, required: bool) -> Optional[str]:
        """Local path of a file beside ``index.json``, downloading it once per node if needed."""
        filename = os.path.join(self.local, self.split, basename)
        missing_marker = filename + '.missing'
        if os.path.exists(filename):
            return filename
        if not self.remote:  # nothing to fetch: every rank sees the same directory
            if required:
                raise FileNotFoundError(f'{filename}: missing; it is written by `dwm-stream convert` beside '
                                        f'index.json: restore it, or re-run the conversion.')
            return None
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
        # Without a remote, `local` is the user's corpus (read-only): the copy goes to the temp directory.
        folder = (os.path.join(self.local, self.split) if not _is_local_only(self)
                  else os.path.join(tempfile.gettempdir(), 'dwm-stream-cache'))
        filename = os.path.join(folder, f'selection-{digest}.parquet')
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
        if _is_local_only(self):
            integrity.check_local_shards(shards, os.path.join(self.local, self.split), index_file)
        if self.validate_hash is None:
            self.validate_hash = integrity.default_validate_hash(shards)
        for shard in shards:  # the physical count, before a selection replaces `samples`
            shard.dwm_raw_samples = shard.samples
        self.columns = _stream_columns(shards, index_file)
        ours = self.columns is not None and DOMAIN in self.columns
        meta_file = self._fetch_sidecar(META_BASENAME, world, required=False)
        if meta_file is not None:
            with open(meta_file, encoding='utf-8', errors='replace') as f:
                self.meta = CorpusMeta.from_json(f.read(), where=self.meta_file,
                                                 fix=foundry.meta_fix(ours, _stream_location(self)))
        if self.columns is not None:
            foundry.check_columns(self.columns, self.meta, sum(shard.samples for shard in shards),
                                  _stream_location(self), index_file, self.meta_file)
        if self.selection is not None:
            if self.columns is not None and UID not in self.columns:
                raise ValueError(f'{_stream_location(self)}: `selection` picks samples by uid, and this corpus has '
                                 f'none (an LLM Foundry corpus); convert it with `dwm-stream convert` to select '
                                 f'from it, or drop `selection`.')
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


def _stream_columns(shards: list, index_file: str) -> Optional[dict[str, str]]:
    """Column name -> MDS encoding, the same for every shard of a stream; ``None`` without shards."""
    columns: Optional[dict[str, str]] = None
    for i, shard in enumerate(shards):
        names, encodings = getattr(shard, 'column_names', None), getattr(shard, 'column_encodings', None)
        if names is None or encodings is None:
            return None
        these = dict(zip(names, encodings))
        if columns is None:
            columns = these
        elif these != columns:
            raise ValueError(f'{index_file}: shard {i} has columns {these}, shard 0 has {columns}; the shards of '
                             f'one stream must have the same columns: re-convert it, or give each part as its '
                             f'own stream.')
    return columns


class DWMDataset(StreamingDataset):
    """A ``StreamingDataset`` that yields DWM sample dicts, with selection overlays.

    Takes every argument of ``streaming.StreamingDataset`` unchanged (``streams``, ``remote``,
    ``local``, ``split``, ``batch_size``, ``shuffle``, ``shuffle_seed``, ``predownload``,
    ``cache_limit``, ...). Plain ``streaming.Stream`` objects are accepted and wrapped; ``streams`` may
    also be a mapping of name -> stream, the name being the domain of a corpus without ``dwm.json``.

    Reads corpora written by ``dwm-stream convert`` and by LLM Foundry's conversion scripts
    (:mod:`dwm_stream.format.foundry`). A sample longer than ``max_seq_len`` is truncated to it, as
    Foundry's ``StreamingTextDataset`` does; samples of different lengths (a Foundry corpus written
    without fixed-size samples) are padded to the longest of their batch by
    :func:`dwm_stream.data.loader.collate_samples`, with ``num_tokens`` marking the real tokens (labels
    are -100 past it).

    Args:
        selection (str, optional): With ``remote``/``local``: a selection file for that corpus.
            With ``streams``, give each :class:`DWMStream` its own ``selection`` instead.
            Default: ``None``.
        max_seq_len (int, optional): Truncate every sample to this many tokens. Default: ``None``
            (samples as stored).
        token_encoding_type (str): The dtype of ``tokens`` stored as ``bytes`` (older LLM Foundry
            corpora), as Foundry's option of the same name. Default: ``'int64'`` (Foundry's default).
        **kwargs: Passed to ``StreamingDataset``.

    Attributes:
        domain_names (list[str]): ``sample['domain']`` indexes this list (union over streams).
        score_names (list[str]): ``sample['scores']`` columns (union over streams and selections).
        seq_len (int | None): Tokens per sample when every stream's samples have one length (after
            ``max_seq_len``), else ``max_seq_len`` (an upper bound) or ``None``.

    Raises:
        ConfigError: An argument of the wrong type (``shuffle: "false"``), naming the key.
        FileNotFoundError: A shard file missing from a dataset without ``remote``, naming it.
        ValueError: A missing or damaged ``dwm.json``, a text-only corpus, or ``tokens`` that cannot be
            token ids, naming the file and the fix.
    """

    def __init__(self,
                 *,
                 streams: Optional[Union[Sequence[Stream], Mapping[str, Stream]]] = None,
                 remote: Optional[str] = None,
                 local: Optional[str] = None,
                 split: Optional[str] = None,
                 selection: Optional[str] = None,
                 max_seq_len: Optional[int] = None,
                 token_encoding_type: str = 'int64',
                 **kwargs: Any) -> None:
        check_dataset_arguments({'remote': remote, 'local': local, 'split': split, 'selection': selection,
                                 'max_seq_len': max_seq_len, 'token_encoding_type': token_encoding_type,
                                 **kwargs})
        self.max_seq_len = max_seq_len
        self.token_encoding_type = foundry.check_token_encoding_type(token_encoding_type)
        if streams:
            if selection is not None:
                raise ValueError('`selection` applies with `remote`/`local`; with `streams`, pass '
                                 '`DWMStream(..., selection=PATH)` for each stream instead.')
            if isinstance(streams, Mapping):
                streams = [DWMStream(**{'name': str(name), **s}) if isinstance(s, Mapping) else
                           DWMStream.from_stream(s, selection=getattr(s, 'selection', None), name=str(name))
                           for name, s in streams.items()]
            streams = [s if isinstance(s, DWMStream) else DWMStream.from_stream(s) for s in streams]
        else:
            if not (remote or local):
                raise ValueError('DWMDataset needs `streams`, or `remote` and/or `local`.')
            streams = [DWMStream(remote=remote, local=local, split=split, selection=selection)]
        # A user's complete corpus is read-only (dwm_stream.data.read_only): before streaming sees it.
        named = len(streams) > 1 or any(s.name for s in streams)
        streams = [DWMStream(selection=s.selection, name=s.name,
                             **read_only.protect(compat.stream_arguments(s), kwargs.get('cache_limit'),
                                                 f'streams.{s.name or i}.' if named else ''))
                   for i, s in enumerate(streams)]
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
        self._shm_owner_pid = os.getpid()  # not pickled: copies in workers never release it
        compat.make_fork_safe(self)

    def __del__(self, _getpid=os.getpid, _finalizing=sys.is_finalizing, _release=release_shared_memory) -> None:
        super().__del__()
        if _finalizing():  # at interpreter exit streaming's own atexit cleanup gives it back
            return
        # Streaming keeps a dataset's shared memory (and its descriptors) until interpreter exit;
        # the object that created it gives it back when it is freed.
        if getattr(self, '_shm_owner_pid', None) == _getpid():
            _release(self)

    # ------------------------------------------------------------------ tables built once
    def _build_tables(self) -> None:
        streams: list[DWMStream] = self.streams  # type: ignore[assignment]
        self.domain_names: list[str] = []
        self.score_names: list[str] = []
        max_seq_len = self.max_seq_len
        fixed: dict[str, int] = {}  # stream -> tokens per sample, for streams whose samples have one length
        for stream in streams:
            meta = stream.meta
            for name in (meta.domains if meta and meta.domains else [stream.domain_name]):
                if name not in self.domain_names:
                    self.domain_names.append(name)
            for name in (meta.score_names if meta else []):
                if name not in self.score_names:
                    self.score_names.append(name)
            if stream.resolved is not None:
                for name in (stream.resolved.scores_per_shard[0] if stream.resolved.scores_per_shard else {}):
                    if name not in self.score_names:
                        self.score_names.append(name)
            encoding = foundry.tokens_encoding(stream.columns[TOKENS]) if stream.columns else None
            length = encoding.length if encoding else (meta.seq_len if meta else None)
            if length is not None:
                fixed[_stream_location(stream)] = min(length, max_seq_len) if max_seq_len else length
        if len(set(fixed.values())) > 1:
            raise ValueError(f'streams have different seq_len {fixed}; samples of one batch must have '
                             f'the same length: convert them with the same --seq-len, or set max_seq_len '
                             f'to truncate them to the shortest.')
        if fixed and len(fixed) == len(streams):
            self.seq_len: Optional[int] = next(iter(fixed.values()))
        else:
            self.seq_len = max_seq_len
        score_index = {name: i for i, name in enumerate(self.score_names)}

        # Per-stream domain remap (local domain id -> global id) and the uid of sample 0 of a stream
        # without a uid column (its name, made unique among the streams, hashed; see format.foundry).
        self._domain_remap = []
        self._stream_uid_base: list[int] = []
        name_counts = Counter(stream.domain_name for stream in streams)
        seen: Counter = Counter()
        for stream in streams:
            names = stream.meta.domains if stream.meta and stream.meta.domains else [stream.domain_name]
            self._domain_remap.append(np.array([self.domain_names.index(n) for n in names], np.int64))
            key = stream.domain_name
            if name_counts[key] > 1:
                seen[key] += 1
                key = f'{key}#{seen[key] - 1}'
            self._stream_uid_base.append(foundry.stream_uid_base(key))

        # Per-shard decode plan.
        self._token_dtype = np.dtype(self.token_encoding_type)
        self._shard_dtype: list[Optional[np.dtype]] = []
        self._shard_uid_base: list[int] = []
        self._shard_rows: list[Optional[np.ndarray]] = []
        self._shard_prior: list[Optional[np.ndarray]] = []
        self._shard_score_cols: list[list[tuple[int, str]]] = []
        self._shard_sel_scores: list[list[tuple[int, np.ndarray]]] = []
        raw_offset = 0
        for shard_id, shard in enumerate(self.shards):
            stream_id = int(self.stream_per_shard[shard_id])
            stream = streams[stream_id]
            local_shard = shard_id - int(self.shard_offset_per_stream[stream_id])
            if local_shard == 0:
                raw_offset = 0
            self._shard_uid_base.append(self._stream_uid_base[stream_id] + raw_offset)
            raw_offset += int(shard.dwm_raw_samples)
            names = getattr(shard, 'column_names', None)
            dtype = None
            encoding = foundry.tokens_encoding(stream.columns[TOKENS]) if stream.columns else None
            if names is not None and encoding is not None and encoding.kind == 'ndarray' and encoding.length:
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
        state.pop('_shm_owner_pid', None)
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
            names = view.columns
            filled = UID not in names or (self.max_seq_len is not None and
                                          self.max_seq_len < names[TOKENS].shape[1])
            decoder = (_FilledShardDecoder if filled else _ShardDecoder)(self, shard_id, view)
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
        if not 0 <= sample_id < self.num_samples:
            n = self.num_samples
            raise IndexError(f'Invalid sample index `{sample_id}`: 0 <= index < {n} (or -{n} <= index < 0 '
                             f'from the end); the dataset has {n} samples.')
        shard_id = int(np.searchsorted(self._shard_bounds, sample_id, side='right') - 1)
        vrow = int(sample_id - self._shard_bounds[shard_id])
        rows = self._shard_rows[shard_id]
        row = int(rows[vrow]) if rows is not None else vrow
        if self._shard_dtype[shard_id] is None:
            # Variable-size columns (an LLM Foundry corpus): streaming's own decoder, then our sample dict.
            shard = self.shards[shard_id]
            for _ in range(1 + retry):
                try:
                    raw = shard.get_item(row)
                    break
                except FileNotFoundError:
                    self.prepare_shard(shard_id)
            else:
                raise RuntimeError(f'shard {shard_id} could not be prepared after {retry} retries.')
            return self._decode_foreign(shard_id, raw, row, vrow)
        return self._decoder(shard_id).sample(row, vrow)

    def _decode_foreign(self, shard_id: int, raw: dict[str, Any], row: int, vrow: int) -> dict[str, Any]:
        """The sample dict of a row decoded by streaming: the same keys and types as :class:`_ShardDecoder`'s."""
        tokens = raw[TOKENS]
        if isinstance(tokens, (bytes, bytearray, memoryview)):
            dtype = self._token_dtype
            if len(tokens) % dtype.itemsize:
                raise ValueError(f'{self._shard_file(shard_id)}: sample {row}: `tokens` is {len(tokens)} bytes, '
                                 f'not a whole number of {dtype} ids; set token_encoding_type to the dtype the '
                                 f'corpus was written with (LLM Foundry\'s default: int64).')
            ids = np.frombuffer(tokens, dtype)
        else:
            ids = np.asarray(tokens)
            if ids.size == 0:
                ids = ids.astype(np.int64)
            if ids.ndim != 1 or ids.dtype.kind not in 'iu':
                raise ValueError(f'{self._shard_file(shard_id)}: sample {row}: `tokens` is not a 1-D array of '
                                 f'integer token ids (shape {ids.shape}, dtype {ids.dtype}).')
        if self.max_seq_len is not None:
            ids = ids[:self.max_seq_len]
        num_tokens = len(ids)
        if NUM_TOKENS in raw:
            num_tokens = min(int(raw[NUM_TOKENS]), num_tokens)
        remap = self._domain_remap[self.stream_per_shard[shard_id]]
        domain = int(raw[DOMAIN]) if DOMAIN in raw else 0
        if not 0 <= domain < len(remap):
            raise ValueError(_domain_error(self._shard_file(shard_id), row, domain,
                                           self.streams[self.stream_per_shard[shard_id]]))
        prior = self._shard_prior[shard_id]
        sample: dict[str, Any] = {
            'input_ids': ids,
            'num_tokens': num_tokens,
            'uid': int(raw[UID]) if UID in raw else self._shard_uid_base[shard_id] + row,
            'domain': int(remap[domain]),
            'prior_weight': prior.item(vrow) if prior is not None else 1.0,
        }
        if self.score_names:
            scores = np.full(len(self.score_names), np.nan, np.float32)
            for i, column in self._shard_score_cols[shard_id]:
                scores[i] = raw[column]
            for i, values in self._shard_sel_scores[shard_id]:
                scores[i] = values[vrow]
            sample['scores'] = scores
        return sample

    def _shard_file(self, shard_id: int) -> str:
        stream = self.streams[self.stream_per_shard[shard_id]]
        return os.path.join(_stream_location(stream), self.shards[shard_id].raw_data.basename)

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


def _domain_error(where: str, row: int, domain: int, stream: DWMStream) -> str:
    count = len(stream.meta.domains) if stream.meta else 1
    return (f'{where}: row {row} has domain id {domain}, but {stream.meta_file} lists {count} domain(s); restore '
            f'the dwm.json written with these shards, or re-run `dwm-stream convert`.')


class _ShardDecoder:
    """One mapped shard and what turning a row into a sample dict needs, as O(1) lookups.

    Per process (never pickled). ``sample`` is the whole per-sample cost of the read path: a row
    view of the token ids (zero-copy, into the page cache), four scalar reads and, when the
    corpus has scores, a view of the adjacent ``score_*`` columns (or a small array when a
    selection or another stream contributes scores). Columns an LLM Foundry corpus lacks are
    filled in: ``uid`` from the stream and row, ``num_tokens`` = ``seq_len``, domain 0 of the stream.
    """

    __slots__ = ('view', 'tokens', 'num_tokens', 'seq_len', 'uid', 'uid_base', 'domain', 'remap', 'prior',
                 'num_scores', 'score_block', 'score_cols', 'sel_scores', 'stream')

    def __init__(self, dataset: DWMDataset, shard_id: int, view: ShardView) -> None:
        cols = view.columns
        self.view = view
        tokens = cols[TOKENS]
        if dataset.max_seq_len is not None and dataset.max_seq_len < tokens.shape[1]:
            tokens = tokens[:, :dataset.max_seq_len]  # still a view
        self.tokens = tokens
        self.seq_len = int(tokens.shape[1])
        self.num_tokens = cols.get(NUM_TOKENS)
        self.uid = cols.get(UID)
        self.uid_base = dataset._shard_uid_base[shard_id]
        self.domain = cols.get(DOMAIN)
        self.stream = dataset.streams[dataset.stream_per_shard[shard_id]]
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
        num_tokens = self.num_tokens.item(row) if self.num_tokens is not None else self.seq_len
        return self._sample(row, vrow, num_tokens, self.uid.item(row))

    def _sample(self, row: int, vrow: int, num_tokens: int, uid: int) -> dict[str, Any]:
        try:
            sample: dict[str, Any] = {
                'input_ids': self.tokens[row],
                'num_tokens': num_tokens,
                'uid': uid,
                'domain': self.remap[self.domain.item(row) if self.domain is not None else 0],
                'prior_weight': self.prior.item(vrow) if self.prior is not None else 1.0,
            }
        except IndexError:  # a domain id that dwm.json does not name
            raise ValueError(_domain_error(self.view.filename, row, self.domain.item(row), self.stream)) from None
        if self.num_scores:
            self._add_scores(sample, row, vrow)
        return sample

    def _add_scores(self, sample: dict[str, Any], row: int, vrow: int) -> None:
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


class _FilledShardDecoder(_ShardDecoder):
    """A fixed-size shard without a ``uid`` column (an LLM Foundry corpus), or truncated by ``max_seq_len``.

    Kept apart so that the common case, a converted corpus read whole, pays nothing for it.
    """

    __slots__ = ()

    def sample(self, row: int, vrow: int) -> dict[str, Any]:
        num_tokens = self.num_tokens.item(row) if self.num_tokens is not None else self.seq_len
        uid = self.uid.item(row) if self.uid is not None else self.uid_base + row
        return self._sample(row, vrow, min(num_tokens, self.seq_len), uid)
