"""A fault-injecting upstream registry: the pull-through cache's adversary.

Run it as a script::

    python tests/integration/faults.py --port 0 --port-file /tmp/port \\
        --blob 8M:1 --blob 32M:2

It serves, anonymously (no auth), over plain HTTP on 127.0.0.1:

``GET /v2/``
    ``200 {}``.
``GET|HEAD /v2/NAME/blobs/DIGEST``
    One of the blobs: deterministic random bytes (:func:`blob_bytes`, from
    ``SIZE:SEED``), with ``Content-Length``, ``Docker-Content-Digest`` and
    ``Accept-Ranges``.  ``Range: bytes=N-`` (and ``N-M``, ``-N``) gets ``206``
    with ``Content-Range``; an unsatisfiable one ``416``.
``GET|HEAD /v2/NAME/manifests/(latest|DIGEST)``
    An OCI image manifest naming a small config blob and every blob above as
    layers.
``POST /_admin/fault?kind=K&after=N&count=C&rate=R&path=P``
    Queue a fault for the next *C* (default 1; ``-1``: every) matching
    requests whose path contains *P* (default: any ``/v2/NAME/...``).
    Each request takes the first queued fault that applies to it:

    ``reset``
        send *N* body bytes, then ``abortConnection`` (a reset mid-body;
        0.2 s later, so that the kernel sent what was written);
    ``corrupt``
        flip the body byte at offset *N* (a bad CDN edge);
    ``hang``
        send the headers and *N* body bytes, then nothing, ever;
    ``ignore-range``
        answer a ``Range`` request (only those) with ``200`` and the whole body;
    ``slow``
        send at *R* bytes/s (default 1 MiB/s; ``reactor.callLater``-paced,
        and still paused whenever the client's socket is full); ``rate=R``
        throttles the other body faults the same way;
    ``status``
        answer ``503`` (any ``/v2/NAME/...`` request, ``HEAD`` too).

    Offsets count bytes of *this response's* body.  ``reset``, ``corrupt``,
    ``hang`` and ``slow`` apply to ``GET`` with a body only.
``GET /_admin/log``
    Every request but the admin ones, in order: ``method``, ``path``,
    ``range`` (the header, or ``null``), ``status``, ``fault`` (the kind
    applied, or ``null``) and ``time``.
``GET /_admin/blobs``
    ``{"blobs": [{"digest", "size", "seed"}, ...], "manifest_digest"}``.
``POST /_admin/reset``
    Clear the log and every queued fault.

Every body is written by a push producer registered with the request: a
client that stops reading pauses the server, as a real one would.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.interfaces import IPushProducer
from twisted.web import resource, server
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

__all__ = ["FaultServer", "blob_bytes", "parse_size", "main", "KINDS"]

KINDS = ("reset", "corrupt", "hang", "ignore-range", "slow", "status")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CHUNK = 64 * 1024
#: Time given to the kernel to send what was written before a reset.
RESET_FLUSH_DELAY = 0.2


def blob_bytes(size: int, seed: int) -> bytes:
    """The deterministic random content of a blob (same in every process)."""
    return random.Random(seed).randbytes(size)


def parse_size(text: str) -> int:
    """``8M`` -> 8388608 (K, M, G; binary)."""
    match = re.fullmatch(r"(\d+)([KMG]?)", text.strip().upper())
    if match is None:
        raise ValueError(f"not a size: {text!r}")
    return int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2)]


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Fault:
    """One queued fault (see the module docstring)."""

    def __init__(self, kind: str, after: int, count: int, rate: int, path: str) -> None:
        self.kind, self.after, self.count, self.rate, self.path = kind, after, count, rate, path

    def applies(self, method: str, path: str, has_range: bool, is_body: bool) -> bool:
        if self.count == 0 or (self.path and self.path not in path):
            return False
        if self.kind == "status":
            return True
        if self.kind == "ignore-range":
            return has_range and is_body
        return method == "GET" and is_body


def _parse_range(header: Optional[str], size: int) -> Optional[Tuple[int, int]]:
    """``(start, end)`` (end exclusive) of one ``bytes=`` range; ``None``:
    whole body; ``(-1, -1)``: unsatisfiable."""
    if not header:
        return None
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if match is None or not (match.group(1) or match.group(2)):
        return None
    first, last = match.groups()
    if not first:
        suffix = int(last)
        return (max(0, size - suffix), size) if suffix else (-1, -1)
    start = int(first)
    end = size if not last else min(size, int(last) + 1)
    if start >= size:
        return (-1, -1)
    if end <= start:
        return None
    return (start, end)


@implementer(IPushProducer)
class BodySender:
    """Writes *body* to *request* in chunks, honouring pauses, with a fault."""

    def __init__(self, request: Request, body: bytes, fault: Optional[Fault], reactor: Any) -> None:
        self.request = request
        self.body = body
        self.fault = fault
        self.reactor = reactor
        self.offset = 0
        self.paused = False
        self.stopped = False
        self.call: Any = None
        self.started = 0.0
        kind = fault.kind if fault else None
        after = fault.after if fault else 0
        self.stop_at = min(after if kind in ("reset", "hang") else len(body), len(body))
        self.rate = fault.rate if fault else 0
        self.corrupt_at = after if kind == "corrupt" else -1

    def start(self) -> None:
        self.started = self.reactor.seconds()
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self._schedule(0)

    def _schedule(self, delay: float) -> None:
        if self.call is None and not self.paused and not self.stopped:
            self.call = self.reactor.callLater(delay, self._tick)

    def _budget(self) -> int:
        """Bytes that may go now: up to 16 chunks a tick (so that other
        connections get a turn), or at *rate* what time allows so far (plus
        1/20 s worth), however often the client paused and resumed us."""
        if not self.rate:
            return 16 * CHUNK
        elapsed = self.reactor.seconds() - self.started
        return int(self.rate * elapsed) + max(1, self.rate // 20) - self.offset

    def _tick(self) -> None:
        self.call = None
        budget = self._budget()
        while budget > 0 and not self.paused and not self.stopped:
            if self.offset >= self.stop_at:
                break
            size = min(CHUNK, budget, self.stop_at - self.offset)
            chunk = self.body[self.offset : self.offset + size]
            if self.offset <= self.corrupt_at < self.offset + size:
                flipped = bytearray(chunk)
                flipped[self.corrupt_at - self.offset] ^= 0xFF
                chunk = bytes(flipped)
            self.offset += size
            budget -= size
            self.request.write(chunk)
        if self.offset >= self.stop_at and not self.stopped:
            self._end()
            return
        self._schedule(0.05 if self.rate else 0)

    def _end(self) -> None:
        self.stopped = True
        self.request.unregisterProducer()
        kind = self.fault.kind if self.fault else None
        if kind == "hang" and self.stop_at < len(self.body):
            return  # silence, until the client gives up
        if kind == "reset" and self.stop_at < len(self.body):
            transport: Any = self.request.channel.transport
            self.reactor.callLater(RESET_FLUSH_DELAY, transport.abortConnection)
            return
        self.request.finish()

    # IPushProducer
    def pauseProducing(self) -> None:
        self.paused = True
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None

    def resumeProducing(self) -> None:
        self.paused = False
        self._schedule(0)

    def stopProducing(self) -> None:
        self.stopped = True
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None


class FaultServer(resource.Resource):
    """The whole server: registry API, faults, admin endpoints."""

    isLeaf = True

    def __init__(self, blobs: List[Tuple[int, int]], reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.blobs: Dict[str, bytes] = {}
        self.seeds: Dict[str, Tuple[int, int]] = {}
        layers = []
        for size, seed in blobs:
            data = blob_bytes(size, seed)
            digest = _digest(data)
            self.blobs[digest], self.seeds[digest] = data, (size, seed)
            layers.append(
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest,
                    "size": size,
                }
            )
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
        ).encode()
        self.blobs[_digest(config)] = config
        self.manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": _digest(config),
                    "size": len(config),
                },
                "layers": layers,
            },
            sort_keys=True,
        ).encode()
        self.manifest_digest = _digest(self.manifest)
        self.faults: List[Fault] = []
        self.log: List[Dict[str, Any]] = []

    # -- dispatch -------------------------------------------------------------

    def render(self, request: Request) -> Any:
        path = (request.path or b"/").decode("utf-8", "replace")
        method = (request.method or b"").decode()
        if path.startswith("/_admin/"):
            return self._admin(request, method, path)
        rng = request.getHeader(b"range")
        entry: Dict[str, Any] = {
            "time": time.time(),
            "method": method,
            "path": path,
            "range": rng.decode("latin-1") if rng else None,
            "status": None,
            "fault": None,
        }
        self.log.append(entry)
        match = re.fullmatch(r"/v2/(.+)/(blobs|manifests)/([^/]+)", path)
        if path in ("/v2", "/v2/"):
            return self._json(request, entry, 200, {})
        if match is None or method not in ("GET", "HEAD"):
            return self._json(request, entry, 404, _error("NOT_FOUND", "no such route"))
        kind, reference = match.group(2), match.group(3)
        if kind == "blobs":
            body, ctype = self.blobs.get(reference), b"application/octet-stream"
        elif reference in ("latest", self.manifest_digest):
            body, ctype = self.manifest, OCI_MANIFEST.encode()
        else:
            body, ctype = None, b""
        fault = self._take_fault(method, path, rng is not None, body is not None)
        entry["fault"] = fault.kind if fault else None
        if fault is not None and fault.kind == "status":
            request.setHeader(b"Retry-After", b"1")
            return self._json(request, entry, 503, _error("UNAVAILABLE", "fault: status"))
        if body is None:
            code = "BLOB_UNKNOWN" if kind == "blobs" else "MANIFEST_UNKNOWN"
            return self._json(request, entry, 404, _error(code, "unknown " + kind))
        request.setHeader(b"Content-Type", ctype)
        request.setHeader(b"Docker-Content-Digest", _digest(body).encode())
        request.setHeader(b"Accept-Ranges", b"bytes")
        selected = None
        if rng is not None and not (fault and fault.kind == "ignore-range"):
            selected = _parse_range(rng.decode("latin-1"), len(body))
        if selected == (-1, -1):
            request.setHeader(b"Content-Range", b"bytes */%d" % len(body))
            return self._json(request, entry, 416, _error("INVALID_RANGE", "unsatisfiable"))
        status, part = 200, body
        if selected is not None:
            start, end = selected
            status, part = 206, body[start:end]
            request.setHeader(b"Content-Range", b"bytes %d-%d/%d" % (start, end - 1, len(body)))
        request.setResponseCode(status)
        request.setHeader(b"Content-Length", b"%d" % len(part))
        entry["status"] = status
        if method == "HEAD":
            return b""
        BodySender(request, part, fault, self.reactor).start()
        return NOT_DONE_YET

    def _take_fault(
        self, method: str, path: str, has_range: bool, is_body: bool
    ) -> Optional[Fault]:
        for fault in self.faults:
            if fault.applies(method, path, has_range, is_body):
                if fault.count > 0:
                    fault.count -= 1
                self.faults = [f for f in self.faults if f.count != 0]
                return fault
        return None

    def _json(
        self, request: Request, entry: Optional[Dict[str, Any]], status: int, body: Any
    ) -> bytes:
        if entry is not None:
            entry["status"] = status
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        data = json.dumps(body).encode()
        if request.method == b"HEAD":
            request.setHeader(b"Content-Length", b"%d" % len(data))
            return b""
        return data

    # -- admin ------------------------------------------------------------------

    def _admin(self, request: Request, method: str, path: str) -> bytes:
        args = {k.decode(): v[0].decode() for k, v in (request.args or {}).items()}
        if path == "/_admin/log" and method == "GET":
            return self._json(request, None, 200, self.log)
        if path == "/_admin/blobs" and method == "GET":
            blobs = [{"digest": d, "size": s, "seed": seed} for d, (s, seed) in self.seeds.items()]
            return self._json(
                request, None, 200, {"blobs": blobs, "manifest_digest": self.manifest_digest}
            )
        if path == "/_admin/reset" and method == "POST":
            self.log, self.faults = [], []
            return self._json(request, None, 200, {"ok": True})
        if path == "/_admin/fault" and method == "POST":
            kind = args.get("kind", "")
            if kind not in KINDS:
                return self._json(request, None, 400, {"error": f"kind must be one of {KINDS}"})
            try:
                rate = int(args.get("rate", "1048576" if kind == "slow" else "0"))
                fault = Fault(
                    kind,
                    int(args.get("after", "0")),
                    int(args.get("count", "1")),
                    rate,
                    args.get("path", ""),
                )
            except ValueError as e:
                return self._json(request, None, 400, {"error": str(e)})
            self.faults.append(fault)
            return self._json(request, None, 200, {"queued": len(self.faults)})
        return self._json(request, None, 404, {"error": "no such admin endpoint"})


def _error(code: str, message: str) -> Dict[str, Any]:
    return {"errors": [{"code": code, "message": message, "detail": None}]}


def main(argv: Optional[List[str]] = None) -> None:
    """Parse the command line and serve until killed."""
    from twisted.internet import endpoints, reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--port-file", help="write the port here once listening")
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument(
        "--blob",
        action="append",
        default=[],
        help="SIZE[:SEED] of a blob to serve (repeatable; default 8M:1, 32M:2)",
    )
    args = parser.parse_args(argv)
    blobs = []
    for i, spec in enumerate(args.blob or ["8M:1", "32M:2"]):
        size, _, seed = spec.partition(":")
        blobs.append((parse_size(size), int(seed) if seed else i + 1))
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    site = server.Site(FaultServer(blobs, reactor))
    site.displayTracebacks = False

    def listening(port: Any) -> None:
        number = port.getHost().port
        if args.port_file:
            temporary = args.port_file + ".tmp"
            with open(temporary, "w") as f:
                f.write(str(number))
            os.replace(temporary, args.port_file)
        print(f"fault server listening on {args.interface}:{number}", flush=True)

    endpoint = endpoints.TCP4ServerEndpoint(reactor, args.port, interface=args.interface)

    def failed(failure: Any) -> None:
        failure.printTraceback()
        reactor.stop()

    endpoint.listen(site).addCallbacks(listening, failed)
    reactor.run()


if __name__ == "__main__":
    main()
