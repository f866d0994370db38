"""
Tests for L{hammal.web.routes}: request paths become L{Route}s or the
right registry error.
"""

from __future__ import annotations

import hashlib
from typing import Type

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import getChildForRequest
from twisted.web.test.requesthelper import DummyRequest

from hammal.errors import (
    DigestInvalid,
    NameInvalid,
    NotFound,
    RegistryError,
    TagInvalid,
    Unsupported,
)
from hammal.pull.upstreams import UpstreamSelector
from hammal.reference import Digest
from hammal.web.auth import TokenResource
from hammal.web.repository import RepositoryResource
from hammal.web.routes import Route, RouteKind, parse_route
from hammal.web.v2 import BaseResource, V2Resource

HEX = hashlib.sha256(b"layer").hexdigest()
DIGEST = f"sha256:{HEX}"


class RouteTests(SynchronousTestCase):
    """Well-formed paths parse into their routes."""

    def test_base(self) -> None:
        self.assertEqual(parse_route(b"/v2/"), Route(RouteKind.BASE))
        self.assertEqual(parse_route(b"/v2"), Route(RouteKind.BASE))

    def test_auth(self) -> None:
        self.assertEqual(parse_route(b"/v2/auth").kind, RouteKind.AUTH)
        self.assertEqual(parse_route(b"/v2/token").kind, RouteKind.AUTH)

    def test_manifest_by_tag(self) -> None:
        self.assertEqual(
            parse_route(b"/v2/alpine/manifests/3.19"), Route(RouteKind.MANIFEST, "alpine", "3.19")
        )

    def test_manifest_by_digest(self) -> None:
        route = parse_route(f"/v2/library/alpine/manifests/{DIGEST}".encode())
        self.assertEqual(route, Route(RouteKind.MANIFEST, "library/alpine", Digest("sha256", HEX)))
        self.assertEqual(route.digest, Digest("sha256", HEX))

    def test_blob(self) -> None:
        route = parse_route(f"/v2/a/b/c/blobs/{DIGEST}".encode())
        self.assertEqual((route.kind, route.name), (RouteKind.BLOB, "a/b/c"))
        self.assertEqual(route.digest, Digest("sha256", HEX))

    def test_tags(self) -> None:
        self.assertEqual(parse_route(b"/v2/org/repo/tags/list"), Route(RouteKind.TAGS, "org/repo"))

    def test_name_with_endpoint_words(self) -> None:
        """A name may itself contain ``manifests``, ``blobs`` or ``tags``."""
        route = parse_route(b"/v2/manifests/blobs/tags/manifests/latest")
        self.assertEqual(route, Route(RouteKind.MANIFEST, "manifests/blobs/tags", "latest"))
        route = parse_route(f"/v2/x/manifests/blobs/{DIGEST}".encode())
        self.assertEqual((route.kind, route.name), (RouteKind.BLOB, "x/manifests"))
        route = parse_route(b"/v2/tags/list/tags/list")
        self.assertEqual(route, Route(RouteKind.TAGS, "tags/list"))

    def test_name_ending_in_blobs_uploads(self) -> None:
        """
        C{foo/blobs/uploads} is a valid repository name; pulling its
        manifest is a pull, not an upload.
        """
        route = parse_route(b"/v2/foo/blobs/uploads/manifests/latest")
        self.assertEqual(route, Route(RouteKind.MANIFEST, "foo/blobs/uploads", "latest"))

    def test_longest_valid_tag(self) -> None:
        route = parse_route(b"/v2/a/manifests/" + b"t" * 128)
        self.assertEqual(route.reference, "t" * 128)


