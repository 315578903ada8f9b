"""Before step 0 (issue 16, items 3 and 4): a schedule that cannot run is refused at start-up, and every shipped YAML's
first refit moves the weighter.

Item 4: the paper YAMLs warm the LLM's learning rate up from 0, and the first refit runs at batch 0. The look-ahead
step used the *scheduled* rate (0), so the hypergradient vanished and the first refit could not move the weighter.
``lookahead_lr`` now defaults to the optimizer's base (peak) rate. Each YAML of ``yamls/`` that refits is run here
for exactly its first refit, scaled down by overrides to a tiny model on the test corpus, its own optimizer and
scheduler (warm-up included) unchanged.
"""

from __future__ import annotations

import glob
import os

import pytest
import torch

from dwm_stream.train import builders
from dwm_stream.train.entry import build_trainer, fit, load_config

from tests.dwm_stream.test_yamls import YAML_DIR, _local_data_overrides, _write_selection, yaml_env  # noqa: F401
from tests.dwm_stream.test_yamls import local_mds  # noqa: F401 - fixtures

DWM_YAMLS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(YAML_DIR, '*.yaml'))
                   if 'algorithms:\n  dwm:' in open(p).read())

TINY = ['model.init_device=cpu', 'model.config_overrides.hidden_size=32', 'model.config_overrides.intermediate_size=64',
        'model.config_overrides.num_hidden_layers=1', 'model.config_overrides.num_attention_heads=2',
        'model.config_overrides.num_key_value_heads=2', 'model.config_overrides.max_position_embeddings=256',
        'global_train_batch_size=4', 'device_train_microbatch_size=4', 'device_eval_batch_size=4',
        'precision=fp32', 'device=cpu', 'autoresume=false', 'eval_subset_num_batches=1', 'eval_interval=1000ba',
        'algorithms.dwm.refit_steps=1', 'algorithms.dwm.weighter.d_model=16', 'algorithms.dwm.weighter.n_layers=1',
        'algorithms.dwm.weighter.n_heads=2', 'algorithms.dwm.weighter.max_seq_len=256',
        'algorithms.dwm.refit_loader.batch_size=4', 'algorithms.dwm.validation.batch_size=4',
        'algorithms.dwm.validation.max_length=256',
        # The 370M YAMLs' torch.compile of the base step (about 100 CPU-seconds here) changes nothing in a refit, which
        # runs the LM uncompiled; a compiled model's step and refit have their own test (test_dwm_fast_attention).
        'compile_config=null']


def _config(name: str, tmp, local_mds: str, extra: list[str]) -> dict:
    raw = load_config(os.path.join(YAML_DIR, name))
    selection = None
    if 'dsir' in name or 'qurating' in name:
        selection = str(tmp / 'selection.parquet')
        _write_selection(local_mds, selection, 'dsir' if 'dsir' in name else 'qurating')
    overrides = [*TINY, *_local_data_overrides(raw, local_mds, selection), f'save_folder={tmp / "run"}', *extra]
    if (raw.get('model') or {}).get('config_overrides', {}).get('num_key_value_heads') is None:
        overrides.remove('model.config_overrides.num_key_value_heads=2')
    return load_config(os.path.join(YAML_DIR, name), overrides)


def test_the_shipped_dwm_yamls_are_under_test():
    assert {'demo-cpu.yaml', 'slimpajama-370m-random-dwm.yaml', 'slimpajama-370m-dsir-dwm.yaml',
            'slimpajama-370m-qurating-dwm.yaml'} <= set(DWM_YAMLS), DWM_YAMLS


@pytest.mark.slow
@pytest.mark.parametrize('name', DWM_YAMLS)
def test_first_refit_of_each_shipped_yaml_moves_the_weighter(name, yaml_env, local_mds):  # noqa: F811
    cfg = _config(name, yaml_env, local_mds, ['max_duration=1ba', 'algorithms.dwm.num_stages=1'])
    if not cfg['algorithms']['dwm'].get('refit', True):
        pytest.skip(f'{name} replays a schedule (refit: false): it has no refit')
    trainer = build_trainer(cfg, config_path=name)
    try:
        dwm = next(a for a in trainer.state.algorithms if isinstance(a, builders.ConfiguredDWM))
        before = {k: v.detach().clone() for k, v in dwm.weighter.state_dict().items()}
        fit(trainer, cfg)
        assert dwm.refits_done == 1
        metrics = dwm.last_refit_metrics
        assert metrics['dwm/refit/dead'] == 0, metrics
        moved = max(float((v - before[k]).abs().max()) for k, v in dwm.weighter.state_dict().items()
                    if v.dtype.is_floating_point)
        assert moved > 0, f'{name}: the first refit left the weighter where it was ({metrics})'
        group = trainer.state.optimizers[0].param_groups[0]
        assert dwm._lookahead_lr(trainer.state) == group.get('initial_lr', group['lr']) > 0
    finally:
        trainer.close()


