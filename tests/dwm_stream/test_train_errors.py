"""Errors a person reads, and how fast (issue 16, item 7).

* A schema error is reported before torch, Composer and transformers are imported (it took 15-27 s behind them).
  Not a timed test: the child process reports which of those modules were imported when the error came.
* ``s3://`` without credentials is one short message naming the URL, the YAML key and what to set (it was a 124-line
  traceback ending in ``NoCredentialsError``), against the project's loopback S3 with the credentials unset.
* A DWM training log off a terminal holds none of tokenizers' fork warnings (it held one per DataLoader worker).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dwm_stream.demo.loopback_s3 import upload_dir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(REPO, 'yamls', 'demo-cpu.yaml')
HEAVY = ('torch', 'composer', 'transformers', 'streaming', 'llmfoundry')

PROBE = r'''
import sys
from dwm_stream.cli import main
rc = main(sys.argv[1:])
print('heavy:', sorted(m for m in {heavy!r} if m in sys.modules))
sys.exit(rc)
'''.replace('{heavy!r}', repr(HEAVY))


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', OMP_NUM_THREADS='1',
               CUDA_VISIBLE_DEVICES='', PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    env.update(extra)
    return env


@pytest.mark.parametrize('override, message', [
    ('max_duraton=1ba', "unknown top-level key(s) ['max_duraton']"),
    ('algorithms.dwm.refit_stepz=3', "algorithms.dwm: unknown key(s) ['refit_stepz']"),
    ('train_loader.dataset.shuffle=maybe', 'train_loader.dataset.shuffle: expected bool'),
])
def test_a_schema_error_is_reported_before_the_heavy_imports(override, message, tmp_path):
    proc = subprocess.run([sys.executable, '-c', PROBE, 'train', DEMO, override], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr, proc.stderr[-3000:]
    assert 'heavy: []' in proc.stdout, proc.stdout
    assert proc.stderr.count('\n') == 1 and 'Traceback' not in proc.stderr, proc.stderr


def test_python_m_dwm_stream_train_checks_first_too(tmp_path):
    proc = subprocess.run([sys.executable, '-m', 'dwm_stream.train', DEMO, 'max_duraton=1ba'], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown top-level key(s) ['max_duraton']" in proc.stderr, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr


@pytest.mark.slow
def test_s3_without_credentials_is_one_short_message(tmp_path, loopback_s3, converted_mds, small_tokenizer,
                                                     small_corpus):
    upload_dir(loopback_s3.client(), converted_mds, 'dwm-test', 'no-credentials/train')
    remote = 's3://dwm-test/no-credentials/train'
    env = _env(DWM_DEMO_TOKENIZER=small_tokenizer, DWM_DEMO_LAMBADA_FIT=small_corpus.lambada_path,
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / 'none'), AWS_CONFIG_FILE=str(tmp_path / 'none'),
               AWS_EC2_METADATA_DISABLED='true')
    for key in ('AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_SESSION_TOKEN', 'AWS_PROFILE',
                'AWS_SECURITY_TOKEN'):
        env.pop(key, None)
    assert env['S3_ENDPOINT_URL'] == loopback_s3.endpoint_url
    proc = subprocess.run([sys.executable, '-m', 'dwm_stream.cli', 'train', DEMO,
                           f'train_loader.dataset.remote={remote}', f'train_loader.dataset.local={tmp_path / "cache"}',
                           'train_loader.num_workers=0'],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f'dwm-stream train: error: train_loader.dataset.remote: {remote}/index.json: no S3 '
                           'credentials'), proc.stderr[-4000:]
    assert 'AWS_ACCESS_KEY_ID' in last and 'S3_ENDPOINT_URL' in last
    assert 'Traceback' not in proc.stderr, proc.stderr[-4000:]


@pytest.mark.slow
def test_no_tokenizers_fork_warning_in_a_training_log(tmp_path, converted_mds, small_tokenizer, small_corpus):
    env = _env(DWM_DEMO_TOKENIZER=small_tokenizer, DWM_DEMO_LAMBADA_FIT=small_corpus.lambada_path)
    env.pop('TOKENIZERS_PARALLELISM', None)
    tiny = ['model.config_overrides.hidden_size=32', 'model.config_overrides.intermediate_size=64',
            'model.config_overrides.num_hidden_layers=1', 'model.config_overrides.num_attention_heads=2',
            'model.config_overrides.num_key_value_heads=2', 'global_train_batch_size=4',
            'device_train_microbatch_size=4', 'device_eval_batch_size=4', 'eval_subset_num_batches=1',
            'algorithms.dwm.refit_steps=1', 'algorithms.dwm.num_stages=1', 'max_duration=1ba',
            'algorithms.dwm.refit_loader.batch_size=4', 'algorithms.dwm.validation.batch_size=4',
            'algorithms.dwm.weighter.max_seq_len=256', 'algorithms.dwm.validation.max_length=256',
            'model.config_overrides.max_position_embeddings=256']
    data = ['train_loader.dataset.remote=null', f'train_loader.dataset.local={converted_mds}',
            'train_loader.num_workers=2', 'eval_loader.dataset.remote=null',
            f'eval_loader.dataset.local={converted_mds}', 'eval_loader.num_workers=2',
            f'save_folder={tmp_path / "run"}']
    proc = subprocess.run([sys.executable, '-m', 'dwm_stream.cli', 'train', DEMO, *tiny, *data], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert 'The current process just got forked' not in out, out[-4000:]
