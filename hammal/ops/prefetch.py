"""
Warm a running hammal mirror's cache through its registry API.

The tool is an ordinary registry client: it GETs an image's manifests and
blobs from the mirror, which pulls them upstream and keeps them, and throws
the bytes away once their digests checked out. Nothing here touches the
cache directory, so it works against a mirror on another host, and it cannot
disagree with the server about the cache layout.

Names are sent as given (``alpine``, not ``library/alpine``): the mirror
applies its own ``--library-prefix`` rule, exactly as for a ``docker pull``.

The HTTP side is the standard library with a thread pool: a CLI gains
nothing from an event loop, and threads make the code straight-line and
easy to test against ``http.server``.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Iterator, Protocol, Sequence
from urllib.parse import quote, urlsplit

import attrs

from hammal.cache.manifests import INDEX_TYPES, MANIFEST_TYPES
from hammal.errors import RegistryError
from hammal.reference import Digest, parse_tag, validate_name
from hammal.upstream.challenge import Challenge, select_challenge
from hammal.upstream.proxy_rules import ProxyRules

#: The ``Accept`` header: every manifest type hammal caches.
MANIFEST_ACCEPT = ", ".join(sorted(MANIFEST_TYPES))

#: The distribution spec's recommended ceiling; more is not a manifest.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024

#: Blob bytes read per call: large enough for throughput, small enough to
#: notice a cancellation and move the progress bar smoothly.
CHUNK_SIZE = 256 * 1024

#: An index that points at indexes this deep is a loop or an attack.
MAX_INDEX_DEPTH = 3

DEFAULT_TAG = "latest"


class UsageError(ValueError):
    """An argument the tool cannot use (exit status 2)."""


class PrefetchError(Exception):
    """One thing that could not be fetched or verified (exit status 1)."""


class MirrorUnreachable(PrefetchError):
    """The mirror does not answer its ``/v2/`` endpoint at all."""


class Cancelled(PrefetchError):
    """The run was interrupted; transfers stop at their next chunk."""


# Arguments.


@attrs.frozen
class ImageRef:
    """An image as the operator wrote it: name plus tag and/or digest."""

    name: str
    tag: str | None
    digest: Digest | None

    @property
    def reference(self) -> str:
        """What goes in the manifest URL: the digest wins, as with docker."""
        if self.digest is not None:
            return str(self.digest)
        return self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None or self.digest is None:
            text += f":{self.tag or DEFAULT_TAG}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def parse_image(text: str) -> ImageRef:
    """
    Parse C{NAME[:TAG][@DIGEST]}.

    A registry host in front of the name (C{docker.io/library/alpine},
    C{localhost:5000/x}) is refused rather than sent to the mirror as part
    of the repository name, where it would only produce a confusing 404.

    @raise UsageError: with a one-line explanation.
    """
    remainder, _, digest_text = text.partition("@")
    name, tag = _split_tag(remainder)
    first, slash, _ = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        raise UsageError(
            f"image {text!r} names a registry host ({first}); "
            "give the repository only, the mirror comes from --mirror"
        )
    try:
        validate_name(name)
        if tag is not None:
            parse_tag(tag)
        digest = Digest.parse(digest_text) if digest_text else None
    except RegistryError as failure:
        raise UsageError(f"image {text!r}: {failure.message}")
    if "@" in text and not digest_text:
        raise UsageError(f"image {text!r}: empty digest after @")
    return ImageRef(name, tag, digest)


def _split_tag(text: str) -> tuple[str, str | None]:
    """C{name:tag} → (name, tag); a colon before the last slash is a port."""
    head, colon, tail = text.rpartition(":")
    if not colon or "/" in tail:
        return text, None
    return head, tail


@attrs.frozen
class Platform:
    """C{os/architecture[/variant]}, as in C{docker pull --platform}."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """@raise UsageError: for anything but two or three non-empty parts."""
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise UsageError(f"--platform {text!r} must look like linux/amd64 or linux/arm/v7")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, platform: Any) -> bool:
        """Whether an index entry's C{platform} object is this platform."""
        if not isinstance(platform, dict):
            return False
        if platform.get("os") != self.os or platform.get("architecture") != self.architecture:
            return False
        if self.variant is None:
            return True
        return _variant(platform) == self.variant

    def __str__(self) -> str:
        return "/".join(filter(None, (self.os, self.architecture, self.variant)))


