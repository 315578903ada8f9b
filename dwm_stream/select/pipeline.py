"""The steps every selector shares: check the request, select to a token budget, write the selection
file, and optionally materialise the subset.

A selector (DSIR, QuRating) scores every unit of a corpus (an MDS sample; for DSIR over
``.jsonl.zst`` files, a document) and describes them as :class:`Candidates`. Then:

1. :func:`check_request`, before any scoring: ``out`` must not exist unless ``overwrite``, and a budget
   must be positive;
2. :func:`choose`: every unit without a budget, else top-k or Gumbel-top-k by the selector's logits
   until the tokens fill the budget (:func:`dwm_stream.select.budget.select_to_budget`);
3. :func:`write`: the selection file (uids, the selector's score columns and prior weights, its
   settings as ``info``), then, with ``materialize``, the subset as a corpus of its own: an MDS
   corpus for samples (:func:`~dwm_stream.select.materialize.materialize`), ``.jsonl.zst`` files for
   documents (:func:`~dwm_stream.select.materialize.materialize_documents`).

:class:`SelectionReport` is what both selectors report: the selection and each domain's share of the
tokens before and after.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from dwm_stream.data.selection import write_selection
from dwm_stream.select.budget import select_to_budget, token_shares
from dwm_stream.select.materialize import materialize as materialize_samples
from dwm_stream.select.materialize import materialize_documents

__all__ = ['Candidates', 'SelectionReport', 'check_request', 'choose', 'write']


@dataclass
class Candidates:
    """Every unit of a corpus that a selector scored, in corpus order.

    Args:
        corpus (str): The corpus: an MDS corpus (local or ``s3://``), or ``.jsonl.zst`` file(s).
        unit (str): ``'sample'`` (MDS) or ``'document'`` (``.jsonl.zst``).
        uids (np.ndarray): int64 [n], the unit ids.
        num_tokens (np.ndarray): int64 [n], tokens of each unit (counted against the budget).
        domain (np.ndarray): int64 [n], index into ``domain_names``.
        domain_names (list[str]): Domain names.
        sources (list[str]): Document unit: the ``.jsonl.zst`` files, relative to ``corpus``.
            Default: ``[]``.
    """
    corpus: str
    unit: str
    uids: np.ndarray
    num_tokens: np.ndarray
    domain: np.ndarray
    domain_names: list[str]
    sources: list[str] = field(default_factory=list)


def check_request(out: str, budget_tokens: Optional[int], overwrite: bool) -> None:
    """Fail before any scoring on an existing ``out`` (without ``overwrite``) or a budget below 1.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is false.
        ValueError: ``budget_tokens`` is not positive.
    """
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f'--out {out} already exists; pass --overwrite to replace it.')
    if budget_tokens is not None and budget_tokens <= 0:
        raise ValueError(f'--budget-tokens {budget_tokens}: must be a positive number of tokens.')


def choose(candidates: Candidates,
           logits: np.ndarray,
           budget_tokens: Optional[int],
           sample: bool,
           seed: int,
           per_domain: bool = False,
           what: str = 'the corpus') -> np.ndarray:
    """Indices of the selected units, ascending: all of them without a budget, else to the budget.

    Args:
        candidates (Candidates): The scored units.
        logits (np.ndarray): float [n]; units are taken by top-k, or sampled ∝ ``exp(logits)`` with
            ``sample``. NaN marks a unit that cannot be selected.
        budget_tokens (int, optional): Token budget; ``None`` keeps every unit.
        sample (bool): Gumbel-top-k sampling instead of top-k.
        seed (int): Seed of the sampling.
        per_domain (bool): Split the budget across domains by token share. Default: ``False``.
        what (str): What is selected from, for error messages. Default: ``'the corpus'``.
    """
    if budget_tokens is None:
        return np.arange(len(candidates.uids), dtype=np.int64)
    return select_to_budget(logits, candidates.num_tokens, budget_tokens, sample, seed,
                            domain=candidates.domain if per_domain else None, what=what)


def write(candidates: Candidates,
          selected: np.ndarray,
          out: str,
          info: dict[str, Any],
          scores: Optional[dict[str, np.ndarray]] = None,
          prior_weight: Optional[np.ndarray] = None,
          materialize: Optional[str] = None,
          overwrite: bool = False,
          progress: bool = False) -> Optional[str]:
    """Write the selection file, and the selected subset when ``materialize`` is given.

    Args:
        candidates (Candidates): The scored units.
        selected (np.ndarray): int64 indices of the selected units (from :func:`choose`).
        out (str): The selection file to write (Parquet).
        info (dict): The selector and its settings, stored in the file.
        scores (dict[str, np.ndarray], optional): float32 score columns of the selected units, by
            name (stored as ``score_<name>``). Default: ``None``.
        prior_weight (np.ndarray, optional): float32 prior weight of each selected unit. Default: ``None``.
        materialize (str, optional): Also write the subset there. Default: ``None``.
        overwrite (bool): Replace an existing ``materialize`` directory. Default: ``False``.
        progress (bool): Progress of the materialisation on stderr. Default: ``False``.

    Returns:
        str | None: ``materialize``, once written.
    """
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_selection(out, candidates.uids[selected], prior_weight=prior_weight, scores=scores, info=info)
    if not materialize:
        return None
    if candidates.unit == 'sample':
        materialize_samples(candidates.corpus, out, materialize, overwrite=overwrite, progress=progress)
    else:
        materialize_documents(candidates.corpus, candidates.sources, out, materialize, overwrite=overwrite)
    return materialize


@dataclass
class SelectionReport:
    """What a selection run wrote (``selected`` indexes ``candidates``).

    Args:
        out (str): The selection file.
        candidates (Candidates): The scored units.
        selected (np.ndarray): int64 indices of the selected units.
        materialized (str | None): Where the subset was materialised.
    """
    out: str
    candidates: Candidates
    selected: np.ndarray
    materialized: Optional[str]

    def shares(self) -> tuple[dict[str, float], dict[str, float]]:
        """Token share per domain: ``(corpus, selected)``."""
        c = self.candidates
        return (token_shares(c.domain, c.num_tokens, c.domain_names),
                token_shares(c.domain, c.num_tokens, c.domain_names, self.selected))

    def share_lines(self, corpus_label: str) -> list[str]:
        """The domain table (``corpus_label`` heads the first column of shares), then where it was materialised."""
        corpus_share, selected_share = self.shares()
        lines = [f'  {"domain":<28}{corpus_label:>10}{"selected":>10}']
        for name in self.candidates.domain_names:
            lines.append(f'  {name:<28}{corpus_share[name]:>10.3f}{selected_share[name]:>10.3f}')
        if self.materialized:
            lines.append(f'materialised to {self.materialized}')
        return lines
