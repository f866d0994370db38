"""A static "CDN" in front of Distribution's filesystem storage.

Run it as a script::

    python tests/integration/cdn.py --port 5002 --root /path/to/storage

Distribution's ``redirect`` storage middleware answers blob GETs and HEADs
with ``307`` to ``BASEURL/docker/registry/v2/blobs/sha256/ab/<hex>/data``
(any path in ``baseurl`` is ignored), so the storage root is served at ``/``
with Twisted's :class:`twisted.web.static.File` (which supports ``Range``).
Directory listings are refused and every file is ``application/octet-stream``,
like the object store behind Docker Hub.

Every request (but the admin ones) is logged: method, path, query,
``authorization`` (whether an ``Authorization`` header was present) and the
``Range`` header.  ``GET /_admin/log`` returns that list as JSON and
``POST /_admin/reset`` clears it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

from twisted.internet import endpoints, reactor
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web import resource, server, static
from twisted.web.server import Request

__all__ = ["CDNSite", "ReadOnlyFile", "main"]


class ReadOnlyFile(static.File):
    """``static.File`` without directory listings, ``octet-stream`` for all."""

    def directoryListing(self) -> resource.Resource:
        return resource.ForbiddenResource("no listings")

    def createSimilarFile(self, path: str) -> "ReadOnlyFile":
        f = ReadOnlyFile(path, self.defaultType, self.ignoredExts, self.registry)
        f.processors = self.processors
        f.indexNames = []
        f.contentTypes = {}
        return f


class _Admin(resource.Resource):
    isLeaf = True

    def __init__(self, site: "CDNSite") -> None:
        super().__init__()
        self.site = site

    def render(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        path = (request.path or b"").decode()
        if path == "/_admin/log" and request.method == b"GET":
            return json.dumps(self.site.requests_log).encode()
        if path == "/_admin/reset" and request.method == b"POST":
            self.site.requests_log = []
            return b'{"ok": true}'
        request.setResponseCode(404)
        return b'{"details": "no such admin endpoint"}'


class CDNSite(server.Site):
    """A :class:`~twisted.web.server.Site` that logs each request it routes."""

    def __init__(self, root_directory: str) -> None:
        files = ReadOnlyFile(root_directory, defaultType="application/octet-stream")
        files.indexNames = []
        files.contentTypes = {}
        self.files = files
        self.admin = _Admin(self)
        self.requests_log: List[Dict[str, Any]] = []
        super().__init__(files)

    def getResourceFor(self, request: Request) -> resource.Resource:
        path = (request.path or b"/").decode("utf-8", "replace")
        if path.startswith("/_admin/"):
            return self.admin
        range_header = request.getHeader(b"range")
        agent = request.getHeader(b"user-agent")
        self.requests_log.append(
            {
                "time": time.time(),
                "method": (request.method or b"").decode(),
                "path": path,
                "query": (request.uri or b"").decode("utf-8", "replace").partition("?")[2],
                "authorization": request.getHeader(b"authorization") is not None,
                "range": range_header.decode("latin-1") if range_header else None,
                "user_agent": agent.decode("latin-1") if agent else "",
            }
        )
        return super().getResourceFor(request)


def main(argv: Optional[List[str]] = None) -> None:
    """Parse the command line and serve until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--root", required=True, help="storage root directory")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.root):
        os.makedirs(args.root, exist_ok=True)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    site = CDNSite(args.root)
    endpoint = endpoints.TCP4ServerEndpoint(reactor, args.port, interface=args.interface)
    endpoint.listen(site)
    reactor.run()


if __name__ == "__main__":
    main()
