"""
A throttled registry for the cluster tests, run as its own process:
anonymous C{/v2/}, blobs from a directory (C{<dir>/<hex>} for
C{sha256:<hex>}) whole or from a C{Range} start, sent at C{--rate} bytes a
second so a fill lasts long enough to kill its holder; OCI manifests by
digest from C{<dir>/manifests/<hex>}. C{GET /_admin/log} lists every blob
and manifest request (method, kind, digest, range) so a test counts
upstream fetches.

    python tests/cluster/upstream.py --port N --blobs DIR --rate BYTES
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import LoopingCall
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

TICK = 0.05


class Registry(Resource):
    isLeaf = True

    def __init__(self, blobs: str, rate: int) -> None:
        super().__init__()
        self.blobs = blobs
        self.rate = rate
        self.log: list[dict[str, Any]] = []

    def render(self, request: Request) -> Any:
        path = request.path.decode()
        if path == "/_admin/log":
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(self.log).encode()
        if path in ("/v2", "/v2/"):
            request.setHeader(b"content-type", b"application/json")
            return b"{}"
        parts = path.split("/")
        kind = parts[-2] if len(parts) >= 5 else ""
        if kind not in ("blobs", "manifests") or not parts[-1].startswith("sha256:"):
            request.setResponseCode(404)
            return b'{"errors":[{"code":"NAME_UNKNOWN","message":"no such thing"}]}'
        digest = parts[-1]
        wanted = request.getHeader(b"range")
        self.log.append(
            {
                "method": request.method.decode(),
                "kind": kind,
                "digest": digest,
                "range": wanted.decode() if wanted else None,
            }
        )
        if kind == "manifests":
            return self.manifest(request, digest)
        file = os.path.join(self.blobs, digest[7:])
        if not os.path.exists(file):
            request.setResponseCode(404)
            return b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}'
        size = os.path.getsize(file)
        start = 0
        if wanted:
            start = int(wanted.decode().split("=")[1].split("-")[0])
            request.setResponseCode(206)
            request.setHeader(b"content-range", b"bytes %d-%d/%d" % (start, size - 1, size))
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"docker-content-digest", digest.encode())
        request.setHeader(b"content-length", b"%d" % (size - start))
        if request.method == b"HEAD":
            return b""
        _Trickle(request, open(file, "rb"), start, max(1, int(self.rate * TICK))).begin()
        return NOT_DONE_YET

    def manifest(self, request: Request, digest: str) -> bytes:
        """An OCI image manifest from C{<blobs>/manifests/<hex>}, at once."""
        file = os.path.join(self.blobs, "manifests", digest[7:])
        if not os.path.exists(file):
            request.setResponseCode(404)
            return b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}'
        with open(file, "rb") as f:
            body = f.read()
        request.setHeader(b"content-type", b"application/vnd.oci.image.manifest.v1+json")
        request.setHeader(b"docker-content-digest", digest.encode())
        request.setHeader(b"content-length", b"%d" % len(body))
        return b"" if request.method == b"HEAD" else body


class _Trickle:
    """Writes a file from C{start}, C{step} bytes each tick."""

    def __init__(self, request: Request, f: Any, start: int, step: int) -> None:
        self.request = request
        self.file = f
        self.file.seek(start)
        self.step = step
        self.loop = LoopingCall(self.tick)
        request.notifyFinish().addErrback(lambda _: self.stop())

    def begin(self) -> None:
        self.loop.start(TICK)

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()
        self.file.close()

    def tick(self) -> None:
        data = self.file.read(self.step)
        if not data:
            self.stop()
            self.request.finish()
            return
        self.request.write(data)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--blobs", required=True)
    parser.add_argument("--rate", type=int, default=8 * 1024 * 1024)
    args = parser.parse_args()
    reactor.listenTCP(  # type: ignore[attr-defined]
        args.port, Site(Registry(args.blobs, args.rate)), interface="127.0.0.1"
    )
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
