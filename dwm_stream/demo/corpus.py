"""The embedded corpus: SlimPajama's on-disk format, built from text already on the machine.

Layout (exactly SlimPajama's, plus a LAMBADA-format file and a summary)::

    OUT/
      train/chunk1/example_train_0.jsonl.zst      chunk<c> holds up to FILES_PER_CHUNK files;
      train/chunk1/example_train_1.jsonl.zst      <K> counts from 0 within each chunk
      ...
      train/chunk2/example_train_0.jsonl.zst
      validation/chunk1/example_holdout_0.jsonl.zst
      lambada.jsonl                                {"context": ..., "continuation": ...} per line
      dwm_corpus.json                              what was built (CorpusInfo, minus timings)

Every line of a ``.jsonl.zst`` is ``{"text": ..., "meta": {"redpajama_set_name": ...}}`` and each
file mixes domains, as SlimPajama's do.

Domains (the real ones spelled as SlimPajama spells them; a domain whose sources are absent on the
machine is left out and its share goes to the others):

=========================== =================================================================
``RedPajamaBook``           the Python language/library reference prose in ``pydoc_data.topics``
``RedPajamaWikipedia``      stdlib docstrings, one article per module (module, class and function
                            docstrings, parsed with ``ast``; nothing is imported)
``RedPajamaGithub``         stdlib ``.py`` source files (``sysconfig.get_paths()['stdlib']``)
``RedPajamaCommonCrawl``    licence texts: ``/usr/share/common-licenses/*``, Python's
                            ``LICENSE.txt``, ``/usr/share/doc/*/copyright``
``DegradedShuffledWords``   training prose with its words shuffled within each document
``DegradedRandomTokens``    training documents of every real domain with each prose word replaced
                            by another word of similar frequency (one fixed cipher): real-looking
                            word counts, conflicting word order statistics
``DegradedScrambledLetters`` training documents of every real domain with the inner letters of each
                            word of 4 or more letters shuffled (first and last kept): the same letters,
                            conflicting subword statistics
=========================== =================================================================

Other corruption types (``corruptions='alt'``, for checking that a data weighting method transfers
to corruptions it was not tuned on; they replace the three degraded domains above, same shares):

=========================== =================================================================
``DegradedCharNoise``       training prose with 20% of its letters replaced by random letters
``DegradedRepeated``        one training prose paragraph repeated many times in a document
``DegradedFlattenedCode``   training code with every run of whitespace (newlines, indentation)
                            collapsed to one space
=========================== =================================================================

Held-out text. Each source item (a pydoc topic, a module, a source file, a licence file) is assigned
to train or held-out by a hash of its name (1 in ``HOLDOUT_EVERY``). ``train/`` is built only from
train items; ``validation/`` and ``lambada.jsonl`` only from held-out items. LAMBADA passages are
held-out prose paragraphs of 40-300 words whose context does not occur in any training document
(checked on word windows, see ``_LambadaCandidates``, since stdlib docstrings are also inside the
code and are sometimes copied between modules); ``context + continuation`` is the passage,
``continuation`` is its final word with a leading space (LLM Foundry's LAMBADA convention) and without trailing punctuation.

Size and repetition. ``size`` is the number of UTF-8 bytes of ``text`` in ``train/`` (validation
adds ``validation_size``, by default ``max(64 KiB, size / 50)``). The first pass over a domain
emits each train item once, in a
seeded random order, cut at paragraph (code: blank-line) boundaries into documents of at most
``MAX_DOC_CHARS``. When a domain needs more bytes than its sources hold (prose beyond a few MB, code
beyond ~30 MB), later passes emit seeded random windows of consecutive paragraphs of random items:
the text repeats, in different document boundaries. Degraded domains are generated, so never repeat.

Determinism. Everything random comes from ``random.Random`` seeded with strings derived from
``seed``; sources are listed in sorted order; files are compressed in one call with a fixed zstd
level. On the same machine (same Python and same files), the same ``seed`` and ``size`` give
byte-identical output.
"""

from __future__ import annotations

import ast
import collections
import functools
import glob
import hashlib
import json
import os
import random
import re
import sysconfig
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional, Union

