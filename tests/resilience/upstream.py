"""A small registry upstream with faults on demand, for the resilience tests.

:class:`FaultyRegistry` is a threaded raw-socket HTTP/1.1 server on
127.0.0.1 (keep-alive, one thread per connection) serving, anonymously:

* ``GET /v2/`` -> ``200 {}``;
* ``GET|HEAD /v2/NAME/manifests/REF`` -> the OCI manifest of NAME's image
  (tag ``latest`` or its digest), ``404 MANIFEST_UNKNOWN`` otherwise;
* manifests and blobs answer ``304`` to an ``If-None-Match`` naming their
  digest (``"sha256:..."``), as Distribution does;
* ``GET|HEAD /v2/NAME/blobs/DIGEST`` -> the blob, with ``Range`` support, or
  with ``redirect=True`` a ``307`` to ``/cdn/HEX`` on the same server (a
  "CDN", which may be told to ignore ``Range``);
* ``GET /v2/NAME/tags/list``;
* with ``token_auth=True``: ``GET /token?scope=...`` -> a bearer token, and
  every ``/v2/`` request without one -> ``401`` with a Bearer challenge whose
  realm is that ``/token`` (like Docker Hub; any token issued is accepted);
* anything else -> ``404``.

Faults are queued with :meth:`FaultyRegistry.add_fault`; each request takes
the first matching fault with uses left:

``status``   answer ``code`` (500, 502, 503, ...) with an OCI error body;
``reset``    send the headers and ``after`` body bytes, then a TCP reset;
``hang``     send the headers and ``after`` body bytes (``after=-1``:
             nothing at all, not even headers), then stay silent until the
             client leaves or the server stops;
``slow``     send the body at ``rate`` bytes/s, in 20 sends a second (a rate
             of a few bytes/s: a trickle, never silent for long);
``ignore-range``  answer a ``Range`` request with ``200`` and the whole body;
``status-hang``  answer ``code`` announcing an OCI error body, send ``after``
             bytes of it, then stay silent like ``hang``;
``status-page``  answer ``code`` with an HTML error page of ``after`` bytes
             (a proxy's or CDN's error page);
``no-length``  answer without ``Content-Length`` or ``Docker-Content-Digest``,
             the body ended by closing the connection after ``after`` bytes
             (``-1``: all of them; fewer: a truncation nobody can detect).

Faults match ``/token`` requests too (``hang`` with ``after``: a token
response whose body stalls).

Everything is bounded: request heads (64 KiB), handler lifetimes (``hang``
gives up after 120 s), a client that takes no byte of a response for 60 s,
and :meth:`FaultyRegistry.stop` closes every socket. A client that reads
slowly is never cut off: only faults cut transfers short.
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

__all__ = ["Blob", "Fault", "FaultyRegistry", "OCI_MANIFEST", "make_blob"]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MAX_HEAD = 64 * 1024
HANG_LIMIT = 120.0
#: How long a client may leave a response unread (not one byte taken)
#: before the server gives up on it. A reader that is merely slow, or
#: paused by backpressure on a busy machine, is never cut off.
SEND_STALL = 60.0


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Blob:
    data: bytes
    digest: str = ""

    def __post_init__(self) -> None:
        self.digest = self.digest or _digest(self.data)

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]


def make_blob(size: int, seed: int) -> Blob:
    """Deterministic random bytes."""
    return Blob(random.Random(seed).randbytes(size))


@dataclass
class Fault:
    kind: str
    match: str = ""  # substring of the request path ("" = any /v2/NAME/... or /cdn/)
    count: int = 1  # uses left; -1 = forever
    after: int = 0
    rate: int = 1024 * 1024
    code: int = 503
    method: str = ""  # "" = any
    used: int = 0


@dataclass
class Image:
    name: str
    config: Blob
    layers: List[Blob]
    manifest: bytes = b""
    digest: str = ""

    def __post_init__(self) -> None:
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": self.config.digest,
                "size": len(self.config.data),
            },
            "layers": [
                {"mediaType": OCI_LAYER, "digest": b.digest, "size": len(b.data)}
                for b in self.layers
            ],
        }
        self.manifest = json.dumps(doc, indent=2).encode()
        self.digest = _digest(self.manifest)


@dataclass
class LogEntry:
    method: str
    path: str
    range: Optional[str]
    status: int
    fault: Optional[str]
    headers: Dict[str, str] = field(default_factory=dict)


class _Close(Exception):
    """Close the connection (after a reset, a hang or a bad request)."""


class FaultyRegistry:
    """See the module docstring."""

    def __init__(self, redirect: bool = False, token_auth: bool = False) -> None:
        self.redirect = redirect
        self.token_auth = token_auth
        self._tokens_issued: set = set()
        self.cdn_ignores_range = False
        self.images: Dict[str, Image] = {}
        self.blobs: Dict[str, Blob] = {}
        self.log: List[LogEntry] = []
        #: connections held silent by a ``hang`` fault that the client has
        #: not closed yet
        self.hanging = 0
        self._faults: List[Fault] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._conns: List[socket.socket] = []
        self._threads: List[threading.Thread] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self._acceptor = threading.Thread(
            target=self._accept_loop, daemon=True, name=f"faulty-registry-{self.port}"
        )
        self._acceptor.start()

    # -- content -------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_image(self, name: str, layer_sizes: List[int], seed: int) -> Image:
        config = Blob(
            json.dumps(
                {"architecture": "amd64", "os": "linux", "seed": seed, "name": name}
            ).encode()
        )
        layers = [make_blob(size, seed * 1000 + i) for i, size in enumerate(layer_sizes)]
        image = Image(name, config, layers)
        with self._lock:
            self.images[name] = image
            for b in [config, *layers]:
                self.blobs[b.digest] = b
        return image

    # -- faults and log ------------------------------------------------------

    def add_fault(self, kind: str, match: str = "", count: int = 1, **kw: object) -> Fault:
        fault = Fault(kind, match, count, **kw)  # type: ignore[arg-type]
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def entries(self, match: str = "") -> List[LogEntry]:
        with self._lock:
            return [e for e in self.log if match in e.path]

    def _take_fault(self, method: str, path: str, has_range: bool) -> Optional[Fault]:
        with self._lock:
            for f in self._faults:
                if f.count == 0 or (f.match and f.match not in path):
                    continue
                if f.method and f.method != method:
                    continue
                if f.kind == "ignore-range" and not has_range:
                    continue
                if f.kind in ("reset", "slow") and method != "GET":
                    continue
                if f.count > 0:
                    f.count -= 1
                f.used += 1
                return f
        return None

    # -- server --------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._lock:
                self._conns.append(conn)
                self._threads = [x for x in self._threads if x.is_alive()]
                self._threads.append(t)
            t.start()

    def stop(self) -> None:
        self._stopping.set()
        try:
            self.sock.close()
        except OSError:
            pass
        self._acceptor.join(5)
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
            self._conns.clear()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        for t in threads:
            t.join(5)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(1.0)
        buf = b""
        try:
            deadline = time.monotonic() + 300
            while not self._stopping.is_set() and time.monotonic() < deadline:
                while b"\r\n\r\n" not in buf:
                    if len(buf) > MAX_HEAD or self._stopping.is_set():
                        raise _Close()
                    try:
                        chunk = conn.recv(65536)
                    except socket.timeout:
                        continue
                    if not chunk:
                        raise _Close()
                    buf += chunk
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                parts = lines[0].split(" ")
                if len(parts) != 3:
                    raise _Close()
                method, target = parts[0], parts[1]
                headers: Dict[str, str] = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
                if headers.get("content-length", "0") not in ("", "0"):
                    raise _Close()  # no request bodies here
                self._handle(conn, method, target, headers)
                if headers.get("connection", "").lower() == "close":
                    raise _Close()
        except (_Close, OSError):
            pass
        finally:
            with self._lock:
                if conn in self._conns:
                    self._conns.remove(conn)
            try:
                conn.close()
            except OSError:
                pass

    # -- responses -----------------------------------------------------------

    def _record(
        self, method: str, path: str, headers: Dict[str, str], status: int, fault: Optional[Fault]
    ) -> None:
        with self._lock:
            self.log.append(
                LogEntry(
                    method,
                    path,
                    headers.get("range"),
                    status,
                    fault.kind if fault else None,
                    dict(headers),
                )
            )

    def _send_head(self, conn: socket.socket, status: int, headers: List[Tuple[str, str]]) -> None:
        reason = {
            200: "OK",
            206: "Partial Content",
            307: "Temporary Redirect",
            304: "Not Modified",
            401: "Unauthorized",
            404: "Not Found",
            416: "Range Not Satisfiable",
        }.get(status, "Status")
        lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers]
        self._send(conn, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def _simple(
        self,
        conn: socket.socket,
        method: str,
        status: int,
        body: bytes,
        ctype: str = "application/json",
        extra: Tuple[Tuple[str, str], ...] = (),
    ) -> None:
        self._send_head(
            conn,
            status,
            [
                ("Content-Type", ctype),
                ("Content-Length", str(len(body))),
                ("Docker-Distribution-Api-Version", "registry/2.0"),
                *extra,
            ],
        )
        if method != "HEAD" and body:
            self._send(conn, body)

    def _error(self, conn: socket.socket, method: str, status: int, code: str) -> None:
        body = json.dumps(
            {"errors": [{"code": code, "message": f"{code.lower()} here", "detail": None}]}
        ).encode()
        self._simple(conn, method, status, body)

    def _handle(
        self, conn: socket.socket, method: str, target: str, headers: Dict[str, str]
    ) -> None:
        path = target.split("?", 1)[0]
        has_range = "range" in headers
        fault = None
        if path.startswith("/v2/") and path != "/v2/" or path.startswith(("/cdn/", "/token")):
            fault = self._take_fault(method, path, has_range)
        if path == "/token":
            self._token(conn, method, target, headers, fault)
            return
        if self.token_auth and path.startswith("/v2") and not self._authorized(headers):
            self._record(method, path, headers, 401, None)
            scope = ""
            if path.startswith("/v2/") and path != "/v2/":
                for kind in ("/manifests/", "/blobs/", "/tags/"):
                    if kind in path:
                        scope = f',scope="repository:{path[4:].rpartition(kind)[0]}:pull"'
            challenge = f'Bearer realm="{self.url}/token",service="faulty"{scope}'
            self._simple(
                conn,
                method,
                401,
                json.dumps(
                    {
                        "errors": [
                            {
                                "code": "UNAUTHORIZED",
                                "message": "authentication required",
                                "detail": None,
                            }
                        ]
                    }
                ).encode(),
                extra=(("WWW-Authenticate", challenge),),
            )
            return
        if fault is not None and fault.kind in ("status-hang", "status-page"):
            self._record(method, path, headers, fault.code, fault)
            if fault.kind == "status-page":
                page = b"<html><body>" + b"x" * max(0, fault.after) + b"</body></html>"
                self._simple(conn, method, fault.code, page, "text/html")
                return
            body = json.dumps(
                {"errors": [{"code": "UNAVAILABLE", "message": "try later", "detail": None}]}
            ).encode()
            self._send_head(
                conn,
                fault.code,
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
            )
            if method == "HEAD":
                return  # a HEAD's answer is complete without its body
            self._send(conn, body[: max(0, min(fault.after, len(body) - 1))])
            self._hang(conn)
        if fault is not None and fault.kind == "status":
            self._record(method, path, headers, fault.code, fault)
            self._error(conn, method, fault.code, "UNAVAILABLE" if fault.code != 500 else "UNKNOWN")
            return
        if fault is not None and fault.kind == "hang" and fault.after < 0:
            self._record(method, path, headers, 0, fault)
            self._hang(conn)
        if path == "/v2/" or path == "/v2":
            self._record(method, path, headers, 200, None)
            self._simple(conn, method, 200, b"{}")
            return
        if path.startswith("/cdn/"):
            blob = self.blobs.get("sha256:" + path[len("/cdn/") :])
            if blob is None:
                self._record(method, path, headers, 404, None)
                self._simple(conn, method, 404, b"no such object", "text/plain")
                return
            ignore = self.cdn_ignores_range or (fault is not None and fault.kind == "ignore-range")
            self._body(
                conn, method, path, headers, blob, fault, honour_range=not ignore, registry=False
            )
            return
        rest = path[len("/v2/") :]
        for kind in ("/manifests/", "/blobs/", "/tags/"):
            if kind in rest:
                name, _, ref = rest.rpartition(kind)
                break
        else:
            self._record(method, path, headers, 404, fault)
            self._error(conn, method, 404, "NAME_UNKNOWN")
            return
        image = self.images.get(name)
        if kind == "/tags/":
            if image is None or ref != "list":
                self._record(method, path, headers, 404, fault)
                self._error(conn, method, 404, "NAME_UNKNOWN")
                return
            self._record(method, path, headers, 200, fault)
            self._simple(conn, method, 200, json.dumps({"name": name, "tags": ["latest"]}).encode())
            return
        if kind == "/manifests/":
            if image is None or ref not in ("latest", image.digest):
                self._record(method, path, headers, 404, fault)
                self._error(conn, method, 404, "MANIFEST_UNKNOWN")
                return
            self._body(
                conn,
                method,
                path,
                headers,
                Blob(image.manifest, image.digest),
                fault,
                honour_range=False,
                registry=True,
                ctype=OCI_MANIFEST,
            )
            return
        blob = self.blobs.get(ref)
        if image is None or blob is None:
            self._record(method, path, headers, 404, fault)
            self._error(conn, method, 404, "BLOB_UNKNOWN")
            return
        if self.redirect:
            self._record(method, path, headers, 307, fault)
            self._simple(
                conn, method, 307, b"", "text/plain", (("Location", f"{self.url}/cdn/{blob.hex}"),)
            )
            return
        self._body(conn, method, path, headers, blob, fault, honour_range=True, registry=True)

    def _authorized(self, headers: Dict[str, str]) -> bool:
        value = headers.get("authorization", "")
        with self._lock:
            return value.startswith("Bearer ") and value[7:] in self._tokens_issued

    def _token(
        self,
        conn: socket.socket,
        method: str,
        target: str,
        headers: Dict[str, str],
        fault: Optional[Fault],
    ) -> None:
        """A token endpoint like auth.docker.io (anonymous; any scope)."""
        with self._lock:
            token = f"token-{len(self._tokens_issued) + 1}"
            self._tokens_issued.add(token)
        body = json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode()
        if fault is not None and fault.kind == "status":
            self._record(method, "/token", headers, fault.code, fault)
            self._error(conn, method, fault.code, "UNAVAILABLE")
            return
        self._record(method, "/token", headers, 200, fault)
        self._send_head(
            conn, 200, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        )
        if fault is not None and fault.kind == "hang":
            self._send(conn, body[: max(0, min(fault.after, len(body) - 1))])
            self._hang(conn)
        self._send(conn, body)

    def _body(
        self,
        conn: socket.socket,
        method: str,
        path: str,
        headers: Dict[str, str],
        blob: Blob,
        fault: Optional[Fault],
        honour_range: bool,
        registry: bool,
        ctype: str = "application/octet-stream",
    ) -> None:
        data = blob.data
        size = len(data)
        status, start, end = 200, 0, size
        rng = headers.get("range")
        extra: List[Tuple[str, str]] = []
        if rng and honour_range:
            try:
                unit, _, spec = rng.partition("=")
                first, _, last = spec.strip().partition("-")
                if unit.strip() != "bytes" or "," in spec:
                    raise ValueError
                if first:
                    start = int(first)
                    end = min(size, int(last) + 1) if last else size
                else:
                    start, end = max(0, size - int(last)), size
                if start >= size or start >= end:
                    raise IndexError
                status = 206
                extra.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
            except ValueError:
                pass
            except IndexError:
                self._record(method, path, headers, 416, fault)
                self._simple(
                    conn, method, 416, b"", "text/plain", (("Content-Range", f"bytes */{size}"),)
                )
                return
        if registry and headers.get("if-none-match") == f'"{blob.digest}"':
            # like Distribution: the client has it already
            self._record(method, path, headers, 304, fault)
            self._send_head(
                conn, 304, [("Etag", f'"{blob.digest}"'), ("Docker-Content-Digest", blob.digest)]
            )
            return
        self._record(method, path, headers, status, fault)
        if fault is not None and fault.kind == "no-length" and method == "GET":
            self._send_head(conn, status, [("Content-Type", ctype), ("Connection", "close")])
            body = memoryview(data)[start:end]
            self._send(conn, body if fault.after < 0 else body[: fault.after])
            raise _Close()
        head = [
            ("Content-Type", ctype),
            ("Content-Length", str(end - start)),
            ("Accept-Ranges", "bytes" if honour_range else "none"),
            *extra,
        ]
        if registry:
            head += [
                ("Docker-Content-Digest", blob.digest),
                ("Docker-Distribution-Api-Version", "registry/2.0"),
            ]
        self._send_head(conn, status, head)
        if method == "HEAD":
            return
        body = memoryview(data)[start:end]
        kind = fault.kind if fault else None
        if kind in ("reset", "hang"):
            cut = max(0, min(fault.after, len(body)))  # type: ignore[union-attr]
            self._send(conn, body[:cut])
            if kind == "hang":
                self._hang(conn)
            time.sleep(0.05)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raise _Close()
        if kind == "slow":
            rate = max(1, fault.rate)  # type: ignore[union-attr]
            step = max(1, rate // 20)  # 20 sends a second: a trickle is never silent
            t0 = time.monotonic()
            sent = 0
            while sent < len(body):
                if self._stopping.is_set():
                    raise _Close()
                self._send(conn, body[sent : sent + step])
                sent += min(step, len(body) - sent)
                delay = t0 + sent / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            return
        self._send(conn, body)

    def _send(self, conn: socket.socket, data: bytes | memoryview) -> None:
        """
        Send all of C{data} at the client's pace, giving up only after
        L{SEND_STALL} seconds in which it took nothing, or when the server
        stops. (A socket timeout bounds a whole C{sendall}: with the 1 s one
        of the connection, a large body read at less than its size per
        second was cut off partway, which looked like upstream dropping.)
        """
        view = memoryview(data).cast("B")
        progress = time.monotonic()
        while view:
            if self._stopping.is_set():
                raise _Close()
            try:
                sent = conn.send(view[: 1 << 20])
            except socket.timeout:
                if time.monotonic() - progress > SEND_STALL:
                    raise _Close()
                continue
            view = view[sent:]
            progress = time.monotonic()

    def _hang(self, conn: socket.socket) -> None:
        """Say nothing until the client leaves (or the server stops)."""
        with self._lock:
            self.hanging += 1
        try:
            deadline = time.monotonic() + HANG_LIMIT
            while not self._stopping.is_set() and time.monotonic() < deadline:
                try:
                    if not conn.recv(65536):
                        break
                except socket.timeout:
                    continue
                except OSError:
                    break
        finally:
            with self._lock:
                self.hanging -= 1
        raise _Close()
