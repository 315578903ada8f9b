"""DSIR: data selection with importance resampling on hashed n-gram features (Xie et al. 2023).

The method, as in the reference implementation (``data_selection.HashedNgramDSIR``, which a test
checks this module against, weight for weight):

1. **Features.** A text is lower-cased and split by word-punct tokenization (``\\w+|[^\\w\\s]+``,
   nltk's ``WordPunctTokenizer``). Its unigrams and bigrams (``n``-grams up to ``ngrams``, joined by
   a space) are hashed into ``num_buckets`` buckets with ``sha256(ngram) mod num_buckets``; the
   feature vector counts the n-grams per bucket.
2. **Distributions.** The bucket counts summed over the target texts, and over the raw corpus,
   normalised to probabilities ``p_target`` and ``p_raw``.
3. **Importance.** ``log_ratio = log(p_target + 1e-8) - log(p_raw + 1e-8)``; a sample's log
   importance weight is ``log_ratio · counts``. Divided by the sample's number of words, it is the
   per-token score ``score_dsir`` stored in the selection.
4. **Selection.** To a token budget: top-k by log importance, or sampling ∝ importance weight
   without replacement (Gumbel-top-k, as the reference's ``resample``); see :mod:`dwm_stream.select.budget`.

Pure functions (:func:`word_punct_tokenize`, :class:`NgramHasher`, :func:`hashed_ngram_counts`,
:func:`log_ratio`, :func:`log_importance`, :func:`per_token_score`, :func:`importance_prior`) come
first; :func:`compute_dsir` and :func:`select_dsir` stream a raw corpus through them in parallel:

* an MDS corpus (``dwm-stream convert`` output, local or ``s3://``): each sample's valid tokens are
  decoded with the corpus tokenizer named in ``dwm.json`` (or a given one); a unit is one packed
  sample, named by its ``uid``. Tasks are shards.
* SlimPajama ``.jsonl.zst`` files (local): a unit is one document, named
  ``make_uid(relpath, line)``; tokens are counted with ``tokenizer`` if given, else as words. Tasks
  are files. Such a selection names documents, not MDS samples: materialise it (``.jsonl.zst``) and
  convert the result.

Two passes over the raw corpus (fit ``p_raw``, then score), one task per shard or file, each task
holding one shard or one document at a time, so memory is bounded by the shard size plus one
float per sample.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from dwm_stream.convert.sources import read_jsonl_zst
from dwm_stream.convert.tokenizer import load_tokenizer
from dwm_stream.format.reader import CorpusReader
from dwm_stream.format.shards import make_uid
from dwm_stream.format.storage import is_remote
from dwm_stream.parallel import parallel_map
from dwm_stream.progress import Progress
from dwm_stream.select import pipeline

__all__ = [
    'DEFAULT_NGRAMS', 'DEFAULT_NUM_BUCKETS', 'SMOOTHING', 'word_punct_tokenize', 'hash_bucket',
    'NgramHasher', 'hashed_ngram_counts', 'log_ratio', 'log_importance', 'per_token_score',
    'importance_prior', 'DSIRScores', 'DSIRReport', 'compute_dsir', 'select_dsir', 'iter_target_texts',
]

DEFAULT_NGRAMS = 2
DEFAULT_NUM_BUCKETS = 10_000
SMOOTHING = 1e-8  # the reference's additive smoothing inside both logs
_WORD_PUNCT = re.compile(r'\w+|[^\w\s]+', re.UNICODE | re.MULTILINE | re.DOTALL)  # nltk WordPunctTokenizer
_HASH_CACHE_SIZE = 1 << 20  # memoised n-gram -> bucket entries per process
_DECODE_BATCH = 256


# ----------------------------------------------------------------------------------------------
# Pure functions.


def word_punct_tokenize(text: str) -> list[str]:
    """Lower-case and split into runs of word characters and runs of punctuation."""
    return _WORD_PUNCT.findall(text.lower())


def hash_bucket(ngram: str, num_buckets: int) -> int:
    """The reference's bucket: ``int(sha256(ngram).hexdigest(), 16) % num_buckets``."""
    return int.from_bytes(hashlib.sha256(ngram.encode('utf-8')).digest(), 'big') % num_buckets


