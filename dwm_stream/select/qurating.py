"""QuRating selection (Wettig et al. 2024) from score columns, and annotation with a local QuRater.

**Selection** (:func:`select_qurating`). QuRating rates each sample on four criteria
(:data:`CRITERIA`). Given one criterion's scores ``s`` (optionally z-scored over the corpus), samples
are drawn with probability ∝ ``softmax(s / tau)`` without replacement, by Gumbel-top-k, until the
token budget is filled; ``sample=False`` takes the top-k instead (the limit ``tau -> 0``). With
``per_domain``, the budget is split across domains by their token share and each domain is selected
separately (as QuRating selects within SlimPajama's domains). Scores come from the corpus's
``score_<criterion>`` columns (QuRatedPajama parquet converted by ``dwm-stream convert``), or from an
annotation file keyed by uid (:func:`annotate_qurating`).

**Annotation** (:func:`annotate_qurating`). A local QuRater-style HF sequence-classification model
with one output per criterion rates each sample: its valid tokens are cut into windows of at most
``window`` tokens, each window is rated, and the sample's rating is the mean over windows weighted by
their token counts. The annotation file is Parquet: ``uid`` and one ``score_<criterion>`` column per
model output, with the model and window in the ``dwm.annotation`` metadata.

If the model ships its own tokenizer and it differs from the corpus tokenizer, samples are decoded
with the corpus tokenizer and re-encoded with the model's; otherwise the token ids are used as they
are.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dwm_stream.convert.tokenizer import load_tokenizer
from dwm_stream.format.reader import CorpusReader
from dwm_stream.format.shards import SCORE_PREFIX, score_column
from dwm_stream.parallel import parallel_map
from dwm_stream.progress import Progress, track
from dwm_stream.select import pipeline

__all__ = ['CRITERIA', 'qurating_logits', 'window_bounds', 'token_weighted_mean', 'read_annotations',
           'select_qurating', 'QuRatingReport', 'annotate_qurating', 'AnnotateReport']

CRITERIA = ('writing_style', 'required_expertise', 'facts_and_trivia', 'educational_value')
_ANNOTATION_META_KEY = b'dwm.annotation'


# ----------------------------------------------------------------------------------------------
# Pure functions.


def qurating_logits(scores: np.ndarray, tau: float, zscore: bool = False) -> np.ndarray:
    """``s / tau`` (float64), after z-scoring ``s`` over its finite values if asked; NaN stays NaN.

    Sampling ∝ ``exp`` of these logits is sampling ∝ ``softmax(s / tau)``.

    Raises:
        ValueError: If ``tau`` is not positive.
    """
    if not tau > 0:
        raise ValueError(f'--tau {tau}: the temperature must be > 0 (use --no-sample for top-k).')
    s = np.asarray(scores, np.float64)
    if zscore:
        finite = s[np.isfinite(s)]
        std = finite.std() if len(finite) else 0.0
        s = (s - (finite.mean() if len(finite) else 0.0)) / (std if std > 0 else 1.0)
    return s / tau


def window_bounds(num_tokens: int, window: int) -> list[tuple[int, int]]:
    """``[begin, end)`` of consecutive windows of at most ``window`` tokens covering ``num_tokens``."""
    return [(b, min(b + window, num_tokens)) for b in range(0, num_tokens, window)]


def token_weighted_mean(window_logits: np.ndarray, window_tokens: np.ndarray) -> np.ndarray:
    """A sample's ratings: the windows' ``[num_windows, num_labels]`` outputs averaged by token count."""
    w = np.asarray(window_tokens, np.float64)
    return (np.asarray(window_logits, np.float64) * w[:, None]).sum(0) / w.sum()


# ----------------------------------------------------------------------------------------------
# Scores of a corpus.


def _columns_task(task: dict[str, Any]) -> dict[str, np.ndarray]:
    records = task['reader'].read_shard(task['shard'])
    out = {'num_tokens': records['num_tokens'].astype(np.int64), 'domain': records['domain'].astype(np.int64)}
    if task['column'] is not None:
        out['score'] = records[task['column']].astype(np.float64)
    return out


def read_annotations(path: str, criterion: str, corpus_uids: np.ndarray, corpus: str) -> np.ndarray:
    """One criterion's scores from an annotation file, aligned with ``corpus_uids`` (NaN where unrated).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the column is missing, or the file names uids that the corpus does not have.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f'--annotations {path} does not exist; write it with `dwm-stream annotate qurating`.')
    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise ValueError(f'--annotations {path}: not a Parquet file ({e}).') from e
    column = score_column(criterion)
    if 'uid' not in names or column not in names:
        have = [n[len(SCORE_PREFIX):] for n in names if n.startswith(SCORE_PREFIX)]
        raise ValueError(f'--annotations {path}: no `{column}` column (criteria there: {have}); pick '
                         f'--criterion from those, or annotate with a model that rates {criterion!r}.')
    table = pq.read_table(path, columns=['uid', column])
    uids = table.column('uid').to_numpy().astype(np.int64)
    values = table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    order = np.argsort(corpus_uids, kind='stable')
    pos = np.minimum(np.searchsorted(corpus_uids[order], uids), len(order) - 1)
    found = corpus_uids[order][pos] == uids
    if not found.all():
        missing = uids[~found]
        raise ValueError(f'--annotations {path}: {len(missing)} of {len(uids)} uid(s) are not in the corpus '
                         f'{corpus}, e.g. {missing[:5].tolist()}; annotate this corpus.')
    scores = np.full(len(corpus_uids), np.nan)
    scores[order[pos]] = values
    return scores


