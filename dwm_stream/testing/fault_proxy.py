"""A fault-injecting HTTP proxy on loopback, for testing S3 reads against a flaky object store.

It sits in front of an S3 endpoint (normally :class:`dwm_stream.demo.loopback_s3.LoopbackS3`): point
``S3_ENDPOINT_URL`` at the proxy and every S3 request from boto3 / mosaicml-streaming passes
through it. At a set ``rate`` (seeded), a request gets one of these faults instead of a clean answer:

========== ==================================================================================
fault      what the client sees
========== ==================================================================================
``500``    ``500 InternalError`` (an S3 XML error body); the request never reaches upstream
``503``    ``503 SlowDown`` (S3's throttling answer); the request never reaches upstream
``slow``   the upstream answer, after ``slow_s`` seconds of silence
``reset``  the TCP connection reset (``SO_LINGER 0``) before any byte of the answer
``truncate`` the upstream status and headers (full ``Content-Length``), then only part of the
           body, then the connection closed
========== ==================================================================================

``fail_paths``: requests whose path contains one of these substrings always get ``fail_status``
(a persistent failure, e.g. one object that can never be read).

The proxy is stdlib only, binds 127.0.0.1 (nothing else is accepted), and is bounded: it stops by
itself after ``lifetime_s`` seconds or ``max_requests`` requests, and an idle client connection
times out after ``idle_timeout_s``. ``GET /__fault_proxy__/stats`` answers the counts as JSON.

It runs in a child process by default (:class:`FaultProxy`), like the loopback S3 server, so that
DataLoader workers do not fork its threads and it does not share the trainer's GIL::

    with LoopbackS3(buckets=['b']) as s3, FaultProxy(s3.endpoint_url, rate=0.2, seed=0) as proxy:
        os.environ['S3_ENDPOINT_URL'] = proxy.endpoint_url
        ...

Or run by hand: ``python -m dwm_stream.testing.fault_proxy --upstream http://127.0.0.1:PORT --rate 0.2``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional, Sequence

from dwm_stream.parallel import stop_process

__all__ = ['FaultProxy', 'FaultProxyServer', 'FAULTS', 'serve']

FAULTS = ('500', '503', 'slow', 'reset', 'truncate')
STATS_PATH = '/__fault_proxy__/stats'
_LOOPBACK = '127.0.0.1'
_HOP_BY_HOP = {'connection', 'keep-alive', 'proxy-authenticate', 'proxy-authorization', 'te', 'trailers',
               'transfer-encoding', 'upgrade'}
_ERROR_BODY = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
               '<Message>injected by dwm_stream.testing.fault_proxy</Message><RequestId>fault</RequestId></Error>')


class _Injector:
    """Seeded fault decisions and counters, shared by the handler threads."""

    def __init__(self, rate: float, seed: int, faults: Sequence[str], fail_paths: Sequence[str],
                 fail_status: int, methods: Sequence[str]) -> None:
        unknown = set(faults) - set(FAULTS)
        if unknown:
            raise ValueError(f'unknown fault(s) {sorted(unknown)}; valid are {list(FAULTS)}.')
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f'rate must be in [0, 1], got {rate}.')
        self.rate, self.faults = rate, list(faults)
        self.fail_paths, self.fail_status = list(fail_paths), int(fail_status)
        self.methods = {m.upper() for m in methods}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {'requests': 0, 'clean': 0, 'persistent': 0, **{f: 0 for f in FAULTS}}

    def decide(self, method: str, path: str) -> str:
        with self._lock:
            self.counts['requests'] += 1
            if any(p in path for p in self.fail_paths):
                self.counts['persistent'] += 1
                return 'persistent'
            draw, pick = self._rng.random(), self._rng.randrange(max(1, len(self.faults)))
            if method in self.methods and self.faults and draw < self.rate:
                fault = self.faults[pick]
                self.counts[fault] += 1
                return fault
            self.counts['clean'] += 1
            return 'clean'

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    server: 'FaultProxyServer'

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet by default
        pass

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.idle_timeout_s)
        self._upstream: Optional[http.client.HTTPConnection] = None

    def finish(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
        super().finish()

    def _read_body(self) -> bytes:
        if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b';')[0].strip() or b'0', 16)
                if size == 0:
                    while self.rfile.readline() not in (b'\r\n', b'\n', b''):
                        pass
                    return b''.join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get('Content-Length') or 0)
        return self.rfile.read(length) if length else b''

    def _send_error_xml(self, status: int, code: str) -> None:
        body = _ERROR_BODY.format(code=code).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/xml')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(body)

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
        except OSError:
            pass
        self.close_connection = True

    def _forward(self, body: bytes) -> http.client.HTTPResponse:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body or self.command in ('PUT', 'POST'):
            headers['Content-Length'] = str(len(body))
        for attempt in range(2):  # a kept-alive upstream connection may have been closed
            if self._upstream is None:
                self._upstream = http.client.HTTPConnection(self.server.upstream_host, self.server.upstream_port,
                                                            timeout=self.server.upstream_timeout_s)
            try:
                self._upstream.request(self.command, self.path, body=body or None, headers=headers)
                return self._upstream.getresponse()
            except (ConnectionError, http.client.HTTPException, OSError):
                self._upstream.close()
                self._upstream = None
                if attempt:
                    raise
        raise AssertionError('unreachable')

    def _handle(self) -> None:
        if self.path == STATS_PATH:
            body = json.dumps(self.server.injector.snapshot()).encode()
            self.send_response(200)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.server.count_request()
        body = self._read_body()
        fault = self.server.injector.decide(self.command, self.path)
        if fault == 'persistent':
            self._send_error_xml(self.server.injector.fail_status,
                                 'ServiceUnavailable' if self.server.injector.fail_status == 503 else 'InternalError')
            return
        if fault == '500':
            self._send_error_xml(500, 'InternalError')
            return
        if fault == '503':
            self._send_error_xml(503, 'SlowDown')
            return
        if fault == 'reset':
            self._reset()
            return
        if fault == 'slow':
            time.sleep(self.server.slow_s)
        try:
            response = self._forward(body)
        except Exception:  # noqa: BLE001 - upstream unreachable: answer as a gateway would
            self._send_error_xml(502, 'BadGateway')
            return
        payload = response.read()
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _HOP_BY_HOP and key.lower() != 'content-length':
                self.send_header(key, value)
        self.send_header('Content-Length', str(len(payload)))
        if fault == 'truncate' and self.command != 'HEAD' and len(payload) > 1:
            self.send_header('Connection', 'close')
            self.end_headers()
            self.wfile.write(payload[:len(payload) // 2])
            self.wfile.flush()
            self._reset()
            return
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(payload)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET  # noqa: N815


class FaultProxyServer(ThreadingHTTPServer):
    """The proxy server itself (threads in this process). Most users want :class:`FaultProxy`.

    Args:
        upstream (str): ``http://127.0.0.1:PORT`` of the real endpoint. Only loopback upstreams
            are accepted.
        rate (float): Probability that a request gets a fault. Default: ``0.2``.
        seed (int): Seed of the fault draws. Default: ``0``.
        faults (Sequence[str]): Which faults to draw from (uniformly). Default: all of ``FAULTS``.
        slow_s (float): Delay of a ``slow`` answer. Default: ``0.5``.
        fail_paths (Sequence[str]): Path substrings that always fail. Default: ``()``.
        fail_status (int): Status of a persistent failure. Default: ``503``.
        methods (Sequence[str]): Methods that can get random faults. Default: ``('GET', 'HEAD')``.
        port (int): Port to bind on 127.0.0.1. Default: ``0`` (a free one).
        lifetime_s (float): Stop after this many seconds. Default: ``1800``.
        max_requests (int): Stop after this many proxied requests. Default: ``1_000_000``.
        idle_timeout_s (float): Close an idle client connection after this. Default: ``30``.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: str, rate: float = 0.2, seed: int = 0, faults: Sequence[str] = FAULTS,
                 slow_s: float = 0.5, fail_paths: Sequence[str] = (), fail_status: int = 503,
                 methods: Sequence[str] = ('GET', 'HEAD'), port: int = 0, lifetime_s: float = 1800.0,
                 max_requests: int = 1_000_000, idle_timeout_s: float = 30.0) -> None:
        parsed = urllib.parse.urlparse(upstream)
        if parsed.scheme != 'http' or parsed.hostname not in (_LOOPBACK, 'localhost'):
            raise ValueError(f'upstream {upstream!r}: the fault proxy fronts a loopback http:// endpoint only.')
        self.upstream_host, self.upstream_port = parsed.hostname, parsed.port or 80
        self.injector = _Injector(rate, seed, faults, fail_paths, fail_status, methods)
        self.slow_s, self.idle_timeout_s, self.upstream_timeout_s = slow_s, idle_timeout_s, 60.0
        self.lifetime_s, self.max_requests = lifetime_s, max_requests
        self._served = 0
        self._served_lock = threading.Lock()
        super().__init__((_LOOPBACK, port), _Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def count_request(self) -> None:
        with self._served_lock:
            self._served += 1
            if self._served >= self.max_requests:
                threading.Thread(target=self.shutdown, daemon=True).start()

    def serve_bounded(self) -> None:
        """Serve until ``lifetime_s`` passes or ``max_requests`` are served (or ``shutdown``)."""
        timer = threading.Timer(self.lifetime_s, self.shutdown)
        timer.daemon = True
        timer.start()
        try:
            self.serve_forever(poll_interval=0.2)
        finally:
            timer.cancel()
            self.server_close()


def serve(upstream: str, **kwargs) -> None:
    """Run a proxy in this process, printing ``PORT <n>`` once it listens."""
    server = FaultProxyServer(upstream, **kwargs)
    print(f'PORT {server.port}', flush=True)
    server.serve_bounded()


class FaultProxy:
    """A :class:`FaultProxyServer` in a child process (context manager); see the module docstring.

    Takes the arguments of :class:`FaultProxyServer`.
    """

    def __init__(self, upstream: str, rate: float = 0.2, seed: int = 0, faults: Sequence[str] = FAULTS,
                 slow_s: float = 0.5, fail_paths: Sequence[str] = (), fail_status: int = 503,
                 methods: Sequence[str] = ('GET', 'HEAD'), lifetime_s: float = 1800.0,
                 max_requests: int = 1_000_000) -> None:
        self.args = [
            '--upstream', upstream, '--rate', str(rate), '--seed', str(seed), '--faults', ','.join(faults),
            '--slow-s', str(slow_s), '--fail-status', str(fail_status), '--methods', ','.join(methods),
            '--lifetime-s', str(lifetime_s), '--max-requests', str(max_requests),
        ] + [a for p in fail_paths for a in ('--fail-path', p)]
        self.proc: Optional[subprocess.Popen] = None
        self.port: Optional[int] = None

    @property
    def endpoint_url(self) -> str:
        if self.port is None:
            raise RuntimeError('FaultProxy is not running: use it as a context manager or call start().')
        return f'http://{_LOOPBACK}:{self.port}'

    def start(self) -> 'FaultProxy':
        self.proc = subprocess.Popen([sys.executable, '-m', 'dwm_stream.testing.fault_proxy', *self.args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith('PORT '):
            err = self.proc.stderr.read() if self.proc.stderr else ''
            self.stop()
            raise RuntimeError(f'the fault proxy did not start: {err.strip()[-2000:]}')
        self.port = int(line.split()[1])
        return self

    def stats(self) -> dict[str, int]:
        """Requests seen and faults injected so far."""
        with urllib.request.urlopen(self.endpoint_url + STATS_PATH, timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()
            self.proc = None

    def __enter__(self) -> 'FaultProxy':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description='A fault-injecting HTTP proxy on 127.0.0.1 in front of a '
                                            'loopback S3 endpoint.')
    p.add_argument('--upstream', required=True, help='http://127.0.0.1:PORT of the real endpoint')
    p.add_argument('--rate', type=float, default=0.2, help='probability of a fault per request')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--faults', default=','.join(FAULTS), help=f'comma-separated subset of {",".join(FAULTS)}')
    p.add_argument('--slow-s', type=float, default=0.5)
    p.add_argument('--fail-path', action='append', default=[], help='path substring that always fails')
    p.add_argument('--fail-status', type=int, default=503)
    p.add_argument('--methods', default='GET,HEAD')
    p.add_argument('--port', type=int, default=0)
    p.add_argument('--lifetime-s', type=float, default=1800.0)
    p.add_argument('--max-requests', type=int, default=1_000_000)
    a = p.parse_args(argv)
    serve(a.upstream, rate=a.rate, seed=a.seed, faults=[f for f in a.faults.split(',') if f], slow_s=a.slow_s,
          fail_paths=a.fail_path, fail_status=a.fail_status, methods=[m for m in a.methods.split(',') if m],
          port=a.port, lifetime_s=a.lifetime_s, max_requests=a.max_requests)


if __name__ == '__main__':
    try:
        _main()
    except KeyboardInterrupt:
        pass
    os._exit(0)