def _variant(platform: dict[str, Any]) -> str | None:
    """The variant, with arm64's implicit C{v8} made explicit (as containerd does)."""
    variant = platform.get("variant")
    if variant is None and platform.get("architecture") == "arm64":
        return "v8"
    return str(variant) if variant is not None else None


def parse_platforms(values: Sequence[str]) -> tuple[Platform, ...]:
    """Repeated and comma-separated C{--platform} values, in order."""
    return tuple(
        Platform.parse(item) for value in values for item in value.split(",") if item.strip()
    )


def parse_mirror(text: str) -> str:
    """
    The mirror's base URL without a trailing slash.

    @raise UsageError: unless it is a bare http(s) URL.
    """
    url = text.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(
            f"--mirror must be an http(s) URL like http://127.0.0.1:5000, not {text!r}"
        )
    if parts.path or parts.query or parts.fragment or parts.username:
        raise UsageError(
            f"--mirror must be a bare base URL like http://127.0.0.1:5000, not {text!r}"
        )
    return url


# HTTP.


@attrs.frozen
class MirrorLogin:
    """A user of a mirror running with ``--auth``; the password is never shown."""

    username: str
    password: str = attrs.field(repr=False)

    def basic(self) -> str:
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


_SCOPED_PATH = re.compile(r"/v2/(.+)/(?:manifests|blobs)/[^/]+\Z")


def _scope(path: str) -> str:
    """The token scope a request path needs (none for ``/v2/``)."""
    match = _SCOPED_PATH.match(path)
    return f"repository:{match.group(1)}:pull" if match else ""


class MirrorAuth:
    """
    Answers a mirror's ``401`` challenges as C{login}, the way docker does:
    ``Basic`` directly, ``Bearer`` with a token from the challenge's realm
    (cached per scope until the mirror refuses it). Credentials go to a
    realm only over HTTPS or on the mirror's own origin.
    """

    def __init__(self, login: MirrorLogin, base_url: str, opener: Any, timeout: float) -> None:
        self._login = login
        self._origin = _origin(base_url)
        self._opener = opener
        self._timeout = timeout
        self._lock = threading.Lock()
        self._challenge: Challenge | None = None
        self._tokens: dict[str, str] = {}

    def authorization(self, path: str) -> str | None:
        """What to send with C{path} before any challenge, if anything is known."""
        with self._lock:
            challenge = self._challenge
            if challenge is None:
                return None
            if challenge.scheme == "basic":
                return self._login.basic()
            return self._tokens.get(_scope(path))

    def answer(self, headers: Any, path: str, rejected: str | None) -> str:
        """
        The ``Authorization`` for a retry of C{path} after a 401 with
        C{headers}.

        @raise PrefetchError: when there is nothing better to send.
        """
        challenge = select_challenge(headers.get_all("WWW-Authenticate") or [])
        if challenge is None:
            raise PrefetchError("HTTP 401 from the mirror, without a usable challenge")
        with self._lock:
            self._challenge = challenge
        if challenge.scheme == "basic":
            if rejected is not None:
                raise PrefetchError(f"the mirror refused the credentials of {self._login.username}")
            return self._login.basic()
        scope = _scope(path)
        with self._lock:
            if rejected is not None and self._tokens.get(scope) == rejected:
                del self._tokens[scope]
            elif scope in self._tokens:
                return self._tokens[scope]
        token = "Bearer " + self._token(challenge, scope)
        with self._lock:
            self._tokens[scope] = token
        return token

    def _token(self, challenge: Challenge, scope: str) -> str:
        realm = challenge.realm or ""
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PrefetchError(f"the mirror's token realm is unusable: {realm[:100]!r}")
        if parts.scheme != "https" and _origin(realm) != self._origin:
            raise PrefetchError(
                f"not sending credentials to {parts.hostname} over plain HTTP (the mirror's realm)"
            )
        query = [
            (key, value)
            for key, value in (("service", challenge.service), ("scope", scope))
            if value
        ]
        url = realm + ("&" if parts.query else "?") + urllib.parse.urlencode(query)
        request = urllib.request.Request(url)
        request.add_header("Authorization", self._login.basic())
        try:
            with self._opener.open(request, timeout=self._timeout) as response:
                document = json.loads(read(response, 1024 * 1024))
        except urllib.error.HTTPError as failure:
            if failure.code == 401:
                failure.close()
                raise PrefetchError(f"the mirror refused the credentials of {self._login.username}")
            raise PrefetchError(f"token request: {_http_error(failure)}")
        except urllib.error.URLError as failure:
            raise PrefetchError(f"token request: {_reason(failure.reason)}")
        except (OSError, http.client.HTTPException, ValueError) as failure:
            raise PrefetchError(f"token request: {_reason(failure)}")
        token = (
            document.get("token") or document.get("access_token")
            if isinstance(document, dict)
            else None
        )
        if not isinstance(token, str) or not token:
            raise PrefetchError("the mirror's token realm sent no token")
        return token


