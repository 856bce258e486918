"""A loopback HTTP proxy in front of an S3 server that answers a seeded share of requests with real faults.

Faults, as object stores produce them at scale:

- ``slowdown``: ``503 SlowDown`` with S3's XML error body (no body for HEAD), the request never reaches the server;
- ``reset``: the request reaches the server, the client gets the status line, headers and half the body, then
  the connection is reset (TCP RST);
- ``delay``: the answer comes after a pause drawn from ``delay_s``.

Used by the fault-injection tests and by ``benchmarks/bench_faults.py``. ``only`` restricts faults to requests
for which ``only(method, path)`` is true (e.g. the PUTs of part files); other requests pass unharmed.
"""

from __future__ import annotations

import collections
import http.client
import http.server
import random
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable

FAULT_KINDS = ("slowdown", "reset", "delay")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "te", "trailer"}
_SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                  b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    """Forwards ``http://127.0.0.1:PORT`` to ``upstream``; a share ``rate`` of requests gets a fault of ``kinds``.

    ``counts`` counts the requests seen (``"requests"``) and the faults injected per kind. Deterministic in
    which fault comes next for a seed; which request meets it depends on the order requests arrive.
    """

    def __init__(self, upstream: str, rate: float, seed: int = 0, kinds: tuple[str, ...] = FAULT_KINDS,
                 delay_s: tuple[float, float] = (1.0, 3.0), only: Callable[[str, str], bool] | None = None):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.rate, self.kinds, self.delay_s, self.only = rate, kinds, delay_s, only
        self.counts: collections.Counter = collections.Counter()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _draw(self, method: str, path: str) -> tuple[str | None, float]:
        """The fault for one request (None: none) and, for a delay, its length."""
        with self._lock:
            self.counts["requests"] += 1
            if self.only is not None and not self.only(method, path):
                return None, 0.0
            if self._random.random() >= self.rate:
                return None, 0.0
            kind = self._random.choice(self.kinds)
            self.counts[kind] += 1
            return kind, self._random.uniform(*self.delay_s)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect; Expect: 100-continue handled by the base
    owner: FaultProxy

    def log_message(self, *args) -> None:  # one line per request otherwise
        pass

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _handle(self) -> None:
        body = self._read_body()
        fault, delay = self.owner._draw(self.command, self.path)
        if fault == "slowdown":
            self.send_response(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(_SLOWDOWN_BODY)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(_SLOWDOWN_BODY)
            return
        if fault == "delay":
            time.sleep(delay)
        status, reason, headers, answer = self._forward(body)
        if fault == "reset":
            self._reset(status, reason, headers, answer)
            return
        self.send_response(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(answer)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                chunk = self.rfile.read(size + 2)[:size]  # chunk data + CRLF
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(chunk)
        return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        upstream = self.owner.upstream
        connection = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
        try:
            headers = {name: value for name, value in self.headers.items() if name.lower() not in _HOP_BY_HOP
                       and name.lower() != "content-length"}
            headers["Content-Length"] = str(len(body))
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            answer = response.read()
            kept = [(name, value) for name, value in response.getheaders()
                    if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length"]
            if self.command == "HEAD" and response.getheader("Content-Length"):
                kept.append(("Content-Length", response.getheader("Content-Length")))
            return response.status, response.reason, kept, answer
        finally:
            connection.close()

    def _reset(self, status: int, reason: str, headers: list[tuple[str, str]], answer: bytes) -> None:
        """Send the status line, the headers and half the body (none for HEAD), then reset the connection."""
        if self.command != "HEAD" and answer:
            self.send_response(status, reason)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer[: len(answer) // 2])
            self.wfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close → RST
        self.close_connection = True
        self.connection.close()
