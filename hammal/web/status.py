"""
``/status`` (HTML for people) and ``/status.json`` (the same for scripts).

Routing and HTTP only: the document comes from
L{hammal.status.report.StatusReport}, the page from
L{hammal.status.page}. Both answer only clients that the address rules
(``--allow-ip``, ``--deny-ip``, ``--trusted-proxy``) admit, like
``/metrics``; with ``--metrics-port`` they are served there only.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from hammal.access.rules import AccessRules
from hammal.errors import RegistryError, Unsupported
from hammal.status.page import render_page
from hammal.status.report import StatusReport
from hammal.web.respond import error_body

#: Nothing but the page itself: inline style, data: images, no script.
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class _StatusLeaf(Resource):
    """Common ground of the two views: methods, access rules, headers."""

    isLeaf = True
    content_type = b"text/plain"

    def __init__(self, report: StatusReport, rules: AccessRules | None = None) -> None:
        super().__init__()
        self._report = report
        self._rules = rules

    def render(self, request: Request) -> Any:
        try:
            if request.method not in (b"GET", b"HEAD"):
                request.setHeader(b"allow", b"GET, HEAD")
                raise Unsupported("only GET and HEAD are allowed here")
            self._check(request)
            body = self.body(self._report.build())
        except RegistryError as error:
            return _error(request, error)
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"content-security-policy", CONTENT_SECURITY_POLICY)
        request.setHeader(b"content-length", b"%d" % len(body))
        return b"" if request.method == b"HEAD" else body

    def _check(self, request: Request) -> None:
        if self._rules is None:
            return
        address = request.getClientAddress()
        headers = {
            name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        self._rules.check(
            str(getattr(address, "host", "")), headers, request.path.decode("latin-1")
        )

    def body(self, report: dict[str, Any]) -> bytes:
        raise NotImplementedError


class StatusPage(_StatusLeaf):
    """``/status``: one HTML page with inline CSS and SVG charts."""

    content_type = b"text/html; charset=utf-8"

    def body(self, report: dict[str, Any]) -> bytes:
        return render_page(report).encode("utf-8")


class StatusDocument(_StatusLeaf):
    """``/status.json``: the report as JSON."""

    content_type = b"application/json"

    def body(self, report: dict[str, Any]) -> bytes:
        return json.dumps(report, separators=(",", ":")).encode()


def add_status(parent: Resource, report: StatusReport, rules: AccessRules | None) -> None:
    """Put ``status`` and ``status.json`` under C{parent}."""
    parent.putChild(b"status", StatusPage(report, rules))
    parent.putChild(b"status.json", StatusDocument(report, rules))


def _error(request: Request, error: RegistryError) -> bytes:
    body = error_body(error)
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body