def _origin(url: str) -> tuple[str, str | None, int]:
    parts = urlsplit(url)
    return (parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))


class MirrorClient:
    """GETs from the mirror's registry API, turning failures into one line."""

    def __init__(
        self,
        base_url: str,
        timeout: float = 60.0,
        insecure: bool = False,
        login: MirrorLogin | None = None,
        proxies: ProxyRules | None = None,
    ) -> None:
        self.base_url = base_url
        self._timeout = timeout
        # The forward proxy hammal's own rules pick for the mirror (NO_PROXY
        # with CIDR blocks too), not urllib's reading of the environment.
        handlers: list[urllib.request.BaseHandler] = [
            _proxy_handler(base_url, proxies or ProxyRules())
        ]
        if insecure:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)
        self._auth = MirrorAuth(login, base_url, self._opener, timeout) if login else None

    def ping(self) -> None:
        """
        Check that the mirror answers C{/v2/}, so that a wrong URL is one
        error instead of one per manifest.

        @raise MirrorUnreachable: otherwise.
        """
        try:
            with self.get("/v2/") as response:
                read(response, 65536)
        except PrefetchError as failure:
            raise MirrorUnreachable(f"mirror {self.base_url} is unreachable: {failure}")

    def get(self, path: str, accept: str | None = None) -> Any:
        """
        The open response to C{GET path} (a context manager).

        @raise PrefetchError: for connection failures and non-2xx answers.
        """
        authorization = self._auth.authorization(path) if self._auth is not None else None
        for _ in range(3):
            request = urllib.request.Request(self.base_url + path)
            request.add_header("Accept-Encoding", "identity")  # digests are of the raw bytes
            if accept is not None:
                request.add_header("Accept", accept)
            if authorization is not None:
                request.add_header("Authorization", authorization)
            try:
                return self._opener.open(request, timeout=self._timeout)
            except urllib.error.HTTPError as failure:
                if failure.code != 401 or self._auth is None:
                    raise PrefetchError(_http_error(failure))
                failure.close()
                authorization = self._auth.answer(failure.headers, path, authorization)
            except urllib.error.URLError as failure:
                raise PrefetchError(_reason(failure.reason))
            except (OSError, http.client.HTTPException) as failure:
                raise PrefetchError(_reason(failure))
        raise PrefetchError("HTTP 401: the mirror keeps refusing the credentials")


