"""
Parsing of ``/v2/...`` request paths into routes.

A repository name may contain slashes, so the kind of request is decided by
the path's tail (``/manifests/<ref>``, ``/blobs/<digest>``,
``/tags/list``, ``/referrers/<digest>``); the rest is the name, validated before anything else
happens.
"""

from __future__ import annotations

import re
from enum import Enum

import attrs

from hammal.errors import NotFound, Unsupported
from hammal.reference import Digest, Reference, parse_reference, validate_name


class RouteKind(Enum):
    BASE = "base"
    AUTH = "auth"
    MANIFEST = "manifest"
    BLOB = "blob"
    TAGS = "tags"
    REFERRERS = "referrers"


@attrs.frozen
class Route:
    """
    A parsed request path.

    @ivar name: the repository name as the client wrote it.
    @ivar reference: the manifest reference, or the blob digest.
    """

    kind: RouteKind
    name: str = ""
    reference: Reference | None = None

    @property
    def digest(self) -> Digest:
        assert isinstance(self.reference, Digest)
        return self.reference


_MANIFEST = re.compile(r"/v2/(?P<name>.+)/manifests/(?P<ref>[^/]*)\Z")
_BLOB = re.compile(r"/v2/(?P<name>.+)/blobs/(?P<ref>[^/]*)\Z")
_TAGS = re.compile(r"/v2/(?P<name>.+)/tags/list\Z")
_UPLOAD = re.compile(r"/v2/(?P<name>.+)/blobs/uploads(?:/.*)?\Z")
_REFERRERS = re.compile(r"/v2/(?P<name>.+)/referrers/(?P<ref>[^/]*)\Z")


def parse_route(raw_path: bytes) -> Route:
    """
    Parse the path part of a request URI (without query).

    @raise NameInvalid: for a bad repository name.
    @raise TagInvalid: for a bad tag.
    @raise DigestInvalid: for a bad digest.
    @raise Unsupported: for push and catalog endpoints.
    @raise NotFound: for anything else.
    """
    try:
        path = raw_path.decode("ascii")
    except UnicodeDecodeError:
        raise NotFound("no such registry API endpoint")
    if path in ("/v2", "/v2/"):
        return Route(RouteKind.BASE)
    if path in ("/v2/auth", "/v2/token"):
        return Route(RouteKind.AUTH)
    if path in ("/v2/_catalog",):
        raise Unsupported("a mirror does not offer a repository catalog")
    match = _MANIFEST.match(path)
    if match:
        name = validate_name(match["name"])
        return Route(RouteKind.MANIFEST, name, parse_reference(match["ref"]))
    match = _TAGS.match(path)
    if match:
        return Route(RouteKind.TAGS, validate_name(match["name"]))
    if _UPLOAD.match(path):
        raise Unsupported("hammal is a pull-only mirror: pushing is not supported")
    match = _BLOB.match(path)
    if match:
        name = validate_name(match["name"])
        return Route(RouteKind.BLOB, name, Digest.parse(match["ref"]))
    match = _REFERRERS.match(path)
    if match:
        name = validate_name(match["name"])
        return Route(RouteKind.REFERRERS, name, Digest.parse(match["ref"]))
    raise NotFound("no such registry API endpoint")