from dwm_stream.convert.sources import write_jsonl_zst
from dwm_stream.progress import Progress

__all__ = [
    'build_corpus', 'CorpusInfo', 'parse_size', 'REAL_DOMAINS', 'DEGRADED_DOMAINS', 'DOMAINS',
    'DOMAIN_SHARES', 'FILES_PER_CHUNK', 'HOLDOUT_EVERY', 'MAX_DOC_CHARS', 'EOS_TEXT', 'split_lambada',
    'ALT_DEGRADED_DOMAINS', 'CORRUPTIONS', 'degraded_domains', 'domain_shares', 'RECIPE_VERSION',
]

REAL_DOMAINS = ('RedPajamaBook', 'RedPajamaWikipedia', 'RedPajamaGithub', 'RedPajamaCommonCrawl')
DEGRADED_DOMAINS = ('DegradedShuffledWords', 'DegradedRandomTokens', 'DegradedScrambledLetters')
DOMAINS = REAL_DOMAINS + DEGRADED_DOMAINS
ALT_DEGRADED_DOMAINS = ('DegradedCharNoise', 'DegradedRepeated', 'DegradedFlattenedCode')
CORRUPTIONS = ('standard', 'alt')
# Share of the corpus bytes per domain (renormalised over the domains that have sources).
DOMAIN_SHARES = {
    'RedPajamaBook': 0.10,
    'RedPajamaWikipedia': 0.25,
    'RedPajamaGithub': 0.25,
    'RedPajamaCommonCrawl': 0.20,
    'DegradedShuffledWords': 0.07,
    'DegradedRandomTokens': 0.06,
    'DegradedScrambledLetters': 0.07,
    'DegradedCharNoise': 0.07,
    'DegradedRepeated': 0.06,
    'DegradedFlattenedCode': 0.07,
}
FILES_PER_CHUNK = 4
HOLDOUT_EVERY = 10
MAX_DOC_CHARS = 32_000
LAMBADA_MAX_EXAMPLES = 500
_STDLIB = sysconfig.get_paths()['stdlib']
EOS_TEXT = '<|endoftext|>'  # documents containing it are skipped, so EOS splits documents exactly
_BUILD_VERSION = 1  # seeds every random choice: changing it changes every domain
# What the degraded domains are made of; recorded in dwm_corpus.json so that a cached corpus of an older recipe is
# rebuilt (2: DegradedRandomTokens became a word cipher of real documents; 3: the cipher swaps words of similar
# frequency only; 4: DegradedScrambledLetters, a character-level corruption, replaced DegradedBoilerplate: with
# word-level corruptions and boilerplate only, the selection oracle had no headroom on the standard corpus, issue 18).
RECIPE_VERSION = 4


def domain_shares(domains: Iterator[str] | list[str], degraded_share: Optional[float] = None) -> dict[str, float]:
    """Share of the corpus bytes of each of ``domains``, summing to 1.

    ``DOMAIN_SHARES`` renormalised over ``domains``; with ``degraded_share``, the degraded domains together get that
    share (each in proportion to its ``DOMAIN_SHARES`` entry) and the real ones the rest.
    """
    shares = {d: DOMAIN_SHARES[d] for d in domains}
    if degraded_share is None:
        total = sum(shares.values())
        return {d: s / total for d, s in shares.items()}
    if not 0.0 <= degraded_share < 1.0:
        raise ValueError(f'degraded_share must be in [0, 1), got {degraded_share}')
    real = {d: s for d, s in shares.items() if d in REAL_DOMAINS}
    dirty = {d: s for d, s in shares.items() if d not in REAL_DOMAINS}
    if not real:
        raise ValueError('degraded_share: the corpus has no real domain')
    out = {d: (1.0 - (degraded_share if dirty else 0.0)) * s / sum(real.values()) for d, s in real.items()}
    out.update({d: degraded_share * s / sum(dirty.values()) for d, s in dirty.items()})
    return out