@pytest.mark.parametrize('overrides, match', [
    (['max_duration=4ba', 'algorithms.dwm.stage_boundaries=[10ba,20ba]'],
     r"algorithms\.dwm\.stage_boundaries\[0\]=10ba is reached at 10ba, at or past max_duration=4ba \(4 batches\)"),
    (['max_duration=4ba', 'algorithms.dwm.stage_boundaries=[0ba,2ba]'],
     r"algorithms\.dwm\.stage_boundaries\[0\]='0ba': stage 0 starts at 0"),
    (['max_duration=4ba', 'algorithms.dwm.num_stages=6'],
     r'algorithms\.dwm\.num_stages=6 \(stage \d at .*\) is reached at \d+ba, .*max_duration=4ba \(4 batches\).*'
     r'set num_stages to at most 4'),
    (['max_duration=4ba', 'algorithms.dwm.num_stages=5'],
     r'algorithms\.dwm\.num_stages=5 \(stage 4 at 0\.8dur\) is reached at 4ba, at or past max_duration=4ba'),
    (['algorithms.dwm.num_stages=0'], r'algorithms\.dwm\.num_stages: must be >= 1, got 0'),
    (['algorithms.dwm.lookahead_lr=0'], r'algorithms\.dwm\.lookahead_lr is 0: .* no refit can move the weighter'),
])
def test_a_schedule_that_cannot_run_is_refused_at_start_up(overrides, match, yaml_env, local_mds):  # noqa: F811
    """Refused at INIT (the Trainer's construction) or FIT_START (Composer sets ``max_duration`` after INIT): before
    the first refit and the first batch."""
    cfg = _config('demo-cpu.yaml', yaml_env, local_mds, overrides)
    trainer = None
    with pytest.raises(ValueError, match=match):
        trainer = build_trainer(cfg, config_path='demo-cpu.yaml')
        fit(trainer, cfg)
    if trainer is not None:
        dwm = next(a for a in trainer.state.algorithms if isinstance(a, builders.ConfiguredDWM))
        assert int(trainer.state.timestamp.batch) == 0 and dwm.refits_done == 0
        trainer.close()


@pytest.mark.parametrize('schedule', ['algorithms.dwm.num_stages=4', 'algorithms.dwm.stage_boundaries=[1ba,3ba]'])
def test_a_schedule_that_fits_is_accepted(schedule, yaml_env, local_mds):  # noqa: F811
    cfg = _config('demo-cpu.yaml', yaml_env, local_mds, ['max_duration=4ba', schedule])
    trainer = build_trainer(cfg, config_path='demo-cpu.yaml')
    try:
        dwm = next(a for a in trainer.state.algorithms if isinstance(a, builders.ConfiguredDWM))
        from algorithms.dwm.stages import check_against_duration
        assert check_against_duration(dwm.stage_plan, trainer.state.max_duration, 'boundaries' in schedule,
                                      len(dwm.stage_plan) + 1) is None
    finally:
        trainer.close()


def test_lookahead_lr_defaults_to_the_base_rate_and_an_explicit_one_wins():
    """Composer's schedulers record the base rate as ``initial_lr``; the scheduled ``lr`` is 0 in warm-up."""
    from algorithms.dwm import DWM

    class _State:
        optimizers = [torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)]

    state = _State()
    group = state.optimizers[0].param_groups[0]
    group['initial_lr'], group['lr'] = 3e-4, 0.0  # warm-up, batch 0
    assert DWM(refit=False)._lookahead_lr(state) == 3e-4
    assert DWM(refit=False, lookahead_lr=1e-2)._lookahead_lr(state) == 1e-2
    del group['initial_lr']
    group['lr'] = 5e-4
    assert DWM(refit=False)._lookahead_lr(state) == 5e-4