class NgramHasher:
    """Text -> bucket id of each of its hashed n-gram features, with a bounded memo of n-grams.

    Args:
        ngrams (int): Largest n; ``2`` means unigrams and bigrams. Default: ``2``.
        num_buckets (int): Hash buckets. Default: ``10000``.
        cache_size (int): Memoised n-grams before the memo is cleared. Default: ``2**20``.
    """

    def __init__(self, ngrams: int = DEFAULT_NGRAMS, num_buckets: int = DEFAULT_NUM_BUCKETS,
                 cache_size: int = _HASH_CACHE_SIZE) -> None:
        if ngrams < 1 or num_buckets < 1:
            raise ValueError(f'ngrams ({ngrams}) and num_buckets ({num_buckets}) must be >= 1.')
        self.ngrams = ngrams
        self.num_buckets = num_buckets
        self.cache_size = cache_size
        self._cache: dict[str, int] = {}

    def _bucket(self, ngram: str) -> int:
        b = self._cache.get(ngram)
        if b is None:
            if len(self._cache) >= self.cache_size:
                self._cache.clear()
            b = self._cache[ngram] = hash_bucket(ngram, self.num_buckets)
        return b

    def __call__(self, text: str) -> tuple[np.ndarray, int]:
        """``(buckets, num_words)``: int64 bucket of every unigram, then every bigram, ...; word count."""
        words = word_punct_tokenize(text)
        bucket = self._bucket
        ids = [bucket(w) for w in words]
        for n in range(2, self.ngrams + 1):
            ids += [bucket(' '.join(words[i:i + n])) for i in range(len(words) - n + 1)]
        return np.array(ids, np.int64), len(words)

    def counts(self, text: str) -> np.ndarray:
        """The dense feature vector: int64 [num_buckets] n-gram counts per bucket."""
        return np.bincount(self(text)[0], minlength=self.num_buckets)


def hashed_ngram_counts(text: str, ngrams: int = DEFAULT_NGRAMS,
                        num_buckets: int = DEFAULT_NUM_BUCKETS) -> np.ndarray:
    """DSIR's feature vector of one text: int64 [num_buckets] (the reference's ``get_ngram_counts``)."""
    return NgramHasher(ngrams, num_buckets).counts(text)


def log_ratio(target_counts: np.ndarray, raw_counts: np.ndarray, smoothing: float = SMOOTHING) -> np.ndarray:
    """``log(p_target + s) - log(p_raw + s)`` per bucket, from summed bucket counts (float64).

    Raises:
        ValueError: If either distribution has no features.
    """
    target_counts = np.asarray(target_counts, np.float64)
    raw_counts = np.asarray(raw_counts, np.float64)
    if target_counts.sum() <= 0:
        raise ValueError('the target texts have no n-gram features (empty target).')
    if raw_counts.sum() <= 0:
        raise ValueError('the raw corpus has no n-gram features (empty raw corpus).')
    p_target = target_counts / target_counts.sum()
    p_raw = raw_counts / raw_counts.sum()
    return np.log(p_target + smoothing) - np.log(p_raw + smoothing)


def log_importance(buckets: np.ndarray, log_ratio_: np.ndarray) -> float:
    """A sample's log importance weight ``log_ratio · counts`` from its feature buckets."""
    return float(log_ratio_[buckets].sum())


def per_token_score(log_weight: np.ndarray, num_words: np.ndarray) -> np.ndarray:
    """Log importance per word (0 for a sample without words): comparable across sample lengths."""
    num_words = np.asarray(num_words, np.float64)
    return np.where(num_words > 0, np.asarray(log_weight, np.float64) / np.maximum(num_words, 1), 0.0)


