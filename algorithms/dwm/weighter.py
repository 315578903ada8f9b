"""The Data Weighting Model (the *weighter*): one weight per sample of a batch, looking at the whole batch.

Architecture **[ours]** (the paper does not specify one):

1. A backbone embeds each sample: a small pre-LN transformer over token ids owned by the weighter (learned
   positions *within* a sample), or any local HuggingFace model (``AutoModel``); token states are mean-pooled
   over the attention mask into one vector per sample, ``[n, d]``.
   With ``inputs`` (**[ours]**, :mod:`algorithms.dwm.inputs`), each sample's per-sample scalars (its loss, its
   reducible loss), standardised over the batch, are projected and added to its embedding.
2. ``batch_layers`` self-attention blocks run **across the samples of the batch** with no positional encoding,
   so the weighter is permutation-equivariant.
3. A zero-initialised linear head gives a score ``s_i``; ``w = n * softmax(s / tau)`` is mixed with uniform,
   ``(1 - mix_uniform) * w + mix_uniform``. An untrained weighter is therefore exactly uniform, and the weights
   are positive with mean 1.

The split API (:meth:`Weighter.embed` then :meth:`Weighter.weights_from_embeddings`) lets a data-parallel caller
all-gather the per-sample embeddings so the softmax spans the global batch.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.dwm.config import EMBED_NORMS, WeighterConfig
from algorithms.dwm.inputs import standardize_inputs

__all__ = ['WeighterConfig', 'Weighter', 'mean_pool', 'normalize_embeddings', 'EMBED_NORMS']


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` ``[n, L, d]`` over the positions where ``attention_mask`` ``[n, L]`` is set -> ``[n, d]``."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def normalize_embeddings(embeddings: torch.Tensor, mode: str, eps: float = 1e-5) -> torch.Tensor:
    """Per-sample embeddings ``[n, d]`` normalised as ``WeighterConfig.embed_norm`` says.

    Args:
        embeddings (torch.Tensor): ``[n, d]``, the (global) batch.
        mode (str): ``'none'``, ``'layernorm'`` (over features, per sample) or ``'batch'`` (over samples, per
            feature; population variance).
        eps (float): Added to the variance. Default: ``1e-5``.

    Returns:
        torch.Tensor: ``[n, d]``.
    """
    if mode == 'none':
        return embeddings
    if mode == 'layernorm':
        return F.layer_norm(embeddings, embeddings.shape[-1:], eps=eps)
    if mode == 'batch':
        centred = embeddings - embeddings.mean(dim=0, keepdim=True)
        return centred * torch.rsqrt(centred.pow(2).mean(dim=0, keepdim=True) + eps)
    raise ValueError(f'embed_norm must be one of {EMBED_NORMS}, got {mode!r}')


class _Block(nn.Module):
    """Pre-LN self-attention + MLP block; ``x`` is ``[batch, seq, d]``, no positional information of its own."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f'd_model={d_model} must be divisible by n_heads={n_heads}')
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)  # a key bias has no effect (softmax shift)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        attn_mask = None
        if key_mask is not None and not bool(key_mask.all()):
            attn_mask = key_mask[:, None, None, :].bool()  # [b, 1, 1, s]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [b, h, s, d/h]
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(self.norm2(x))