@dataclass
class QuRatingReport(pipeline.SelectionReport):
    """What :func:`select_qurating` did (``selected`` and ``scores`` index the corpus's samples).

    Args:
        out, candidates, selected, materialized: As :class:`~dwm_stream.select.pipeline.SelectionReport`.
        criterion (str): The criterion selected by.
        tau (float): The temperature.
        sample (bool): Gumbel-top-k sampling rather than top-k.
        per_domain (bool): The budget was split across domains.
        budget_tokens (int): The budget.
        scores (np.ndarray): float64 [n], the criterion of every sample (NaN: unrated).
        unrated (int): Samples without a rating (never selected).
        seconds (float): Wall time.
    """
    criterion: str
    tau: float
    sample: bool
    per_domain: bool
    budget_tokens: int
    scores: np.ndarray
    unrated: int
    seconds: float = 0.0

    def __str__(self) -> str:
        how = f'sampled ∝ softmax(score/{self.tau:g})' if self.sample else 'top-k'
        num_tokens = self.candidates.num_tokens
        tokens = int(num_tokens[self.selected].sum())
        lines = [f'QuRating {self.criterion}: {how}{" per domain" if self.per_domain else ""}, '
                 f'{len(self.selected):,} of {len(num_tokens):,} samples, {tokens:,} tokens '
                 f'(budget {self.budget_tokens:,}) -> {self.out} in {self.seconds:.1f}s',
                 f'  mean {self.criterion}: corpus {np.nanmean(self.scores):.3f}, '
                 f'selected {np.nanmean(self.scores[self.selected]):.3f}']
        if self.unrated:
            lines.append(f'  {self.unrated:,} samples without a rating were not eligible')
        return '\n'.join(lines + self.share_lines('corpus'))


