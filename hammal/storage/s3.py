"""
A streaming client for S3-compatible object stores (AWS S3, MinIO, Ceph
RGW, SeaweedFS): just what a blob store needs, over treq.

* Requests are signed by botocore's SigV4 signer (L{S3SigV4Auth}); nothing
  here computes a signature. Bodies are never buffered whole: reads return
  the unbuffered response for the caller to stream, uploads hold at most one
  part (C{part_size}, at least 8 MiB) in memory.
* Addressing is path-style (C{ENDPOINT/BUCKET/PREFIX+KEY}), which every
  S3-compatible store understands.
* L{S3Upload} is how a fill writes: parts go out while the blob streams in,
  and the object appears only when the caller calls L{S3Upload.complete}
  (after the digest matched); L{S3Upload.abort} leaves nothing behind. A
  blob smaller than one part is sent as one C{PUT} at completion.

Every request is bounded by C{timeout} seconds (for a read: until the
response headers; the caller bounds the body).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from typing import TYPE_CHECKING, Any, Callable, Mapping
from urllib.parse import quote, urlencode, urlsplit

import attrs
import treq
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

if TYPE_CHECKING:
    from hammal.storage.objects import ObjectStore, ObjectUpload

log = Logger()

#: The smallest part hammal uploads (S3's own minimum is 5 MiB).
MIN_PART_SIZE = 8 * 1024 * 1024

#: Small response bodies (errors, upload ids) are read up to this size.
_SMALL_BODY_LIMIT = 1024 * 1024


class S3Error(Exception):
    """
    The store refused or failed a request.

    @ivar status: the HTTP status (0 when no response came).
    @ivar code: S3's error code (C{NoSuchKey}, C{AccessDenied}, ...).
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"S3 {code} (HTTP {status}): {message}")
        self.status = status
        self.code = code
        self.message = message


class S3NotFound(S3Error):
    """The key (or bucket) does not exist."""


class S3Unavailable(S3Error):
    """No answer: connection refused or reset, or no response in time."""


