"""DWM inside a real Composer Trainer on a tiny Llama (CPU)."""

import copy

import pytest
import torch
from composer import Trainer
from composer.core import Callback, Event
from composer.loggers import InMemoryLogger
from dwm_testing import ToyCorpus, composer_llama, loader, val_batches
from torch.utils.data import DataLoader

from algorithms.dwm import DWM, load_schedule
from algorithms.dwm.functional import WEIGHT_KEY, normalize_with_prior
from algorithms.dwm.hypergradient import adam_preconditioner
from algorithms.dwm.refit import refit


def _trainer(model, algorithms=(), batch_size=8, microbatch=None, tokens=False, max_duration='2ba', optimizer=None,
             **kwargs):
    logger = InMemoryLogger()
    train = loader(64, batch_size, seed=0, pad_every=3)
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(model=model, train_dataloader=train, max_duration=max_duration, optimizers=optimizer,
                      algorithms=list(algorithms), device='cpu', seed=17, loggers=[logger], progress_bar=False,
                      log_to_console=False, device_train_microbatch_size=microbatch,
                      accumulate_train_batch_on_tokens=tokens, **kwargs)
    return trainer, logger


def _losses(logger):
    return [float(v) for _, v in logger.data['loss/train/total']]


def _refit_loader(seed=1, batch_size=8):
    return DataLoader(ToyCorpus(64, seed=seed), batch_size=batch_size, shuffle=False)


class _Capture(Callback):
    """Records the batch and its DWM weights after the algorithm ran."""

    def __init__(self):
        self.batches = []

    def run_event(self, event, state, logger):
        if event == Event.BATCH_START:
            self.batches.append({k: v.clone() for k, v in state.batch.items() if isinstance(v, torch.Tensor)})