def importance_prior(per_token: np.ndarray) -> np.ndarray:
    """Prior weights from per-token log importance: ``exp(score)`` normalised to mean 1 (float32)."""
    per_token = np.asarray(per_token, np.float64)
    w = np.exp(per_token - per_token.max())
    return (w / w.mean()).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Texts: targets and raw documents.

_TARGET_SUFFIXES = ('.jsonl.zst', '.jsonl', '.json', '.txt')


def _target_files(path: str) -> list[str]:
    if os.path.isdir(path):
        found = []
        for d, _, files in os.walk(path):
            found += [os.path.join(d, f) for f in files if f.endswith(_TARGET_SUFFIXES)]
        return sorted(found)
    if not os.path.exists(path):
        raise FileNotFoundError(f'--target {path}: no such file or directory.')
    if not path.endswith(_TARGET_SUFFIXES):
        raise ValueError(f'--target {path}: unknown file type; give .jsonl.zst (SlimPajama), .jsonl '
                         '(`text`, or LAMBADA `context`+`continuation`), .txt, or a directory of them.')
    return [path]


def iter_target_texts(path: str, domains: Optional[Sequence[str]] = None) -> Iterator[str]:
    """The texts of one target file.

    ``.jsonl.zst``: SlimPajama documents (only ``domains`` when given); ``.jsonl``: each line's
    ``text``, or ``context + continuation`` (LAMBADA format); ``.txt``: the whole file.
    """
    if path.endswith('.jsonl.zst'):
        for doc in read_jsonl_zst(path):
            if domains is None or doc.domain in domains:
                yield doc.text
    elif path.endswith(('.jsonl', '.json')):
        with open(path, encoding='utf-8') as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f'--target {path}:{line_no}: not valid JSON ({e}).') from e
                if isinstance(obj, dict) and isinstance(obj.get('text'), str):
                    yield obj['text']
                elif isinstance(obj, dict) and 'context' in obj and 'continuation' in obj:
                    yield str(obj['context']) + str(obj['continuation'])
                else:
                    raise ValueError(f'--target {path}:{line_no}: expected an object with `text`, or '
                                     '`context` and `continuation`.')
    else:
        with open(path, encoding='utf-8') as f:
            yield f.read()


_HASHERS: dict[tuple[int, int], NgramHasher] = {}
_TOKENIZERS: dict[str, Any] = {}


def _hasher(ngrams: int, num_buckets: int) -> NgramHasher:
    key = (ngrams, num_buckets)
    if key not in _HASHERS:
        _HASHERS[key] = NgramHasher(ngrams, num_buckets)
    return _HASHERS[key]


def _tokenizer(name: str):
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = load_tokenizer(name)
    return _TOKENIZERS[name]


