"""A reverse proxy that makes a healthy S3 endpoint flaky, for the fault tests.

It forwards every request to the upstream (the moto server) unchanged, except that a seeded
fraction of them fails the way object stores and networks fail:

- ``slow_down``: answered ``503 SlowDown`` with S3's XML error body; never forwarded.
- ``reset``: the connection is reset (RST) without a reply; never forwarded.
- ``truncate``: GET only, forwarded; the reply's headers promise the whole body, half of it is
  sent, then the connection is reset.
- ``stall``: not in the default mix; no reply for ``stall_s`` seconds, then a reset (a hung
  connection, for the clients' timeouts).

The sequence of faults by request number is fixed by the seed; ``counts`` says how many
requests and faults there were, so a test can show that faults did happen, and ``calls`` how
many requests of each S3 call (``GetObject``, ``HeadObject``, ``ListObjects``, ``other``) came,
and ``most_in_flight`` how many were answered at once at most. ``delay_s`` holds every request
that long before it is answered: the round trip of a real object store, for the benchmarks.
``before_forward(method, path)``, if set, runs before a request goes upstream: a test can
change the store between a job's listing and its reads.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>fault-proxy</RequestId></Error>"
)
# Headers that belong to one hop. Expect is answered here (100 Continue) and not passed on.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "content-length",
}
KINDS = ("slow_down", "reset", "truncate")


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        rate: float = 0.05,
        seed: int = 0,
        kinds: tuple[str, ...] = KINDS,
        stall_s: float = 30.0,
        fail_first: int = 0,
        methods: tuple[str, ...] = (),
        delay_s: float = 0.0,
    ):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.rate = rate
        self.kinds = kinds
        self.stall_s = stall_s
        self.fail_first = fail_first  # the first N requests all fail, whatever the rate
        self.methods = methods  # only requests with these methods fail (default: all)
        self.delay_s = delay_s
        self.before_forward: Callable[[str, str], None] | None = None
        self._eligible = 0
        self.counts: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.in_flight = self.most_in_flight = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def faults(self) -> int:
        return sum(n for kind, n in self.counts.items() if kind != "requests")

    @contextlib.contextmanager
    def paused(self):
        """No faults inside the block (for setting up data)."""
        rate, self.rate = self.rate, 0.0
        try:
            yield
        finally:
            self.rate = rate

    @contextlib.contextmanager
    def answering(self):
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1

    def decide(self, method: str, path: str) -> str | None:
        with self._lock:
            self.counts["requests"] += 1
            self.calls[s3_call(method, path)] += 1
            if self.methods and method not in self.methods:
                return None
            self._eligible += 1
            draw, pick = self._rng.random(), self._rng.randrange(len(self.kinds))
            if draw >= self.rate and self._eligible > self.fail_first:
                return None
            kind = self.kinds[pick]
            if kind == "truncate" and method != "GET":
                kind = "slow_down" if "slow_down" in self.kinds else "reset"
            self.counts[kind] += 1
            return kind


def s3_call(method: str, path: str) -> str:
    """The S3 call a path-style request makes: an object's GET or HEAD, a listing, or other."""
    parts = urlsplit(path)
    has_key = "/" in parts.path.strip("/")
    if method == "GET" and not has_key and "list-type" in parts.query:
        return "ListObjects"
    if method in ("GET", "HEAD") and has_key and not parts.query:
        return "GetObject" if method == "GET" else "HeadObject"
    return "other"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and 100 Continue for Expect headers
    # Headers and body leave in two writes; with Nagle's algorithm the body waited for the
    # client's delayed ACK of the headers, 40 ms on every request.
    disable_nagle_algorithm = True

    def log_message(self, format, *args):  # quiet
        pass

    def do_GET(self):
        with self.server.proxy.answering():
            self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reset(self) -> None:
        """Close with RST: the client sees 'connection reset by peer'."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _proxy(self) -> None:
        body = self._read_body()
        proxy: FaultProxy = self.server.proxy
        fault = proxy.decide(self.command, self.path)
        if proxy.delay_s:
            time.sleep(proxy.delay_s)
        if fault == "stall":
            time.sleep(proxy.stall_s)
        if fault in ("reset", "stall"):
            self._reset()
            return
        if proxy.before_forward and fault is None:
            proxy.before_forward(self.command, self.path)
        if fault == "slow_down":
            self.send_response(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(SLOW_DOWN)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(SLOW_DOWN)
            return

        upstream = http.client.HTTPConnection(*proxy.upstream, timeout=120)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    upstream.putheader(name, value)
            if body or self.command in ("PUT", "POST"):
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body or None)
            reply = upstream.getresponse()
            data = reply.read()
            headers = reply.getheaders()
        except OSError:
            self.send_error(502)
            return
        finally:
            upstream.close()

        self.send_response_only(reply.status, reply.reason)
        length = None
        for name, value in headers:
            if name.lower() == "content-length":
                length = value
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        if self.command == "HEAD":
            self.send_header("Content-Length", length or "0")
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault == "truncate" and len(data) > 1:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._reset()
            return
        self.wfile.write(data)