@attrs.frozen
class S3Location:
    """
    A bucket and a key prefix, from C{s3://BUCKET/PREFIX}.
    """

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, value: str) -> "S3Location":
        """
        Parse C{s3://BUCKET[/PREFIX]}; the prefix gets a trailing C{/}.

        @raises ValueError: for anything else.
        """
        parts = urlsplit(value)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"expected s3://BUCKET/PREFIX, got {value!r}")
        prefix = parts.path.lstrip("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        return cls(parts.netloc, prefix)


@attrs.frozen(repr=False)
class S3Credentials:
    """
    Access key, secret and region, from the standard C{AWS_*} variables.
    The secret never appears in C{repr}.
    """

    access_key: str
    secret_key: str
    region: str = "us-east-1"
    session_token: str | None = None

    def __repr__(self) -> str:
        return f"S3Credentials(access_key={self.access_key!r}, region={self.region!r})"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "S3Credentials":
        """
        C{AWS_ACCESS_KEY_ID}, C{AWS_SECRET_ACCESS_KEY}, C{AWS_REGION} (else
        C{AWS_DEFAULT_REGION}, else C{us-east-1}) and C{AWS_SESSION_TOKEN}.

        @raises ValueError: when the key or the secret is missing.
        """
        env = os.environ if environ is None else environ
        access_key = env.get("AWS_ACCESS_KEY_ID", "")
        secret_key = env.get("AWS_SECRET_ACCESS_KEY", "")
        if not access_key or not secret_key:
            raise ValueError("S3 storage needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
        return cls(access_key, secret_key, region, env.get("AWS_SESSION_TOKEN") or None)


class _UnsignedPayload:
    """botocore's client-config shape that turns payload signing off."""

    s3 = {"payload_signing_enabled": False}


def _local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _xml_text(body: bytes, name: str) -> str | None:
    """The text of the first element called C{name} (any namespace)."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return None
    for element in root.iter():
        if _local_name(element.tag) == name:
            return element.text or ""
    return None


def _is_error_document(body: bytes) -> bool:
    try:
        return _local_name(ElementTree.fromstring(body).tag) == "Error"
    except ElementTree.ParseError:
        return False


async def _read_small(response: IResponse) -> bytes:
    """A short response body (bounded), for errors and small documents."""
    chunks: list[bytes] = []
    total = 0

    def collect(data: bytes) -> None:
        nonlocal total
        total += len(data)
        if total <= _SMALL_BODY_LIMIT:
            chunks.append(data)

    await treq.collect(response, collect)
    return b"".join(chunks)


class S3Store:
    """
    One bucket and prefix on one S3-compatible endpoint.

    @param endpoint: the store's base URL (C{--s3-endpoint}), e.g.
        C{https://s3.eu-west-1.amazonaws.com} or C{http://127.0.0.1:8333}.
    @param http: a treq C{HTTPClient} (streaming responses are asked for
        with C{unbuffered=True}).
    @param timeout: seconds each request may take until its response.
    @param part_size: bytes per multipart part (at least L{MIN_PART_SIZE}).
    """

    def __init__(
        self,
        endpoint: str,
        location: S3Location,
        credentials: S3Credentials,
        http: Any,
        clock: IReactorTime,
        timeout: float = 60.0,
        part_size: int = MIN_PART_SIZE,
    ) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"S3 endpoint must be an http(s) URL, got {endpoint!r}")
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"S3 parts must be at least {MIN_PART_SIZE} bytes")
        self._base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self.location = location
        self._credentials = credentials
        self._signer = S3SigV4Auth(
            Credentials(credentials.access_key, credentials.secret_key, credentials.session_token),
            "s3",
            credentials.region,
        )
        self._http = http
        self._clock = clock
        self.timeout = timeout
        self.part_size = part_size

    # Requests -----------------------------------------------------------

    def url(self, key: str | None, query: list[tuple[str, str | None]] | None = None) -> str:
        """The path-style URL of C{key} (or of the bucket, for L{None})."""
        path = "/" + quote(self.location.bucket, safe="")
        if key is not None:
            path += "/" + quote(self.location.prefix + key, safe="/-_.~")
        url = self._base + path
        if query:
            url += "?" + "&".join(
                name if value is None else urlencode([(name, value)], quote_via=quote, safe="-_.~")
                for name, value in query
            )
        return url

    def _signed_headers(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None
    ) -> dict[bytes, list[bytes]]:
        request = AWSRequest(method=method, url=url, headers=dict(headers), data=body or b"")
        if body is not None and len(body) > _SMALL_BODY_LIMIT:
            # Large part bodies: S3's UNSIGNED-PAYLOAD rather than hashing
            # megabytes on the reactor thread.
            request.context["client_config"] = _UnsignedPayload()
        self._signer.add_auth(request)
        return {
            name.encode("latin-1"): [str(value).encode("latin-1")]
            for name, value in request.headers.items()
        }

    def _send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> Deferred[IResponse]:
        """One signed request; the response unbuffered, or a timeout."""
        signed = self._signed_headers(method, url, headers or {}, body)
        d: Deferred[IResponse] = self._http.request(
            method,
            url,
            headers=signed,
            data=body,
            unbuffered=True,
            allow_redirects=False,
        )
        timed_out = False

        def on_timeout(result: Any, timeout: float) -> Any:
            nonlocal timed_out
            timed_out = True
            return result

        def unavailable(failure: Failure) -> Failure:
            if failure.check(S3Error):
                return failure
            reason = (
                f"no answer within {self.timeout:g}s"
                if timed_out
                else (failure.getErrorMessage() or getattr(failure.type, "__name__", "error"))
            )
            return Failure(S3Unavailable(0, "Unavailable", f"{method} {url}: {reason}"))

        d.addTimeout(self.timeout, self._clock, onTimeoutCancel=on_timeout)
        return d.addErrback(unavailable)

    async def _error(self, response: IResponse, key: str | None, head: bool = False) -> S3Error:
        """The L{S3Error} for a failed response (its body read, bounded)."""
        body = b"" if head else await _read_small(response)
        code = _xml_text(body, "Code") or f"HTTP{response.code}"
        message = _xml_text(body, "Message") or (key or self.location.bucket)
        error_type = S3NotFound if response.code == 404 else S3Error
        return error_type(response.code, code, message)

    async def _expect(
        self,
        method: str,
        url: str,
        key: str | None,
        ok: tuple[int, ...] = (200,),
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> IResponse:
        response = await self._send(method, url, headers, body)
        if response.code not in ok:
            raise await self._error(response, key)
        return response

    # Objects ------------------------------------------------------------

    def size(self, key: str) -> Deferred[int | None]:
        """The object's size (C{HEAD}), or L{None} when it does not exist."""
        return Deferred.fromCoroutine(self._size(key))

    async def _size(self, key: str) -> int | None:
        response = await self._send("HEAD", self.url(key))
        if response.code == 404:
            return None
        if response.code != 200:
            raise await self._error(response, key, head=True)
        length = response.headers.getRawHeaders(b"content-length", [b""])[0]
        try:
            return int(length)
        except ValueError:
            raise S3Error(response.code, "InvalidResponse", "HEAD without Content-Length")

    def exists(self, key: str) -> Deferred[bool]:
        """Whether the object exists (C{HEAD})."""
        return self.size(key).addCallback(lambda size: size is not None)

    def read(self, key: str, start: int = 0, end: int | None = None) -> Deferred[IResponse]:
        """
        Stream bytes C{[start, end)} of C{key} (to its end for L{None}): the
        unbuffered response, C{200} for the whole object or C{206} for a
        range. The caller reads it with C{deliverBody} (or C{treq.collect}).

        @raises S3NotFound: the object does not exist.
        @raises S3Error: anything else, including a range past the end.
        """
        if start < 0 or (end is not None and end <= start):
            raise ValueError(f"bad range [{start}, {end})")
        return Deferred.fromCoroutine(self._read(key, start, end))

    async def _read(self, key: str, start: int, end: int | None) -> IResponse:
        headers = {}
        if start or end is not None:
            last = "" if end is None else str(end - 1)
            headers["Range"] = f"bytes={start}-{last}"
            response = await self._expect("GET", self.url(key), key, (206,), headers)
        else:
            response = await self._expect("GET", self.url(key), key, (200,))
        return response

    def delete(self, key: str) -> Deferred[None]:
        """Remove C{key} (no error when it is absent)."""
        return Deferred.fromCoroutine(self._delete(key))

    async def _delete(self, key: str) -> None:
        response = await self._expect("DELETE", self.url(key), key, (200, 204))
        await _read_small(response)

    def create_bucket(self) -> Deferred[None]:
        """Create the bucket (for set-up; fine when it already exists and is ours)."""
        return Deferred.fromCoroutine(self._create_bucket())

    async def _create_bucket(self) -> None:
        response = await self._send("PUT", self.url(None), body=b"")
        if response.code == 409:
            error = await self._error(response, None)
            if error.code != "BucketAlreadyOwnedByYou":
                raise error
            return
        if response.code != 200:
            raise await self._error(response, None)
        await _read_small(response)

    # Uploads ------------------------------------------------------------

    def open_upload(self, key: str) -> "S3Upload":
        """Start writing C{key}; nothing is visible until L{S3Upload.complete}."""
        return S3Upload(self, key)

    async def _put(self, key: str, body: bytes) -> None:
        response = await self._expect("PUT", self.url(key), key, body=body)
        await _read_small(response)

    async def _create_multipart(self, key: str) -> str:
        response = await self._expect("POST", self.url(key, [("uploads", None)]), key, body=b"")
        upload_id = _xml_text(await _read_small(response), "UploadId")
        if not upload_id:
            raise S3Error(response.code, "InvalidResponse", "no UploadId in the answer")
        return upload_id

    async def _upload_part(self, key: str, upload_id: str, number: int, body: bytes) -> str:
        url = self.url(key, [("partNumber", str(number)), ("uploadId", upload_id)])
        response = await self._expect("PUT", url, key, body=body)
        await _read_small(response)
        etag = response.headers.getRawHeaders(b"etag", [b""])[0].decode("latin-1")
        if not etag:
            raise S3Error(response.code, "InvalidResponse", f"part {number} without an ETag")
        return etag

    async def _complete_multipart(
        self, key: str, upload_id: str, parts: list[tuple[int, str]]
    ) -> None:
        document = ElementTree.Element("CompleteMultipartUpload")
        for number, etag in parts:
            part = ElementTree.SubElement(document, "Part")
            ElementTree.SubElement(part, "PartNumber").text = str(number)
            ElementTree.SubElement(part, "ETag").text = etag
        body = ElementTree.tostring(document, encoding="utf-8", xml_declaration=False)
        url = self.url(key, [("uploadId", upload_id)])
        response = await self._expect("POST", url, key, body=body)
        answer = await _read_small(response)
        # S3 may answer 200 and still fail the completion in the body.
        if _is_error_document(answer):
            raise S3Error(
                response.code,
                _xml_text(answer, "Code") or "InternalError",
                _xml_text(answer, "Message") or "completion failed",
            )

    async def _abort_multipart(self, key: str, upload_id: str) -> None:
        url = self.url(key, [("uploadId", upload_id)])
        response = await self._expect("DELETE", url, key, (200, 204, 404))
        await _read_small(response)


class S3Upload:
    """
    One object being written: L{write} the bytes as they arrive, then
    L{complete} (the digest matched) or L{abort} (it did not, or the fill
    failed).

    Writes are buffered up to one part; each full part is uploaded while
    the next one fills. Wait for L{write}'s Deferred before writing more:
    that is the backpressure that keeps memory at about one part.
    """

    def __init__(self, store: S3Store, key: str) -> None:
        self._store = store
        self.key = key
        self.size = 0
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._upload_id: str | None = None
        self._parts: list[tuple[int, str]] = []
        self._lock = DeferredLock()
        self._state = "open"

    @property
    def parts(self) -> int:
        """How many parts have been uploaded so far."""
        return len(self._parts)

    def _take(self) -> bytes:
        data = b"".join(self._buffer)
        self._buffer, self._buffered = [], 0
        return data

    def _serially(self, work: Callable[[], Any]) -> Deferred[None]:
        return self._lock.run(lambda: Deferred.fromCoroutine(work()))

    def write(self, data: bytes) -> Deferred[None]:
        """
        Add C{data}; fires once any part it completed is uploaded.

        @raises S3Error: through the Deferred, when a part upload failed
            (the caller then aborts).
        """
        if self._state == "failed":
            raise S3Error(0, "UploadFailed", f"an earlier part of {self.key} failed")
        if self._state != "open":
            raise RuntimeError(f"write to a {self._state} upload")
        self._buffer.append(bytes(data))
        self._buffered += len(data)
        self.size += len(data)
        if self._buffered < self._store.part_size:
            return self._serially(self._nothing)
        part = self._take()
        return self._serially(lambda: self._send_part(part))

    async def _nothing(self) -> None:
        return None

    async def _send_part(self, part: bytes) -> None:
        if self._state in ("aborted", "failed"):
            return
        store = self._store
        try:
            if self._upload_id is None:
                self._upload_id = await store._create_multipart(self.key)
            number = len(self._parts) + 1
            etag = await store._upload_part(self.key, self._upload_id, number, part)
        except BaseException:
            self._state = "failed"
            raise
        self._parts.append((number, etag))

    def complete(self) -> Deferred[None]:
        """
        Make the object visible: the caller verified the digest. Sends the
        last part (or, for a blob smaller than one part, the whole object
        in one C{PUT}) and completes the multipart upload.
        """
        if self._state == "failed":
            raise S3Error(0, "UploadFailed", f"an earlier part of {self.key} failed")
        if self._state != "open":
            raise RuntimeError(f"complete a {self._state} upload")
        self._state = "completing"
        rest = self._take()
        return self._serially(lambda: self._complete(rest))

    async def _complete(self, rest: bytes) -> None:
        if self._state == "aborted":
            return
        store = self._store
        try:
            if self._upload_id is None:
                await store._put(self.key, rest)
            else:
                if rest:
                    await self._send_part(rest)
                await store._complete_multipart(self.key, self._upload_id, self._parts)
        except BaseException:
            self._state = "failed"
            await self._abort_quietly()
            raise
        self._state = "completed"
        log.debug("stored {key} in S3 ({size} bytes)", key=self.key, size=self.size)

    def abort(self) -> Deferred[None]:
        """
        Drop the upload: uploaded parts are discarded and no object appears.
        Never fails (a part the store keeps anyway is a lifecycle rule's
        job: see "Running a cluster").
        """
        if self._state in ("aborted", "completed"):
            return self._serially(self._nothing)
        self._state = "aborted"
        self._take()
        return self._serially(self._abort_quietly)

    async def _abort_quietly(self) -> None:
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is None:
            return
        try:
            await self._store._abort_multipart(self.key, upload_id)
        except Exception as e:  # noqa: BLE001 - abort is best effort
            log.warn(
                "could not abort the S3 upload of {key}: {error}",
                key=self.key,
                error=str(e) or type(e).__name__,
            )


if TYPE_CHECKING:

    def _fits_the_contract(store: S3Store, upload: S3Upload) -> tuple[ObjectStore, ObjectUpload]:
        return store, upload