class RouteErrorTests(SynchronousTestCase):
    """Bad paths raise the registry error that names the problem."""

    def assertRouteError(self, path: bytes, error: Type[RegistryError]) -> RegistryError:
        failure = self.assertRaises(RegistryError, parse_route, path)
        self.assertIs(type(failure), error, f"{path!r} raised {failure!r}")
        return failure

    def test_bad_names(self) -> None:
        for name in (
            b"Alpine",
            b"a//b",
            b"..",
            b"a/../b",
            b"a/./b",
            b"-a",
            b"a___b",
            b"a%2fb",
            b"%2e%2e",
            b"a/%2e%2e/b",
            b"a%00b",
            b"a" * 256,
        ):
            self.assertRouteError(b"/v2/" + name + b"/manifests/latest", NameInvalid)
            self.assertRouteError(b"/v2/" + name + b"/blobs/" + DIGEST.encode(), NameInvalid)
            self.assertRouteError(b"/v2/" + name + b"/tags/list", NameInvalid)

    def test_name_checked_before_reference(self) -> None:
        self.assertRouteError(b"/v2/A/manifests/..", NameInvalid)
        self.assertRouteError(b"/v2/A/blobs/nope", NameInvalid)

    def test_longest_name(self) -> None:
        route = parse_route(b"/v2/" + b"a" * 255 + b"/tags/list")
        self.assertEqual(route.name, "a" * 255)

    def test_bad_tags(self) -> None:
        for tag in (
            b"",
            b".hidden",
            b"-x",
            b"t" * 129,
            b"%2e%2e",
            b"..%2f..%2fetc",
            b"a%20b",
            b"latest\n",
        ):
            self.assertRouteError(b"/v2/alpine/manifests/" + tag, TagInvalid)

    def test_bad_manifest_digests(self) -> None:
        for reference in (
            b"sha256:" + HEX.upper().encode(),
            b"sha256:" + HEX[:-1].encode(),
            b"md5:" + b"0" * 32,
            b"sha256:",
            b"sha256:%2e%2e",
        ):
            self.assertRouteError(b"/v2/alpine/manifests/" + reference, DigestInvalid)

    def test_bad_blob_digests(self) -> None:
        """A blob is addressed by digest only: a tag there is a bad digest."""
        for reference in (
            b"latest",
            b"",
            b"sha256:" + HEX.upper().encode(),
            b"sha256:" + HEX.encode() + b"0",
            b"sha1:" + b"0" * 40,
            b"sha256:..%2f..%2f",
        ):
            self.assertRouteError(b"/v2/alpine/blobs/" + reference, DigestInvalid)

    def test_uploads_unsupported(self) -> None:
        for path in (
            b"/v2/alpine/blobs/uploads",
            b"/v2/alpine/blobs/uploads/",
            b"/v2/library/alpine/blobs/uploads/0f6c1e7a-uuid",
            b"/v2/alpine/blobs/uploads/0f6c1e7a-uuid/extra",
        ):
            failure = self.assertRouteError(path, Unsupported)
            self.assertEqual((failure.status, failure.code), (405, "UNSUPPORTED"))

    def test_catalog_unsupported(self) -> None:
        self.assertRouteError(b"/v2/_catalog", Unsupported)

    def test_unknown_not_found(self) -> None:
        for path in (
            b"/",
            b"",
            b"/v1/alpine/manifests/latest",
            b"/v2/alpine",
            b"/v2/alpine/",
            b"/v2/alpine/manifests",
            b"/v2/alpine/tags",
            b"/v2/alpine/tags/list/",
            b"/v2/alpine/manifests/latest/extra",
            b"/v2//manifests/latest",
            b"/v2/alpine/referrers/" + DIGEST.encode() + b"/x",
            b"/v2/_catalog/",
            b"/v2/auth/",
            b"/V2/alpine/tags/list",
        ):
            failure = self.assertRouteError(path, NotFound)
            self.assertEqual(failure.status, 404)

    def test_non_ascii(self) -> None:
        """Raw non-ASCII bytes are not a registry path at all."""
        self.assertRouteError("/v2/caf\u00e9/manifests/latest".encode(), NotFound)
        self.assertRouteError(b"/v2/alpine/manifests/\xff", NotFound)
        self.assertRouteError(b"/v2/\xc0\xae\xc0\xae/tags/list", NotFound)


class TreeTests(SynchronousTestCase):
    """The ``/v2`` resource tree sends each path to its own resource."""

    def resource_for(self, path: bytes) -> object:
        v2 = V2Resource(UpstreamSelector(None, {}, []))
        request = DummyRequest(path.split(b"/")[2:])
        return getChildForRequest(v2, request)

    def test_routes(self) -> None:
        self.assertIsInstance(self.resource_for(b"/v2"), V2Resource)
        self.assertIsInstance(self.resource_for(b"/v2/"), BaseResource)
        self.assertIsInstance(self.resource_for(b"/v2/auth"), TokenResource)
        self.assertIsInstance(self.resource_for(b"/v2/token"), TokenResource)
        for path in (b"/v2/auth/x", b"/v2//", b"/v2/a/b/manifests/1", b"/v2/token/blobs/x"):
            self.assertIsInstance(self.resource_for(path), RepositoryResource, path)
