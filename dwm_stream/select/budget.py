"""Select samples to a token budget: top-k, or sampling without replacement by Gumbel-top-k.

Both selectors (DSIR and QuRating) reduce to the same step. Each sample has a log-probability-like
key ``logit`` (DSIR: the log importance weight; QuRating: ``score / tau``). Sampling without
replacement with probabilities proportional to ``exp(logit)`` is the same as taking the top
samples by ``logit + Gumbel(0, 1)`` noise (Kool et al. 2019, "Stochastic Beams and Where to Find
Them"); top-k is the same without noise. Samples are taken in descending key order while their
tokens fit the budget.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ['gumbel_perturb', 'take_to_budget', 'domain_budgets', 'select_to_budget', 'token_shares']


def gumbel_perturb(logits: np.ndarray, seed: int) -> np.ndarray:
    """``logits + Gumbel(0, 1)`` noise (float64), seeded; top-k of it samples ∝ ``exp(logits)``."""
    rng = np.random.default_rng(seed)
    return np.asarray(logits, np.float64) + rng.gumbel(size=len(logits))


def take_to_budget(keys: np.ndarray, num_tokens: np.ndarray, budget_tokens: int) -> np.ndarray:
    """Indices of the highest keys, in descending key order, whose tokens sum to at most the budget.

    Ties are broken by index (stable). NaN keys are never taken.

    Args:
        keys (np.ndarray): float [n].
        num_tokens (np.ndarray): int [n], tokens of each sample.
        budget_tokens (int): Token budget.
    """
    keys = np.asarray(keys, np.float64)
    candidates = np.flatnonzero(~np.isnan(keys))
    order = candidates[np.argsort(-keys[candidates], kind='stable')]
    cumulative = np.cumsum(np.asarray(num_tokens, np.int64)[order])
    count = int(np.searchsorted(cumulative, budget_tokens, side='right'))
    return order[:count]


def domain_budgets(domain: np.ndarray, num_tokens: np.ndarray, budget_tokens: int) -> dict[int, int]:
    """Split a token budget across domains in proportion to each domain's share of the tokens.

    Rounded down per domain; the remainder goes to the largest domains first, one token each.
    """
    domain = np.asarray(domain)
    ids = np.unique(domain)
    tokens = np.array([int(np.asarray(num_tokens)[domain == d].sum()) for d in ids], np.int64)
    total = int(tokens.sum())
    exact = [budget_tokens * t / total for t in tokens.tolist()]
    budgets = [int(e) for e in exact]
    for k in np.argsort(-tokens, kind='stable')[:budget_tokens - sum(budgets)].tolist():
        budgets[k] += 1
    return {int(d): b for d, b in zip(ids.tolist(), budgets)}


def select_to_budget(logits: np.ndarray,
                     num_tokens: np.ndarray,
                     budget_tokens: int,
                     sample: bool,
                     seed: int = 0,
                     domain: Optional[np.ndarray] = None,
                     what: str = 'the corpus') -> np.ndarray:
    """Select samples to a token budget by top-k or Gumbel-top-k sampling.

    Args:
        logits (np.ndarray): float [n]; with ``sample``, samples are drawn ∝ ``exp(logits)``
            without replacement. NaN marks a sample that cannot be selected.
        num_tokens (np.ndarray): int [n], tokens of each sample.
        budget_tokens (int): Token budget; at most the tokens of the selectable samples.
        sample (bool): Gumbel-top-k sampling if true, else top-k.
        seed (int): Seed of the Gumbel noise. Default: ``0``.
        domain (np.ndarray, optional): int [n]; if given, the budget is split across domains by
            their token share (:func:`domain_budgets`) and each domain is selected separately.
            Default: ``None``.
        what (str): What is being selected from, for error messages. Default: ``'the corpus'``.

    Returns:
        np.ndarray: int64 indices of the selected samples, sorted ascending.

    Raises:
        ValueError: If the budget is not positive, exceeds the selectable tokens, or fits no sample.
    """
    logits = np.asarray(logits, np.float64)
    num_tokens = np.asarray(num_tokens, np.int64)
    selectable = ~np.isnan(logits)
    available = int(num_tokens[selectable].sum())
    if budget_tokens <= 0:
        raise ValueError(f'--budget-tokens {budget_tokens}: must be a positive number of tokens.')
    if budget_tokens > available:
        raise ValueError(f'--budget-tokens {budget_tokens:,} exceeds the {available:,} selectable tokens of '
                         f'{what}; lower the budget, or omit it to keep every sample.')
    keys = gumbel_perturb(logits, seed) if sample else logits
    if domain is None:
        chosen = take_to_budget(keys, num_tokens, budget_tokens)
    else:
        domain = np.asarray(domain)
        parts = []
        for d, budget in domain_budgets(domain[selectable], num_tokens[selectable], budget_tokens).items():
            members = np.flatnonzero(domain == d)
            parts.append(members[take_to_budget(keys[members], num_tokens[members], budget)])
        chosen = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if not len(chosen):
        raise ValueError(f'--budget-tokens {budget_tokens}: smaller than any sample of {what} '
                         f'(the smallest holds {int(num_tokens[selectable].min())} tokens).')
    return np.sort(chosen).astype(np.int64)


def token_shares(domain: np.ndarray, num_tokens: np.ndarray, domain_names: list[str],
                 subset: Optional[np.ndarray] = None) -> dict[str, float]:
    """Each domain's share of the tokens (of ``subset``, an index array, when given)."""
    domain = np.asarray(domain)
    num_tokens = np.asarray(num_tokens, np.int64)
    if subset is not None:
        domain, num_tokens = domain[subset], num_tokens[subset]
    total = max(int(num_tokens.sum()), 1)
    return {name: int(num_tokens[domain == i].sum()) / total for i, name in enumerate(domain_names)}