@pytest.mark.parametrize('microbatch,tokens', [(1, False), (2, False), (8, False), (2, True), (1, True)])
def test_neutral_weights_equal_plain_composer(microbatch, tokens):
    """An untrained (exactly uniform) DWM reproduces Composer's plain loss and update for any microbatching."""
    plain, plain_log = _trainer(composer_llama(), microbatch=microbatch, tokens=tokens)
    plain.fit()
    dwm = DWM(refit=False, weighter={'d_model': 16, 'n_heads': 2, 'n_layers': 1})
    capture = _Capture()
    weighted, weighted_log = _trainer(composer_llama(), [dwm], microbatch=microbatch, tokens=tokens,
                                      callbacks=[capture])
    weighted.fit()
    assert all(torch.equal(b[WEIGHT_KEY], torch.ones(8)) for b in capture.batches)
    torch.testing.assert_close(_losses(weighted_log), _losses(plain_log), rtol=1e-6, atol=0)
    for (name, a), (_, b) in zip(weighted.state.model.named_parameters(), plain.state.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_weighted_loss_reaches_the_update():
    """Non-uniform weights do change the step (the replacement of state.loss is live)."""
    plain, _ = _trainer(composer_llama(), max_duration='1ba')
    plain.fit()
    dwm = DWM(refit=False, weighter={'d_model': 16, 'n_heads': 2, 'n_layers': 1})
    trainer, _ = _trainer(composer_llama(), [dwm], max_duration='1ba')
    with torch.no_grad():
        dwm.weighter.score_head.weight.normal_(std=5.0)
    trainer.fit()
    diff = max((a - b).abs().max() for a, b in zip(trainer.state.model.parameters(), plain.state.model.parameters()))
    assert diff > 1e-5


def _dwm(**kwargs):
    defaults = dict(stage_boundaries=['2ba', '4ba'], refit_steps=4, refit_lr=0.05, lookahead_lr=0.5,
                    refit_dataloader=_refit_loader(), val_dataloader=val_batches(), score_names=['quality'],
                    domain_names=['clean', 'noisy'], weighter={'d_model': 16, 'n_heads': 2, 'n_layers': 1})
    defaults.update(kwargs)
    return DWM(**defaults)


@pytest.mark.slow
def test_training_refits_and_resumes_identically(tmp_path):
    # Uninterrupted run, with a checkpoint at batch 3 (between the 2nd and 3rd stage refits).
    dwm_a = _dwm(lookahead='adam', save_dir=str(tmp_path / 'schedule'))
    capture_a = _Capture()
    model_a = composer_llama()
    trainer_a, log_a = _trainer(model_a, [dwm_a], max_duration='6ba', callbacks=[capture_a],
                                optimizer=torch.optim.Adam(model_a.parameters(), lr=3e-3),
                                save_folder=str(tmp_path / 'ckpt'), save_interval='3ba',
                                save_filename='ep{epoch}-ba{batch}-rank{rank}.pt')
    trainer_a.fit()
    w0 = capture_a.batches[0][WEIGHT_KEY]
    assert dwm_a.refits_done == 3 and dwm_a.stage_index == 2
    assert w0.std() > 1e-3  # moved off uniform after the first refit
    torch.testing.assert_close(w0.mean(), torch.tensor(1.0), rtol=0, atol=1e-5)
    domain = capture_a.batches[0]['domain']
    assert w0[domain == 0].mean() > w0[domain == 1].mean()  # the clean domain is the one the validation set likes
    for key in ('dwm/weight/ess', 'dwm/domain/clean/weight', 'dwm/domain/noisy/loss', 'dwm/refit/val_loss_before',
                'dwm/refit/val_loss_after', 'dwm/refit/hypergradient_norm', 'dwm/refit/wall_time',
                'dwm/spearman/quality'):
        assert key in log_a.data, key
    assert log_a.data['dwm/spearman/quality'][0][1] > 0  # weights correlate with the clean/noisy score
    assert len(load_schedule(tmp_path / 'schedule')) == 3

    # Resume from batch 3.
    dwm_b = _dwm(lookahead='adam')
    capture_b = _Capture()
    model_b = composer_llama(seed=5)
    trainer_b, log_b = _trainer(model_b, [dwm_b], max_duration='6ba', callbacks=[capture_b],
                                optimizer=torch.optim.Adam(model_b.parameters(), lr=3e-3),
                                load_path=str(tmp_path / 'ckpt' / 'ep0-ba3-rank0.pt'))
    trainer_b.fit()
    assert len(capture_b.batches) == 3
    for a, b in zip(capture_a.batches[3:], capture_b.batches):
        assert torch.equal(a['uid'], b['uid'])
        torch.testing.assert_close(b[WEIGHT_KEY], a[WEIGHT_KEY], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(_losses(log_b), _losses(log_a)[3:], rtol=1e-6, atol=0)
    for (name, a), (_, b) in zip(dwm_a.weighter.named_parameters(), dwm_b.weighter.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)


def test_refit_moves_the_weighter_and_nothing_else():
    """The public refit step, called without the Trainer, moves the weighter it is given; the LLM, its gradients and
    optimizer, and the RNG are left as they were."""
    dwm = _dwm(lookahead='adam', refit_steps=2, stage_boundaries=None, num_stages=1)  # a 1-batch run: one stage
    model = composer_llama()
    trainer, _ = _trainer(model, [dwm], max_duration='1ba', optimizer=torch.optim.Adam(model.parameters(), lr=1e-3))
    trainer.fit()
    state = trainer.state
    for p in state.model.parameters():
        p.grad = torch.randn_like(p)
    params = copy.deepcopy({k: v.detach() for k, v in state.model.named_parameters()})
    grads = {k: v.grad.clone() for k, v in state.model.named_parameters()}
    opt_state = copy.deepcopy(state.optimizers[0].state_dict())
    rng = torch.get_rng_state()
    before = [p.detach().clone() for p in dwm.weighter.parameters()]
    lm = state.model.model
    result = refit(dwm.weighter, dwm.weighter_optimizer, lm, dwm.refit_batches.next, dwm.val_batches.next, dwm.config,
                   lookahead_lr=1e-3, precond=adam_preconditioner(state.optimizers[0], dict(lm.named_parameters())))
    assert result.weighter is dwm.weighter and not result.weighter.training
    assert any(not torch.equal(a, b) for a, b in zip(before, dwm.weighter.parameters()))
    assert result.diagnostics.metrics()['dwm/refit/steps'] == 2
    for k, v in state.model.named_parameters():
        assert torch.equal(v, params[k]) and torch.equal(v.grad, grads[k]), k
    after = state.optimizers[0].state_dict()
    for pid, st in opt_state['state'].items():
        for key, value in st.items():
            assert torch.equal(torch.as_tensor(after['state'][pid][key]), torch.as_tensor(value))
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.slow
def test_schedule_transfers_to_a_wider_model(tmp_path):
    dwm_a = _dwm(stage_boundaries=['2ba'], refit_steps=3, save_dir=str(tmp_path / 'sched'))
    trainer_a, _ = _trainer(composer_llama(hidden=32), [dwm_a], max_duration='4ba')
    trainer_a.fit()
    saved = [w for _, w in load_schedule(tmp_path / 'sched')]
    assert len(saved) == 2

    dwm_b = DWM(stage_boundaries=['2ba'], schedule=str(tmp_path / 'sched'), refit=False)
    capture = _Capture()
    trainer_b, _ = _trainer(composer_llama(hidden=48, seed=3), [dwm_b], max_duration='4ba', callbacks=[capture])
    trainer_b.fit()
    assert dwm_b.refits_done == 0
    for i, batch in enumerate(capture.batches):
        stage = 0 if i < 2 else 1
        with torch.no_grad():
            expected = saved[stage](batch['input_ids'], batch.get('attention_mask'))
        torch.testing.assert_close(batch[WEIGHT_KEY], expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(capture.batches[0][WEIGHT_KEY], torch.ones(8))


def test_select_mode_keeps_a_fraction_of_the_pool():
    dwm = _dwm(mode='select', select_factor=4, stage_boundaries=None, num_stages=1, refit_steps=2)
    capture = _Capture()
    trainer, log = _trainer(composer_llama(), [dwm], batch_size=16, max_duration='2ba', callbacks=[capture])
    trainer.fit()
    assert [b['input_ids'].shape[0] for b in capture.batches] == [4, 4]
    assert all(torch.equal(b[WEIGHT_KEY], torch.ones(4)) for b in capture.batches)
    assert len(set(capture.batches[0]['uid'].tolist())) == 4


class _PoolCapture(Callback):
    """Records, per batch, the uids DWM trained on and the weights it gave the whole pool."""

    def __init__(self, dwm):
        self.dwm, self.trained, self.pools = dwm, [], []

    def run_event(self, event, state, logger):
        if event == Event.FIT_START:  # after DWM built its weighter: spread-out scores, frozen
            with torch.no_grad():
                head = self.dwm.weighter.score_head.weight
                head.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(0)))
        if event == Event.BATCH_START:
            self.trained.append(sorted(state.batch['uid'].tolist()))
            self.pools.append(self.dwm.last_weights.clone())


@pytest.mark.parametrize('temperature', [1.0, 1e-3])
def test_select_temperature_sharpens_the_draw_toward_the_top_k(temperature):
    """``select_temperature`` divides the selection's logits: near 0 the trained quarter is exactly the pool's top
    quarter by weight, batch after batch; at 1 (the Gumbel draw in proportion to the weights) it is not."""
    dwm = DWM(refit=False, mode='select', select_factor=4, select_temperature=temperature,
              weighter={'d_model': 16, 'n_heads': 2, 'n_layers': 1})
    capture = _PoolCapture(dwm)
    trainer, _ = _trainer(composer_llama(), [dwm], batch_size=16, max_duration='4ba', callbacks=[capture])
    trainer.fit()
    assert len(capture.trained) == 4
    top = [sorted((16 * b + torch.topk(pool, 4).indices).tolist()) for b, pool in enumerate(capture.pools)]
    assert all(float(pool.std()) > 0.1 for pool in capture.pools)
    if temperature < 1:
        assert capture.trained == top
    else:
        assert capture.trained != top


def test_select_temperature_must_be_positive():
    with pytest.raises(ValueError, match='select_temperature must be > 0'):
        DWM(refit=False, mode='select', select_temperature=0.0)


def test_nonfinite_weights_fall_back_to_uniform():
    dwm = DWM(refit=False, weighter={'d_model': 16, 'n_heads': 2, 'n_layers': 1})
    capture = _Capture()
    trainer, log = _trainer(composer_llama(), [dwm], max_duration='1ba', callbacks=[capture])
    with torch.no_grad():
        dwm.weighter.score_head.weight.fill_(float('nan'))
    with pytest.warns(UserWarning, match='non-finite'):
        trainer.fit()
    assert torch.equal(capture.batches[0][WEIGHT_KEY], torch.ones(8))
    assert dwm.nonfinite_batches == 1 and log.data['dwm/nonfinite_weight_batches'][-1][1] == 1


def test_prior_weight_multiplies_and_renormalises():
    w = torch.tensor([1.0, 1.0, 2.0, 0.0 + 0.5])
    prior = torch.tensor([2.0, 1.0, 1.0, 0.0])
    out = normalize_with_prior(w, prior)
    torch.testing.assert_close(out.mean(), torch.tensor(1.0))
    torch.testing.assert_close(out / out[1], w * prior / (w[1] * prior[1]))


def test_fsdp_is_refused_at_init():
    class FakeState:
        fsdp_enabled = True
        fsdp_config = object()

    with pytest.raises(ValueError, match='FSDP'):
        DWM(refit=False)._init(FakeState())


class _ForwardKwargs:
    """Forward pre-hook that records which keyword arguments reach the HF model."""

    def __init__(self, module):
        self.calls = []
        module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls.append(sorted(kwargs))


@pytest.mark.parametrize('single_loss_pass', [True, False])
def test_single_loss_pass_keeps_loss_and_train_metrics(single_loss_pass):
    """With ``single_loss_pass`` the HF forward gets no ``labels`` (no discarded cross-entropy), yet the loss, the
    update and Composer's train metrics (LanguageCrossEntropy from its own copy of the batch) equal plain Composer,
    and the batch keeps its labels after the step; microbatched and with token accumulation."""
    from composer.metrics.nlp import LanguageCrossEntropy
    from composer.models import HuggingFaceModel
    from dwm_testing import tiny_llama

    def model():
        return HuggingFaceModel(tiny_llama(), use_logits=True, metrics=[LanguageCrossEntropy()])

    plain, plain_log = _trainer(model(), microbatch=4, tokens=True)
    plain.fit()
    dwm = DWM(refit=False, weighter={'d_model': 16, 'n_heads': 2, 'n_layers': 1}, single_loss_pass=single_loss_pass)
    capture = _Capture()
    weighted_model = model()
    hook = _ForwardKwargs(weighted_model.model)
    weighted, weighted_log = _trainer(weighted_model, [dwm], microbatch=4, tokens=True, callbacks=[capture])
    weighted.fit()
    assert len(hook.calls) == 4
    assert all(('labels' in kw) != single_loss_pass for kw in hook.calls)
    assert all('labels' in b for b in capture.batches) and 'labels' in weighted.state.batch
    torch.testing.assert_close(_losses(weighted_log), _losses(plain_log), rtol=1e-6, atol=0)
    key = 'metrics/train/LanguageCrossEntropy'
    torch.testing.assert_close([float(v) for _, v in weighted_log.data[key]],
                               [float(v) for _, v in plain_log.data[key]], rtol=1e-6, atol=0)
    for (name, a), (_, b) in zip(weighted.state.model.named_parameters(), plain.state.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_refit_with_sdpa_model_uses_math_attention():
    """A refit on an ``sdpa`` model runs (the JVP on SDPA's math backend) and leaves the attention setting alone."""
    model = composer_llama(attn='sdpa')
    dwm = DWM(num_stages=2, refit_steps=1, lookahead_lr=0.1, weighter={'d_model': 16, 'n_heads': 2, 'n_layers': 1},
              refit_dataloader=_refit_loader(), val_dataloader=val_batches())
    trainer, _ = _trainer(model, [dwm], max_duration='2ba')
    trainer.fit()
    assert dwm.refits_done == 2
    assert model.model.config._attn_implementation == 'sdpa'
    assert dwm.last_refit_metrics['dwm/refit/hypergradient_norm'] > 0


def test_refit_checkpoint_weighter_gives_the_same_refit():
    """Checkpointing the weighter's backbone in the refit changes memory, not the result."""
    weighters = []
    for checkpointed in (False, True):
        dwm = DWM(num_stages=1, refit_steps=2, lookahead_lr=0.1, weighter={'d_model': 16, 'n_heads': 2, 'n_layers': 1},
                  refit_dataloader=_refit_loader(), val_dataloader=val_batches(),
                  refit_checkpoint_weighter=checkpointed)
        trainer, _ = _trainer(composer_llama(), [dwm], max_duration='1ba')  # one stage: its refit at batch 0
        trainer.fit()
        assert dwm.refits_done >= 1
        weighters.append(dwm.weighter.state_dict())
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in weighters[0].items() if 'score_head' in k)
    for name, value in weighters[0].items():
        torch.testing.assert_close(weighters[1][name], value, rtol=1e-6, atol=1e-7, msg=name)
