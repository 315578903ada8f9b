"""Fixtures of the reliability tests: the test corpus on loopback S3 and one clean reference run."""

from __future__ import annotations

import os
import uuid

import pytest

from train_runs import TRAINED_SAMPLES, run_train, train_args, train_env, upload_dir


@pytest.fixture(scope='session')
def s3_train(loopback_s3, converted_mds) -> str:
    """The test corpus (``converted_mds``) uploaded to loopback S3; its ``s3://`` URI."""
    prefix = f'reliability-{uuid.uuid4().hex[:8]}/train'
    upload_dir(loopback_s3.client(), converted_mds, 'dwm-test', prefix)
    return f's3://dwm-test/{prefix}'


@pytest.fixture(scope='session')
def reference_run(tmp_path_factory, loopback_s3, s3_train, small_tokenizer, small_corpus) -> str:
    """An uninterrupted, fault-free ``dwm-stream train`` run (see ``train_runs``); its root directory."""
    root = str(tmp_path_factory.mktemp('reference'))
    run_train(train_args(root, s3_train, small_tokenizer, small_corpus.lambada_path), root, train_env())
    assert os.path.exists(os.path.join(root, 'run', TRAINED_SAMPLES))
    return root