def _proxy_handler(url: str, proxies: ProxyRules) -> urllib.request.ProxyHandler:
    proxy = proxies.proxy_for(url)
    if proxy is None:
        return urllib.request.ProxyHandler({})
    userinfo = ""
    if proxy.username is not None:
        userinfo = quote(proxy.username, safe="") + ":" + quote(proxy.password or "", safe="") + "@"
    host = f"[{proxy.host}]" if ":" in proxy.host else proxy.host
    return urllib.request.ProxyHandler(
        {urlsplit(url).scheme: f"http://{userinfo}{host}:{proxy.port}"}
    )


def _http_error(failure: urllib.error.HTTPError) -> str:
    """C{HTTP 404 MANIFEST_UNKNOWN: manifest unknown}, from the OCI error body."""
    text = f"HTTP {failure.code}"
    try:
        body = json.loads(failure.read(65536))
        first = body["errors"][0]
        return f"{text} {first['code']}: {first.get('message', '')}".rstrip(": ")
    except Exception:
        return f"{text} {failure.reason}"
    finally:
        failure.close()


def read(response: Any, size: int) -> bytes:
    """Up to C{size} bytes of a response body; a broken transfer is a L{PrefetchError}."""
    try:
        return bytes(response.read(size))
    except (OSError, http.client.HTTPException) as failure:
        raise PrefetchError(f"transfer broke: {_reason(failure)}")


def _reason(reason: object) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


# Manifests.


@attrs.frozen
class Blob:
    """A blob an image needs: its digest and the size its descriptor gives."""

    digest: Digest
    size: int


@attrs.frozen
class Manifest:
    """A fetched, verified manifest."""

    digest: Digest
    media_type: str
    size: int
    document: dict[str, Any]

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES or "manifests" in self.document


