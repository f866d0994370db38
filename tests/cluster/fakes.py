"""
In-memory doubles for the cluster unit tests: a Redis that knows the
commands and the two lease scripts hammal sends, with expiry on a
L{task.Clock}, and switches for an outage or a Redis that never answers;
an S3 endpoint (L{FakeS3}) to serve through L{treq.testing.StubTreq}; and
a cache file being filled (L{Fill}) for the peer endpoint.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from hammal.cluster.lease import RELEASE_SCRIPT, RENEW_SCRIPT
from hammal.cluster.peer import GrowingFile


class FakeRedisDown(ConnectionError):
    """What the fake raises while L{FakeRedis.down} is set."""


class FakeRedis:
    """
    The subset of txredisapi the lease uses: C{set} (NX, PX), C{get},
    C{eval} of L{RENEW_SCRIPT} and L{RELEASE_SCRIPT}.

    @ivar down: every call fails at once (connection refused).
    @ivar hang: every call returns a Deferred that never fires.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.data: dict[str, tuple[str, float | None]] = {}
        self.down = False
        self.hang = False
        self.calls: list[tuple[Any, ...]] = []

    def _live(self, key: str) -> str | None:
        entry = self.data.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires is not None and self.clock.seconds() >= expires:
            del self.data[key]
            return None
        return value

    def _answer(self, call: tuple[Any, ...], compute: Any) -> Deferred[Any]:
        self.calls.append(call)
        if self.hang:
            return Deferred()
        if self.down:
            return fail(FakeRedisDown("Not connected"))
        return succeed(compute())

    def ttl(self, key: str) -> float | None:
        """Seconds left on C{key} (None: no key or no expiry)."""
        if self._live(key) is None:
            return None
        expires = self.data[key][1]
        return None if expires is None else expires - self.clock.seconds()

    def set(
        self,
        key: str,
        value: str,
        expire: int | None = None,
        pexpire: int | None = None,
        only_if_not_exists: bool = False,
        only_if_exists: bool = False,
    ) -> Deferred[Any]:
        def compute() -> Any:
            if only_if_not_exists and self._live(key) is not None:
                return None
            expires = None
            if pexpire is not None:
                expires = self.clock.seconds() + pexpire / 1000
            self.data[key] = (value, expires)
            return "OK"

        return self._answer(("set", key, value, pexpire, only_if_not_exists), compute)

    def get(self, key: str) -> Deferred[Any]:
        return self._answer(("get", key), lambda: self._live(key))

    def eval(self, script: str, keys: list[str], args: list[Any]) -> Deferred[Any]:
        key = keys[0]

        def compute() -> int:
            if self._live(key) != args[0]:
                return 0
            if script == RENEW_SCRIPT:
                self.data[key] = (args[0], self.clock.seconds() + int(args[1]) / 1000)
                return 1
            if script == RELEASE_SCRIPT:
                del self.data[key]
                return 1
            raise AssertionError(f"unexpected script {script!r}")

        return self._answer(("eval", script, key, tuple(args)), compute)


