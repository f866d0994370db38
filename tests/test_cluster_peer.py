"""
Tests for L{hammal.cluster.peer} over real TCP on 127.0.0.1: a peer
endpoint serving complete and growing files, its authentication, and the
client that streams from it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed
from twisted.web.resource import Resource
from twisted.web.server import Site

from hammal.cluster.peer import (
    PEER_PATH,
    GrowingFile,
    PeerBlobResource,
    PeerClient,
    PeerError,
    mount_peer_endpoint,
)
from hammal.cluster.peerauth import PeerAuth
from tests.cluster.fakes import Fill

KEY = b"cluster-key-for-tests-0123456789abcdef"


def _data(size: int) -> bytes:
    block = hashlib.sha256(b"peer").digest() * 1024
    return (block * (size // len(block) + 1))[:size]


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class PeerEndpointTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.blobs: dict[str, GrowingFile] = {}
        self.auth = PeerAuth(KEY, reactor)
        root = Resource()
        mount_peer_endpoint(root, PeerBlobResource(self.blobs.get, self.auth, reactor))
        self.port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.peer = f"http://127.0.0.1:{self.port.getHost().port}"
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        self.client = PeerClient(self.http, self.auth, reactor)

    def complete(self, data: bytes) -> str:
        digest = _digest(data)
        fill = Fill(self.mktemp(), len(data))
        fill.append(data)
        fill.end(len(data))
        self.blobs[digest] = fill.growing()
        return digest

    @inlineCallbacks
    def body(self, d: Deferred[Any]) -> Any:
        response = yield d
        return (yield treq.content(response))

    # Authentication --------------------------------------------------------

    @inlineCallbacks
    def assert_refused(self, headers: dict[bytes, list[bytes]], path: str | None = None) -> Any:
        digest = self.complete(b"secret bytes")
        url = self.peer + (path or PEER_PATH + digest)
        response = yield self.http.get(url, headers=headers)
        self.assertEqual(response.code, 401)
        self.assertEqual(response.headers.getRawHeaders(b"www-authenticate"), [b"Hammal-Peer"])
        document = json.loads((yield response.content()))
        self.assertEqual(document["errors"][0]["code"], "UNAUTHORIZED")
        self.assertNotIn(b"secret", json.dumps(document).encode())

    def test_unsigned_refused(self) -> Any:
        return self.assert_refused({})

    def test_wrong_key_refused(self) -> Any:
        other = PeerAuth(b"another-key-" + b"x" * 32, reactor)
        digest = _digest(b"secret bytes")
        target = (PEER_PATH + digest).encode()
        return self.assert_refused({b"authorization": [other.sign(b"GET", target)]})

    def test_expired_signature_refused(self) -> Any:
        past = Clock()
        past.advance(reactor.seconds() - 60)
        digest = _digest(b"secret bytes")
        target = (PEER_PATH + digest).encode()
        header = PeerAuth(KEY, past).sign(b"GET", target)
        return self.assert_refused({b"authorization": [header]})

    def test_signature_for_another_path_refused(self) -> Any:
        header = self.auth.sign(b"GET", (PEER_PATH + _digest(b"other")).encode())
        return self.assert_refused({b"authorization": [header]})

    def test_refused_before_lookup(self) -> Any:
        """Unsigned requests learn nothing, not even whether a digest exists."""
        looked: list[str] = []
        self.blobs = _Recording(looked)  # type: ignore[assignment]
        root = Resource()
        mount_peer_endpoint(root, PeerBlobResource(self.blobs.get, self.auth, reactor))
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}{PEER_PATH}{_digest(b'x')}"
        d = self.http.get(url)
        d.addCallback(lambda r: self.assertEqual(r.code, 401))
        return d.addCallback(lambda _: self.assertEqual(looked, []))

    # Serving ---------------------------------------------------------------

    @inlineCallbacks
    def test_complete_file(self) -> Any:
        data = _data(3 * 1024 * 1024 + 17)
        digest = self.complete(data)
        response = yield self.client.fetch(self.peer, digest)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.length, len(data))
        self.assertEqual(
            response.headers.getRawHeaders(b"docker-content-digest"), [digest.encode()]
        )
        self.assertEqual((yield treq.content(response)), data)

    @inlineCallbacks
    def test_resume_with_range(self) -> Any:
        data = _data(1024 * 1024)
        digest = self.complete(data)
        response = yield self.client.fetch(self.peer, digest, start=1000)
        self.assertEqual(response.code, 206)
        self.assertEqual(
            response.headers.getRawHeaders(b"content-range"),
            [b"bytes 1000-%d/%d" % (len(data) - 1, len(data))],
        )
        self.assertEqual((yield treq.content(response)), data[1000:])

    @inlineCallbacks
    def test_range_past_the_end(self) -> Any:
        digest = self.complete(b"0123456789")
        with self.assertRaises(PeerError) as caught:
            yield self.client.fetch(self.peer, digest, start=10)
        self.assertEqual(caught.exception.status, 416)

    @inlineCallbacks
    def test_unknown_digest(self) -> Any:
        with self.assertRaises(PeerError) as caught:
            yield self.client.fetch(self.peer, _digest(b"nothing"))
        self.assertEqual(caught.exception.status, 404)

    @inlineCallbacks
    def test_file_gone(self) -> Any:
        """A file removed between lookup and read is a 404, not a hang."""
        fill = Fill(self.mktemp(), 10)
        fill.append(b"0123456789")
        fill.end(10)
        digest = _digest(b"0123456789")
        self.blobs[digest] = fill.growing()
        os.unlink(fill.path)
        with self.assertRaises(PeerError) as caught:
            yield self.client.fetch(self.peer, digest, start=2)
        self.assertEqual(caught.exception.status, 404)
        self.assertIn("gone", str(caught.exception))

    @inlineCallbacks
    def test_nobody_listening(self) -> Any:
        yield self.port.stopListening()
        with self.assertRaises(PeerError) as caught:
            yield self.client.fetch(self.peer, _digest(b"nothing"))
        self.assertEqual(caught.exception.status, 0)

    @inlineCallbacks
    def growing_transfer(self, notify: bool, start: int = 0) -> Any:
        data = _data(2 * 1024 * 1024 + 5)
        digest = _digest(data)
        fill = Fill(self.mktemp(), len(data))
        fill.append(data[:1000])
        self.blobs[digest] = fill.growing(notify)
        response = yield self.client.fetch(self.peer, digest, start)
        # The response started while the file holds 1000 bytes of it.
        self.assertEqual(fill.written, 1000)
        self.assertEqual(response.length, len(data) - start)
        received: list[bytes] = []
        done = treq.collect(response, received.append)
        for offset in range(1000, len(data), 300_000):
            yield deferLater(reactor, 0.01, lambda: None)
            fill.append(data[offset : offset + 300_000])
        fill.end(len(data))
        yield done
        self.assertEqual(b"".join(received), data[start:])

    def test_growing_file_notified(self) -> Any:
        return self.growing_transfer(notify=True)

    def test_growing_file_polled(self) -> Any:
        return self.growing_transfer(notify=False)

    def test_growing_file_resumed_ahead_of_the_fill(self) -> Any:
        """A range that starts past what is written waits for those bytes."""
        return self.growing_transfer(notify=True, start=500_000)

    @inlineCallbacks
    def test_failed_fill_aborts(self) -> Any:
        """A fill that fails mid-way is never a clean short body."""
        data = _data(1024 * 1024)
        digest = _digest(data)
        fill = Fill(self.mktemp(), len(data))
        fill.append(data[:4000])
        self.blobs[digest] = fill.growing()
        response = yield self.client.fetch(self.peer, digest)
        received: list[bytes] = []
        done = treq.collect(response, received.append)
        yield deferLater(reactor, 0.05, lambda: None)
        fill.end(RuntimeError("digest mismatch"))
        with self.assertRaises(ResponseFailed):
            yield done
        self.assertEqual(b"".join(received), data[:4000])

    @inlineCallbacks
    def test_last_byte_waits_for_verification(self) -> Any:
        """All bytes written is not a complete body until the digest matched."""
        data = _data(100_000)
        digest = _digest(data)
        fill = Fill(self.mktemp(), len(data))
        fill.append(data)
        self.blobs[digest] = fill.growing()
        response = yield self.client.fetch(self.peer, digest)
        received: list[bytes] = []
        done = treq.collect(response, received.append)
        for _ in range(50):
            yield deferLater(reactor, 0.01, lambda: None)
            if len(b"".join(received)) == len(data) - 1:
                break
        self.assertEqual(b"".join(received), data[:-1])
        self.assertNoResult(done)
        fill.end(len(data))
        yield done
        self.assertEqual(b"".join(received), data)

    @inlineCallbacks
    def test_whole_but_wrong_is_aborted(self) -> Any:
        data = _data(100_000)
        digest = _digest(data)
        fill = Fill(self.mktemp(), len(data))
        fill.append(data)
        self.blobs[digest] = fill.growing()
        response = yield self.client.fetch(self.peer, digest)
        done = treq.content(response)
        yield deferLater(reactor, 0.05, lambda: None)
        fill.end(RuntimeError("digest mismatch"))
        with self.assertRaises(ResponseFailed):
            yield done

    @inlineCallbacks
    def test_stalled_fill_aborts(self) -> Any:
        data = _data(100_000)
        digest = _digest(data)
        fill = Fill(self.mktemp(), len(data))
        fill.append(data[:10])
        root = Resource()
        clock = Clock()
        resource = PeerBlobResource(
            {digest: fill.growing()}.get, self.auth, clock, stall_timeout=5.0
        )
        mount_peer_endpoint(root, resource)
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        response = yield self.client.fetch(f"http://127.0.0.1:{port.getHost().port}", digest)
        received: list[bytes] = []
        done = treq.collect(response, received.append)
        # The sender's steps run on the injected clock.
        for _ in range(3):
            yield deferLater(reactor, 0.01, lambda: None)
            clock.advance(0)
        self.assertNoResult(done)
        clock.advance(5.0)
        with self.assertRaises(ResponseFailed):
            yield done
        self.assertEqual(b"".join(received), data[:10])

    @inlineCallbacks
    def test_head(self) -> Any:
        digest = self.complete(b"abc")
        target = (PEER_PATH + digest).encode()
        response = yield self.http.head(
            self.peer + PEER_PATH + digest,
            headers={b"authorization": [self.auth.sign(b"HEAD", target)]},
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-length"), [b"3"])

    @inlineCallbacks
    def test_client_goes_away(self) -> Any:
        """A peer that disconnects mid-transfer releases the file."""
        data = _data(1024 * 1024)
        digest = _digest(data)
        fill = Fill(self.mktemp(), len(data))
        fill.append(data[:1000])
        self.blobs[digest] = fill.growing()
        response = yield self.client.fetch(self.peer, digest)
        self.assertEqual(len(fill._listeners), 1)
        hang_up = _HangUp()
        response.deliverBody(hang_up)
        for _ in range(20):
            yield deferLater(reactor, 0.01, lambda: None)
            if not fill._listeners:
                break
        self.assertEqual(fill._listeners, [])


class _Recording(dict):  # type: ignore[type-arg]
    def __init__(self, looked: list[str]) -> None:
        super().__init__()
        self._looked = looked

    def get(self, key: Any, default: Any = None) -> Any:
        self._looked.append(key)
        return None


class _HangUp(Protocol):
    """Takes the first bytes of a body, then closes the connection."""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.stopProducing()
