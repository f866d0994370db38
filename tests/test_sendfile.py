"""
Tests for L{hammal.cache.readers.tcp_transport}: sendfile is used only on plain
TCP connections (the byte-moving itself runs in the integration tests,
over real sockets).
"""

from __future__ import annotations

import hashlib
import os
import socket
from types import SimpleNamespace
from typing import Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial.unittest import SynchronousTestCase

from hammal.cache import fetch as fetch_module
from hammal.cache.fetch import BlobFetch
from hammal.cache.readers import _FIRST_SLICE, FileSender, tcp_transport
from hammal.cache.store import BlobStore
from hammal.reference import Digest
from tests.test_fetch_pipeline import _HeldOffload, _Response


def request_over(transport: Any) -> Any:
    return SimpleNamespace(channel=SimpleNamespace(transport=transport))


class TransportDetectionTests(SynchronousTestCase):
    def test_plain_tcp(self) -> None:
        connection = tcp.Connection.__new__(tcp.Server)
        self.assertIs(tcp_transport(request_over(connection)), connection)

    def test_through_protocol_wrappers(self) -> None:
        connection = tcp.Connection.__new__(tcp.Server)
        wrapper = ProtocolWrapper(WrappingFactory(Factory.forProtocol(Protocol)), Protocol())
        wrapper.transport = connection
        self.assertIs(tcp_transport(request_over(wrapper)), connection)

    def test_not_under_tls(self) -> None:
        connection = tcp.Connection.__new__(tcp.Server)
        tls = TLSMemoryBIOProtocol.__new__(TLSMemoryBIOProtocol)
        tls.transport = connection
        self.assertIsNone(tcp_transport(request_over(tls)))

    def test_not_for_test_doubles(self) -> None:
        self.assertIsNone(tcp_transport(request_over(StringTransport())))
        self.assertIsNone(tcp_transport(object()))  # type: ignore[arg-type]


class _Consumer:
    """The request side of a FileSender: counts what was sent."""

    def __init__(self) -> None:
        self.sentLength = 0
        self.channel = SimpleNamespace(resetTimeout=lambda: None)
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


class FirstBurstTests(SynchronousTestCase):
    """
    A connection's first sendfile is capped at _FIRST_SLICE and the rest
    waits for the next reactor turn: thousands of clients arriving together
    each copy little before requests already under way are served.
    """

    def test_first_burst_capped(self) -> None:
        sender_sock, reader_sock = socket.socketpair()
        self.addCleanup(sender_sock.close)
        self.addCleanup(reader_sock.close)
        sender_sock.setblocking(False)
        size = 3 * _FIRST_SLICE
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"z" * size)
        transport = SimpleNamespace(
            fileno=sender_sock.fileno,
            dataBuffer=b"",
            offset=0,
            _tempDataLen=0,
            producerPaused=False,
            startWriting=lambda: None,
        )
        clock = Clock()
        consumer = _Consumer()
        sender = FileSender(consumer, transport, clock, path, 0, size)  # type: ignore[arg-type]
        received: list[int] = []
        sender.done.addCallback(received.append)
        sender.begin()
        self.assertEqual(consumer.sentLength, _FIRST_SLICE)
        got = 0
        while got < size:
            try:
                got += len(reader_sock.recv(1 << 20, socket.MSG_DONTWAIT))
            except BlockingIOError:
                pass
            clock.advance(0)
        self.assertEqual(received, [size])


class FollowFromMemoryTests(SynchronousTestCase):
    """
    A FileSender following a fill sends what arrived from upstream at once,
    from memory, without waiting for the writer thread; it goes on from
    the file for what was written.
    """

    def test_first_chunk_sent_before_it_is_written(self) -> None:
        sender_sock, reader_sock = socket.socketpair()
        self.addCleanup(sender_sock.close)
        self.addCleanup(reader_sock.close)
        sender_sock.setblocking(False)
        chunks = [bytes([n]) * 50_000 for n in range(1, 5)]
        blob = b"".join(chunks)
        root = self.mktemp()
        store = BlobStore(root)
        os.makedirs(os.path.join(root, "tmp"), exist_ok=True)
        clock = Clock()
        offload = _HeldOffload()
        response = _Response(len(blob))
        fetch = BlobFetch(
            Digest.parse("sha256:" + hashlib.sha256(blob).hexdigest()),
            store,
            clock,
            lambda offset: succeed(response),
            read_timeout=30,
            resumes=0,
            upstream="upstream.test",
            offload=offload,
        )
        Deferred.fromCoroutine(fetch.run())
        transport = SimpleNamespace(
            fileno=sender_sock.fileno,
            dataBuffer=b"",
            offset=0,
            _tempDataLen=0,
            producerPaused=False,
            startWriting=lambda: None,
        )
        consumer = _Consumer()
        sender = FileSender(
            consumer,
            transport,  # type: ignore[arg-type]
            clock,
            fetch.path,
            0,
            len(blob),
            fetch=fetch,
        )
        received: list[int] = []
        sender.done.addCallback(received.append)
        sender.begin()

        def read() -> bytes:
            got = b""
            while True:
                try:
                    got += reader_sock.recv(1 << 20, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return got

        response.send(chunks[0])
        clock.advance(0)
        self.assertEqual(fetch.written, 0)  # no write job ran
        self.assertEqual(read(), chunks[0])
        for chunk in chunks[1:]:
            response.send(chunk)
        offload.run_only(fetch_module._write_and_hash)  # then sent from the file
        got = b""
        for _ in range(20):
            clock.advance(0)
            got += read()
        self.assertEqual(got, blob[50_000:-1])  # the last byte waits for the digest
        response.end()
        offload.run_all()
        for _ in range(20):
            clock.advance(0)
            got += read()
        self.assertEqual(got, blob[50_000:])
        self.assertEqual(received, [len(blob)])
