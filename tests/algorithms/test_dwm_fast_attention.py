"""DWM's weighted step and refit with what makes a GPU step fast, on CPU: HF Llama on ``sdpa`` (and
``flash_attention_2`` where flash-attn and a GPU are there), LLM Foundry's MPT on ``attn_impl: torch`` (and ``flash``
where installed), and Composer's ``compile_config`` (``torch.compile``).

The reference for each is the same run on HF's eager attention / without compile: the same seed, data and DWM must
give the same losses and the same refit weighter, so the fast path changes the speed and nothing else.
"""

import importlib.util

import pytest
import torch
from composer import Trainer
from composer.core import Callback
from composer.loggers import InMemoryLogger
from dwm_testing import VOCAB, ToyCorpus, composer_llama, loader, val_batches
from torch.utils.data import DataLoader

from algorithms.dwm import DWM

FLASH_ATTN = importlib.util.find_spec('flash_attn') is not None
NO_FLASH = 'flash-attn is not installed (it needs a CUDA build)' if not FLASH_ATTN else \
    'flash-attn needs a CUDA device' if not torch.cuda.is_available() else ''


def _dwm():
    return DWM(stage_boundaries=['2ba'], refit_steps=2, refit_lr=0.05, lookahead_lr=0.5, lookahead='sgd',
               refit_dataloader=DataLoader(ToyCorpus(64, seed=1), batch_size=8, shuffle=False),
               val_dataloader=val_batches(), domain_names=['clean', 'noisy'],
               weighter={'d_model': 16, 'n_heads': 2, 'n_layers': 1})


class _InitialWeighter(Callback):
    """The weighter's state at AFTER_LOAD (DWM builds it at INIT, after the callbacks' INIT; it first refits at
    FIT_START)."""

    def after_load(self, state, logger):
        dwm = next(a for a in state.algorithms if isinstance(a, DWM))
        self.state = {k: v.detach().clone() for k, v in dwm.weighter.state_dict().items()}


def _run(model, **trainer_kwargs):
    """3 batches with DWM: a refit at step 0 and at batch 2, weighted steps in between; the losses, the refits'
    hypergradient norms, the weighter's state at the end, the DWM algorithm, the trainer and the weighter's state
    before any refit."""
    torch.manual_seed(0)
    dwm = _dwm()
    logger = InMemoryLogger()
    initial = _InitialWeighter()
    trainer = Trainer(model=model, train_dataloader=loader(64, 8, seed=0, pad_every=3), max_duration='3ba',
                      optimizers=torch.optim.Adam(model.parameters(), lr=3e-3), algorithms=[dwm], device='cpu',
                      seed=17, loggers=[logger], progress_bar=False, log_to_console=False, callbacks=[initial],
                      **trainer_kwargs)
    trainer.fit()
    losses = [float(v) for _, v in logger.data['loss/train/total']]
    hyper = [float(v) for _, v in logger.data['dwm/refit/hypergradient_norm']]
    weighter = {k: v.detach().clone() for k, v in dwm.weighter.state_dict().items()}
    return losses, hyper, weighter, dwm, trainer, initial.state


def _assert_same_run(fast, reference, rtol):
    """Same losses and hypergradients. The second refit's hypergradient is taken with the weights of the weighter
    the first refit made, so it checks that refit too (the weighter's parameters themselves are not compared: Adam
    turns a 1e-9 difference in a near-zero gradient into a full step)."""
    losses, hyper, weighter, dwm, _, initial = fast
    ref_losses, ref_hyper = reference[:2]
    assert dwm.refits_done == 2 and len(losses) == 3 and len(hyper) == 2
    assert all(h > 0 for h in hyper)
    assert any(not torch.equal(weighter[k], v) for k, v in initial.items())  # the refits moved the weighter
    torch.testing.assert_close(losses, ref_losses, rtol=rtol, atol=0)
    torch.testing.assert_close(hyper, ref_hyper, rtol=rtol, atol=0)


@pytest.fixture(scope='module')
def eager_run():
    return _run(composer_llama(seed=0, attn='eager').double())


def test_sdpa_llama_weighted_step_and_refit_match_eager(eager_run):
    """``attn_implementation: sdpa`` (the fused CPU kernel in the training step, blocks on the math backend in the
    refit's JVP) trains and refits exactly as eager attention does."""
    fast = _run(composer_llama(seed=0, attn='sdpa').double())
    assert fast[4].state.model.model.config._attn_implementation == 'sdpa'  # restored after each refit's JVP
    _assert_same_run(fast, eager_run, rtol=1e-6)  # float64; HF's eager softmax runs in float32


@pytest.mark.skipif(bool(NO_FLASH), reason=NO_FLASH or 'runs')
def test_flash_attention_2_llama_weighted_step_and_refit():  # pragma: no cover - needs flash-attn and a GPU
    model = composer_llama(seed=0, attn='flash_attention_2').to(dtype=torch.bfloat16, device='cuda')
    losses, hyper, _, dwm = _run(model)[:4]
    assert dwm.refits_done == 2 and all(torch.isfinite(torch.tensor(losses))) and all(h > 0 for h in hyper)


def _mpt(attn_impl: str):
    from llmfoundry.models.mpt import ComposerMPTCausalLM
    torch.manual_seed(0)
    return ComposerMPTCausalLM(tokenizer=None, d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=64,
                               vocab_size=VOCAB, attn_config={'attn_impl': attn_impl},
                               loss_fn='torch_crossentropy')


def test_mpt_torch_attention_weighted_step_and_refit():
    """LLM Foundry's MPT with ``attn_impl: torch``: the weighted loss reaches the step (the losses differ from an
    untrained-weighter run only through the weights) and each refit computes a JVP hypergradient and moves the
    weighter."""
    losses, hyper, weighter, dwm, trainer, initial = _run(_mpt('torch'))
    assert dwm.refits_done == 2 and len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert len(hyper) == 2 and all(h > 0 and h == h for h in hyper)
    assert any(not torch.allclose(weighter[k], v) for k, v in initial.items())
    blocks = [m for m in trainer.state.model.model.modules() if hasattr(m, 'attn_impl')]
    assert blocks and all(m.attn_impl == 'torch' for m in blocks)


@pytest.mark.skipif(not FLASH_ATTN or not torch.cuda.is_available(),
                    reason='MPT attn_impl: flash needs flash-attn and a CUDA device')
def test_mpt_flash_attention_refit_runs_torch_attention_for_the_jvp():  # pragma: no cover - needs flash-attn + GPU
    model = _mpt('flash').to(dtype=torch.bfloat16, device='cuda')
    losses, hyper, _, dwm, trainer, _ = _run(model)
    assert dwm.refits_done == 2 and all(h > 0 for h in hyper)
    blocks = [m for m in trainer.state.model.model.modules() if hasattr(m, 'attn_impl')]
    assert all(m.attn_impl == 'flash' for m in blocks)  # switched back after the JVP


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compiled_model_weighted_step_and_refit_match_eager_mode():
    """``compile_config: {}`` (Composer compiles the model's forward with ``torch.compile``): DWM's single loss pass
    (the HF forward without labels) and its refit (an uncompiled ``functional_call`` of the same LM) give the run of
    the uncompiled model. The model is tiny: inductor compiles it on CPU in about a minute."""
    reference = _run(composer_llama(seed=0, attn='sdpa'))
    compiled = _run(composer_llama(seed=0, attn='sdpa'), compile_config={})
    trainer = compiled[4]
    assert 'forward' in vars(trainer.state.model)  # Composer replaced the forward by its compiled wrapper
    _assert_same_run(compiled, reference, rtol=1e-4)