def fetch_manifest(client: MirrorClient, name: str, reference: str) -> Manifest:
    """
    GET one manifest and verify it: against C{reference} when that is a
    digest, else against the C{Docker-Content-Digest} the mirror sent.

    @raise PrefetchError: for fetch failures, bad digests and bodies that
        are not a JSON manifest.
    """
    with client.get(f"/v2/{name}/manifests/{reference}", MANIFEST_ACCEPT) as response:
        body = read(response, MAX_MANIFEST_BYTES + 1)
        content_type = response.headers.get("Content-Type", "")
        sent_digest = response.headers.get("Docker-Content-Digest")
    if len(body) > MAX_MANIFEST_BYTES:
        raise PrefetchError(f"manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    expected = _expected_digest(reference if ":" in reference else sent_digest)
    digest = Digest.of(body, expected.algorithm if expected else "sha256")
    if expected is not None and digest != expected:
        raise PrefetchError(f"manifest digest mismatch: expected {expected}, got {digest}")
    try:
        document = json.loads(body)
    except ValueError:
        raise PrefetchError("manifest is not valid JSON")
    if not isinstance(document, dict):
        raise PrefetchError("manifest is not a JSON object")
    media_type = content_type.split(";", 1)[0].strip().lower() or str(document.get("mediaType", ""))
    if media_type not in MANIFEST_TYPES and not ("manifests" in document or "layers" in document):
        raise PrefetchError(f"unsupported manifest type {media_type or 'unknown'}")
    return Manifest(digest, media_type, len(body), document)


def _expected_digest(text: str | None) -> Digest | None:
    """The digest a manifest must have: the one asked for, else the one the mirror sent."""
    if text is None:
        return None
    try:
        return Digest.parse(text)
    except RegistryError:
        raise PrefetchError(f"mirror sent an invalid Docker-Content-Digest: {text[:100]!r}")


def descriptor_digest(descriptor: Any) -> Digest:
    """@raise PrefetchError: for a descriptor without a valid digest."""
    try:
        return Digest.parse(str(descriptor["digest"]))
    except (RegistryError, KeyError, TypeError):
        raise PrefetchError(f"invalid descriptor in manifest: {str(descriptor)[:120]}")


def image_blobs(manifest: Manifest) -> Iterator[Blob]:
    """
    The config and every layer of an image manifest. Foreign layers (with
    C{urls}) live outside any registry, so the mirror cannot have them.
    """
    config = manifest.document.get("config")
    layers = manifest.document.get("layers") or []
    if not isinstance(layers, list):
        raise PrefetchError(f"manifest {manifest.digest} has invalid layers")
    for descriptor in ([config] if config else []) + layers:
        if isinstance(descriptor, dict) and descriptor.get("urls"):
            continue
        yield Blob(descriptor_digest(descriptor), _size(descriptor))


def _size(descriptor: Any) -> int:
    size = descriptor.get("size") if isinstance(descriptor, dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise PrefetchError(f"descriptor {descriptor_digest(descriptor)} has no valid size")
    return size


def children(index: Manifest, platforms: Sequence[Platform]) -> list[Digest]:
    """An index's entries: all of them, or those for C{platforms}."""
    entries = index.document.get("manifests") or []
    if not isinstance(entries, list):
        raise PrefetchError(f"index {index.digest} has invalid manifests")
    chosen = [
        entry
        for entry in entries
        if not platforms or any(p.matches(_platform_of(entry)) for p in platforms)
    ]
    return [descriptor_digest(entry) for entry in chosen]


def _platform_of(entry: Any) -> Any:
    return entry.get("platform") if isinstance(entry, dict) else None


# The run.


class Reporter(Protocol):
    """
    What a prefetch tells its user. Called from worker threads as well as
    the main one: implementations serialise their own output.
    """

    def manifest_done(self, image: str, manifest: Manifest) -> None: ...

    def blobs_started(self, image: str, count: int, total: int) -> None: ...

    def advanced(self, image: str, count: int) -> None: ...

    def blob_done(self, image: str, blob: Blob) -> None: ...

    def failed(self, image: str, what: str, reason: str) -> None: ...

    def image_done(self, image: str, result: ImageResult) -> None: ...


@attrs.define
class ImageResult:
    """How one image went: counts for the summary, failures for the exit code."""

    manifests: int = 0
    blobs: int = 0
    bytes: int = 0
    failures: int = 0

    @property
    def ok(self) -> bool:
        return self.failures == 0


class Prefetcher:
    """
    Prefetches images one after the other, each image's blobs C{parallel}
    at a time. A blob already fetched for the same repository during the
    run is not fetched again (indexes share layers between platforms).
    """

    def __init__(
        self,
        client: MirrorClient,
        reporter: Reporter,
        parallel: int = 4,
        platforms: Sequence[Platform] = (),
    ) -> None:
        self._client = client
        self._reporter = reporter
        self._parallel = parallel
        self._platforms = tuple(platforms)
        self._done: set[tuple[str, str]] = set()
        self._done_lock = threading.Lock()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop: transfers in progress give up at their next chunk."""
        self._cancelled.set()

    def run(self, images: Sequence[ImageRef]) -> bool:
        """Prefetch every image; whether all of them succeeded."""
        with ThreadPoolExecutor(self._parallel, thread_name_prefix="hammal-prefetch") as pool:
            try:
                results = [self.prefetch(image, pool) for image in images]
            except BaseException:
                self.cancel()  # KeyboardInterrupt: let the workers stop
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return all(result.ok for result in results)

    def prefetch(self, image: ImageRef, pool: ThreadPoolExecutor) -> ImageResult:
        """One image: resolve its manifests, then fetch its blobs."""
        label = str(image)
        result = ImageResult()
        blobs = self._resolve(image, label, result)
        pending = [blob for blob in blobs if not self._seen(image.name, blob)]
        if pending:
            self._reporter.blobs_started(label, len(pending), sum(blob.size for blob in pending))
        futures = {pool.submit(self._fetch_blob, image.name, label, blob): blob for blob in pending}
        wait(futures)
        for future, blob in futures.items():
            self._collect(future, blob, label, image.name, result)
        self._reporter.image_done(label, result)
        return result

    def _resolve(self, image: ImageRef, label: str, result: ImageResult) -> list[Blob]:
        """Walk from the image's reference down to its blobs (deduplicated, in order)."""
        blobs: dict[Digest, Blob] = {}
        try:
            top = fetch_manifest(self._client, image.name, image.reference)
        except PrefetchError as failure:
            self._fail(
                label, "manifest" if image.digest is None else image.reference, str(failure), result
            )
            return []
        self._walk(image, label, top, 0, blobs, result)
        return list(blobs.values())

    def _walk(
        self,
        image: ImageRef,
        label: str,
        manifest: Manifest,
        depth: int,
        blobs: dict[Digest, Blob],
        result: ImageResult,
    ) -> None:
        result.manifests += 1
        self._reporter.manifest_done(label, manifest)
        try:
            if not manifest.is_index:
                for blob in image_blobs(manifest):
                    blobs.setdefault(blob.digest, blob)
                return
            if depth >= MAX_INDEX_DEPTH:
                raise PrefetchError(f"indexes nested more than {MAX_INDEX_DEPTH} deep")
            wanted = children(manifest, self._platforms)
            if not wanted and self._platforms:
                raise PrefetchError(f"no manifest for {', '.join(map(str, self._platforms))}")
        except PrefetchError as failure:
            self._fail(label, str(manifest.digest), str(failure), result)
            return
        for digest in wanted:
            try:
                child = fetch_manifest(self._client, image.name, str(digest))
            except PrefetchError as failure:
                self._fail(label, str(digest), str(failure), result)
                continue
            self._walk(image, label, child, depth + 1, blobs, result)

    def _fetch_blob(self, name: str, label: str, blob: Blob) -> None:
        """Runs in a worker: stream, hash and discard one blob."""
        if self._cancelled.is_set():
            raise Cancelled("interrupted")
        fetch_blob(
            self._client,
            name,
            blob,
            lambda count: self._reporter.advanced(label, count),
            self._cancelled,
        )

    def _collect(
        self, future: Future[None], blob: Blob, label: str, name: str, result: ImageResult
    ) -> None:
        error = future.exception()
        if error is None:
            with self._done_lock:
                self._done.add((name, str(blob.digest)))
            result.blobs += 1
            result.bytes += blob.size
            self._reporter.blob_done(label, blob)
        elif isinstance(error, PrefetchError):
            self._fail(label, str(blob.digest), str(error), result)
        else:
            raise error

    def _seen(self, name: str, blob: Blob) -> bool:
        with self._done_lock:
            return (name, str(blob.digest)) in self._done

    def _fail(self, label: str, what: str, reason: str, result: ImageResult) -> None:
        result.failures += 1
        self._reporter.failed(label, what, reason)


def fetch_blob(
    client: MirrorClient,
    name: str,
    blob: Blob,
    advanced: Callable[[int], None],
    cancelled: threading.Event,
) -> None:
    """
    GET a blob, hashing it as it arrives, and check digest and size.

    @param advanced: called with each chunk's length, for progress.
    @raise PrefetchError: for fetch failures and any mismatch.
    """
    hasher = blob.digest.hasher()
    received = 0
    with client.get(f"/v2/{name}/blobs/{blob.digest}") as response:
        while True:
            if cancelled.is_set():
                raise Cancelled("interrupted")
            chunk = read(response, CHUNK_SIZE)
            if not chunk:
                break
            hasher.update(chunk)
            received += len(chunk)
            advanced(len(chunk))
    if received != blob.size:
        raise PrefetchError(f"size mismatch: expected {blob.size} bytes, got {received}")
    if not blob.digest.matches(hasher):
        raise PrefetchError(f"digest mismatch: got {blob.digest.algorithm}:{hasher.hexdigest()}")
