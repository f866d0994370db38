"""Load through one hammal process: 500 concurrent client connections, and
a slow client among fast ones.

The upstream is a healthy :class:`tests.resilience.upstream.FaultyRegistry`.
The clients are one ``selectors`` loop (500 sockets) or a few threads.
"""

from __future__ import annotations

import hashlib
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

from tests.resilience.support import (
    FixtureCase,
    Sandbox,
    cache_problems,
    established_sockets,
    get_blob,
    open_fds,
    sha256,
    start_sandboxed_hammal,
)
from tests.resilience.upstream import FaultyRegistry

MiB = 1024 * 1024
CONNECTIONS = 500
WAVE = 40


class _Conn:
    """One client connection of the selectors loop."""

    def __init__(self, sock: socket.socket, digest: str, request: bytes) -> None:
        self.sock = sock
        self.digest = digest
        self.request = request
        self.sent = 0
        self.buf = bytearray()
        self.head: Optional[bytes] = None
        self.length: Optional[int] = None
        self.hasher = hashlib.sha256()
        self.received = 0
        self.done = False
        self.error = ""
        self.status: Optional[int] = None


class LoadTests(FixtureCase):
    registry: FaultyRegistry
    sandbox: Sandbox

    @classmethod
    def start_fixture(cls) -> None:
        cls.registry = FaultyRegistry()
        cls.sandbox = start_sandboxed_hammal(cls.registry.url, read_timeout=5)

    @classmethod
    def stop_fixture(cls) -> None:
        cls._stop_shared("sandbox", "registry")

    def tearDown(self) -> None:
        self.assertAlive(self.sandbox)
        self.assertNoTraceback(self.sandbox)
        self.assertEqual(cache_problems(self.sandbox.cache_dir), [])

    def test_500_concurrent_connections(self) -> None:
        """500 connections open at once, each pulling a small blob (cold and
        coalesced, or warm): every digest right, one upstream GET per blob."""
        image = self.registry.add_image(
            "load/many", [1024 * (1 + 13 * i) for i in range(24)], seed=7
        )
        blobs = image.layers
        port = self.sandbox.hammal.port
        pid = self.sandbox.pid
        fds_before = len(open_fds(pid))
        est_before = len(established_sockets(pid))
        sel = selectors.DefaultSelector()
        conns: List[_Conn] = []
        try:
            # 1. open every connection, in waves smaller than hammal's listen
            #    backlog (Twisted's default, 50: a burst of 500 SYNs has most
            #    of them dropped and retried by the kernel seconds later)
            deadline = time.monotonic() + 30
            for i in range(CONNECTIONS):
                blob = blobs[i % len(blobs)]
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                req = (
                    f"GET /v2/{image.name}/blobs/{blob.digest} HTTP/1.1\r\n"
                    f"Host: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
                ).encode()
                conns.append(_Conn(s, blob.digest, req))
                sel.register(s, selectors.EVENT_WRITE, conns[-1])
                if len(conns) % WAVE == 0 or len(conns) == CONNECTIONS:
                    pending = len(sel.get_map())
                    while pending and time.monotonic() < deadline:
                        for key, _ in sel.select(timeout=0.5):
                            c = key.data
                            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                            if err:
                                c.error = f"connect: errno {err}"
                            sel.unregister(c.sock)
                            pending -= 1
                    self.assertEqual(
                        pending, 0, f"connections {len(conns)}: {pending} never completed"
                    )
            self.assertEqual([c.error for c in conns if c.error], [])
            # hammal holds them all at once (accepted, none answered yet)
            self.assertTrue(
                self.settle(
                    lambda: (
                        sum(
                            1 for local, _ in established_sockets(pid) if local.endswith(f":{port}")
                        )
                        >= CONNECTIONS
                    ),
                    20,
                ),
                "hammal never held 500 client connections at once",
            )
            # 2. send every request, then read every response
            for c in conns:
                sel.register(c.sock, selectors.EVENT_WRITE | selectors.EVENT_READ, c)
            open_count = len(conns)
            deadline = time.monotonic() + 60
            while open_count and time.monotonic() < deadline:
                for key, events in sel.select(timeout=0.5):
                    c = key.data
                    if events & selectors.EVENT_WRITE and c.sent < len(c.request):
                        try:
                            c.sent += c.sock.send(c.request[c.sent :])
                        except BlockingIOError:
                            pass
                        if c.sent == len(c.request):
                            sel.modify(c.sock, selectors.EVENT_READ, c)
                        continue
                    if not events & selectors.EVENT_READ:
                        continue
                    try:
                        data = c.sock.recv(256 * 1024)
                    except BlockingIOError:
                        continue
                    except OSError as e:
                        data, c.error = b"", str(e)
                    if data:
                        self._feed(c, data)
                    if not data or (c.length is not None and c.received >= c.length):
                        c.done = True
                        sel.unregister(c.sock)
                        c.sock.close()
                        open_count -= 1
            statuses: Dict[Optional[int], int] = {}
            for c in conns:
                statuses[c.status] = statuses.get(c.status, 0) + 1
            self.assertEqual(statuses, {200: CONNECTIONS})
            wrong = [
                c.digest
                for c in conns
                if c.received != c.length or "sha256:" + c.hasher.hexdigest() != c.digest
            ]
            self.assertEqual(wrong, [])
        finally:
            sel.close()
            for c in conns:
                c.sock.close()
        for blob in blobs:
            gets = [e for e in self.registry.entries(f"/blobs/{blob.digest}") if e.method == "GET"]
            self.assertEqual(len(gets), 1, f"{blob.digest}: {len(gets)} upstream GETs")
        self.assertNoLeaks(
            self.sandbox,
            fds_before,
            est_before,
            upstream_ports=[self.registry.port],
            pool_limit=64,
            timeout=15,
        )

    @staticmethod
    def _feed(c: _Conn, data: bytes) -> None:
        if c.head is None:
            c.buf += data
            if b"\r\n\r\n" not in c.buf:
                return
            head, rest = bytes(c.buf).split(b"\r\n\r\n", 1)
            c.head = head
            c.buf = bytearray()
            c.status = int(head.split(b" ", 2)[1])
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    c.length = int(v.strip())
            data = rest
        c.hasher.update(data)
        c.received += len(data)

    def test_slow_client_does_not_slow_fast_ones(self) -> None:
        """A client that stops reading a cold 16 MiB blob first in line; fast
        clients of the same blob and of others all finish before it does."""
        image = self.registry.add_image("load/slow", [16 * MiB, 256 * 1024, 512 * 1024], seed=8)
        big = image.layers[0]
        port = self.sandbox.hammal.port
        slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.settimeout(30)
        slow.connect(("127.0.0.1", port))
        order: List[str] = []
        lock = threading.Lock()
        try:
            slow.sendall(
                f"GET /v2/{image.name}/blobs/{big.digest} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
            )
            first = slow.recv(4096)
            self.assertTrue(first.startswith(b"HTTP/1.1 200"), first[:200])
            # the slow client now stops reading

            def fast(blob_index: int) -> str:
                blob = image.layers[blob_index]
                resp = get_blob(port, image.name, blob.digest, timeout=20)
                ok = resp.status == 200 and resp.complete and sha256(resp.body) == blob.digest
                with lock:
                    order.append(f"fast-{blob_index}")
                return "" if ok else f"fast {blob_index}: {resp.status} {resp.error}"

            with ThreadPoolExecutor(max_workers=12) as pool:
                problems = [p for p in pool.map(fast, [0, 1, 2] * 4) if p]
            self.assertEqual(problems, [])
            # the slow one has not finished: it has barely read anything
            with lock:
                order.append("slow-still-reading")
            # now it reads everything, and gets the right bytes
            data = bytearray(first)
            slow.settimeout(30)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                chunk = slow.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
            body = bytes(data).split(b"\r\n\r\n", 1)[1]
            order.append("slow-done")
        finally:
            slow.close()
        self.assertEqual(len(body), len(big.data))
        self.assertEqual(sha256(body), big.digest)
        self.assertEqual(order[-2:], ["slow-still-reading", "slow-done"])
        self.assertEqual(len(order), 14)
        gets = [e for e in self.registry.entries(f"/blobs/{big.digest}") if e.method == "GET"]
        self.assertEqual(len(gets), 1)
