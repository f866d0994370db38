"""
Tests for L{hammal.storage.follow.FileUpload}: a growing file's bytes to
an object upload, completed only once the fill is verified.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase

from hammal.storage.follow import FileUpload


class FakeFill:
    """A fill as L{FileUpload} sees it, written by the test."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.written = 0
        self.verified = False
        self.size: int | None = None
        self.finished: Deferred[None] = Deferred()
        self.listeners: set[Callable[[], None]] = set()
        open(path, "wb").close()

    def subscribe(self, listener: Callable[[], None]) -> None:
        self.listeners.add(listener)

    def unsubscribe(self, listener: Callable[[], None]) -> None:
        self.listeners.discard(listener)

    def append(self, data: bytes) -> None:
        with open(self.path, "ab") as f:
            f.write(data)
        self.written += len(data)
        for listener in list(self.listeners):
            listener()

    def end(self, verified: bool) -> None:
        self.verified = verified
        self.size = self.written
        for listener in list(self.listeners):
            listener()
        self.finished.callback(None)


class FakeUpload:
    """An L{ObjectUpload} that records what it is told; C{pending} holds writes open."""

    def __init__(self) -> None:
        self.data = b""
        self.state = "open"
        self.fail_writes = False
        self.pending: list[Deferred[None]] = []
        self.hold = False

    def write(self, data: bytes) -> Deferred[None]:
        if self.fail_writes:
            return fail(RuntimeError("S3 InternalError (HTTP 500)"))
        self.data += data
        if self.hold:
            d: Deferred[None] = Deferred()
            self.pending.append(d)
            return d
        return succeed(None)

    def complete(self) -> Deferred[None]:
        self.state = "completed"
        return succeed(None)

    def abort(self) -> Deferred[None]:
        self.state = "aborted"
        return succeed(None)


class FileUploadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fill = FakeFill(self.mktemp())
        self.upload = FakeUpload()
        self.failures: list[str] = []
        self.uploader = FileUpload(self.fill, self.upload, self.failures.append)

    def test_streams_then_completes_once_verified(self) -> None:
        """Bytes go out as they are written; the object completes after the verdict."""
        self.fill.append(b"a" * 10)
        self.uploader.begin()
        self.fill.append(b"b" * 10)
        self.assertEqual(self.upload.data, b"a" * 10 + b"b" * 10)
        self.assertEqual(self.upload.state, "open")
        self.assertNoResult(self.uploader.done)
        self.fill.end(verified=True)
        self.assertEqual(self.upload.state, "completed")
        self.assertIs(self.successResultOf(self.uploader.done), True)
        self.assertEqual(self.failures, [])

    def test_backpressure(self) -> None:
        """One write at a time: the next waits for the store to take the last."""
        self.upload.hold = True
        self.uploader.begin()
        self.fill.append(b"a" * 10)
        self.fill.append(b"b" * 10)
        self.assertEqual(self.upload.data, b"a" * 10)
        self.upload.pending.pop().callback(None)
        self.assertEqual(self.upload.data, b"a" * 10 + b"b" * 10)

    def test_failed_fill_aborts(self) -> None:
        """A fill that fails (a digest mismatch, say) aborts: no object, no store failure."""
        self.uploader.begin()
        self.fill.append(b"a" * 10)
        self.fill.end(verified=False)
        self.assertEqual(self.upload.state, "aborted")
        self.assertIs(self.successResultOf(self.uploader.done), False)
        self.assertEqual(self.failures, [])

    def test_store_failure_aborts_and_is_reported(self) -> None:
        """A write the store fails aborts the upload and reports the store's failure."""
        self.upload.fail_writes = True
        self.uploader.begin()
        self.fill.append(b"a" * 10)
        self.assertEqual(self.upload.state, "aborted")
        self.assertIs(self.successResultOf(self.uploader.done), False)
        self.assertEqual(self.failures, ["S3 InternalError (HTTP 500)"])

    def test_cancel(self) -> None:
        """A fill that failed before it began: dropped, not reported as the store's."""
        self.uploader.cancel()
        self.uploader.begin()
        self.assertEqual(self.upload.state, "aborted")
        self.assertIs(self.successResultOf(self.uploader.done), False)
        self.assertEqual(self.failures, [])
