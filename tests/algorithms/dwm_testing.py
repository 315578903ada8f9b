"""Shared builders for the DWM tests: a tiny Llama, toy corpora with a clean and a noisy domain."""

from __future__ import annotations

import torch
from composer.models import HuggingFaceModel
from torch.utils.data import DataLoader, Dataset
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 128
SEQ_LEN = 16


def tiny_llama_config(hidden: int = 32, layers: int = 2, vocab: int = VOCAB, attn: str = 'eager') -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                       attn_implementation=attn, tie_word_embeddings=False)


def tiny_llama(hidden: int = 32, layers: int = 2, vocab: int = VOCAB, seed: int = 0, dtype=torch.float32,
               attn: str = 'eager') -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(hidden, layers, vocab, attn))
    return model.to(dtype)


def composer_llama(hidden: int = 32, layers: int = 2, seed: int = 0, attn: str = 'eager') -> HuggingFaceModel:
    return HuggingFaceModel(tiny_llama(hidden, layers, seed=seed, attn=attn), use_logits=True)


def clean_sequence(gen: torch.Generator, length: int = SEQ_LEN) -> torch.Tensor:
    """A learnable pattern: an arithmetic progression mod 32 from a random start (tokens 0..31)."""
    start = int(torch.randint(0, 32, (1,), generator=gen))
    step = int(torch.randint(1, 4, (1,), generator=gen))
    return (start + step * torch.arange(length)) % 32


def noisy_sequence(gen: torch.Generator, length: int = SEQ_LEN) -> torch.Tensor:
    """Uniform random tokens 32..127: nothing to learn."""
    return torch.randint(32, VOCAB, (length,), generator=gen)


class ToyCorpus(Dataset):
    """Samples in the data-side batch format: ``input_ids``, ``labels``, ``uid``, ``domain``, ``prior_weight``,
    ``scores`` (one column: 1 for clean, 0 for noisy, NaN for every 5th sample). Even uids are clean."""

    def __init__(self, size: int, seed: int = 0, pad_every: int = 0, clean_fraction: float = 0.5):
        gen = torch.Generator().manual_seed(seed)
        self.samples = []
        for uid in range(size):
            clean = bool(torch.rand(1, generator=gen) < clean_fraction)
            ids = clean_sequence(gen) if clean else noisy_sequence(gen)
            labels = ids.clone()
            if pad_every and uid % pad_every == 0:
                cut = int(torch.randint(4, SEQ_LEN - 2, (1,), generator=gen))
                labels[cut:] = -100
                ids = ids.clone()
                ids[cut:] = 0
            score = float('nan') if uid % 5 == 4 else float(clean)
            self.samples.append({
                'input_ids': ids.long(),
                'labels': labels.long(),
                'uid': torch.tensor(uid, dtype=torch.long),
                'domain': torch.tensor(0 if clean else 1, dtype=torch.long),
                'prior_weight': torch.tensor(1.0),
                'scores': torch.tensor([score]),
            })

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


def loader(size: int, batch_size: int, seed: int = 0, **kwargs) -> DataLoader:
    return DataLoader(ToyCorpus(size, seed=seed, **kwargs), batch_size=batch_size, shuffle=False)


def val_batches(n_batches: int = 4, batch_size: int = 4, seed: int = 123) -> list[dict]:
    """Validation in LAMBADA style: clean sequences, loss on the last 4 tokens only."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.stack([clean_sequence(gen) for _ in range(batch_size)]).long()
        labels = torch.full_like(ids, -100)
        labels[:, -4:] = ids[:, -4:]
        out.append({'input_ids': ids, 'labels': labels})
    return out


def hypergradient_autograd(contributions_fns, val_loss_fn, params: dict, weights, lr: float,
                           preconditioner: dict | None = None):
    """The hypergradient oracle: reverse mode through ``K`` ``create_graph=True`` look-ahead steps (O(Hessian)), the
    exact ``dL_val(theta_K) / dw_k`` of every step. One contributions function and one weight vector (not lists):
    the one-step hypergradient ``[n]``; lists of ``K``: a list of ``K`` of them."""
    single = callable(contributions_fns)
    fns, ws = ([contributions_fns], [weights]) if single else (contributions_fns, weights)
    theta = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    ws = [w.detach().clone().requires_grad_(True) for w in ws]
    with torch.enable_grad():
        for fn, w in zip(fns, ws):
            grads = torch.autograd.grad((w * fn(theta)).sum(), list(theta.values()), create_graph=True,
                                        allow_unused=True)
            step = {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(theta.items(), grads)}
            if preconditioner is not None:
                step = {k: preconditioner[k] * g for k, g in step.items()}
            theta = {k: theta[k] - lr * step[k] for k in theta}
        hyper = [h.detach() for h in torch.autograd.grad(val_loss_fn(theta), ws)]
    return hyper[0] if single else hyper
