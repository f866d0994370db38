"""The resilience tests' upstream itself: its faults are the only faults.

A test registry that drops a transfer on its own, because its client read
slowly on a busy machine, makes hammal look broken at random (the
``test_small_disk`` flake: a 66 MiB uncached layer cut off partway).
"""

from __future__ import annotations

import socket
import time

from twisted.trial.unittest import TestCase

from tests.resilience.upstream import FaultyRegistry

MiB = 1024 * 1024


class FaultyRegistryTests(TestCase):
    def setUp(self) -> None:
        self.registry = FaultyRegistry()
        self.addCleanup(self.registry.stop)

    def test_a_reader_that_stalls_gets_the_whole_body(self) -> None:
        """
        A client that leaves a large body unread for longer than the
        server's socket timeout, as backpressure through a loaded hammal
        does, still gets every byte: only faults cut transfers short.
        """
        image = self.registry.add_image("harness/stall", [8 * MiB], seed=7)
        blob = image.layers[0]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        # a small window the kernel will not grow: the body cannot sit in
        # socket buffers while the reader stalls
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", self.registry.port))
        sock.sendall(
            f"GET /v2/{image.name}/blobs/{blob.digest} HTTP/1.1\r\n"
            "Host: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        time.sleep(2.5)  # the stall: well past the registry's 1 s socket timeout
        chunks = []
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head[:200])
        self.assertEqual(len(body), len(blob.data))
        self.assertTrue(body == blob.data, "wrong bytes")