def _mds_texts(reader: CorpusReader, records: np.ndarray, tokenizer: str) -> Iterator[str]:
    tok = _tokenizer(tokenizer)
    rows = reader.valid_tokens(records)
    for begin in range(0, len(rows), _DECODE_BATCH):
        batch = [r.tolist() for r in rows[begin:begin + _DECODE_BATCH]]
        yield from tok.batch_decode(batch, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------
# Tasks (run in worker processes). 'count': summed bucket counts; 'score': per-unit log weights.


def _count_texts(texts: Iterator[str], hasher: NgramHasher, limit: Optional[int]) -> np.ndarray:
    counts = np.zeros(hasher.num_buckets, np.int64)
    total = 0
    for text in texts:
        buckets, _ = hasher(text)
        counts += np.bincount(buckets, minlength=hasher.num_buckets)
        total += len(buckets)
        if limit is not None and total > limit:
            break
    return counts


def _target_task(task: dict[str, Any]) -> np.ndarray:
    hasher = _hasher(task['ngrams'], task['num_buckets'])
    return _count_texts(iter_target_texts(task['path'], task['domains']), hasher, None)


def _mds_task(task: dict[str, Any]) -> dict[str, Any]:
    reader: CorpusReader = task['reader']
    hasher = _hasher(task['ngrams'], task['num_buckets'])
    records = reader.read_shard(task['shard'])
    texts = _mds_texts(reader, records, task['tokenizer'])
    if task['mode'] == 'count':
        return {'counts': _count_texts(texts, hasher, task['limit'])}
    lr = task['log_ratio']
    log_weight = np.empty(len(records), np.float64)
    num_words = np.empty(len(records), np.int64)
    for i, text in enumerate(texts):
        buckets, num_words[i] = hasher(text)
        log_weight[i] = lr[buckets].sum()
    return {'log_weight': log_weight, 'num_words': num_words,
            'num_tokens': records['num_tokens'].astype(np.int64), 'domain': records['domain'].astype(np.int64)}


def _jsonl_task(task: dict[str, Any]) -> dict[str, Any]:
    hasher = _hasher(task['ngrams'], task['num_buckets'])
    docs = read_jsonl_zst(task['path'], name=task['relpath'])
    if task['mode'] == 'count':
        return {'counts': _count_texts((d.text for d in docs), hasher, task['limit'])}
    lr = task['log_ratio']
    tok = _tokenizer(task['tokenizer']) if task['tokenizer'] else None
    log_weight, num_words, uids, num_tokens, domains = [], [], [], [], []
    for doc in docs:
        buckets, words = hasher(doc.text)
        log_weight.append(lr[buckets].sum())
        num_words.append(words)
        uids.append(make_uid(task['relpath'], doc.line))
        num_tokens.append(len(tok(doc.text)['input_ids']) + 1 if tok is not None else words)  # + EOS
        domains.append(doc.domain)
    return {'log_weight': np.array(log_weight, np.float64), 'num_words': np.array(num_words, np.int64),
            'uids': np.array(uids, np.int64), 'num_tokens': np.array(num_tokens, np.int64),
            'domains': domains}


# ----------------------------------------------------------------------------------------------
# The pipeline.


@dataclass
class DSIRScores:
    """DSIR log importance weights of every unit (MDS sample or document) of a raw corpus.

    Args:
        raw (str): The raw corpus.
        unit (str): ``'sample'`` (MDS) or ``'document'`` (``.jsonl.zst``).
        uids (np.ndarray): int64 [n], the unit ids.
        log_weight (np.ndarray): float64 [n], log importance weights.
        num_words (np.ndarray): int64 [n], word-punct words.
        num_tokens (np.ndarray): int64 [n], tokens (MDS: ``num_tokens``; documents: tokenizer or words).
        domain (np.ndarray): int64 [n], index into ``domain_names``.
        domain_names (list[str]): Domain names.
        log_ratio (np.ndarray): float64 [num_buckets], the fitted log ratio.
        raw_features (int): n-gram features counted to fit ``p_raw``.
        target_features (int): n-gram features of the target.
        seconds_fit (float): Time of the fitting passes (target and raw).
        seconds_score (float): Time of the scoring pass.
        sources (list[str]): ``.jsonl.zst`` files relative to ``raw`` (document unit only).
        ngrams (int): Largest n-gram.
    """
    raw: str
    unit: str
    uids: np.ndarray
    log_weight: np.ndarray
    num_words: np.ndarray
    num_tokens: np.ndarray
    domain: np.ndarray
    domain_names: list[str]
    log_ratio: np.ndarray
    raw_features: int = 0
    target_features: int = 0
    seconds_fit: float = 0.0
    seconds_score: float = 0.0
    sources: list[str] = field(default_factory=list)
    ngrams: int = DEFAULT_NGRAMS

    @property
    def per_token(self) -> np.ndarray:
        return per_token_score(self.log_weight, self.num_words)

    @property
    def features_per_second(self) -> float:
        """Raw n-gram features hashed per second in the scoring pass."""
        features = sum(int(np.maximum(self.num_words - k + 1, 0).sum()) for k in range(1, self.ngrams + 1))
        return features / self.seconds_score if self.seconds_score else 0.0

    def candidates(self) -> pipeline.Candidates:
        """The scored units, as the shared selection pipeline takes them."""
        return pipeline.Candidates(corpus=self.raw, unit=self.unit, uids=self.uids, num_tokens=self.num_tokens,
                                   domain=self.domain, domain_names=self.domain_names, sources=self.sources)


def _is_mds(raw: str) -> bool:
    if is_remote(raw):
        return True  # only MDS corpora are read from object storage
    return os.path.isfile(os.path.join(raw, 'index.json'))


def _jsonl_sources(raw: str) -> list[str]:
    if os.path.isfile(raw):
        return [os.path.basename(raw)] if raw.endswith('.jsonl.zst') else []
    if not os.path.isdir(raw):
        raise FileNotFoundError(f'--raw {raw}: no such file or directory.')
    found = []
    for d, _, files in os.walk(raw):
        found += [os.path.relpath(os.path.join(d, f), raw) for f in files if f.endswith('.jsonl.zst')]
    return sorted(p.replace(os.sep, '/') for p in found)


def compute_dsir(raw: str,
                 targets: Sequence[str],
                 tokenizer: Optional[str] = None,
                 ngrams: int = DEFAULT_NGRAMS,
                 num_buckets: int = DEFAULT_NUM_BUCKETS,
                 workers: int = 1,
                 raw_fit_features: Optional[int] = None,
                 target_domains: Optional[Sequence[str]] = None,
                 progress: bool = False) -> DSIRScores:
    """Fit DSIR on a raw corpus and a target, and score every unit of the raw corpus.

    Args:
        raw (str): An MDS corpus (local or ``s3://``), or a local ``.jsonl.zst`` file or directory.
        targets (Sequence[str]): Target files or directories (see :func:`iter_target_texts`).
        tokenizer (str, optional): MDS: decode with it instead of ``dwm.json``'s tokenizer;
            ``.jsonl.zst``: count tokens with it (else words count as tokens). Default: ``None``.
        ngrams (int): Largest n-gram. Default: ``2``.
        num_buckets (int): Hash buckets. Default: ``10000``.
        workers (int): Processes over shards / files. Default: ``1``.
        raw_fit_features (int, optional): Fit ``p_raw`` on about this many n-gram features (split
            evenly over shards / files) instead of all. Default: ``None`` (all).
        target_domains (Sequence[str], optional): Keep only these SlimPajama domains of
            ``.jsonl.zst`` targets. Default: ``None`` (all).
        progress (bool): Progress bars. Default: ``False``.

    Raises:
        ValueError: An empty target or raw corpus, or a corpus that cannot be decoded.
        FileNotFoundError: A missing raw corpus or target.
    """
    if not targets:
        raise ValueError('--target: give at least one target file or directory (the text to select toward).')
    start = time.perf_counter()
    target_files = []
    for path in targets:
        files = _target_files(path)
        if not files:
            raise ValueError(f'--target {path}: holds no .jsonl.zst, .jsonl or .txt files (empty target).')
        target_files += files
    common = {'ngrams': ngrams, 'num_buckets': num_buckets}
    target_tasks = [{'path': p, 'domains': list(target_domains) if target_domains else None, **common}
                    for p in target_files]
    target_counts = sum(parallel_map(_target_task, target_tasks, workers,
                                     Progress('dsir target', len(target_tasks), 'files', progress)))
    if target_counts.sum() <= 0:
        what = f' in domains {list(target_domains)}' if target_domains else ''
        raise ValueError(f'--target {" ".join(targets)}: no text{what} (empty target); DSIR needs '
                         'example text of the distribution to select toward.')

    if _is_mds(raw):
        reader = CorpusReader(raw)
        tok = tokenizer or reader.meta.tokenizer
        if not len(reader):
            raise ValueError(f'--raw {raw}: the corpus has no samples.')
        _tokenizer(tok)  # fail early (and before forking) on an unusable tokenizer
        n_tasks = len(reader.shards)
        limit = None if raw_fit_features is None else max(1, raw_fit_features // n_tasks)
        tasks = [{'reader': reader, 'shard': s, 'tokenizer': tok, 'limit': limit, **common}
                 for s in range(n_tasks)]
        job = _mds_task
        task_unit = 'shards'
        sources: list[str] = []
    else:
        sources = _jsonl_sources(raw)
        if not sources:
            raise FileNotFoundError(f'--raw {raw}: neither an MDS corpus (index.json) nor .jsonl.zst files.')
        if tokenizer:
            _tokenizer(tokenizer)
        root = raw if os.path.isdir(raw) else os.path.dirname(raw)
        limit = None if raw_fit_features is None else max(1, raw_fit_features // len(sources))
        tasks = [{'path': os.path.join(root, r), 'relpath': r, 'tokenizer': tokenizer, 'limit': limit, **common}
                 for r in sources]
        job = _jsonl_task
        task_unit = 'files'
    raw_counts = sum(r['counts'] for r in parallel_map(job, [{**t, 'mode': 'count'} for t in tasks], workers,
                                                       Progress('dsir fit raw', len(tasks), task_unit, progress)))
    lr = log_ratio(target_counts, raw_counts)
    seconds_fit = time.perf_counter() - start

    start = time.perf_counter()
    results = list(parallel_map(job, [{**t, 'mode': 'score', 'log_ratio': lr} for t in tasks], workers,
                                Progress('dsir score', len(tasks), task_unit, progress)))
    seconds_score = time.perf_counter() - start
    log_weight = np.concatenate([r['log_weight'] for r in results])
    num_words = np.concatenate([r['num_words'] for r in results])
    if job is _mds_task:
        uids = reader.uids
        num_tokens = np.concatenate([r['num_tokens'] for r in results])
        domain = np.concatenate([r['domain'] for r in results])
        domain_names = list(reader.meta.domains)
        unit = 'sample'
    else:
        uids = np.concatenate([r['uids'] for r in results])
        num_tokens = np.concatenate([r['num_tokens'] for r in results])
        names = [d for r in results for d in r['domains']]
        domain_names = sorted(set(names))
        index = {d: i for i, d in enumerate(domain_names)}
        domain = np.array([index[d] for d in names], np.int64)
        unit = 'document'
    return DSIRScores(raw=raw, unit=unit, uids=uids, log_weight=log_weight, num_words=num_words,
                      num_tokens=num_tokens, domain=domain, domain_names=domain_names, log_ratio=lr,
                      raw_features=int(raw_counts.sum()), target_features=int(target_counts.sum()),
                      seconds_fit=seconds_fit, seconds_score=seconds_score, sources=sources, ngrams=ngrams)


@dataclass
class DSIRReport(pipeline.SelectionReport):
    """What :func:`select_dsir` did (``selected`` indexes ``scores``).

    Args:
        out, candidates, selected, materialized: As :class:`~dwm_stream.select.pipeline.SelectionReport`.
        scores (DSIRScores): The scores of every unit.
        budget_tokens (int | None): The budget (``None``: every unit kept).
        sample (bool): Gumbel-top-k sampling rather than top-k.
    """
    scores: DSIRScores
    budget_tokens: Optional[int]
    sample: bool

    def __str__(self) -> str:
        s = self.scores
        tokens = int(s.num_tokens[self.selected].sum())
        how = ('every unit (no budget)' if self.budget_tokens is None else
               f'{"Gumbel-top-k sampled" if self.sample else "top-k"} to {self.budget_tokens:,} tokens')
        lines = [f'DSIR over {s.raw} ({len(s.uids):,} {s.unit}s, {s.raw_features:,} raw / '
                 f'{s.target_features:,} target n-gram features; fit {s.seconds_fit:.1f}s, score '
                 f'{s.seconds_score:.1f}s, {s.features_per_second:,.0f} features/s)',
                 f'selected {len(self.selected):,} {s.unit}s, {tokens:,} tokens: {how} -> {self.out}']
        return '\n'.join(lines + self.share_lines('raw share'))


def select_dsir(raw: str,
                targets: Sequence[str],
                out: str,
                budget_tokens: Optional[int] = None,
                sample: bool = False,
                seed: int = 0,
                prior_weight: bool = False,
                min_words: int = 0,
                materialize: Optional[str] = None,
                overwrite: bool = False,
                tokenizer: Optional[str] = None,
                ngrams: int = DEFAULT_NGRAMS,
                num_buckets: int = DEFAULT_NUM_BUCKETS,
                workers: int = 1,
                raw_fit_features: Optional[int] = None,
                target_domains: Optional[Sequence[str]] = None,
                progress: bool = False) -> DSIRReport:
    """Score a raw corpus with DSIR, select to a token budget and write a selection file.

    The selection file has ``uid``, ``score_dsir`` (per-token log importance) and, with
    ``prior_weight``, ``prior_weight`` (:func:`importance_prior` over the selected units). The steps
    after scoring are :mod:`dwm_stream.select.pipeline`'s.

    Args:
        raw, targets, tokenizer, ngrams, num_buckets, workers, raw_fit_features, target_domains,
            progress: As :func:`compute_dsir`.
        out (str): The selection file to write (Parquet).
        budget_tokens (int, optional): Token budget; ``None`` keeps every unit (a score overlay).
            Default: ``None``.
        sample (bool): Gumbel-top-k sampling ∝ importance weight instead of top-k. Default: ``False``.
        seed (int): Seed of the sampling. Default: ``0``.
        prior_weight (bool): Store importance-derived prior weights. Default: ``False``.
        min_words (int): Units with fewer words are never selected (the reference uses 100).
            Default: ``0``.
        materialize (str, optional): Also write the selected subset there: an MDS corpus for an MDS
            raw corpus, ``.jsonl.zst`` files for a ``.jsonl.zst`` one. Default: ``None``.
        overwrite (bool): Replace an existing ``out`` / ``materialize``. Default: ``False``.
    """
    pipeline.check_request(out, budget_tokens, overwrite)
    scores = compute_dsir(raw, targets, tokenizer=tokenizer, ngrams=ngrams, num_buckets=num_buckets,
                          workers=workers, raw_fit_features=raw_fit_features, target_domains=target_domains,
                          progress=progress)
    candidates = scores.candidates()
    logits = np.where(scores.num_words >= min_words, scores.log_weight, np.nan)
    selected = pipeline.choose(candidates, logits, budget_tokens, sample, seed,
                               what=f'--raw {raw} ({scores.unit}s with >= {min_words} words)')
    per_token = scores.per_token[selected]
    info = {'selector': 'dsir', 'raw': raw, 'unit': scores.unit, 'targets': list(targets),
            'target_domains': list(target_domains) if target_domains else None, 'ngrams': ngrams,
            'num_buckets': num_buckets, 'budget_tokens': budget_tokens, 'sample': sample, 'seed': seed,
            'min_words': min_words, 'prior_weight': 'importance' if prior_weight else None,
            'token_unit': 'tokens' if scores.unit == 'sample' or tokenizer else 'words'}
    materialized = pipeline.write(candidates, selected, out, info, scores={'dsir': per_token.astype(np.float32)},
                                  prior_weight=importance_prior(per_token) if prior_weight else None,
                                  materialize=materialize, overwrite=overwrite, progress=progress)
    return DSIRReport(out=out, candidates=candidates, selected=selected, materialized=materialized, scores=scores,
                      budget_tokens=budget_tokens, sample=sample)
