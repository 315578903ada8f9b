"""A loopback S3 endpoint: moto's server in a child process, bound to 127.0.0.1 on a free port.

This is the embedded default object store. Everything else in dwm-stream talks to S3 only through
mosaicml-streaming and boto3 with ``S3_ENDPOINT_URL``, so the same code runs against AWS S3, R2 or
MinIO by setting the endpoint and credentials instead of starting this server.

The server runs in its own process (not a thread) so that benchmarks and DataLoader workers do not
share a GIL with it, and so that a crashed test cannot leave a half-dead server thread behind.

Usage::

    with LoopbackS3(buckets=["corpus"]) as s3:
        # S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... are set in os.environ while inside.
        upload_dir(s3.client(), "/tmp/mds", "corpus", "mds")  # -> s3://corpus/mds/...
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

import boto3

from dwm_stream.parallel import stop_process

__all__ = ['LoopbackS3', 'LOOPBACK_HOST', 'upload_dir']

LOOPBACK_HOST = '127.0.0.1'

# Credentials for the loopback server only. moto accepts any; these are never real secrets.
_LOOPBACK_ENV = {
    'AWS_ACCESS_KEY_ID': 'dwm-loopback-key',
    'AWS_SECRET_ACCESS_KEY': 'dwm-loopback-secret',
    'AWS_DEFAULT_REGION': 'us-east-1',
}


class LoopbackS3:
    """Start moto's S3 server on 127.0.0.1 and point this process's S3 clients at it.

    Args:
        buckets (Sequence[str]): Buckets to create once the server is up. Default: ``()``.
        set_env (bool): While active, set ``S3_ENDPOINT_URL`` and loopback credentials in
            ``os.environ`` (restored on exit), so that mosaicml-streaming, boto3 and child
            processes use the server. Default: ``True``.
        startup_timeout (float): Seconds to wait for the server to report its port.
            Default: ``60``.
    """

    def __init__(self,
                 buckets: Sequence[str] = (),
                 set_env: bool = True,
                 startup_timeout: float = 60.0) -> None:
        self.buckets = list(buckets)
        self.set_env = set_env
        self.startup_timeout = startup_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.port: Optional[int] = None
        self._saved_env: dict[str, Optional[str]] = {}

    @property
    def endpoint_url(self) -> str:
        if self.port is None:
            raise RuntimeError('LoopbackS3 is not running: call start() or use it as a context manager.')
        return f'http://{LOOPBACK_HOST}:{self.port}'

    @property
    def env(self) -> dict[str, str]:
        """The environment variables that point S3 clients at this server."""
        return {'S3_ENDPOINT_URL': self.endpoint_url, **_LOOPBACK_ENV}

    def start(self) -> 'LoopbackS3':
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'dwm_stream.demo.loopback_s3', '--host', LOOPBACK_HOST],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        deadline = time.monotonic() + self.startup_timeout
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith('PORT '):
            self.stop()
            raise RuntimeError('the loopback S3 server (moto) did not start; '
                               'check that `moto[server]` is installed in this environment.')
        self.port = int(line.split()[1])
        if self.set_env:
            for key, value in self.env.items():
                self._saved_env[key] = os.environ.get(key)
                os.environ[key] = value
        client = self.client()
        while True:
            try:
                client.list_buckets()
                break
            except Exception:  # noqa: BLE001 - the server may take a moment to accept requests
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f'the loopback S3 server on {self.endpoint_url} does not answer.')
                time.sleep(0.1)
        for bucket in self.buckets:
            client.create_bucket(Bucket=bucket)
        return self

    def client(self):
        """A boto3 S3 client for this server."""
        return boto3.client('s3',
                            endpoint_url=self.endpoint_url,
                            aws_access_key_id=_LOOPBACK_ENV['AWS_ACCESS_KEY_ID'],
                            aws_secret_access_key=_LOOPBACK_ENV['AWS_SECRET_ACCESS_KEY'],
                            region_name=_LOOPBACK_ENV['AWS_DEFAULT_REGION'])

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}

    def __enter__(self) -> 'LoopbackS3':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def upload_dir(client, local_dir: str, bucket: str, prefix: str,
               include: Optional[Callable[[str], bool]] = None) -> int:
    """Upload every file under ``local_dir`` to ``s3://bucket/prefix/<path relative to local_dir>``.

    Args:
        client: A boto3 S3 client (``LoopbackS3.client()``, or one for any other endpoint).
        local_dir (str): Directory to upload, subdirectories included.
        bucket (str): Destination bucket.
        prefix (str): Key prefix, without a trailing ``/``.
        include (Callable[[str], bool], optional): Uploads only the files whose name it accepts.
            Default: ``None`` (every file).

    Returns:
        int: The number of files uploaded.
    """
    count = 0
    for root, dirs, files in os.walk(local_dir):
        dirs.sort()
        for name in sorted(files):
            if include is not None and not include(name):
                continue
            path = os.path.join(root, name)
            client.upload_file(path, bucket, f'{prefix}/{os.path.relpath(path, local_dir)}')
            count += 1
    return count


def _serve(host: str) -> None:
    # Imported here, in the server's own process only: moto's server pulls in Flask and every moto backend
    # (seconds of start-up), which the process that uses LoopbackS3 never needs.
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address=host, port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    print(f'PORT {port}', flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='Serve moto S3 on a free loopback port.')
    parser.add_argument('--host', default=LOOPBACK_HOST,
                        help='Address to bind. Only loopback addresses are allowed.')
    args = parser.parse_args()
    if not args.host.startswith('127.') and args.host not in ('localhost', '::1'):
        parser.error(f'--host {args.host} is not a loopback address; the embedded S3 server binds '
                     'to loopback only.')
    _serve(args.host)
