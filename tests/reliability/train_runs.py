"""Shared by the reliability tests: a tiny ``dwm-stream train`` run (DWM on, 2 DataLoader workers,
checkpoint every batch, the ``trained_samples`` callback) over ``s3://``, launched as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

from dwm_stream.demo.loopback_s3 import upload_dir  # noqa: F401 - re-exported: conftest.py imports it from here

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_YAML = os.path.join(REPO, 'yamls', 'demo-cpu.yaml')
DWM_STREAM = os.path.join(os.path.dirname(sys.executable), 'dwm-stream')
NUM_BATCHES = 12
TRAINED_SAMPLES = 'trained_samples-rank0.jsonl'


def train_args(run_root: str, remote: str, tokenizer: str, lambada: str, num_batches: int = NUM_BATCHES,
               save_interval: str = '1ba', extra: tuple[str, ...] = ()) -> list[str]:
    """``dwm-stream train yamls/demo-cpu.yaml`` with tiny overrides; all outputs under ``run_root``."""
    return [
        DWM_STREAM, 'train', DEMO_YAML,
        'run_name=reliability',
        f'save_folder={run_root}/run',
        f'save_interval={save_interval}',
        f'max_duration={num_batches}ba',
        f'tokenizer.name={tokenizer}',
        'model.config_overrides.max_position_embeddings=256',
        'model.config_overrides.hidden_size=32',
        'model.config_overrides.intermediate_size=64',
        'model.config_overrides.num_hidden_layers=1',
        f'train_loader.dataset.remote={remote}',
        f'train_loader.dataset.local={run_root}/cache/train',
        'train_loader.dataset.download_retry=6',
        'train_loader.num_workers=2',
        'eval_loader=null',
        'eval_interval=1',
        'eval_subset_num_batches=-1',
        'global_train_batch_size=4',
        'device_train_microbatch_size=4',
        'scheduler.t_warmup=1ba',
        'algorithms.dwm.num_stages=2',
        'algorithms.dwm.refit_steps=1',
        'algorithms.dwm.weighter.d_model=16',
        'algorithms.dwm.weighter.n_heads=2',
        f'algorithms.dwm.validation.lambada={lambada}',
        'algorithms.dwm.validation.batch_size=4',
        'callbacks.trained_samples={}',
        'log_to_console=true',
        'console_log_interval=1ba',
        *extra,
    ]


def train_env(endpoint: Optional[str] = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)  # S3_ENDPOINT_URL and the loopback credentials
    env.update(HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', TOKENIZERS_PARALLELISM='false', OMP_NUM_THREADS='1')
    if endpoint:
        env['S3_ENDPOINT_URL'] = endpoint
    env.update(extra)
    return env


def run_train(args: list[str], cwd: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f'dwm-stream train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}'
    return proc


def final_weighter(run_root: str) -> dict:
    """The weighter of the last DWM stage, as exported (safetensors) by the run."""
    from safetensors.torch import load_file
    folder = os.path.join(run_root, 'run', 'dwm_schedule')
    stages = sorted(f for f in os.listdir(folder) if f.endswith('.safetensors'))
    return {s: load_file(os.path.join(folder, s)) for s in stages}


def latest_checkpoint_weighter(run_root: str) -> dict:
    """The DWM weighter state in ``latest-rank0.pt`` (loaded with weights_only=True)."""
    from dwm_stream.train.checkpoint_safety import safe_load
    state = safe_load(os.path.join(run_root, 'run', 'latest-rank0.pt'))
    return dict(state['state']['algorithms'])['ConfiguredDWM']['weighter']
