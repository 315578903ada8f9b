"""DWM checks what a run needs when the Trainer is built (Composer's INIT), before any training step (issue 11).

Findings 1 and 4: a missing or empty validation/refit loader used to surface at the first refit (20% into a
5-stage run, naming Python arguments); a 1-stage schedule replayed with ``num_stages: 3`` silently reused its last
stage; a ``save_dir`` holding another run's ``schedule.json`` was silently overwritten. Each is now an error at
``Trainer(...)`` (or, for a run that might be resuming, at FIT_START, before the first batch) naming the YAML key
and the constructor argument.

The save_dir rule: ``schedule.json`` records its run (``run_name``, ``max_duration``). Another run's directory is
refused (fix: a new ``save_dir``, or ``save_overwrite``); the same run continues in it (autoresume, or a restart
after a kill before the first checkpoint).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from composer import Trainer
from dwm_testing import ToyCorpus, composer_llama, loader, val_batches
from torch.utils.data import DataLoader

from algorithms.dwm import DWM, ValidationBatches, load_schedule

WEIGHTER = {'d_model': 16, 'n_heads': 2, 'n_layers': 1}


def _refit_loader():
    return DataLoader(ToyCorpus(32, seed=1), batch_size=8, shuffle=False)


def _dwm(**kwargs) -> DWM:
    defaults = {'num_stages': 2, 'refit_steps': 1, 'lookahead_lr': 0.1, 'weighter': WEIGHTER,
                'refit_dataloader': _refit_loader(), 'val_dataloader': val_batches(2)}
    defaults.update(kwargs)
    return DWM(**defaults)


def _trainer(dwm: DWM, max_duration: str = '2ba', run_name: str = 'run-a', **kwargs) -> Trainer:
    model = composer_llama()
    return Trainer(model=model, train_dataloader=loader(32, 8), max_duration=max_duration, algorithms=[dwm],
                   optimizers=torch.optim.SGD(model.parameters(), lr=0.1), device='cpu', seed=17, run_name=run_name,
                   progress_bar=False, log_to_console=False, **kwargs)


# ------------------------------------------------------------------------------------------------ finding 1
def test_missing_validation_fails_at_init_naming_the_key():
    with pytest.raises(ValueError) as info:
        _trainer(_dwm(num_stages=5, val_dataloader=None))
    message = str(info.value)
    assert message.startswith('algorithms.dwm.validation (DWM(val_dataloader=...)): missing'), message
    assert 'lambada: PATH' in message and 'algorithms.dwm.refit: false' in message


def test_missing_refit_loader_fails_at_init():
    with pytest.raises(ValueError, match=r'^algorithms\.dwm\.refit_loader \(DWM\(refit_dataloader=\.\.\.\)\): missing'):
        _trainer(_dwm(refit_dataloader=None))


@pytest.mark.parametrize('source, reason', [
    ([], 'yields no batch'),
    ([{'ids': torch.zeros(2, 4, dtype=torch.long)}], 'have no `input_ids`'),
])
def test_empty_or_malformed_validation_fails_at_init(source, reason):
    with pytest.raises(ValueError, match=r'^algorithms\.dwm\.validation .*' + reason):
        _trainer(_dwm(val_dataloader=source))


def test_validation_file_that_does_not_exist_fails_at_init(tmp_path):
    from transformers import PreTrainedTokenizerFast
    missing = str(tmp_path / 'lambada_val.jsonl')
    val = ValidationBatches(missing, tokenizer=PreTrainedTokenizerFast, batch_size=2)
    with pytest.raises(ValueError) as info:
        _trainer(_dwm(val_dataloader=val))
    assert str(info.value).startswith('algorithms.dwm.validation (DWM(val_dataloader=...)): yields no batch '
                                      f'(FileNotFoundError: LAMBADA-format file {missing} does not exist)')


def test_no_validation_needed_without_refits():
    _trainer(_dwm(refit=False, val_dataloader=None, refit_dataloader=None)).close()
    # warmup_uniform with a single stage never refits either
    _trainer(_dwm(num_stages=1, warmup_uniform=True, val_dataloader=None, refit_dataloader=None)).close()


def test_probing_does_not_move_the_data():
    """The start-up probe reads the first batch without drawing it: the refit still starts at batch 0."""
    batches = val_batches(3)
    dwm = _dwm(val_dataloader=batches, num_stages=1)
    trainer = _trainer(dwm, max_duration='1ba')
    assert dwm.val_batches.drawn == 0 and dwm.refit_batches.drawn == 0
    trainer.fit()
    assert dwm.val_batches.drawn == 1 and dwm.refit_batches.drawn == 1


# ------------------------------------------------------------------------------------------------ finding 4: replay
def _write_run(tmp_path, name: str, num_stages: int, max_duration: str = '2ba', run_name: str = 'run-a') -> str:
    save_dir = str(tmp_path / name)
    trainer = _trainer(_dwm(num_stages=num_stages, save_dir=save_dir), max_duration=max_duration, run_name=run_name)
    trainer.fit()
    trainer.close()
    return save_dir


def test_replaying_a_schedule_with_another_stage_count_fails_at_init(tmp_path):
    schedule = _write_run(tmp_path, 'one-stage', num_stages=1)
    assert len(load_schedule(schedule)) == 1
    with pytest.raises(ValueError) as info:
        _trainer(DWM(num_stages=3, schedule=schedule, refit=False), max_duration='3ba')
    message = str(info.value)
    assert message.startswith('algorithms.dwm.num_stages (DWM(num_stages=...)): 3 stages, but the replayed '
                              f'schedule {schedule} (algorithms.dwm.schedule) holds 1 stage; set num_stages: 1'), message
    with pytest.raises(ValueError, match=r'^algorithms\.dwm\.stage_boundaries .*: 2 boundaries.*give 0 stage_boundaries'):
        _trainer(DWM(stage_boundaries=['1ba', '2ba'], schedule=schedule, refit=False), max_duration='3ba')
    _trainer(DWM(num_stages=1, schedule=schedule, refit=False), max_duration='3ba').close()  # matching: fine


def test_a_schedule_that_does_not_exist_fails_at_init(tmp_path):
    with pytest.raises(ValueError, match=r'^algorithms\.dwm\.schedule \(DWM\(schedule=\.\.\.\)\): DWM schedule .* not '
                                         r'found; give the schedule\.json'):
        _trainer(DWM(num_stages=1, schedule=str(tmp_path / 'nowhere'), refit=False))


# ------------------------------------------------------------------------------------------------ finding 4: save_dir
def _schedule(save_dir: str) -> dict:
    with open(os.path.join(save_dir, 'schedule.json')) as f:
        return json.load(f)


def test_save_dir_of_another_run_is_refused_at_init(tmp_path):
    save_dir = _write_run(tmp_path, 'sched', num_stages=2, max_duration='4ba')
    before = _schedule(save_dir)
    assert before['run'] == {'run_name': 'run-a', 'max_duration': '4ba'}
    with pytest.raises(ValueError) as info:
        _trainer(_dwm(save_dir=save_dir), max_duration='2ba', run_name='run-b')
    message = str(info.value)
    assert message.startswith(f"algorithms.dwm.save_dir (DWM(save_dir=...)): {save_dir}/schedule.json belongs to run "
                              "'run-a', not to this run 'run-b'; set a new save_dir, or algorithms.dwm.save_overwrite: "
                              'true to replace it'), message
    assert _schedule(save_dir) == before


def test_save_dir_of_a_longer_run_of_the_same_name_is_refused_before_the_first_batch(tmp_path):
    """Same run_name, other max_duration, not resuming (the issue's 2-batch run): refused at FIT_START."""
    save_dir = _write_run(tmp_path, 'sched', num_stages=2, max_duration='4ba')
    before = _schedule(save_dir)
    trainer = _trainer(_dwm(save_dir=save_dir), max_duration='2ba')
    with pytest.raises(ValueError, match=r"belongs to a run 'run-a' of max_duration 4ba \(this one: 2ba\) that this "
                                         r'run does not resume; set a new save_dir'):
        trainer.fit()
    assert int(trainer.state.timestamp.batch) == 0
    assert _schedule(save_dir) == before
    trainer.close()


def test_save_overwrite_replaces_the_schedule_and_its_stage_files(tmp_path, caplog):
    save_dir = _write_run(tmp_path, 'sched', num_stages=3, max_duration='3ba')
    assert len(_schedule(save_dir)['stages']) == 3
    dwm = _dwm(num_stages=1, save_dir=save_dir)
    dwm.config.save_overwrite = True  # algorithms.dwm.save_overwrite
    trainer = _trainer(dwm, max_duration='1ba', run_name='run-b')
    with caplog.at_level('WARNING', logger='algorithms.dwm.export'):
        trainer.fit()
    replaced = [r.getMessage() for r in caplog.records if 'replacing the schedule' in r.getMessage()]
    assert replaced == [f"algorithms.dwm.save_dir: replacing the schedule of run 'run-a' in {save_dir} "
                        '(save_overwrite: true).'], replaced  # logged, once
    doc = _schedule(save_dir)
    assert doc['run'] == {'run_name': 'run-b', 'max_duration': '1ba'} and len(doc['stages']) == 1
    assert sorted(os.listdir(save_dir)) == ['schedule.json', 'stage_0.json', 'stage_0.safetensors']


def test_the_same_run_continues_in_its_save_dir(tmp_path):
    """A restart of the same run (e.g. after a kill before its first checkpoint), and a resume from a checkpoint
    with a longer max_duration, both continue in the run's own save_dir."""
    save_dir = _write_run(tmp_path, 'sched', num_stages=2, max_duration='4ba')
    trainer = _trainer(_dwm(save_dir=save_dir), max_duration='4ba', save_folder=str(tmp_path / 'ckpt'),
                       save_interval='2ba')
    trainer.fit()
    trainer.close()
    resumed = _trainer(_dwm(save_dir=save_dir), max_duration='6ba',
                       load_path=str(tmp_path / 'ckpt' / 'ep0-ba2-rank0.pt'))
    resumed.fit()
    assert int(resumed.state.timestamp.batch) == 6
    assert _schedule(save_dir)['run'] == {'run_name': 'run-a', 'max_duration': '6ba'}


def test_save_dir_is_not_the_replayed_schedule(tmp_path):
    schedule = _write_run(tmp_path, 'sched', num_stages=1)
    with pytest.raises(ValueError, match=r'^algorithms\.dwm\.save_dir .*holds the schedule this run replays'):
        _trainer(DWM(num_stages=1, schedule=schedule, refit=False, save_dir=schedule), run_name='run-b')
