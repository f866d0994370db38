"""
Tests for L{hammal.cache.tlspump.TLSBodyPump} alone: a real pyOpenSSL
client connection (memory BIOs, as Twisted makes them) after its handshake
with a pyOpenSSL server, the ciphertext carried over a socket pair that the
pump reads, the pump run on the test's thread. What the stream does is up
to the test: end early with C{close_notify}, break a record, start a new
handshake.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from typing import Any, Callable

from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from hammal.cache.tlspump import TLSBodyPump
from hammal.selfsigned import ensure_self_signed
from hammal.stream import TransferBroken

KiB = 1024


class _Reactor:
    """callFromThread, run at once (the pump's progress reports)."""

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        f(*args)


def _shuttle(source: SSL.Connection, target: SSL.Connection) -> None:
    while True:
        try:
            data = source.bio_read(64 * KiB)
        except SSL.WantReadError:
            return
        target.bio_write(data)


def tls_pair(
    cert: str, key: str, version: int = SSL.TLS1_3_VERSION
) -> tuple[SSL.Connection, SSL.Connection]:
    """A client and a server connection (memory BIOs), their handshake done in memory."""
    server_context = SSL.Context(SSL.TLS_SERVER_METHOD)
    server_context.use_certificate_file(cert)
    server_context.use_privatekey_file(key)
    server_context.set_max_proto_version(version)
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    client.set_connect_state()
    server = SSL.Connection(server_context, None)
    server.set_accept_state()
    done = [False, False]
    for _ in range(20):
        for index, side in enumerate((client, server)):
            if not done[index]:
                try:
                    side.do_handshake()
                    done[index] = True
                except SSL.WantReadError:
                    pass
        _shuttle(client, server)
        _shuttle(server, client)
        if all(done):
            break
    # what the server sends after its handshake (TLS 1.3 tickets)
    try:
        client.recv(1)
    except SSL.WantReadError:
        pass
    if done != [True, True]:
        raise RuntimeError("the in-memory TLS handshake did not finish")
    return client, server


class TLSBodyPumpTests(SynchronousTestCase):
    def setUp(self) -> None:
        made = ensure_self_signed(self.mktemp(), ["localhost"], ["127.0.0.1"])
        self.cert, self.key = made.cert_path, made.key_path
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        ours.setblocking(False)
        self.ours, self.theirs = ours, theirs
        self.path = self.mktemp()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.addCleanup(os.close, self.fd)
        self.positions: list[int] = []

    def connect(self, version: int = SSL.TLS1_3_VERSION) -> None:
        """A client and a server connection, their handshake done in memory."""
        self.client, self.server = tls_pair(self.cert, self.key, version)

    def send(self, data: bytes) -> None:
        """The server sends C{data}: its records go on the wire."""
        view = memoryview(data)
        while view:
            sent = self.server.send(view[: 16 * KiB])
            view = view[sent:]
        self.wire()

    def wire(self) -> None:
        while True:
            try:
                self.theirs.sendall(self.server.bio_read(256 * KiB))
            except SSL.WantReadError:
                return

    def pump(self, length: int, hasher: Any = None, idle_timeout: float = 10) -> TLSBodyPump:
        pump = TLSBodyPump(
            _Reactor(),
            self.ours.fileno(),
            self.fd,
            0,
            length,
            hasher,
            idle_timeout,
            "upstream.test",
            self.positions.append,
            tls=self.client,
        )
        self.addCleanup(pump.close)
        return pump

    def run_while(self, pump: TLSBodyPump, server: Callable[[], None]) -> Any:
        """Run the pump here while C{server} sends on a thread; the pump's result or failure."""
        feeder = threading.Thread(target=server)
        feeder.start()
        try:
            return pump.run()
        except Exception as failure:
            return failure
        finally:
            feeder.join(30)

    def written(self) -> bytes:
        with open(self.path, "rb") as stored:
            return stored.read()

    def test_body_decrypted_written_and_hashed(self) -> None:
        """The body's bytes, in order, at their offsets; the hasher took each once."""
        self.connect()
        body = os.urandom(700 * KiB + 3)
        hasher = hashlib.sha256()
        result = self.run_while(self.pump(len(body), hasher), lambda: self.send(body))
        self.assertEqual(result, len(body))
        self.assertEqual(self.written(), body)
        self.assertEqual(hasher.hexdigest(), hashlib.sha256(body).hexdigest())
        self.assertEqual(self.positions[-1], len(body))

    def test_takes_no_byte_past_the_body(self) -> None:
        """Bytes after the announced length stay in the connection, never in the file."""
        self.connect()
        body = os.urandom(300 * KiB)
        result = self.run_while(self.pump(len(body)), lambda: self.send(body + b"trailing"))
        self.assertEqual(result, len(body))
        self.assertEqual(self.written(), body)

    def test_close_notify_before_the_end(self) -> None:
        """A clean TLS close before the announced end: broken, what came before written."""
        self.connect()
        body = os.urandom(200 * KiB)

        def server() -> None:
            self.send(body[: 120 * KiB])
            self.server.shutdown()
            self.wire()

        failure = self.run_while(self.pump(len(body)), server)
        self.assertIsInstance(failure, TransferBroken)
        self.assertIn("closed TLS after 122880 of 204800 bytes", failure.message)
        self.assertEqual(self.written(), body[: 120 * KiB])

    def test_corrupt_record(self) -> None:
        """
        A record that fails to decrypt ends the pump as a broken transfer
        (the fill resumes on a new connection); the alert TLS sends about it
        goes to the socket, and nothing of the broken record is written.
        """
        self.connect()
        body = os.urandom(100 * KiB)

        def server() -> None:
            self.send(body[: 16 * KiB])
            self.server.send(body[16 * KiB : 32 * KiB])
            record = bytearray(self.server.bio_read(256 * KiB))
            record[len(record) // 2] ^= 0xFF
            self.theirs.sendall(bytes(record))

        failure = self.run_while(self.pump(len(body)), server)
        self.assertIsInstance(failure, TransferBroken)
        self.assertIn("broke TLS after 16384 bytes", failure.message)
        self.assertEqual(self.written(), body[: 16 * KiB])
        self.theirs.settimeout(5)
        self.assertTrue(self.theirs.recv(1024))  # the alert

    def test_renegotiation_ends_the_pump(self) -> None:
        """A TLS 1.2 server starting a new handshake mid-body ends the pump as broken."""
        self.connect(SSL.TLS1_2_VERSION)
        body = os.urandom(200 * KiB)

        def server() -> None:
            self.send(body[: 64 * KiB])
            self.server.renegotiate()
            try:
                self.server.do_handshake()
            except SSL.WantReadError:
                pass
            self.wire()

        failure = self.run_while(self.pump(len(body), idle_timeout=2), server)
        self.assertIsInstance(failure, TransferBroken)
        self.assertIn("new TLS handshake after 65536 bytes", failure.message)
        self.assertEqual(self.written(), body[: 64 * KiB])

    def test_socket_end(self) -> None:
        """The socket ending (no close_notify) before the body did: broken."""
        self.connect()
        body = os.urandom(100 * KiB)

        def server() -> None:
            self.send(body[: 50 * KiB])
            self.theirs.shutdown(socket.SHUT_WR)

        failure = self.run_while(self.pump(len(body)), server)
        self.assertIsInstance(failure, TransferBroken)
        self.assertEqual(self.written(), body[: 50 * KiB])