def select_qurating(corpus: str,
                    criterion: str,
                    out: str,
                    budget_tokens: int,
                    tau: float = 2.0,
                    sample: bool = True,
                    per_domain: bool = False,
                    zscore: bool = False,
                    annotations: Optional[str] = None,
                    seed: int = 0,
                    workers: int = 1,
                    materialize: Optional[str] = None,
                    overwrite: bool = False,
                    progress: bool = False) -> QuRatingReport:
    """Select samples of a corpus by one QuRating criterion to a token budget; write a selection file.

    The steps after scoring are :mod:`dwm_stream.select.pipeline`'s.

    Args:
        corpus (str): A converted corpus (local or ``s3://``).
        criterion (str): The score, e.g. ``educational_value``.
        out (str): The selection file to write.
        budget_tokens (int): Token budget.
        tau (float): Temperature of ``softmax(score / tau)``. Default: ``2.0``.
        sample (bool): Gumbel-top-k sampling; ``False``: top-k. Default: ``True``.
        per_domain (bool): Split the budget across domains by token share. Default: ``False``.
        zscore (bool): Z-score the scores over the corpus first. Default: ``False``.
        annotations (str, optional): An annotation file; default: the corpus's score columns.
        seed (int): Seed of the sampling. Default: ``0``.
        workers (int): Processes reading shards. Default: ``1``.
        materialize (str, optional): Also write the subset as an MDS corpus there. Default: ``None``.
        overwrite (bool): Replace an existing ``out`` / ``materialize``. Default: ``False``.
        progress (bool): Progress on stderr. Default: ``False``.

    Raises:
        ValueError: A missing score column (naming the corpus or file and the scores it has), a
            budget larger than the corpus, or annotations naming unknown uids.
    """
    start = time.perf_counter()
    pipeline.check_request(out, budget_tokens, overwrite)
    reader = CorpusReader(corpus)
    column = None
    if annotations is None:
        if criterion not in reader.meta.score_names:
            raise ValueError(f'--corpus {corpus}: no score column `{score_column(criterion)}` (its scores: '
                             f'{reader.meta.score_names or "none"}). Convert QuRatedPajama parquet, or rate '
                             f'the corpus with `dwm-stream annotate qurating` and pass --annotations.')
        column = score_column(criterion)
    qurating_logits(np.zeros(1), tau)  # validate tau before reading the corpus
    tasks = [{'reader': reader, 'shard': s, 'column': column} for s in range(len(reader.shards))]
    parts = list(parallel_map(_columns_task, tasks, workers, Progress('qurating read', len(tasks), 'shards', progress)))
    candidates = pipeline.Candidates(corpus=corpus, unit='sample', uids=reader.uids,
                                     num_tokens=np.concatenate([p['num_tokens'] for p in parts]),
                                     domain=np.concatenate([p['domain'] for p in parts]),
                                     domain_names=list(reader.meta.domains))
    if annotations is None:
        scores = np.concatenate([p['score'] for p in parts])
    else:
        scores = read_annotations(annotations, criterion, reader.uids, corpus)
    unrated = int(np.sum(~np.isfinite(scores)))
    scores = np.where(np.isfinite(scores), scores, np.nan)
    selected = pipeline.choose(candidates, qurating_logits(scores, tau, zscore), budget_tokens, sample, seed,
                               per_domain=per_domain, what=f'--corpus {corpus}')
    info = {'selector': 'qurating', 'corpus': corpus, 'criterion': criterion, 'tau': tau, 'sample': sample,
            'per_domain': per_domain, 'zscore': zscore, 'annotations': annotations,
            'budget_tokens': budget_tokens, 'seed': seed}
    extra = {}
    if annotations is not None:  # the shards lack these scores: carry every rated criterion for DWM's analysis
        names = [n[len(SCORE_PREFIX):] for n in pq.ParquetFile(annotations).schema_arrow.names
                 if n.startswith(SCORE_PREFIX)]
        for name in names:
            values = scores if name == criterion else read_annotations(annotations, name, reader.uids, corpus)
            extra[name] = values[selected].astype(np.float32)
    materialized = pipeline.write(candidates, selected, out, info, scores=extra, materialize=materialize,
                                  overwrite=overwrite, progress=progress)
    return QuRatingReport(out=out, candidates=candidates, selected=selected, materialized=materialized,
                          criterion=criterion, tau=tau, sample=sample, per_domain=per_domain,
                          budget_tokens=budget_tokens, scores=scores, unrated=unrated,
                          seconds=time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------
# Annotation with a local QuRater-style model.


@dataclass
class AnnotateReport:
    """What :func:`annotate_qurating` wrote."""
    out: str
    num_samples: int
    num_windows: int
    labels: list[str]
    reencoded: bool
    seconds: float

    def __str__(self) -> str:
        rate = self.num_samples / self.seconds if self.seconds else 0.0
        how = 're-encoded with the model tokenizer' if self.reencoded else 'corpus token ids used as is'
        return (f'annotated {self.num_samples:,} samples ({self.num_windows:,} windows; {how}) with criteria '
                f'{self.labels} -> {self.out} in {self.seconds:.1f}s ({rate:,.1f} samples/s)')


def _has_tokenizer(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ('tokenizer.json', 'tokenizer_config.json'))


def annotate_qurating(model: str,
                      corpus: str,
                      out: str,
                      labels: Sequence[str] = CRITERIA,
                      tokenizer: Optional[str] = None,
                      window: int = 512,
                      batch_size: int = 16,
                      device: Optional[str] = None,
                      overwrite: bool = False,
                      progress: bool = False) -> AnnotateReport:
    """Rate every sample of a corpus with a local sequence-classification model; write an annotation file.

    Args:
        model (str): A local HF model directory (``AutoModelForSequenceClassification``) with one output
            per label.
        corpus (str): A converted corpus (local or ``s3://``).
        out (str): The annotation Parquet file to write (``uid`` + ``score_<label>``).
        labels (Sequence[str]): The criteria, in the model's output order. Default: :data:`CRITERIA`.
        tokenizer (str, optional): The model's tokenizer; default: the model directory's, if it has
            one, else the corpus token ids are fed as they are.
        window (int): Tokens per window. Default: ``512``.
        batch_size (int): Windows per forward pass. Default: ``16``.
        device (str, optional): Torch device; default ``cuda`` when available, else ``cpu``.
        overwrite (bool): Replace an existing ``out``. Default: ``False``.
        progress (bool): A progress bar over shards. Default: ``False``.

    Raises:
        FileNotFoundError: If the model directory does not exist.
        ValueError: If the model's number of outputs differs from ``labels``, or token ids exceed its
            vocabulary.
    """
    # torch and transformers load in seconds and only annotation needs them: imported here.
    import torch
    from transformers import AutoModelForSequenceClassification

    start = time.perf_counter()
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f'--out {out} already exists; pass --overwrite to replace it.')
    if not os.path.isdir(model):
        raise FileNotFoundError(f'--model {model}: not a local model directory (a QuRater-style '
                                'AutoModelForSequenceClassification saved with save_pretrained).')
    if window < 1 or batch_size < 1:
        raise ValueError(f'--window {window} and --batch-size {batch_size} must be >= 1.')
    reader = CorpusReader(corpus)
    net = AutoModelForSequenceClassification.from_pretrained(model, local_files_only=True)
    labels = list(labels)
    if net.config.num_labels != len(labels):
        raise ValueError(f'--model {model}: has {net.config.num_labels} outputs but {len(labels)} labels '
                         f'{labels} were given; pass --labels with one name per output.')
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    net.to(device).eval()
    # Windows are batched by equal length, so nothing is padded: make "last non-pad token" pooling
    # (decoder classifiers) pick each window's last token.
    net.config.pad_token_id = -1
    corpus_tok = load_tokenizer(reader.meta.tokenizer) if (tokenizer or _has_tokenizer(model)) else None
    model_tok = load_tokenizer(tokenizer or model) if corpus_tok is not None else None
    reencode = model_tok is not None and model_tok.get_vocab() != corpus_tok.get_vocab()
    vocab_size = getattr(net.config, 'vocab_size', None)

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    schema = pa.schema([('uid', pa.int64())] + [(score_column(n), pa.float32()) for n in labels])
    meta = {_ANNOTATION_META_KEY: json.dumps({'model': os.path.abspath(model), 'labels': labels,
                                              'window': window, 'reencoded': reencode,
                                              'corpus': corpus}).encode()}
    tmp = out + '.tmp'
    num_windows = 0
    shards = track(range(len(reader.shards)), 'annotate', unit='shards', enabled=progress)
    with pq.ParquetWriter(tmp, schema.with_metadata(meta)) as writer:
        for s in shards:
            records = reader.read_shard(s)
            samples = reader.valid_tokens(records)
            if reencode:
                texts = corpus_tok.batch_decode([t.tolist() for t in samples], skip_special_tokens=True)
                samples = [np.array(ids, np.int64) for ids in model_tok(texts)['input_ids']]
            windows = []  # (sample, begin, end)
            for i, ids in enumerate(samples):
                if vocab_size is not None and len(ids) and int(ids.max()) >= vocab_size:
                    raise ValueError(f'--model {model}: token id {int(ids.max())} of corpus sample uid '
                                     f'{int(records["uid"][i])} is outside its vocabulary ({vocab_size}); '
                                     'pass --tokenizer with the model\'s tokenizer.')
                windows += [(i, b, e) for b, e in window_bounds(len(ids), window)]
            num_windows += len(windows)
            sums = np.zeros((len(samples), len(labels)))
            weights = np.zeros(len(samples))
            windows.sort(key=lambda w: w[2] - w[1])
            k = 0
            while k < len(windows):
                length = windows[k][2] - windows[k][1]
                group = [windows[k]]
                while (k + len(group) < len(windows) and len(group) < batch_size
                       and windows[k + len(group)][2] - windows[k + len(group)][1] == length):
                    group.append(windows[k + len(group)])
                k += len(group)
                batch = torch.tensor(np.stack([samples[i][b:e].astype(np.int64) for i, b, e in group]),
                                     device=device)
                with torch.no_grad():
                    logits = net(input_ids=batch, attention_mask=torch.ones_like(batch)).logits.float().cpu().numpy()
                for (i, _, _), row in zip(group, logits):
                    sums[i] += row * length
                    weights[i] += length
            ratings = sums / np.maximum(weights, 1)[:, None]
            ratings[weights == 0] = np.nan  # an empty sample has no rating
            columns = [pa.array(records['uid'].astype(np.int64))]
            columns += [pa.array(ratings[:, j].astype(np.float32)) for j in range(len(labels))]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema.with_metadata(meta)))
    os.replace(tmp, out)
    return AnnotateReport(out=out, num_samples=len(reader), num_windows=num_windows, labels=labels,
                          reencoded=reencode, seconds=time.perf_counter() - start)
