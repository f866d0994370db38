"""
In-memory fakes shared by the unit tests: an upstream registry world
(registry, token realm and CDN on three host names) served through
L{treq.testing.StubTreq}, and small producer/consumer doubles.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
from treq.testing import RequestTraversalAgent
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from hammal.upstream.client import http_client_over

REGISTRY = "registry.test"
REALM = "auth.test"
CDN = "cdn.test"
MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@attrs.define
class Seen:
    """One request the fake world received."""

    host: str
    method: str
    path: str
    headers: dict[str, list[str]]

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


class FakeUpstream(Resource):
    """
    A Docker-Hub-like world: ``registry.test`` challenges for Bearer tokens
    from ``auth.test``, redirects blob GETs to ``cdn.test`` with a signed
    query string, and can be told to fail.

    @ivar faults: statuses the registry answers (in order) before behaving.
    @ivar hold_blobs: when set, CDN responses start but never finish until
        L{release} is called (for streaming tests).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []
        self.manifests: dict[tuple[str, str], tuple[str, bytes]] = {}
        self.blobs: dict[str, bytes] = {}
        self.faults: list[int] = []
        self.retry_after: str | None = None
        self.tokens_issued = 0
        self.users: dict[str, str] = {}
        self.token_status = 200
        self.redirect_blobs = True
        self.corrupt_blobs = False
        self.expires_in: int | None = 300
        self.held: list[Request] = []
        self.hold_blobs = False
        self.reset_after: list[int] = []
        self.blob_content_type = b"application/octet-stream"
        self.honour_range = True
        self.realm_url = f"https://{REALM}/token"
        #: digest -> the only repositories that hold it (unset: all do).
        self.blob_repositories: dict[str, set[str]] = {}
        #: private repository -> the users who may read it (unset: all).
        self.grants: dict[str, set[str]] = {}
        #: tokens the registry no longer accepts (as if expired).
        self.revoked: set[str] = set()

    # Seeding.

    def add_image(self, name: str, tag: str, body: bytes, media_type: str = MANIFEST_V2) -> str:
        digest = sha256(body)
        self.manifests[(name, tag)] = (media_type, body)
        self.manifests[(name, digest)] = (media_type, body)
        return digest

    def add_blob(self, data: bytes, repository: str | None = None) -> str:
        """Seed a blob; with C{repository}, only that repository holds it."""
        digest = sha256(data)
        self.blobs[digest] = data
        if repository is not None:
            self.blob_repositories.setdefault(digest, set()).add(repository)
        return digest

    # Inspection.

    def hits(self, host: str, path_part: str = "") -> list[Seen]:
        return [s for s in self.seen if s.host == host and path_part in s.path]

    # Serving.

    def render(self, request: Request) -> Any:
        host = (request.getHeader(b"host") or b"").decode().split(":")[0]
        self.seen.append(
            Seen(
                host,
                request.method.decode(),
                request.uri.decode(),
                {
                    k.decode().lower(): [v.decode() for v in vs]
                    for k, vs in request.requestHeaders.getAllRawHeaders()
                },
            )
        )
        if host == REALM:
            return self._token(request)
        if host == CDN:
            return self._cdn(request)
        return self._registry(request)

    def _json(self, request: Request, status: int, document: object) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(document).encode()

    def _token(self, request: Request) -> bytes:
        if self.token_status != 200:
            if self.retry_after is not None:
                request.setHeader(b"retry-after", self.retry_after.encode())
            return self._json(
                request,
                self.token_status,
                {"errors": [{"code": "TOOMANYREQUESTS", "message": "slow down"}]},
            )
        user = "anonymous"
        authorization = request.getHeader(b"authorization")
        if authorization:
            scheme, _, encoded = authorization.decode().partition(" ")
            name, _, password = base64.b64decode(encoded).decode().partition(":")
            if scheme != "Basic" or self.users.get(name) != password:
                return self._json(request, 401, {"details": "bad credentials"})
            user = name
        self.tokens_issued += 1
        scope = parse_qs(urlsplit(request.uri.decode()).query).get("scope", [""])[0]
        document: dict[str, object] = {"token": f"tok-{self.tokens_issued}-{user}-{scope}"}
        if self.expires_in is not None:
            document["expires_in"] = self.expires_in
        return self._json(request, 200, document)

    def _authorised(self, request: Request) -> bool:
        """Any token reads public repositories; private/ needs a named user's."""
        authorization = (request.getHeader(b"authorization") or b"").decode()
        if not authorization.startswith("Bearer tok-") or authorization[7:] in self.revoked:
            return False
        path = request.path.decode()
        if path.startswith("/v2/private/"):
            user = authorization[len("Bearer tok-") :].split("-", 2)[1]
            name = path[len("/v2/") :].split("/manifests/")[0].split("/blobs/")[0]
            readers = self.grants.get(name)
            return user != "anonymous" and (readers is None or user in readers)
        return True

    def _registry(self, request: Request) -> Any:
        if self.faults:
            status = self.faults.pop(0)
            if self.retry_after is not None:
                request.setHeader(b"retry-after", self.retry_after.encode())
            return self._json(
                request, status, {"errors": [{"code": "UNAVAILABLE", "message": "x"}]}
            )
        path = request.path.decode()
        if path == "/v2/" and self._authorised(request):
            return self._json(request, 200, {})
        if not self._authorised(request):
            name = path[len("/v2/") :].split("/manifests/")[0].split("/blobs/")[0]
            presented = (request.getHeader(b"authorization") or b"").decode()
            # Like Distribution: a token it does not take is invalid_token,
            # a good one without the repository insufficient_scope.
            error = ""
            if presented.startswith("Bearer "):
                taken = presented.startswith("Bearer tok-") and presented[7:] not in self.revoked
                error = ',error="insufficient_scope"' if taken else ',error="invalid_token"'
            request.setHeader(
                b"www-authenticate",
                f'Bearer realm="{self.realm_url}",service="{REGISTRY}",'
                f'scope="repository:{name}:pull"{error}'.encode(),
            )
            return self._json(
                request, 401, {"errors": [{"code": "UNAUTHORIZED", "message": "auth"}]}
            )
        if "/manifests/" in path:
            name, _, reference = path[len("/v2/") :].partition("/manifests/")
            found = self.manifests.get((name, reference))
            if found is None:
                return self._json(
                    request, 404, {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "unknown"}]}
                )
            media_type, body = found
            request.setHeader(b"content-type", media_type.encode())
            request.setHeader(b"docker-content-digest", sha256(body).encode())
            request.setHeader(b"content-length", str(len(body)).encode())
            return body
        if "/blobs/" in path:
            name, _, digest = path[len("/v2/") :].rpartition("/blobs/")
            holders = self.blob_repositories.get(digest)
            if digest not in self.blobs or (holders is not None and name not in holders):
                return self._json(
                    request, 404, {"errors": [{"code": "BLOB_UNKNOWN", "message": "?"}]}
                )
            if self.redirect_blobs:
                request.setResponseCode(307)
                request.setHeader(
                    b"location", f"https://{CDN}/data/{digest}?sig=a%2Bb~c&exp=1".encode()
                )
                return b""
            return self._blob_body(request, digest)
        if path.endswith("/tags/list"):
            request.setHeader(b"link", b'</v2/x/tags/list?last=b&n=1>; rel="next"')
            return self._json(request, 200, {"name": "x", "tags": ["a"]})
        return self._json(request, 404, {"errors": [{"code": "NAME_UNKNOWN", "message": "?"}]})

    def _cdn(self, request: Request) -> Any:
        digest = request.path.decode().rpartition("/")[2]
        if digest not in self.blobs:
            request.setResponseCode(404)
            return b"not found"
        return self._blob_body(request, digest)

    def _blob_body(self, request: Request, digest: str) -> Any:
        data = self.blobs[digest]
        if self.corrupt_blobs:
            data = data[:-1] + bytes([data[-1] ^ 1])
        request.setHeader(b"content-type", self.blob_content_type)
        requested = (request.getHeader(b"range") or b"").decode()
        if self.honour_range and requested.startswith("bytes=") and requested.endswith("-"):
            start = int(requested[6:-1])
            request.setResponseCode(206)
            request.setHeader(
                b"content-range", f"bytes {start}-{len(data) - 1}/{len(data)}".encode()
            )
            data = data[start:]
        request.setHeader(b"content-length", str(len(data)).encode())
        if self.reset_after and request.method == b"GET":
            cut = self.reset_after.pop(0)
            request.write(data[:cut])
            request.channel.transport.abortConnection()  # type: ignore[union-attr]
            return NOT_DONE_YET
        if self.hold_blobs and request.method == b"GET":
            half = len(data) // 2
            request.write(data[:half])
            self.held.append(request)
            request.hold_rest = data[half:]  # type: ignore[attr-defined]
            return NOT_DONE_YET
        return data

    def release(self) -> None:
        """Finish every held CDN response."""
        for request in self.held:
            request.write(request.hold_rest)  # type: ignore[attr-defined]
            request.finish()
        self.held.clear()


class StubUpstreamHTTP:
    """
    hammal's real treq client (L{http_client_over}) over an in-memory agent
    serving C{resource}; L{flush} moves the bytes.
    """

    def __init__(self, resource: Resource) -> None:
        self.agent = RequestTraversalAgent(resource)
        self.client = http_client_over(self.agent)

    def request(self, *args: Any, **kwargs: Any) -> Any:
        return self.client.request(*args, **kwargs)

    def flush(self) -> None:
        self.agent.flush()


def stub_for(resource: Resource) -> StubUpstreamHTTP:
    """A client whose every request is served by C{resource}."""
    return StubUpstreamHTTP(resource)


@implementer(IPushProducer)
class FakeProducerTransport:
    """An upstream transport that records pause/resume/stop."""

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False
        self.pauses = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


@implementer(IConsumer)
class FakeConsumer:
    """A client-side consumer that keeps what it is given."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.producer: IPushProducer | None = None
        self.streaming: bool | None = None

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        self.producer = producer
        self.streaming = streaming

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.data.append(data)

    @property
    def received(self) -> bytes:
        return b"".join(self.data)