def degraded_domains(corruptions: str = 'standard') -> tuple[str, ...]:
    """The degraded domains of a corpus built with ``corruptions`` (``'standard'`` or ``'alt'``)."""
    if corruptions not in CORRUPTIONS:
        raise ValueError(f'corruptions must be one of {CORRUPTIONS}, got {corruptions!r}')
    return DEGRADED_DOMAINS if corruptions == 'standard' else ALT_DEGRADED_DOMAINS


@dataclass
class CorpusInfo:
    """What :func:`build_corpus` wrote.

    Args:
        out_dir (str): The corpus root.
        seed (int): The seed.
        size_bytes (int): Requested train text bytes.
        train_files (list[str]): Train files, relative to ``out_dir``.
        validation_files (list[str]): Validation files, relative to ``out_dir``.
        docs_per_domain (dict[str, int]): Train documents by domain.
        bytes_per_domain (dict[str, int]): Train text bytes by domain.
        validation_docs (int): Validation documents.
        lambada_examples (int): Lines in ``lambada.jsonl``.
        seconds (float): Build time (not written to ``dwm_corpus.json``).
    """
    out_dir: str
    seed: int
    size_bytes: int
    train_files: list[str] = field(default_factory=list)
    validation_files: list[str] = field(default_factory=list)
    docs_per_domain: dict[str, int] = field(default_factory=dict)
    bytes_per_domain: dict[str, int] = field(default_factory=dict)
    validation_docs: int = 0
    lambada_examples: int = 0
    seconds: float = 0.0

    @property
    def train_dir(self) -> str:
        return os.path.join(self.out_dir, 'train')

    @property
    def lambada_path(self) -> str:
        return os.path.join(self.out_dir, 'lambada.jsonl')

    def __str__(self) -> str:
        mb = sum(self.bytes_per_domain.values()) / 1e6
        lines = [f'corpus {self.out_dir}: {len(self.train_files)} train files, {mb:.1f} MB text, '
                 f'{sum(self.docs_per_domain.values())} docs, {self.validation_docs} validation '
                 f'docs, {self.lambada_examples} LAMBADA examples, {self.seconds:.1f}s']
        for d in sorted(self.docs_per_domain):
            lines.append(f'  {d:24s} {self.docs_per_domain[d]:8d} docs '
                         f'{self.bytes_per_domain[d] / 1e6:8.2f} MB')
        return '\n'.join(lines)


def parse_size(size: Union[int, str]) -> int:
    """Bytes from ``123``, ``'8MB'``, ``'500KB'``, ``'1.5GB'`` (decimal) or ``'8MiB'`` (binary).

    Not mosaicml-streaming's ``bytes_to_int``: that one reads ``'8MB'`` as 8 MiB and has no ``MiB``, so the same
    ``--size 8MB`` would build a different (4.9% larger) corpus than every recorded demo and benchmark run.
    """
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r'\s*([0-9]*\.?[0-9]+)\s*([KMG]i?B|B)?\s*', str(size), re.IGNORECASE)
        if not m:
            raise ValueError(f'--size {size!r}: expected a number of bytes such as 8MB, 500KB or 1GB.')
        unit = (m.group(2) or 'B').upper()
        mult = {'B': 1, 'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'KIB': 2**10, 'MIB': 2**20,
                'GIB': 2**30}[unit]
        value = int(float(m.group(1)) * mult)
    if value < 100_000:
        raise ValueError(f'--size {size!r} is too small: the corpus needs at least 100KB.')
    return value


# ----------------------------------------------------------------------------------------------
# Source items: (name, loader) pairs, loaded lazily and split into train / held-out by name.


@dataclass
class _Item:
    name: str
    load: Callable[[], str]
    is_code: bool = False


def _read_text(path: str) -> str:
    try:
        with open(path, 'rb') as f:
            return f.read().decode('utf-8')
    except (OSError, UnicodeDecodeError):
        return ''


def _stdlib_py_files() -> list[str]:
    out = []
    for d, dirs, files in os.walk(_STDLIB):
        dirs[:] = sorted(x for x in dirs if x not in ('site-packages', 'dist-packages', '__pycache__'))
        out += [os.path.join(d, f) for f in sorted(files) if f.endswith('.py')]
    return out


