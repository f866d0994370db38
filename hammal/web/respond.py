"""
The one place that writes responses: documents whole, errors as OCI error
JSON, blob bodies through their producer, and aborts when a response that
has started cannot be completed.
"""

from __future__ import annotations

import json

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import Request

from hammal.cache.readers import tcp_transport
from hammal.classpoll import BULK, INTERACTIVE, classify
from hammal.errors import RegistryError
from hammal.replies import BlobReply, Document
from hammal.web.send_now import send_now
from hammal.web.state import client_gone, state_of

_log = Logger()


def error_body(error: RegistryError) -> bytes:
    """The OCI ``{"errors": [...]}`` document for C{error}."""
    return json.dumps({"errors": [error.as_dict()]}).encode()


def write_error(request: Request, error: RegistryError) -> None:
    """
    Answer C{request} with C{error}. If the response has already started,
    the only honest thing left is to abort the connection.
    """
    if client_gone(request) or request.finished:
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
    state_of(request).aborted_by_server = True
    transport = getattr(request, "transport", None) or getattr(request.channel, "transport", None)
    if transport is not None:
        transport.abortConnection()


def start_response(
    request: Request, status: int, headers: list[tuple[bytes, list[bytes]]], length: int | None
) -> None:
    """Set C{request}'s status, headers and (when known) length."""
    request.setResponseCode(status)
    for name, values in headers:
        request.responseHeaders.setRawHeaders(name, values)
    if length is not None:
        request.setHeader(b"content-length", b"%d" % length)


def write_document(request: Request, document: Document) -> None:
    """Answer C{request} with C{document}, unless the client has gone."""
    if client_gone(request):
        return
    # A 304 has no body, and no length unless the 200's (RFC 9110 8.6).
    length = None if document.status == 304 else document.content_length
    start_response(request, document.status, document.headers, length)
    connection = tcp_transport(request)
    if document.body:
        request.write(document.body)
    request.finish()
    send_now(connection)  # in this turn, not after a round of ready sockets


async def write_stream(request: Request, reply: BlobReply) -> None:
    """
    Answer C{request} with C{reply}'s body, with backpressure; a body that
    fails part way aborts the client rather than finishing a short response.
    """
    start_response(request, reply.status, reply.headers, reply.length)
    if reply.body is None:
        request.finish()
        return
    request.write(b"")  # headers now: clients give up on slow ones
    # Its socket's writes and close wait behind requests on other
    # connections (hammal.classpoll); HTTP/2 streams share their connection.
    connection = request.channel.transport if isinstance(request.channel, HTTPChannel) else None
    if connection is not None:
        classify(connection, BULK)
    try:
        await reply.body.deliver(request)
    except CancelledError:
        reply.body.stop()
        raise
    except RegistryError as error:
        request.unregisterProducer()
        if not client_gone(request):
            _log.warn("aborting {path}: {error}", path=request.uri[:512], error=error.message)
            abort_client(request)
        return
    finally:
        if connection is not None:
            classify(connection, INTERACTIVE)
    request.unregisterProducer()
    if not client_gone(request):
        request.finish()
