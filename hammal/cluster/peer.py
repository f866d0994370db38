"""
Streaming a blob from the instance that fills it: the internal peer
endpoint (L{PeerBlobResource}) and its client (L{PeerClient}).

When another instance holds a digest's fill lease, this one asks the
holder for the bytes instead of going upstream: C{GET
<advertised URL>/_hammal/peer/blobs/<digest>} with a C{Range} to resume
from, signed with the cluster key (L{hammal.cluster.peerauth}). The holder
answers from its cache file while it grows, with flow control both ways,
and never finishes a short body: if its fill fails, the connection is
aborted and the caller can resume elsewhere with C{Range}.

Both sides know nothing of hammal's cache: the resource takes a lookup
callable (digest -> L{GrowingFile}) and the client returns the streaming
response.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable
from urllib.parse import urlsplit

import attrs
import treq
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from hammal.cluster.peerauth import SCHEME, PeerAuth

log = Logger()

#: Where the peer endpoint lives on an instance's advertised URL.
PEER_PATH = "/_hammal/peer/blobs/"

_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}$")
_RANGE = re.compile(rb"^bytes=(\d+)-(\d*)$")

#: Bytes read from the file per step.
CHUNK = 256 * 1024


@attrs.frozen
class GrowingFile:
    """
    A blob on this instance's disk, complete or still being filled.

    @ivar path: the file; bytes C{[0, written())} in it are final.
    @ivar size: the blob's full size (the fill knows it from upstream).
    @ivar written: how many bytes are in the file so far.
    @ivar when_done: a new Deferred per call that fires when the fill has
        ended well (all C{size} bytes written and verified) and fails if it
        failed; for a complete file, one that has already fired.
    @ivar subscribe: optional: C{subscribe(callback)} calls C{callback()}
        whenever more bytes were written and returns a function that
        unsubscribes; without it, a reader that caught up polls.
    """

    path: str
    size: int
    written: Callable[[], int]
    when_done: Callable[[], Deferred[Any]]
    subscribe: Callable[[Callable[[], None]], Callable[[], None]] | None = None


Lookup = Callable[[str], "GrowingFile | None"]


def _oci_error(request: Request, status: int, code: str, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
    request.setHeader(b"content-length", str(len(body)).encode())
    return body


def _parse_range(header: bytes | None, size: int) -> tuple[int, int] | None | str:
    """C{(start, end)} (end exclusive), None for no range, "invalid"."""
    if header is None:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return "invalid"
    start = int(match.group(1))
    end = int(match.group(2)) + 1 if match.group(2) else size
    end = min(end, size)
    if start >= size or end <= start:
        return "invalid"
    return start, end


class PeerBlobResource(Resource):
    """
    C{GET <mount>/<digest>} for peers: the blob from this instance's disk,
    whole or a C{Range}, following the file while it grows.

    Unsigned or wrongly signed requests get an OCI-format C{401} before
    anything is looked up; unknown digests a C{404}.

    @param stall_timeout: seconds without a new byte before a transfer is
        given up (the connection is aborted, never finished short).
    @param poll_interval: seconds between looks at a growing file whose
        L{GrowingFile} cannot notify.
    """

    isLeaf = True

    def __init__(
        self,
        lookup: Lookup,
        auth: PeerAuth,
        clock: IReactorTime,
        stall_timeout: float = 30.0,
        poll_interval: float = 0.05,
    ) -> None:
        super().__init__()
        self._lookup = lookup
        self._auth = auth
        self._clock = clock
        self._stall_timeout = stall_timeout
        self._poll_interval = poll_interval

    def render(self, request: Request) -> Any:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return _oci_error(request, 405, "UNSUPPORTED", "peers only GET blobs")
        if not self._auth.check(request.method, request.uri, request.getHeader(b"authorization")):
            request.setHeader(b"www-authenticate", SCHEME)
            return _oci_error(
                request, 401, "UNAUTHORIZED", "peer requests need a valid cluster signature"
            )
        postpath = request.postpath or []
        digest = (postpath[-1] if postpath else b"").decode("ascii", "replace")
        if len(postpath) != 1 or not _DIGEST.match(digest):
            return _oci_error(request, 404, "BLOB_UNKNOWN", "not a digest")
        blob = self._lookup(digest)
        if blob is None:
            return _oci_error(request, 404, "BLOB_UNKNOWN", f"{digest} is not here")
        wanted = _parse_range(request.getHeader(b"range"), blob.size)
        if wanted == "invalid":
            request.setHeader(b"content-range", b"bytes */%d" % blob.size)
            return _oci_error(request, 416, "RANGE_INVALID", "range not satisfiable")
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"docker-content-digest", digest.encode())
        request.setHeader(b"accept-ranges", b"bytes")
        if not isinstance(wanted, tuple):
            start, end = 0, blob.size
        else:
            start, end = wanted
            request.setResponseCode(206)
            request.setHeader(b"content-range", b"bytes %d-%d/%d" % (start, end - 1, blob.size))
        request.setHeader(b"content-length", str(end - start).encode())
        if request.method == b"HEAD" or start == end:
            return b""
        sender = GrowingFileSender(
            request, blob, start, end, self._clock, self._stall_timeout, self._poll_interval
        )
        sender.begin()
        return NOT_DONE_YET


def mount_peer_endpoint(root: Resource, resource: PeerBlobResource) -> None:
    """Put C{resource} at L{PEER_PATH} under C{root} (a site's root)."""
    parent = root
    segments = PEER_PATH.strip("/").split("/")
    for segment in segments[:-1]:
        name = segment.encode()
        child = parent.children.get(name)
        if child is None:
            child = Resource()
            parent.putChild(name, child)
        parent = child
    parent.putChild(segments[-1].encode(), resource)


@implementer(IPushProducer)
class GrowingFileSender:
    """
    Writes bytes C{[start, end)} of a L{GrowingFile} to a request as they
    become available, pausing with the client; aborts the connection when
    the fill fails or stalls. The blob's last byte is sent only once the
    fill is verified, so a peer never receives a whole body that failed
    its digest.
    """

    def __init__(
        self,
        request: Request,
        blob: GrowingFile,
        start: int,
        end: int,
        clock: IReactorTime,
        stall_timeout: float,
        poll_interval: float,
    ) -> None:
        self._request = request
        self._blob = blob
        self._offset = start
        self._end = end
        self._clock = clock
        self._stall_timeout = stall_timeout
        self._poll_interval = poll_interval
        self._fd: int | None = None
        self._paused = False
        self._stopped = False
        self._fill_failed = False
        self._verified = False
        self._next: IDelayedCall | None = None
        self._stall: IDelayedCall | None = None
        self._unsubscribe: Callable[[], None] | None = None

    def begin(self) -> None:
        """Open the file and start sending."""
        try:
            self._fd = os.open(self._blob.path, os.O_RDONLY)
        except OSError as e:
            # Gone (evicted, say) before a byte was sent: an honest 404.
            log.warn("peer read of {path} failed: {error}", path=self._blob.path, error=e.strerror)
            self._stopped = True
            for name in (b"content-range", b"docker-content-digest"):
                self._request.responseHeaders.removeHeader(name)
            body = _oci_error(self._request, 404, "BLOB_UNKNOWN", "the blob is gone")
            self._request.write(body)
            self._request.finish()
            return
        self._request.notifyFinish().addErrback(lambda _: self._stop())
        self._request.registerProducer(self, True)
        # Headers now, even if no byte is there yet: the peer knows the
        # transfer started (and its response timeout ends).
        self._request.write(b"")
        self._blob.when_done().addCallbacks(self._verified_fill, self._failed_fill)
        if self._blob.subscribe is not None:
            self._unsubscribe = self._blob.subscribe(self._progress)
        self._arm_stall()
        self._pump()

    # IPushProducer --------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        if self._stopped:
            return
        self._paused = False
        self._schedule(0)

    def stopProducing(self) -> None:
        self._stop()

    # Moving bytes ---------------------------------------------------------

    def _progress(self) -> None:
        if not self._paused and self._next is None:
            self._schedule(0)

    def _schedule(self, delay: float) -> None:
        if self._stopped or self._next is not None:
            return
        self._next = self._clock.callLater(delay, self._step)

    def _step(self) -> None:
        self._next = None
        self._pump()

    def _pump(self) -> None:
        if self._stopped or self._paused or self._fd is None:
            return
        if self._fill_failed:
            self._abort()
            return
        # The last byte waits for the fill's verdict: with Content-Length
        # sent, the peer would take a body that is all there as complete
        # even if its digest turns out wrong.
        limit = self._end if self._verified else self._end - 1
        available = min(self._blob.written(), limit)
        if self._offset < available:
            try:
                data = os.pread(self._fd, min(CHUNK, available - self._offset), self._offset)
            except OSError as e:
                log.warn(
                    "peer read of {path} failed: {error}", path=self._blob.path, error=e.strerror
                )
                self._abort()
                return
            if not data:
                self._abort()
                return
            self._offset += len(data)
            self._arm_stall()
            self._request.write(data)
            if self._offset >= self._end:
                self._finish()
                return
            self._schedule(0)
            return
        # Caught up with the fill: wait for more (notified, or poll).
        if self._blob.subscribe is None:
            self._schedule(self._poll_interval)

    def _verified_fill(self, result: object) -> None:
        self._verified = True
        if not self._stopped and not self._paused:
            self._schedule(0)

    def _failed_fill(self, failure: Failure) -> None:
        self._fill_failed = True
        if not self._stopped:
            log.info(
                "fill of {path} failed; aborting a peer transfer at {offset}",
                path=self._blob.path,
                offset=self._offset,
            )
            self._schedule(0)

    def _arm_stall(self) -> None:
        if self._stall is not None and self._stall.active():
            self._stall.reset(self._stall_timeout)
        else:
            self._stall = self._clock.callLater(self._stall_timeout, self._stalled)

    def _stalled(self) -> None:
        self._stall = None
        if self._paused:
            # The reader is slow, not the fill: wait for it.
            self._arm_stall()
            return
        log.warn(
            "peer transfer of {path} stalled at {offset}", path=self._blob.path, offset=self._offset
        )
        self._abort()

    # Ending ----------------------------------------------------------------

    def _cleanup(self) -> None:
        self._stopped = True
        for call in (self._next, self._stall):
            if call is not None and call.active():
                call.cancel()
        self._next = self._stall = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _stop(self) -> None:
        if not self._stopped:
            self._cleanup()

    def _finish(self) -> None:
        self._cleanup()
        self._request.unregisterProducer()
        self._request.finish()

    def _abort(self) -> None:
        """Never a short body that looks complete: drop the connection."""
        was_registered = self._fd is not None
        self._cleanup()
        if was_registered:
            self._request.unregisterProducer()
        transport: Any = self._request.channel.transport if self._request.channel else None
        if transport is not None:
            transport.abortConnection()


class PeerError(Exception):
    """A peer refused or failed a request (status 0: no answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class PeerClient:
    """
    Fetches blobs from other instances' peer endpoints.

    @param http: a treq C{HTTPClient}.
    @param timeout: seconds until the peer's response headers arrive (the
        caller bounds the body, e.g. with a stall timer of its own).
    """

    def __init__(
        self, http: Any, auth: PeerAuth, clock: IReactorTime, timeout: float = 10.0
    ) -> None:
        self._http = http
        self._auth = auth
        self._clock = clock
        self._timeout = timeout

    @staticmethod
    def url(peer: str, digest: str) -> str:
        """The peer endpoint URL for C{digest} on the instance at C{peer}."""
        return peer.rstrip("/") + PEER_PATH + digest

    def fetch(self, peer: str, digest: str, start: int = 0) -> Deferred[IResponse]:
        """
        Stream C{digest} from C{peer} (its advertised URL) from byte
        C{start}: the unbuffered response (C{200} or C{206}) for the caller
        to C{deliverBody}.

        @raises PeerError: through the Deferred, for any other status or no
            answer in time.
        """
        return Deferred.fromCoroutine(self._fetch(peer, digest, start))

    async def _fetch(self, peer: str, digest: str, start: int) -> IResponse:
        url = self.url(peer, digest)
        parts = urlsplit(url)
        target = (parts.path + ("?" + parts.query if parts.query else "")).encode("ascii")
        headers = {b"authorization": [self._auth.sign(b"GET", target)]}
        if start:
            headers[b"range"] = [b"bytes=%d-" % start]
        d = self._http.request("GET", url, headers=headers, unbuffered=True, allow_redirects=False)
        try:
            response: IResponse = await d.addTimeout(self._timeout, self._clock)
        except Exception as e:
            raise PeerError(0, f"peer {peer} did not answer: {e!r}")
        expected = 206 if start else 200
        if response.code != expected:
            message = await self._error_message(response)
            raise PeerError(
                response.code, f"peer {peer} answered HTTP {response.code} for {digest}: {message}"
            )
        return response

    async def _error_message(self, response: IResponse) -> str:
        """The first OCI error message of a refusal (its body read, bounded)."""
        chunks: list[bytes] = []

        def keep(data: bytes) -> None:
            if sum(map(len, chunks)) < 65536:
                chunks.append(data)

        try:
            await treq.collect(response, keep).addTimeout(self._timeout, self._clock)
            document = json.loads(b"".join(chunks))
            return str(document["errors"][0]["message"])
        except Exception:
            return "no OCI error body"
