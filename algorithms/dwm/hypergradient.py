"""The exact one-step hypergradient of DWM, as pure functions over parameter dicts.

Notation (``method.md``): a batch of ``n`` samples with weights ``w``; the training loss is
``L_train(theta; w) = sum_i w_i * c_i(theta)`` where ``c(theta)`` is the per-sample *contribution* vector
(see :func:`algorithms.dwm.functional.loss_contributions`; ``c_i = l_i / n`` in the paper's notation).

    look-ahead:     theta'(w) = theta - eta * P * grad_theta L_train(theta; w)
    hypergradient:  dL_val(theta')/dw_i = -eta * < P * grad L_val(theta'), grad c_i(theta) >

``theta'`` is linear in ``w``, so this is exact and needs no Hessian. The ``n`` dot products with the one vector
``u = P * grad L_val(theta')`` are a single forward-mode JVP of ``c`` at ``theta`` along ``u``
(:func:`torch.func.jvp`), or a central finite difference ``(c(theta + h u) - c(theta - h u)) / 2h``.

Preconditioner ``P``:

* SGD look-ahead: ``P = 1`` (pass ``preconditioner=None``).
* Adam look-ahead **[ours]**: ``P = 1 / (sqrt(v_hat) + eps)`` with ``v_hat = exp_avg_sq / (1 - beta2**step)``
  taken from the LLM optimizer's current state (:func:`adam_preconditioner`) and held fixed. The first moment is
  ignored: the look-ahead moves along the fresh, weighted gradient only, which keeps ``theta'`` linear in ``w``.

The tests' oracle differentiates through ``create_graph=True`` look-ahead steps (``tests/algorithms/dwm_testing.py``).

K-step look-ahead **[ours]** (:func:`hypergradient_multistep`): ``K`` virtual steps on ``K`` refit batches, each
weighted by the weighter, ``theta_{k+1} = theta_k - eta * P * grad sum_i w_ki c_ki(theta_k)``, and the validation
loss at ``theta_K``. Its exact gradient needs Hessian-vector products through the later steps
(``d theta_K / d theta_{k+1}``); the first-order form used here drops them (``d theta_K / d theta_{k+1} ~ I``, the
approximation of first-order MAML):

    dL_val(theta_K)/dw_ki ~ -eta * < P * grad L_val(theta_K), grad c_ki(theta_k) >

one JVP per step at that step's own ``theta_k``, along the one direction ``u = P * grad L_val(theta_K)``. For
``K = 1`` it is the exact one-step hypergradient. The error is ``O(eta * ||H||)`` per skipped step;
the tests' oracle (reverse mode through ``create_graph=True`` steps) checks it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional

import torch
from torch.func import jvp

__all__ = [
    'ParamDict',
    'HypergradientResult',
    'adam_preconditioner',
    'lookahead',
    'directional_derivative_jvp',
    'directional_derivative_fd',
    'hypergradient',
    'MultiStepResult',
    'hypergradient_multistep',
    'jvp_attention',
    'eager_attention',
    'chunked_attention',
    'jvp_query_block',
    'JVP_QUERY_BLOCK',
]

ParamDict = dict[str, torch.Tensor]
GradReduce = Callable[[ParamDict], ParamDict]


@dataclass
class HypergradientResult:
    """Output of :func:`hypergradient`.

    Attributes:
        hypergradient (torch.Tensor): ``[n]`` ``dL_val(theta')/dw``.
        val_loss (float): ``L_val(theta')`` at the look-ahead.
        lookahead_lr (float): The ``eta`` used.
    """

    hypergradient: torch.Tensor
    val_loss: float
    lookahead_lr: float


def adam_preconditioner(
    optimizer: torch.optim.Optimizer,
    named_params: Mapping[str, torch.Tensor],
) -> Optional[ParamDict]:
    """``P = 1 / (sqrt(v_hat) + eps)`` from an Adam-family optimizer's second moments.

    Args:
        optimizer (torch.optim.Optimizer): Adam/AdamW/Composer ``DecoupledAdamW`` (anything with ``exp_avg_sq``
            and ``step`` per parameter state and ``betas``/``eps`` per group).
        named_params (Mapping[str, torch.Tensor]): The *live* parameters, to find their state.

    Returns:
        dict[str, torch.Tensor] | None: ``P`` per parameter name (ones for a parameter without state yet), or
        ``None`` when no parameter has state (before the first step), meaning an SGD look-ahead.
    """
    group_of = {}
    for group in optimizer.param_groups:
        for p in group['params']:
            group_of[id(p)] = group
    precond: ParamDict = {}
    any_state = False
    for name, p in named_params.items():
        state = optimizer.state.get(p, {})
        group = group_of.get(id(p))
        if group is None or 'exp_avg_sq' not in state:
            precond[name] = torch.ones_like(p)
            continue
        any_state = True
        beta2 = group['betas'][1]
        step = float(state['step'])
        # 1 / (sqrt(exp_avg_sq / bias_correction) + eps), built in one buffer (no parameter-sized temporaries).
        p_buf = state['exp_avg_sq'] / (1.0 - beta2**step)
        precond[name] = p_buf.sqrt_().add_(group['eps']).reciprocal_()
    return precond if any_state else None


def _scale_(tensors: ParamDict, precond: Optional[ParamDict]) -> ParamDict:
    """``P * t`` in place (``tensors`` must be owned by the caller, e.g. fresh ``autograd.grad`` outputs)."""
    if precond is not None:
        for k, t in tensors.items():
            t.mul_(precond[k])
    return tensors


def _grad(loss: torch.Tensor, params: ParamDict) -> ParamDict:
    """``d loss / d params``, each gradient a buffer of its own (safe to modify in place).

    ``autograd.grad`` may hand back expanded views (stride 0) or two gradients sharing one storage (e.g. the
    two inputs of an addition); those few are cloned, every other gradient is used as returned (no copy).
    """
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    out: ParamDict = {}
    seen: set[int] = set()
    for (k, p), g in zip(params.items(), grads):
        if g is None:
            g = torch.zeros_like(p)
        elif g.numel() > 0:
            storage = g.untyped_storage().data_ptr()
            if storage in seen or (g.numel() > 1 and 0 in g.stride()):
                g = g.clone(memory_format=torch.contiguous_format)
                storage = g.untyped_storage().data_ptr()
            seen.add(storage)
        out[k] = g
    return out


def _leaves(params: ParamDict) -> ParamDict:
    return {k: p.detach().requires_grad_(True) for k, p in params.items()}


def lookahead(
    contributions_fn: Callable[[ParamDict], torch.Tensor],
    params: ParamDict,
    weights: torch.Tensor,
    lr: float,
    preconditioner: Optional[ParamDict] = None,
    grad_reduce: Optional[GradReduce] = None,
) -> ParamDict:
    """``theta' = theta - lr * P * grad sum_i w_i c_i(theta)`` (detached; the LLM's ``.grad`` is never touched).

    Args:
        contributions_fn (Callable): ``params -> c`` ``[n]``.
        params (dict[str, torch.Tensor]): ``theta``.
        weights (torch.Tensor): ``[n]``, treated as constants.
        lr (float): ``eta``.
        preconditioner (dict[str, torch.Tensor], optional): ``P``; ``None`` for ones. Default: ``None``.
        grad_reduce (Callable, optional): Applied to the gradient dict before the step, e.g. a data-parallel
            sum so that the look-ahead uses the global batch. Default: ``None``.

    Returns:
        dict[str, torch.Tensor]: ``theta'``.
    """
    leaves = _leaves(params)
    with torch.enable_grad():
        contributions = contributions_fn(leaves)
        train_loss = (weights.detach().to(contributions) * contributions).sum()
        grads = _grad(train_loss, leaves)
    del contributions, train_loss  # free the graph's saved activations before building theta'
    if grad_reduce is not None:
        grads = grad_reduce(grads)
    # In place and one parameter at a time: at most one gradient buffer plus theta' are alive per parameter, instead
    # of gradient, P * gradient, lr * P * gradient and theta'.
    theta_prime = {}
    for k in params:
        step = grads.pop(k)
        if preconditioner is not None:
            step.mul_(preconditioner[k])
        theta_prime[k] = step.mul_(-lr).add_(params[k].detach())
    return theta_prime


def directional_derivative_jvp(
    contributions_fn: Callable[[ParamDict], torch.Tensor],
    params: ParamDict,
    direction: ParamDict,
) -> torch.Tensor:
    """``< grad c_i(theta), u >`` for all ``i`` in one forward-mode pass (:func:`torch.func.jvp`)."""
    primals = {k: p.detach() for k, p in params.items()}
    tangents = {k: direction[k].detach().to(p.dtype) for k, p in primals.items()}
    with torch.no_grad():
        _, derivative = jvp(contributions_fn, (primals,), (tangents,))
    return derivative


def directional_derivative_fd(
    contributions_fn: Callable[[ParamDict], torch.Tensor],
    params: ParamDict,
    direction: ParamDict,
    fd_eps: float = 1e-3,
) -> torch.Tensor:
    """Central finite difference ``(c(theta + h u) - c(theta - h u)) / 2h`` with ``h = fd_eps / ||u||``.

    Args:
        contributions_fn (Callable): ``params -> c`` ``[n]``.
        params (dict[str, torch.Tensor]): ``theta``.
        direction (dict[str, torch.Tensor]): ``u``.
        fd_eps (float): Length of the parameter-space step. Default: ``1e-3`` (float32); use ~``1e-5`` in float64.

    Returns:
        torch.Tensor: ``[n]``.
    """
    norm = torch.sqrt(sum((u.double()**2).sum() for u in direction.values()))
    if float(norm) == 0.0:
        return torch.zeros_like(contributions_fn({k: p.detach() for k, p in params.items()}))
    h = fd_eps / float(norm)
    with torch.no_grad():
        plus = contributions_fn({k: p.detach() + h * direction[k] for k, p in params.items()})
        minus = contributions_fn({k: p.detach() - h * direction[k] for k, p in params.items()})
    return (plus - minus) / (2.0 * h)


def hypergradient(
    contributions_fn: Callable[[ParamDict], torch.Tensor],
    val_loss_fn: Callable[[ParamDict], torch.Tensor],
    params: ParamDict,
    weights: torch.Tensor,
    lr: float,
    preconditioner: Optional[ParamDict] = None,
    method: str = 'jvp',
    fd_eps: float = 1e-3,
    grad_reduce: Optional[GradReduce] = None,
    jvp_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> HypergradientResult:
    """Exact one-step hypergradient ``dL_val(theta'(w))/dw``.

    Cost: one weighted forward+backward (``theta'``), one validation forward+backward (``v``) and one JVP
    forward (or two forwards for ``'fd'``); no second-order memory.

    Args:
        contributions_fn (Callable): ``params -> c`` ``[n]``, the per-sample training-loss contributions.
        val_loss_fn (Callable): ``params -> L_val`` (scalar). Under data parallelism, this rank's share of the
            global validation loss (so that the shares sum to it).
        params (dict[str, torch.Tensor]): ``theta`` (not modified).
        weights (torch.Tensor): ``[n]`` the weights at which to differentiate.
        lr (float): Look-ahead learning rate ``eta``.
        preconditioner (dict[str, torch.Tensor], optional): ``P``; ``None`` for the SGD look-ahead. Default:
            ``None``.
        method (str): ``'jvp'`` (forward-mode, exact) or ``'fd'`` (central finite difference). Default: ``'jvp'``.
        fd_eps (float): Step length for ``'fd'``. Default: ``1e-3``.
        grad_reduce (Callable, optional): Sums a gradient dict over data-parallel ranks (applied to the
            look-ahead gradient and to ``grad L_val``). Default: ``None``.
        jvp_context (Callable, optional): Context manager factory entered around the JVP (e.g. switching a HF
            model to an attention that supports forward-mode AD). Default: ``contextlib.nullcontext``.

    Returns:
        HypergradientResult: ``[n]`` hypergradient, the look-ahead validation loss and ``eta``.
    """
    direction, val_loss = _validation_direction(
        lookahead(contributions_fn, params, weights, lr, preconditioner, grad_reduce), val_loss_fn, preconditioner,
        grad_reduce)
    derivative = _derivative(contributions_fn, params, direction, method, fd_eps, jvp_context)
    return HypergradientResult(-lr * derivative.detach(), float(val_loss), float(lr))


def _validation_direction(theta_end: ParamDict, val_loss_fn: Callable[[ParamDict], torch.Tensor],
                          preconditioner: Optional[ParamDict],
                          grad_reduce: Optional[GradReduce]) -> tuple[ParamDict, torch.Tensor]:
    """``u = P * grad L_val(theta_end)`` (summed over ranks) and ``L_val(theta_end)``. Pass ``theta_end`` without
    keeping a reference: it is not needed past the gradient, and through the JVP only ``u`` (and ``P``, owned by
    the caller) are parameter-sized."""
    leaves = _leaves(theta_end)
    del theta_end
    with torch.enable_grad():
        val_loss = val_loss_fn(leaves)
        val_grad = _grad(val_loss, leaves)
    val_loss_value = val_loss.detach()
    del val_loss, leaves
    if grad_reduce is not None:
        val_grad = grad_reduce(val_grad)
        val_loss_value = grad_reduce({'loss': val_loss_value.reshape(1)})['loss'][0]
    return _scale_(val_grad, preconditioner), val_loss_value  # in place: val_grad becomes u


def _derivative(contributions_fn: Callable[[ParamDict], torch.Tensor], params: ParamDict, direction: ParamDict,
                method: str, fd_eps: float,
                jvp_context: Callable[[], contextlib.AbstractContextManager]) -> torch.Tensor:
    """``d c(params + t u) / dt`` at ``t = 0`` by ``method``: ``'jvp'`` (exact) or ``'fd'``."""
    if method == 'jvp':
        with jvp_context():
            return directional_derivative_jvp(contributions_fn, params, direction)
    if method == 'fd':
        return directional_derivative_fd(contributions_fn, params, direction, fd_eps)
    raise ValueError(f"hypergrad method must be 'jvp' or 'fd', got {method!r}")


def iter_named_trainable(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """Trainable named parameters of ``module`` (the ``theta`` of the look-ahead)."""
    return ((n, p) for n, p in module.named_parameters() if p.requires_grad)


@contextlib.contextmanager
def eager_attention(lm: torch.nn.Module) -> Iterator[None]:
    """Switch a HF model to eager attention (forward-mode AD is not implemented for fused attention kernels)."""
    config = getattr(lm, 'config', None)
    previous = getattr(config, '_attn_implementation', None)
    if config is None or previous in (None, 'eager'):
        yield
        return
    config._attn_implementation = 'eager'
    try:
        yield
    finally:
        config._attn_implementation = previous


# Query rows per block of the JVP's attention; ``None``: :func:`jvp_query_block`'s rule (from the model's shape).
JVP_QUERY_BLOCK: Optional[int] = None
_CHUNKED_NAME = 'dwm_jvp_chunked'


def jvp_query_block(vocab_size: int, num_heads: int, minimum: int = 64) -> int:
    """Query rows per attention block in the JVP, so that the attention never bounds its memory.

    Under :func:`torch.func.jvp` (no graph is kept) the JVP's peak is its largest op: the attention scores of one
    layer (primal and tangent scores and softmax, ``4 x B x H x rows x T`` values) or the LM head (logits and their
    log-softmax in the cross-entropy, ``4 x B x T x V``). Blocks of ``V // H`` rows keep the scores at or under the
    head's size at any ``T``, so chunking costs nothing where the head bounds anyway (a 50k vocabulary with 16 heads
    at ``T = 2048``: one block) and caps the ``O(T^2)`` scores where they would not (long sequences, small
    vocabularies). Rounded down to a multiple of ``minimum``, at least ``minimum``.
    """
    rows = max(vocab_size // max(num_heads, 1), minimum)
    return rows - rows % minimum


def chunked_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, query_block: Optional[int] = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """Attention over blocks of query rows, each on SDPA's *math* backend: what forward-mode AD can differentiate,
    with scores of ``[B, H, query_block, T]`` at a time instead of ``[B, H, T, T]``.

    A HuggingFace attention function (``AttentionInterface`` signature: ``query`` ``[B, H, T, D]``, ``key``/``value``
    ``[B, H_kv, S, D]``, the 4-D additive ``attention_mask`` ``[B, 1, T, S]`` or ``None``; returns ``[B, T, H, D]``).
    Every query row attends to the same keys as in one call, so the result is the unchunked one (same math, blocks
    concatenated); under :func:`torch.func.jvp` each block's primal and tangent scores are freed before the next.

    Args:
        module, query, key, value, attention_mask, dropout, scaling, is_causal: as HF's ``sdpa_attention_forward``.
        query_block (int, optional): Query rows per block. Default: ``None`` (:data:`JVP_QUERY_BLOCK` if set, else
            :func:`jvp_query_block` of the module's ``config``; one block for a module without one).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = getattr(module, 'num_key_value_groups', 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    block = query_block or JVP_QUERY_BLOCK
    config = getattr(module, 'config', None)
    if block is None:
        vocab, heads = getattr(config, 'vocab_size', None), getattr(config, 'num_attention_heads', None)
        block = jvp_query_block(vocab, heads) if vocab and heads else query.shape[2]
    q_len, k_len = query.shape[2], key.shape[2]
    mask = attention_mask[:, :, :, :k_len] if attention_mask is not None and attention_mask.ndim == 4 else \
        attention_mask
    causal = bool(is_causal if is_causal is not None else (q_len > 1 and mask is None))
    key, value = key.contiguous(), value.contiguous()
    dropout = dropout if module.training else 0.0
    outputs = []
    with sdpa_kernel([SDPBackend.MATH]):
        for start in range(0, q_len, block):
            stop = min(start + block, q_len)
            block_mask = mask[:, :, start:stop] if mask is not None and mask.ndim == 4 else mask
            if causal:  # query row i sees keys 0..i + (k_len - q_len): the bottom-right aligned causal mask
                rows = torch.arange(start, stop, device=query.device)[:, None] + (k_len - q_len)
                block_mask = torch.arange(k_len, device=query.device)[None, :] <= rows  # [block, S] bool
            outputs.append(torch.nn.functional.scaled_dot_product_attention(
                query[:, :, start:stop].contiguous(), key, value, attn_mask=block_mask, dropout_p=dropout,
                scale=scaling))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _register_chunked_attention() -> bool:
    """Register :func:`chunked_attention` with HF's ``AttentionInterface`` (once); ``False`` where HF has none."""
    try:
        from transformers.modeling_utils import AttentionInterface
    except ImportError:  # pragma: no cover - transformers < 4.50
        return False
    if _CHUNKED_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(_CHUNKED_NAME, chunked_attention)
    return True


@contextlib.contextmanager
def _switched_attributes(changes: list[tuple[object, str, object]]) -> Iterator[None]:
    previous = [(obj, name, getattr(obj, name)) for obj, name, _ in changes]
    try:
        for obj, name, value in changes:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(previous):
            setattr(obj, name, value)


def _mpt_torch_attention(lm: torch.nn.Module) -> list[tuple[object, str, object]]:
    """LLM Foundry MPT modules set to ``attn_impl: flash``: the attribute changes that run them on ``torch``
    attention (plain ops, differentiable in forward mode) instead; empty for any other model."""
    changes: list[tuple[object, str, object]] = []
    for module in lm.modules():
        if getattr(module, 'attn_impl', None) != 'flash':
            continue
        changes.append((module, 'attn_impl', 'torch'))
        if hasattr(module, 'attn_fn'):
            from llmfoundry.models.layers.attention import scaled_multihead_dot_product_attention
            changes.append((module, 'attn_fn', scaled_multihead_dot_product_attention))
    return changes


@contextlib.contextmanager
def jvp_attention(lm: torch.nn.Module) -> Iterator[None]:
    """Attention that forward-mode AD can differentiate, as cheaply as available, and in bounded memory.

    SDPA's fused kernels (flash/memory-efficient, CPU flash) and flash-attn have no forward-mode rule, but SDPA's
    *math* backend is a composite of differentiable ops (measured faster than HF's eager attention for the JVP on
    CPU, see ``benchmarks/RESULTS.md``). It materialises the ``[B, H, T, T]`` scores, with their tangents; at
    long sequences (or small vocabularies) that is what bounds the JVP's memory, so:

    * a HuggingFace model on the attention interface (``_supports_attention_backend``: Llama, Mistral, Qwen2...),
      whatever its ``attn_implementation`` (``sdpa``, ``flash_attention_2``, ``eager``), runs
      :func:`chunked_attention` for the JVP: the math backend over blocks of query rows (:func:`jvp_query_block`:
      as many as keep the scores under the LM head's size);
    * another HF model on ``sdpa`` keeps SDPA, restricted to the math backend; on anything else, eager;
    * an LLM Foundry MPT model with ``attn_impl: flash`` runs its ``torch`` attention for the JVP (``attn_impl:
      torch`` is already plain ops).
    """
    config = getattr(lm, 'config', None)
    implementation = getattr(config, '_attn_implementation', None)
    mpt_changes = _mpt_torch_attention(lm)
    if mpt_changes:
        with _switched_attributes(mpt_changes):
            yield
        return
    if (config is not None and implementation is not None and getattr(lm, '_supports_attention_backend', False)
            and _register_chunked_attention()):
        config._attn_implementation = _CHUNKED_NAME
        try:
            yield
        finally:
            config._attn_implementation = implementation
        return
    if implementation == 'sdpa':
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.MATH]):
            yield
        return
    with eager_attention(lm):
        yield


@dataclass
class MultiStepResult:
    """Output of :func:`hypergradient_multistep`.

    Attributes:
        hypergradients (list[torch.Tensor]): ``[n_k]`` per look-ahead step ``k``, ``dL_val(theta_K)/dw_k``
            (first order beyond ``K = 1``).
        val_loss (float): ``L_val(theta_K)``.
        lookahead_lr (float): The ``eta`` used.
    """

    hypergradients: list[torch.Tensor]
    val_loss: float
    lookahead_lr: float


def hypergradient_multistep(
    contributions_fns: list[Callable[[ParamDict], torch.Tensor]],
    val_loss_fn: Callable[[ParamDict], torch.Tensor],
    params: ParamDict,
    weights: list[torch.Tensor],
    lr: float,
    preconditioner: Optional[ParamDict] = None,
    method: str = 'jvp',
    fd_eps: float = 1e-3,
    grad_reduce: Optional[GradReduce] = None,
    jvp_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> MultiStepResult:
    """First-order ``K``-step hypergradient (module docstring); ``K = len(contributions_fns)``.

    ``K = 1`` calls :func:`hypergradient` (exact, bit-identical). Memory: ``K`` copies of the parameters (each
    step's ``theta_k`` is kept for its JVP); cost: ``K`` weighted forward+backward passes, one validation
    forward+backward, ``K`` JVPs.

    Args:
        contributions_fns (list[Callable]): ``params -> c_k`` ``[n_k]``, one per look-ahead step (its batch).
        val_loss_fn (Callable): ``params -> L_val``.
        params (dict[str, torch.Tensor]): ``theta_0`` (not modified).
        weights (list[torch.Tensor]): ``[n_k]`` per step, treated as constants.
        lr, preconditioner, method, fd_eps, grad_reduce, jvp_context: as for :func:`hypergradient` (``P`` is held
            fixed over the ``K`` steps).

    Returns:
        MultiStepResult: per-step hypergradients, ``L_val(theta_K)`` and ``eta``.
    """
    if len(contributions_fns) != len(weights) or not contributions_fns:
        raise ValueError(f'hypergradient_multistep needs one weight vector per step, got {len(contributions_fns)} '
                         f'contribution functions and {len(weights)} weight vectors')
    if len(contributions_fns) == 1:
        one = hypergradient(contributions_fns[0], val_loss_fn, params, weights[0], lr, preconditioner, method,
                            fd_eps, grad_reduce, jvp_context)
        return MultiStepResult([one.hypergradient], one.val_loss, one.lookahead_lr)
    trajectory = [{k: p.detach() for k, p in params.items()}]
    for fn, w in zip(contributions_fns, weights):
        trajectory.append(lookahead(fn, trajectory[-1], w, lr, preconditioner, grad_reduce))
    direction, val_loss = _validation_direction(trajectory.pop(), val_loss_fn, preconditioner, grad_reduce)
    hypergradients = [-lr * _derivative(fn, theta_k, direction, method, fd_eps, jvp_context).detach()
                      for fn, theta_k in zip(contributions_fns, trajectory)]
    return MultiStepResult(hypergradients, float(val_loss), float(lr))

