"""
Error responses: hammal's error types rendered as OCI error JSON, in one
place.
"""

from __future__ import annotations

import json

from twisted.web.server import Request

from hammal.errors import RegistryError


def error_body(error: RegistryError) -> bytes:
    """The OCI ``{"errors": [...]}`` document for C{error}."""
    return json.dumps({"errors": [error.as_dict()]}).encode()


def write_error(request: Request, error: RegistryError) -> None:
    """
    Answer C{request} with C{error}. If the response has already started,
    the only honest thing left is to abort the connection.
    """
    if getattr(request, "_disconnected", False) or request.finished:
        return
    if request.startedWriting:
        abort_client(request)
        return
    body = error_body(error)
    request.setResponseCode(error.status)
    for name in (b"content-range", b"docker-content-digest", b"etag", b"accept-ranges"):
        request.responseHeaders.removeHeader(name)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"content-length", b"%d" % len(body))
    for header, value in error.headers.items():
        request.setHeader(header.encode("latin-1"), value.encode("latin-1"))
    request.write(body)
    request.finish()


def abort_client(request: Request) -> None:
    """
    Drop the client's connection without completing the response (hammal's
    choice, which the access log tells apart from a client leaving).
    """
    request.aborted_by_server = True  # type: ignore[attr-defined]
    transport = getattr(request, "transport", None) or getattr(request.channel, "transport", None)
    if transport is not None:
        transport.abortConnection()