def _book_items() -> list[_Item]:
    try:  # optional in a Python installation (some distributions leave pydoc_data out): looked up when needed
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return [_Item(f'pydoc:{k}', (lambda k=k: topics[k])) for k in sorted(topics)]


@functools.lru_cache(maxsize=None)
def _module_article(path: str) -> str:
    """One 'encyclopedia article' per stdlib module: its docstrings, titled by qualified name."""
    source = _read_text(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # invalid escapes in old stdlib files
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ''
    module = os.path.relpath(path, _STDLIB)[:-3].replace(os.sep, '.').removesuffix('.__init__')
    sections = []
    doc = ast.get_docstring(tree)
    if doc:
        sections.append(f'{module}\n\n{doc}')

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f'{prefix}{child.name}'
                d = ast.get_docstring(child)
                if d and len(d) >= 80:
                    sections.append(f'{name}\n\n{d}')
                if isinstance(child, ast.ClassDef):
                    visit(child, name + '.')

    visit(tree, module + '.')
    text = '\n\n'.join(sections)
    return text if len(text) >= 300 else ''


def _wikipedia_items() -> list[_Item]:
    return [_Item(f'doc:{p}', (lambda p=p: _module_article(p))) for p in _stdlib_py_files()]


def _github_items() -> list[_Item]:
    return [_Item(f'code:{p}', (lambda p=p: _read_text(p)), is_code=True) for p in _stdlib_py_files()]


def _licence_files() -> list[str]:
    paths = sorted(p for p in glob.glob('/usr/share/common-licenses/*') if os.path.isfile(p))
    stdlib_licence = os.path.join(_STDLIB, 'LICENSE.txt')
    if os.path.isfile(stdlib_licence):
        paths.append(stdlib_licence)
    paths += sorted(p for p in glob.glob('/usr/share/doc/*/copyright') if os.path.isfile(p))
    return paths


def _commoncrawl_items() -> list[_Item]:
    return [_Item(f'licence:{p}', (lambda p=p: _read_text(p))) for p in _licence_files()]


_REAL_SOURCES: dict[str, Callable[[], list[_Item]]] = {
    'RedPajamaBook': _book_items,
    'RedPajamaWikipedia': _wikipedia_items,
    'RedPajamaGithub': _github_items,
    'RedPajamaCommonCrawl': _commoncrawl_items,
}


def _is_held_out(name: str) -> bool:
    # Keyed by the underlying file or topic, not the domain, so a module's docstrings (Wikipedia)
    # and its source (Github) land in the same split.
    h = hashlib.blake2b(name.split(':', 1)[-1].encode(), digest_size=8).digest()
    return int.from_bytes(h, 'little') % HOLDOUT_EVERY == 0


def _paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks (for code: top-level blocks), keeping their internal text."""
    return [p for p in re.split(r'\n\s*\n', text) if p.strip()]


def _cut(paragraphs: list[str]) -> Iterator[str]:
    """Join consecutive paragraphs into documents of at most MAX_DOC_CHARS (longer ones alone)."""
    current: list[str] = []
    size = 0
    for p in paragraphs:
        if current and size + len(p) + 2 > MAX_DOC_CHARS:
            yield '\n\n'.join(current)
            current, size = [], 0
        current.append(p)
        size += len(p) + 2
    if current:
        yield '\n\n'.join(current)


def _usable(text: str) -> bool:
    return bool(text.strip()) and EOS_TEXT not in text


class _RealStream:
    """Documents of one real domain (one split): a full pass, then random paragraph windows."""

    def __init__(self, domain: str, items: list[_Item], rng: random.Random) -> None:
        self.domain = domain
        self.items = list(items)
        rng.shuffle(self.items)
        self.rng = rng
        self.cache: dict[str, list[str]] = {}

    def _paras(self, item: _Item) -> list[str]:
        if item.name not in self.cache:
            text = item.load()
            self.cache[item.name] = _paragraphs(text) if _usable(text) else []
        return self.cache[item.name]

    def __iter__(self) -> Iterator[str]:
        for item in self.items:
            text = item.load()
            if not _usable(text):
                self.cache[item.name] = []
                continue
            self.cache[item.name] = paras = _paragraphs(text)
            if len(text) <= MAX_DOC_CHARS:
                yield text
            else:
                yield from _cut(paras)
        nonempty = [i for i in self.items if self._paras(i)]
        if not nonempty:
            return
        while True:  # repeat with new boundaries (see module docstring)
            paras = self._paras(self.rng.choice(nonempty))
            start = self.rng.randrange(len(paras))
            length = self.rng.randint(1, max(1, min(len(paras) - start, 40)))
            yield from _cut(paras[start:start + length])


_WORD = re.compile(r'\S+')


def _shuffled_words(prose: Iterator[str], rng: random.Random) -> Iterator[str]:
    for text in prose:
        words = _WORD.findall(text)
        if len(words) < 5:
            continue
        rng.shuffle(words)
        lines = [' '.join(words[i:i + 14]) for i in range(0, len(words), 14)]
        yield '\n'.join(lines)


def _word_cipher(real: Iterator[str], vocab: list[str], rng: random.Random, band: int = 4) -> Iterator[str]:
    """Real documents with every word of ``vocab`` replaced by another word of similar frequency: ``vocab`` is
    ranked by frequency, cut into bands of ``band`` consecutive ranks, and each band is mapped onto itself by one
    fixed random cyclic permutation (drawn once from ``rng``; no word maps to itself). Other words, whitespace and
    punctuation stay, so code keeps its layout.

    The unigram frequencies stay close to the real ones, so the text looks real to a model that counts words, but
    each word stands where another one would ("the" where "of" belongs): the same token types, in the same kinds of
    contexts, with consistently wrong bigram statistics. A model trained on both learns conflicting statistics for
    the same contexts; a method that drops these documents helps. (Recipe 2 permuted the whole vocabulary, so
    frequent words became rare ones: text a model could tell apart from real text by its word counts alone.)
    """
    table: dict[str, str] = {}
    for start in range(0, len(vocab), band):
        words = vocab[start:start + band]
        if len(words) < 2:
            continue
        rng.shuffle(words)
        table.update(zip(words, words[1:] + words[:1]))

    def swap(match: re.Match) -> str:
        return table.get(match.group(0), match.group(0))

    for text in real:
        yield re.sub(r'[A-Za-z]{2,}', swap, text)


def _scrambled_letters(real: Iterator[str], rng: random.Random) -> Iterator[str]:
    """Real documents with the inner letters of every word of 4 or more letters shuffled, the first and the last
    kept ("documents" -> "dnmeouts"). Each document keeps its letters, words, lengths, punctuation and layout, but
    the letters inside a word come in an order the real text never uses: conflicting subword statistics from the
    same documents. (Word-level corruptions, the shuffled words and the cipher, still teach a small model its
    spelling, and dropping them gains nothing; character-level ones do harm.)"""
    def scramble(match: re.Match) -> str:
        word = match.group(0)
        inner = list(word[1:-1])
        rng.shuffle(inner)
        return word[0] + ''.join(inner) + word[-1]

    for text in real:
        yield re.sub(r'[A-Za-z]{4,}', scramble, text)


def _char_noise(prose: Iterator[str], rng: random.Random, rate: float = 0.2) -> Iterator[str]:
    letters = 'abcdefghijklmnopqrstuvwxyz'
    for text in prose:
        yield ''.join(rng.choice(letters) if c.isalpha() and rng.random() < rate else c for c in text)


def _repeated(prose: Iterator[str], rng: random.Random) -> Iterator[str]:
    for text in prose:
        paras = [p for p in _paragraphs(text) if len(p) >= 40]
        if paras:
            para = rng.choice(paras)[:2000]
            yield '\n\n'.join([para] * rng.randint(3, 20))


def _flattened(code: Iterator[str]) -> Iterator[str]:
    for text in code:
        flat = ' '.join(text.split())
        if flat:
            yield flat


def _prose_vocab(book: list[_Item], wiki: list[_Item], limit_chars: int = 200_000) -> list[str]:
    """The words of the first ``limit_chars`` of prose, most frequent first (ties alphabetical)."""
    counts: collections.Counter[str] = collections.Counter()
    chars = 0
    for item in book + wiki:
        text = item.load()
        chars += len(text)
        counts.update(re.findall(r'[A-Za-z]{2,}', text))
        if chars >= limit_chars:
            break
    return sorted(counts, key=lambda w: (-counts[w], w))


def _norm(paragraph: str) -> str:
    return ' '.join(paragraph.split())


class _DomainStreams:
    """Document iterators for every domain of one split."""

    def __init__(self, split: str, seed: int, items: dict[str, list[_Item]], corruptions: str = 'standard') -> None:
        def rng(tag: str) -> random.Random:
            return random.Random(f'dwm-corpus|{_BUILD_VERSION}|{seed}|{split}|{tag}')

        self.streams: dict[str, Iterator[str]] = {}
        for domain in REAL_DOMAINS:
            if items.get(domain):
                self.streams[domain] = iter(_RealStream(domain, items[domain], rng(domain)))
        prose_items = items.get('RedPajamaBook', []) + items.get('RedPajamaWikipedia', [])
        if corruptions == 'alt':  # other corruption types; the standard streams below are left exactly as they were
            if prose_items:
                self.streams['DegradedCharNoise'] = _char_noise(
                    iter(_RealStream('prose', prose_items, rng('prose-for-noise'))), rng('char-noise'))
                self.streams['DegradedRepeated'] = _repeated(
                    iter(_RealStream('prose', prose_items, rng('prose-for-repeat'))), rng('repeat'))
            if items.get('RedPajamaGithub'):
                self.streams['DegradedFlattenedCode'] = _flattened(
                    iter(_RealStream('code', items['RedPajamaGithub'], rng('code-for-flatten'))))
            return
        if prose_items:
            prose = iter(_RealStream('prose', prose_items, rng('prose-for-shuffle')))
            self.streams['DegradedShuffledWords'] = _shuffled_words(prose, rng('shuffle'))
        book, wiki = list(items.get('RedPajamaBook', [])), list(items.get('RedPajamaWikipedia', []))
        rng('vocab').shuffle(book)
        rng('vocab').shuffle(wiki)
        real_items = [i for d in REAL_DOMAINS for i in items.get(d, [])]
        if real_items:
            self.streams['DegradedRandomTokens'] = _word_cipher(
                iter(_RealStream('real', real_items, rng('real-for-cipher'))), _prose_vocab(book, wiki),
                random.Random(f'dwm-corpus|{_BUILD_VERSION}|{seed}|cipher'))  # one cipher for train and validation
            self.streams['DegradedScrambledLetters'] = _scrambled_letters(
                iter(_RealStream('real', real_items, rng('real-for-scramble'))), rng('scramble'))


def _write_split(out_dir: str, split: str, stem: str, budget: int, streams: _DomainStreams,
                 seed: int, file_bytes: int, pbar, lambada: Optional[_LambadaCandidates],
                 degraded_share: Optional[float] = None) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """Interleave domain documents into SlimPajama files until ``budget`` text bytes."""
    if degraded_share is None:  # the arithmetic of the corpora built before degraded_share, kept byte for byte
        shares = {d: DOMAIN_SHARES[d] for d in streams.streams}
        total_share = sum(shares.values())
        remaining = {d: int(budget * s / total_share) for d, s in shares.items()}
    else:
        remaining = {d: int(budget * s) for d, s in domain_shares(list(streams.streams), degraded_share).items()}
    docs: dict[str, int] = {d: 0 for d in streams.streams}
    nbytes: dict[str, int] = {d: 0 for d in streams.streams}
    rng = random.Random(f'dwm-corpus|{_BUILD_VERSION}|{seed}|{split}|interleave')
    files: list[str] = []
    batch: list[dict] = []
    batch_bytes = 0

    def flush() -> None:
        nonlocal batch, batch_bytes
        k = len(files)
        rel = os.path.join(split, f'chunk{k // FILES_PER_CHUNK + 1}',
                           f'{stem}_{k % FILES_PER_CHUNK}.jsonl.zst')
        write_jsonl_zst(batch, os.path.join(out_dir, rel))
        files.append(rel)
        batch, batch_bytes = [], 0

    while True:
        live = [d for d in remaining if remaining[d] > 0]
        if not live:
            break
        domain = rng.choices(live, weights=[remaining[d] for d in live])[0]
        text = next(streams.streams[domain], None)
        if text is None:  # a domain without sources: give up its remaining share
            remaining[domain] = 0
            continue
        if not _usable(text):
            continue
        size = len(text.encode('utf-8'))
        remaining[domain] -= size
        docs[domain] += 1
        nbytes[domain] += size
        if lambada is not None and domain in REAL_DOMAINS:
            lambada.scan(text)
        batch.append({'text': text, 'meta': {'redpajama_set_name': domain}})
        batch_bytes += size
        pbar.update(size)
        if batch_bytes >= file_bytes:
            flush()
    if batch:
        flush()
    return files, docs, nbytes


_FINAL_WORD = re.compile(r'^(.*\S)(\s)([A-Za-z]{2,})[.!?]?["\')]?$', re.DOTALL)
_KEY_WORDS = 10


class _LambadaCandidates:
    """LAMBADA-format examples from held-out prose, minus any whose context occurs in train.

    A context that is a substring of the (whitespace-normalised) training text has its last
    ``_KEY_WORDS`` words as consecutive whole words of some training document, so every training
    document is scanned for those word windows and matching candidates are dropped.
    """

    def __init__(self, items: list[_Item], seed: int, limit: int) -> None:
        rng = random.Random(f'dwm-corpus|{_BUILD_VERSION}|{seed}|lambada')
        items = list(items)
        rng.shuffle(items)
        self.examples: list[dict[str, str]] = []
        seen: set[str] = set()
        for item in items:
            text = item.load()
            if not _usable(text):
                continue
            for para in _paragraphs(text):
                passage = _norm(para)
                words = passage.split(' ')
                if not 40 <= len(words) <= 300 or passage in seen:
                    continue
                letters = sum(c.isalpha() or c.isspace() for c in passage)
                if letters < 0.9 * len(passage):  # skip code-like and table-like paragraphs
                    continue
                m = _FINAL_WORD.match(passage)
                if not m:
                    continue
                seen.add(passage)
                self.examples.append({'context': m.group(1), 'continuation': ' ' + m.group(3)})
            if len(self.examples) >= limit:
                break
        self.keys = {tuple(ex['context'].split()[-_KEY_WORDS:]): i
                     for i, ex in enumerate(self.examples)}
        self.last_words = {k[-1] for k in self.keys}
        self.contaminated: set[int] = set()

    def scan(self, text: str) -> None:
        words = text.split()
        last_words, keys = self.last_words, self.keys
        for i in range(_KEY_WORDS - 1, len(words)):
            if words[i] in last_words:
                hit = keys.get(tuple(words[i - _KEY_WORDS + 1:i + 1]))
                if hit is not None:
                    self.contaminated.add(hit)

    def clean(self, limit: int) -> list[dict[str, str]]:
        return [ex for i, ex in enumerate(self.examples) if i not in self.contaminated][:limit]


def build_corpus(out_dir: str,
                 size: Union[int, str] = '8MB',
                 seed: int = 0,
                 progress: bool = False,
                 corruptions: str = 'standard',
                 validation_size: int | str | None = None,
                 degraded_share: Optional[float] = None) -> CorpusInfo:
    """Build the embedded SlimPajama-format corpus (see the module docstring for the layout).

    Args:
        out_dir (str): Directory to write; it must not already hold a corpus (``train/``).
        size (int | str): Train text bytes, e.g. ``'8MB'``, ``'200MB'``. Default: ``'8MB'``.
        seed (int): Seed for every random choice. Default: ``0``.
        progress (bool): Report progress on stderr (:class:`~dwm_stream.progress.Progress`). Default: ``False``
            (library functions are quiet; the CLI turns it on).
        corruptions (str): ``'standard'`` (the three degraded domains of the table above) or ``'alt'`` (other
            corruption types in their place: ``ALT_DEGRADED_DOMAINS``). Default: ``'standard'``.
        validation_size (int | str, optional): Validation text bytes. Default: ``None`` (``max(64 KiB, size /
            50)``).
        degraded_share (float, optional): Share of the bytes (train and validation) that the degraded domains take
            together; the real domains keep their relative shares. Default: ``None`` (``DOMAIN_SHARES`` as they are:
            20% degraded). The quality benchmark uses 0.5, so that degraded data do measurable harm.

    Returns:
        CorpusInfo: What was written.
    """
    start = time.perf_counter()
    size_bytes = parse_size(size)
    degraded_domains(corruptions)  # validate
    if degraded_share is not None:
        domain_shares(REAL_DOMAINS, degraded_share)  # validate
    if os.path.exists(os.path.join(out_dir, 'train')):
        raise FileExistsError(f'{out_dir} already holds a corpus (train/); choose another --out or '
                              'delete it first.')
    train_items: dict[str, list[_Item]] = {}
    held_items: dict[str, list[_Item]] = {}
    for domain, list_items in _REAL_SOURCES.items():
        items = list_items()
        train_items[domain] = [i for i in items if not _is_held_out(i.name)]
        held_items[domain] = [i for i in items if _is_held_out(i.name)]
    if not (train_items['RedPajamaBook'] or train_items['RedPajamaWikipedia']):
        raise FileNotFoundError('no prose found on this machine (pydoc_data.topics and stdlib '
                                'sources are both missing); the embedded corpus needs a full Python '
                                'installation.')
    val_bytes = max(64 * 1024, size_bytes // 50) if validation_size is None else parse_size(validation_size)
    file_bytes = max(256 * 1024, min(32 * 2**20, size_bytes // 16))
    os.makedirs(out_dir, exist_ok=True)

    pbar = Progress('corpus build', size_bytes + val_bytes, unit='B', enabled=progress)
    lambada = _LambadaCandidates(held_items['RedPajamaBook'] + held_items['RedPajamaWikipedia'],
                                 seed, 2 * LAMBADA_MAX_EXAMPLES)
    try:
        train_files, docs, nbytes = _write_split(out_dir, 'train', 'example_train', size_bytes,
                                                 _DomainStreams('train', seed, train_items, corruptions), seed,
                                                 file_bytes, pbar, lambada, degraded_share)
        val_files, val_docs, _ = _write_split(out_dir, 'validation', 'example_holdout', val_bytes,
                                              _DomainStreams('validation', seed, held_items, corruptions), seed,
                                              file_bytes, pbar, None, degraded_share)
    finally:
        pbar.close()
    examples = lambada.clean(LAMBADA_MAX_EXAMPLES)
    with open(os.path.join(out_dir, 'lambada.jsonl'), 'w', encoding='utf-8') as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + '\n')

    info = CorpusInfo(out_dir=out_dir,
                      seed=seed,
                      size_bytes=size_bytes,
                      train_files=train_files,
                      validation_files=val_files,
                      docs_per_domain=docs,
                      bytes_per_domain=nbytes,
                      validation_docs=sum(val_docs.values()),
                      lambada_examples=len(examples))
    record = asdict(info)
    del record['seconds'], record['out_dir']
    record['recipe'] = RECIPE_VERSION
    if corruptions != 'standard':  # absent for the standard set: its summary stays byte-identical
        record['corruptions'] = corruptions
    if degraded_share is not None:  # absent by default, for the same reason
        record['degraded_share'] = degraded_share
    with open(os.path.join(out_dir, 'dwm_corpus.json'), 'w', encoding='utf-8') as f:
        f.write(json.dumps(record, indent=2, sort_keys=True) + '\n')
    info.seconds = time.perf_counter() - start
    return info


def split_lambada(lambada_path: str, fit_path: str, report_path: str) -> tuple[int, int]:
    """Split a LAMBADA-format file in two halves, in file order: the first fits a data selector or
    weighter (DWM's validation), the second is only ever reported. Returns the two sizes."""
    with open(lambada_path) as f:
        lines = [line if line.endswith('\n') else line + '\n' for line in f if line.strip()]
    half = len(lines) // 2
    with open(fit_path, 'w') as f:
        f.writelines(lines[:half])
    with open(report_path, 'w') as f:
        f.writelines(lines[half:])
    return half, len(lines) - half
