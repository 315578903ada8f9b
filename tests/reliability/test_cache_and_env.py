"""The local cache (read-only, full, too small), the loopback servers' addresses, and secrets.

A read-only or full cache is made real with a private mount namespace (``unshare -Urm``): a read-only
bind mount (``EROFS``) and a 150 KB tmpfs (``ENOSPC``). Where unprivileged namespaces are unavailable
the test falls back to ``chmod 555`` (non-root) or ``RLIMIT_FSIZE`` (``EFBIG``).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid

import pytest

from dwm_stream.data.dataset import DWMDataset
from train_runs import REPO, train_args, train_env

_PROBE = '''
import sys
from dwm_stream.data.dataset import DWMDataset
try:
    n = sum(1 for _ in DWMDataset(remote=sys.argv[1], local=sys.argv[2], batch_size=4, download_retry=1))
    print('OK', n)
except Exception as e:
    print('ERROR', type(e).__name__, e)
    sys.exit(3)
'''


def _has_unshare() -> bool:
    if not shutil.which('unshare'):
        return False
    return subprocess.run(['unshare', '-Urm', 'true'], capture_output=True).returncode == 0


def _probe(remote: str, cache: str, setup: str = '', preexec=None) -> subprocess.CompletedProcess:
    python = shlex.join([sys.executable, '-c', _PROBE, remote, cache])
    if setup:
        cmd = ['unshare', '-Urm', 'sh', '-c', f'{setup} && exec {python}']
    else:
        cmd = [sys.executable, '-c', _PROBE, remote, cache]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, preexec_fn=preexec)


@pytest.fixture()
def remote_copy(converted_mds, tmp_path) -> str:
    remote = str(tmp_path / 'remote')
    shutil.copytree(converted_mds, remote)
    return remote


def test_read_only_cache_names_the_path(remote_copy, tmp_path):
    cache = tmp_path / 'cache'
    cache.mkdir()
    if _has_unshare():
        proc = _probe(remote_copy, str(cache), setup=f'mount --bind {cache} {cache} && '
                                                     f'mount -o remount,bind,ro {cache}')
    elif os.geteuid() != 0:
        cache.chmod(0o555)
        proc = _probe(remote_copy, str(cache))
    else:
        pytest.skip('root without unprivileged mount namespaces: cannot make a read-only directory')
    assert proc.returncode == 3, proc.stdout + proc.stderr[-2000:]
    assert f'cannot write the local cache at {cache}' in proc.stdout, proc.stdout
    print(proc.stdout)
    assert re.search(r'read-only filesystem|not writable', proc.stdout), proc.stdout


def test_full_cache_names_the_path(remote_copy, tmp_path):
    cache = tmp_path / 'cache'
    cache.mkdir()
    if _has_unshare():  # a 150 KB filesystem: index.json and a compressed shard fit, its raw form does not
        proc = _probe(remote_copy, str(cache), setup=f'mount -t tmpfs -o size=150k tmpfs {cache}')
        expected = 'disk holding the cache is full'
    else:
        def limit():
            import resource
            import signal
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))
        proc = _probe(remote_copy, str(cache), preexec=limit)
        expected = 'exceeds the allowed file size'
    assert proc.returncode == 3, proc.stdout + proc.stderr[-2000:]
    assert f'cannot write the local cache at {cache}' in proc.stdout and expected in proc.stdout, proc.stdout
    print(proc.stdout)


def test_too_small_cache_limit_names_the_path(remote_copy, tmp_path):
    cache = re.escape(str(tmp_path / 'cache'))
    with pytest.raises(ValueError, match=rf"local cache \['{cache}/?'\]: Cache limit .* too low") as info:
        DWMDataset(remote=remote_copy, local=str(tmp_path / 'cache'), batch_size=4, cache_limit='10kb')
    assert 'cache_limit' in str(info.value)


# ------------------------------------------------------------------------------------ loopback only
def _listening_addresses(port: int) -> list[str]:
    """Local addresses listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = []
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            next(f)
            for line in f:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.rsplit(':', 1)
                if int(hex_port, 16) == port and state == '0A':  # LISTEN
                    found.append(address)
    return found


def test_loopback_servers_bind_127_0_0_1_only(loopback_s3):
    from dwm_stream.testing.fault_proxy import FaultProxy, FaultProxyServer
    if not os.path.exists('/proc/net/tcp'):
        pytest.skip('needs /proc/net/tcp')
    assert loopback_s3.endpoint_url.startswith('http://127.0.0.1:')
    assert _listening_addresses(loopback_s3.port) == ['0100007F']  # 127.0.0.1, and nothing else
    with FaultProxy(loopback_s3.endpoint_url, rate=0.0) as proxy:
        assert _listening_addresses(proxy.port) == ['0100007F']
    with pytest.raises(ValueError, match='loopback'):
        FaultProxyServer('http://10.1.2.3:9000')


@pytest.mark.parametrize('host', ['0.0.0.0', '192.168.1.10', '::'])
def test_loopback_s3_refuses_a_non_loopback_host(host):
    proc = subprocess.run([sys.executable, '-m', 'dwm_stream.demo.loopback_s3', '--host', host],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and 'is not a loopback address' in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------ secrets
SECRET = 'dwmTESTsecret-' + 'Zq8Xv3Lm0Pk7Wn2Rb5'


@pytest.mark.slow
def test_secret_key_never_appears_in_anything_a_run_writes(loopback_s3, converted_mds, small_corpus,
                                                           small_tokenizer, tmp_path):
    """convert to s3://, train from it (checkpoints, metrics, logs at debug level), and two failing
    commands (errors); grep every byte of stdout, stderr and every file they wrote for the secret."""
    root = tmp_path
    env = train_env(AWS_SECRET_ACCESS_KEY=SECRET)
    dwm = os.path.join(os.path.dirname(sys.executable), 'dwm-stream')
    prefix = f's3://dwm-test/secrets-{uuid.uuid4().hex[:8]}'
    outputs = []

    def run(args, ok=True, **kw):
        proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=600, **kw)
        assert (proc.returncode == 0) == ok, proc.stdout[-2000:] + proc.stderr[-4000:]
        outputs.extend([proc.stdout, proc.stderr])
        return proc

    run([dwm, 'convert', '--src', small_corpus.train_dir, '--out', f'{prefix}/train', '--tokenizer',
         small_tokenizer, '--seq-len', '256', '--no-progress'])
    args = train_args(str(root / 'good'), f'{prefix}/train', small_tokenizer, small_corpus.lambada_path,
                      num_batches=2, extra=('python_log_level=debug', 'loggers.file={filename: '
                                            f'{root}/good/log.txt' '}'))
    run(args)
    # Errors: a missing remote (train) and a missing source prefix (convert).
    bad = run(train_args(str(root / 'bad'), f'{prefix}/nope', small_tokenizer, small_corpus.lambada_path,
                         num_batches=2), ok=False)
    assert 'nope' in bad.stderr + bad.stdout
    run([dwm, 'convert', '--src', f'{prefix}/no-such-src', '--out', str(root / 'o'), '--tokenizer',
         small_tokenizer, '--seq-len', '256', '--no-progress'], ok=False)

    needle = SECRET.encode()
    assert not [i for i, text in enumerate(outputs) if SECRET in text]
    leaked, scanned = [], 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            with open(path, 'rb') as f:
                data = f.read()
            scanned += 1
            if needle in data:
                leaked.append(path)
    assert not leaked, leaked
    assert scanned > 10 and any(p.endswith('.pt') for _, _, fs in os.walk(root) for p in fs)