class Weighter(nn.Module):
    """Batch-aware data weighting model.

    Args:
        config (WeighterConfig | dict): The architecture and the weight transform. ``vocab_size`` must be set for
            the own transformer backbone.
    """

    def __init__(self, config: WeighterConfig | dict[str, Any]):
        super().__init__()
        self.config = WeighterConfig.from_any(config)
        cfg = self.config
        d_ff = cfg.d_ff or 4 * cfg.d_model
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(cfg.seed)  # identical init on every rank and in every process
        try:
            if cfg.backbone == 'transformer':
                if cfg.vocab_size is None:
                    raise ValueError('WeighterConfig.vocab_size must be set (the LLM tokenizer vocabulary size)')
                self.hf_backbone = None
                self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
                self.position_embedding = nn.Embedding(cfg.max_seq_len, cfg.d_model)
                nn.init.normal_(self.token_embedding.weight, std=0.02)
                nn.init.normal_(self.position_embedding.weight, std=0.02)
                self.layers = nn.ModuleList(_Block(cfg.d_model, cfg.n_heads, d_ff) for _ in range(cfg.n_layers))
                self.final_norm = nn.LayerNorm(cfg.d_model)
                self.backbone_proj = nn.Identity()
            else:
                from transformers import AutoModel
                self.hf_backbone = AutoModel.from_pretrained(cfg.backbone, local_files_only=True)
                hidden = self.hf_backbone.config.hidden_size
                self.backbone_proj = nn.Linear(hidden, cfg.d_model)
            # Batch-level like the layers below: it sees the (gathered) global batch's inputs.
            self.input_proj = nn.Linear(len(cfg.inputs), cfg.d_model) if cfg.inputs else None
            self.batch_layers = nn.ModuleList(
                _Block(cfg.d_model, cfg.n_heads, d_ff) for _ in range(cfg.batch_layers))
            # No bias in the last norm nor the head: a shift of all scores leaves the softmax unchanged, so those
            # parameters would only receive rounding noise (which Adam amplifies into steps).
            self.batch_norm = nn.LayerNorm(cfg.d_model, bias=False)
            self.score_head = nn.Linear(cfg.d_model, 1, bias=False)
            nn.init.zeros_(self.score_head.weight)
        finally:
            torch.random.set_rng_state(generator_state)

    def backbone_parameter_names(self) -> set[str]:
        """Names of the parameters that embed single samples (their gradient is per-sample, hence per-rank)."""
        batch_prefixes = ('input_proj.', 'batch_layers.', 'batch_norm.', 'score_head.')
        return {n for n, _ in self.named_parameters() if not n.startswith(batch_prefixes)}

    def _attention_mask(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        if attention_mask is not None:
            return attention_mask
        if self.config.pad_token_id is not None:
            return (input_ids != self.config.pad_token_id).long()
        return torch.ones_like(input_ids)

    def embed(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-sample embeddings.

        Args:
            input_ids (torch.Tensor): ``[n, L]`` token ids.
            attention_mask (torch.Tensor, optional): ``[n, L]``, 1 for real tokens. Default: ``None`` (built
                from ``pad_token_id``, or all ones).

        Returns:
            torch.Tensor: ``[n, d_model]``.
        """
        mask = self._attention_mask(input_ids, attention_mask)
        if self.hf_backbone is not None:
            hidden = self.hf_backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state
            return self.backbone_proj(mean_pool(hidden, mask))
        max_len = self.config.max_seq_len
        input_ids, mask = input_ids[:, :max_len], mask[:, :max_len]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)[None]
        # A sample without any real token would attend to nothing; let it attend to everything instead.
        key_mask = torch.where(mask.sum(dim=1, keepdim=True) > 0, mask, torch.ones_like(mask))
        for layer in self.layers:
            x = layer(x, key_mask)
        return mean_pool(self.final_norm(x), mask)

    def scores_from_embeddings(self, embeddings: torch.Tensor, inputs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scores ``s`` ``[n]`` of the samples, each seeing the whole batch ``embeddings`` ``[n, d]`` (and, for a
        weighter with ``inputs``, the batch's ``inputs`` ``[n, len(config.inputs)]``, in that order)."""
        x = normalize_embeddings(embeddings, self.config.embed_norm)
        if self.input_proj is not None:
            expected = (embeddings.shape[0], len(self.config.inputs))
            if inputs is None or tuple(inputs.shape) != expected:
                raise ValueError(f'this weighter takes the inputs {self.config.inputs} beside the tokens: pass them as '
                                 f'inputs= of shape {list(expected)}, got '
                                 f'{None if inputs is None else list(inputs.shape)}')
            x = x + self.input_proj(standardize_inputs(inputs.to(x.dtype)))
        x = x.unsqueeze(0)  # the batch is the attention sequence: [1, n, d], no positions
        for layer in self.batch_layers:
            x = layer(x)
        return self.score_head(self.batch_norm(x)).squeeze(0).squeeze(-1)

    def weights_from_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """``(1 - lambda) * n * softmax(s / tau) + lambda``: positive, mean 1, exactly 1 where all scores tie."""
        n = scores.shape[0]
        weights = n * torch.softmax(scores.float() / self.config.tau, dim=0)
        return weights + self.config.mix_uniform * (1.0 - weights)  # == (1 - lam) * w + lam, exact at w == 1

    def weights_from_embeddings(self, embeddings: torch.Tensor, inputs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Weights ``[n]`` from the (global) batch of embeddings ``[n, d]`` (and ``inputs``, see
        :meth:`scores_from_embeddings`)."""
        return self.weights_from_scores(self.scores_from_embeddings(embeddings, inputs))

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                inputs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Weights ``[n]`` of one batch (single process)."""
        return self.weights_from_embeddings(self.embed(input_ids, attention_mask), inputs)

    def num_parameters(self) -> int:
        """Number of parameters."""
        return sum(p.numel() for p in self.parameters())

    def forward_flops_per_token(self) -> float:
        """Approximate forward FLOPs per token of the own backbone (``2 * params`` matmul rule); ``nan`` for HF."""
        if self.hf_backbone is not None:
            return math.nan
        matmul_params = sum(p.numel() for n, p in self.layers.named_parameters() if p.dim() == 2)
        return 2.0 * matmul_params
