"""``dwm-stream train yamls/demo-cpu.yaml`` end to end: data from a loopback S3 endpoint, DWM on, a
checkpoint written, then ``autoresume=true`` to a longer ``max_duration`` continues from it.

Both runs are real ``dwm-stream`` subprocesses (the console script installed in the environment).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
import torch

from dwm_stream.demo.loopback_s3 import upload_dir
from dwm_stream.train.loggers import read_metrics

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_YAML = os.path.join(REPO, 'yamls', 'demo-cpu.yaml')
DWM_STREAM = os.path.join(os.path.dirname(sys.executable), 'dwm-stream')
FIRST_BATCHES = 4
RESUMED_BATCHES = 6


@pytest.fixture(scope='module')
def s3_corpus(loopback_s3, converted_mds) -> str:
    """The test corpus uploaded to the loopback S3 bucket as train/ and validation/; the prefix URI."""
    client = loopback_s3.client()
    prefix = f'train-cli-{uuid.uuid4().hex[:8]}'
    for split in ('train', 'validation'):
        upload_dir(client, converted_mds, 'dwm-test', f'{prefix}/{split}')
    return f's3://dwm-test/{prefix}'


def _overrides(tmp_path, s3_corpus: str, small_tokenizer: str, lambada: str, max_duration: str) -> list[str]:
    return [
        'run_name=test-train-cli',
        f'save_folder={tmp_path / "run"}',
        'save_interval=2ba',
        f'max_duration={max_duration}',
        f'tokenizer.name={small_tokenizer}',
        'model.config_overrides.max_position_embeddings=256',  # the test corpus has 256-token samples
        f'train_loader.dataset.remote={s3_corpus}/train',
        f'train_loader.dataset.local={tmp_path / "cache" / "train"}',
        f'eval_loader.dataset.remote={s3_corpus}/validation',
        f'eval_loader.dataset.local={tmp_path / "cache" / "validation"}',
        'global_train_batch_size=4',
        'device_train_microbatch_size=4',
        'device_eval_batch_size=4',
        'eval_interval=2ba',
        'eval_subset_num_batches=1',
        'scheduler.t_warmup=1ba',
        'algorithms.dwm.num_stages=2',
        'algorithms.dwm.refit_steps=1',
        f'algorithms.dwm.validation.lambada={lambada}',
        'algorithms.dwm.validation.batch_size=4',
        'console_log_interval=1ba',  # progress_bar/log_to_console unset: one line per batch off a terminal
    ]


def _run(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ)  # carries S3_ENDPOINT_URL and the loopback credentials
    env.update(HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', TOKENIZERS_PARALLELISM='false',
               OMP_NUM_THREADS='1')
    proc = subprocess.run([DWM_STREAM, 'train', DEMO_YAML, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f'dwm-stream train failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}'
    return proc


def _metrics(run_dir) -> list[dict]:
    return read_metrics(os.path.join(run_dir, 'metrics.jsonl'))


def _loss_batches(records: list[dict]) -> list[int]:
    return [r['batch'] for r in records if 'loss/train/total' in r['metrics']]


def test_train_cli_from_s3_checkpoint_and_autoresume(tmp_path, loopback_s3, s3_corpus, small_tokenizer,
                                                    small_corpus):
    assert os.environ.get('S3_ENDPOINT_URL') == loopback_s3.endpoint_url
    run_dir = tmp_path / 'run'
    lambada = small_corpus.lambada_path

    # --- first run: 4 batches from s3://, DWM refits at 0 and 2ba, checkpoints at 2ba and 4ba.
    proc = _run(_overrides(tmp_path, s3_corpus, small_tokenizer, lambada, f'{FIRST_BATCHES}ba'), tmp_path)
    # Off a terminal: no progress-bar redraws, one short console line per batch (and one per eval).
    assert '\r' not in proc.stderr
    progress_lines = [line for line in proc.stderr.splitlines() if line.startswith('[batch=')]
    assert [line.split()[0] for line in progress_lines if line.split()[1:2] != ['eval']] == \
        [f'[batch={b}/{FIRST_BATCHES}]' for b in range(1, FIRST_BATCHES + 1)], proc.stderr[-3000:]
    assert any(line.startswith('[batch=2/4] eval metrics/eval/LanguageCrossEntropy') for line in progress_lines)
    checkpoints = sorted(p for p in os.listdir(run_dir) if p.endswith('.pt') and p.startswith('ep'))
    assert any(f'ba{FIRST_BATCHES}-' in p for p in checkpoints), checkpoints
    assert os.path.exists(run_dir / 'latest-rank0.pt')
    checkpoint = torch.load(run_dir / 'latest-rank0.pt', map_location='cpu', weights_only=False)['state']
    assert checkpoint['timestamp']['Timestamp']['batch'] == FIRST_BATCHES
    assert dict(checkpoint['algorithms'])['ConfiguredDWM']['stage_index'] == 1
    assert checkpoint['dataset_state'] is not None  # the loader position, for exact resumption
    first = _metrics(run_dir)
    first_batches = _loss_batches(first)
    # (a record's batch is the timestamp while the batch trains: batches 0..3)
    assert first_batches == list(range(FIRST_BATCHES)), first_batches
    assert any('metrics/eval/LanguageCrossEntropy' in r['metrics'] for r in first)
    # DWM ran: both stages exported their weighter, and weights were logged.
    with open(run_dir / 'dwm_schedule' / 'schedule.json') as f:
        schedule = json.load(f)
    assert [s['stage'] for s in schedule['stages']] == [0, 1]
    refits = [r['metrics']['dwm/refit/count'] for r in first if 'dwm/refit/count' in r['metrics']]
    assert refits == [1, 2], refits
    assert any(k.startswith('dwm/domain/') for r in first for k in r['metrics'])
    # The data really came through the S3 endpoint into the local cache.
    assert os.path.exists(tmp_path / 'cache' / 'train' / 'index.json')
    n_first = len(first)

    # --- resumed run: same run, autoresume, a longer budget.
    proc = _run(_overrides(tmp_path, s3_corpus, small_tokenizer, lambada, f'{RESUMED_BATCHES}ba')
                + ['autoresume=true'], tmp_path)
    records = _metrics(run_dir)
    resumed = records[n_first:]
    resumed_batches = _loss_batches(resumed)
    # It starts right after the checkpoint's batch and ends at the new max_duration.
    assert resumed_batches == list(range(FIRST_BATCHES, RESUMED_BATCHES)), (resumed_batches, proc.stdout[-2000:])
    assert any(f'ba{RESUMED_BATCHES}-' in p for p in os.listdir(run_dir)), os.listdir(run_dir)
    # The DWM stage came back from the checkpoint (no refit of stage 0 again on resume).
    with open(run_dir / 'dwm_schedule' / 'schedule.json') as f:
        assert [s['stage'] for s in json.load(f)['stages']] == [0, 1]
    stages = [r['metrics']['dwm/stage'] for r in resumed if 'dwm/stage' in r['metrics']]
    assert stages and all(s == 1 for s in stages), stages
    assert not any('dwm/refit/count' in r['metrics'] for r in resumed)