class FakeS3(Resource):
    """
    An in-memory, path-style S3 endpoint with one bucket: objects, ranged
    GET, HEAD, DELETE, and multipart uploads (create, part, complete,
    abort). It records every request and checks that each is signed and
    that a signed payload hash matches the body.

    @ivar fail_parts: answer part uploads with this status instead.
    @ivar hold: leave every request unanswered (for timeouts).
    @ivar complete_error: answer completion with 200 and an C{<Error>} body.
    """

    isLeaf = True

    def __init__(self, bucket: str) -> None:
        super().__init__()
        self.bucket = bucket
        self.objects: dict[str, bytes] = {}
        self.uploads: dict[str, dict[int, bytes]] = {}
        self.requests: list[tuple[str, str, dict[str, str], int]] = []
        self.fail_parts: int | None = None
        self.hold = False
        self.complete_error = False
        self.held: list[Request] = []
        self._ids = 0

    def render(self, request: Request) -> Any:
        method = request.method.decode()
        path = unquote(request.path.decode())
        # Not request.args: Twisted drops a bare "?uploads" (no "=").
        query = dict(
            (unquote(name), unquote(value))
            for name, _, value in (
                pair.partition("=") for pair in urlsplit(request.uri.decode()).query.split("&")
            )
            if name
        )
        headers = {
            k.decode().lower(): vs[0].decode()
            for k, vs in request.requestHeaders.getAllRawHeaders()
        }
        body = request.content.read()
        self.requests.append((method, request.uri.decode(), headers, len(body)))
        if self.hold:
            self.held.append(request)
            return NOT_DONE_YET
        if not headers.get("authorization", "").startswith("AWS4-HMAC-SHA256 "):
            return self._error(request, 403, "AccessDenied", "unsigned")
        payload = headers.get("x-amz-content-sha256")
        if payload != "UNSIGNED-PAYLOAD" and payload != hashlib.sha256(body).hexdigest():
            return self._error(request, 400, "XAmzContentSHA256Mismatch", "payload hash")
        bucket, _, key = path.lstrip("/").partition("/")
        if bucket != self.bucket:
            return self._error(request, 404, "NoSuchBucket", bucket)
        if "uploads" in query and method == "POST":
            self._ids += 1
            upload_id = f"up+{self._ids}/="
            self.uploads[upload_id] = {}
            return (
                b"<InitiateMultipartUploadResult xmlns='http://s3.amazonaws.com/doc/2006-03-01/'>"
                b"<Bucket>b</Bucket><Key>k</Key><UploadId>%s</UploadId>"
                b"</InitiateMultipartUploadResult>" % upload_id.encode()
            )
        if "uploadId" in query:
            return self._multipart(request, method, key, query, body)
        if method == "PUT":
            self.objects[key] = body
            request.setHeader(b"etag", b'"%s"' % hashlib.md5(body).hexdigest().encode())
            return b""
        data = self.objects.get(key)
        if data is None:
            if method == "HEAD":
                request.setResponseCode(404)
                return b""
            return self._error(request, 404, "NoSuchKey", key)
        if method == "DELETE":
            del self.objects[key]
            request.setResponseCode(204)
            return b""
        if method == "HEAD":
            request.setHeader(b"content-length", str(len(data)).encode())
            return b""
        range_header = headers.get("range")
        if range_header:
            first, _, last = range_header.removeprefix("bytes=").partition("-")
            start = int(first)
            stop = int(last) + 1 if last else len(data)
            if start >= len(data):
                return self._error(request, 416, "InvalidRange", range_header)
            request.setResponseCode(206)
            request.setHeader(b"content-range", f"bytes {start}-{stop - 1}/{len(data)}".encode())
            return data[start:stop]
        return data

    def _multipart(
        self, request: Request, method: str, key: str, query: dict[str, str], body: bytes
    ) -> bytes:
        upload_id = query["uploadId"]
        parts = self.uploads.get(upload_id)
        if parts is None:
            return self._error(request, 404, "NoSuchUpload", upload_id)
        if method == "PUT":
            if self.fail_parts is not None:
                return self._error(request, self.fail_parts, "InternalError", "part")
            number = int(query["partNumber"])
            parts[number] = body
            request.setHeader(b"etag", b'"etag-%d"' % number)
            return b""
        if method == "DELETE":
            del self.uploads[upload_id]
            request.setResponseCode(204)
            return b""
        # POST: complete.
        if self.complete_error:
            return b"<Error><Code>InternalError</Code><Message>late</Message></Error>"
        listed = [int(n) for n in re.findall(rb"<PartNumber>(\d+)</PartNumber>", body)]
        if listed != sorted(parts):
            return self._error(request, 400, "InvalidPart", repr(listed))
        self.objects[key] = b"".join(parts[n] for n in listed)
        del self.uploads[upload_id]
        return b"<CompleteMultipartUploadResult><Key>k</Key></CompleteMultipartUploadResult>"

    def _error(self, request: Request, status: int, code: str, message: str) -> bytes:
        request.setResponseCode(status)
        return (
            f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
            f"<Message>{message}</Message></Error>"
        ).encode()


class Fill:
    """A file being filled by the test, as the cache would."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size
        self.written = 0
        self._listeners: list[Callable[[], None]] = []
        self._waiters: list[Deferred[Any]] = []
        self.outcome: Any = None
        open(path, "wb").close()

    def append(self, data: bytes) -> None:
        with open(self.path, "ab") as f:
            f.write(data)
        self.written += len(data)
        for listener in list(self._listeners):
            listener()

    def end(self, outcome: Any) -> None:
        self.outcome = outcome
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if isinstance(outcome, Exception):
                d.errback(outcome)
            else:
                d.callback(outcome)

    def when_done(self) -> Deferred[Any]:
        if self.outcome is None:
            d: Deferred[Any] = Deferred()
            self._waiters.append(d)
            return d
        return succeed(self.outcome)

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def growing(self, notify: bool = True) -> GrowingFile:
        return GrowingFile(
            self.path,
            self.size,
            lambda: self.written,
            self.when_done,
            self.subscribe if notify else None,
        )
