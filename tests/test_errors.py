"""
Tests for L{hammal.errors}: OCI error codes, HTTP statuses and the
``errors`` list entry each error becomes.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from hammal import errors
from hammal.errors import RegistryError, UpstreamError

#: Every error type, with the OCI code and HTTP status it must carry.
EXPECTED: dict[type[RegistryError], tuple[str, int]] = {
    errors.RegistryError: ("UNKNOWN", 500),
    errors.NameInvalid: ("NAME_INVALID", 400),
    errors.TagInvalid: ("TAG_INVALID", 400),
    errors.DigestInvalid: ("DIGEST_INVALID", 400),
    errors.RangeInvalid: ("RANGE_INVALID", 416),
    errors.Unsupported: ("UNSUPPORTED", 405),
    errors.NotFound: ("UNSUPPORTED", 404),
    errors.Denied: ("DENIED", 403),
    errors.Unauthorized: ("UNAUTHORIZED", 401),
    errors.TooManyRequests: ("TOOMANYREQUESTS", 429),
    errors.UpstreamUnavailable: ("UNAVAILABLE", 502),
    errors.UpstreamTimeout: ("UNAVAILABLE", 504),
    errors.UpstreamBadResponse: ("UNAVAILABLE", 502),
}


class StatusAndCodeTests(SynchronousTestCase):
    """Each error type carries its distribution-spec code and status."""

    def test_table(self) -> None:
        for error_type, (code, status) in EXPECTED.items():
            error = error_type("message")
            self.assertEqual((error.code, error.status), (code, status), error_type.__name__)
            self.assertIsInstance(error, RegistryError)
            self.assertIsInstance(error, Exception)

    def test_every_type_well_formed(self) -> None:
        """Every error type defined (now or later) has an error status and an OCI-style code."""
        defined = [
            value
            for value in vars(errors).values()
            if isinstance(value, type) and issubclass(value, RegistryError)
        ]
        self.assertTrue(set(EXPECTED) <= set(defined))
        for error_type in defined:
            self.assertTrue(400 <= error_type.status <= 599, error_type.__name__)
            self.assertRegex(error_type.code, r"\A[A-Z_]+\Z")

    def test_client_errors_are_4xx(self) -> None:
        for error_type in (errors.NameInvalid, errors.TagInvalid, errors.DigestInvalid):
            self.assertTrue(400 <= error_type.status < 500)


class AsDictTests(SynchronousTestCase):
    """L{RegistryError.as_dict} is one entry of an OCI ``errors`` list."""

    def test_without_detail(self) -> None:
        error = errors.NameInvalid("invalid repository name: 'A'")
        self.assertEqual(
            error.as_dict(), {"code": "NAME_INVALID", "message": "invalid repository name: 'A'"}
        )

    def test_with_detail(self) -> None:
        error = errors.DigestInvalid("bad", detail={"digest": "sha256:0"})
        self.assertEqual(
            error.as_dict(),
            {"code": "DIGEST_INVALID", "message": "bad", "detail": {"digest": "sha256:0"}},
        )

    def test_falsy_detail_kept(self) -> None:
        """Only an absent detail is left out; an empty one is sent."""
        self.assertEqual(errors.Denied("no", detail={}).as_dict()["detail"], {})
        self.assertEqual(errors.Denied("no", detail=0).as_dict()["detail"], 0)

    def test_json_serialisable(self) -> None:
        error = errors.TagInvalid("t\u00e4g", detail=["x", 1])
        body = json.dumps({"errors": [error.as_dict()]})
        self.assertEqual(json.loads(body)["errors"][0]["message"], "t\u00e4g")

    def test_message_is_exception_text(self) -> None:
        error = errors.Unsupported("push is not supported")
        self.assertEqual(str(error), "push is not supported")
        self.assertEqual(error.message, "push is not supported")


class HeadersTests(SynchronousTestCase):
    """Errors may carry extra response headers."""

    def test_default_empty(self) -> None:
        self.assertEqual(errors.TooManyRequests("slow down").headers, {})

    def test_copied(self) -> None:
        given = {"Retry-After": "30"}
        error = errors.TooManyRequests("slow down", headers=given)
        given["Retry-After"] = "0"
        self.assertEqual(error.headers, {"Retry-After": "30"})

    def test_not_shared(self) -> None:
        first, second = errors.Denied("a"), errors.Denied("b")
        first.headers["X"] = "1"
        self.assertEqual(second.headers, {})


class UpstreamErrorTests(SynchronousTestCase):
    """L{UpstreamError} relays upstream's own status and code."""

    def test_relayed(self) -> None:
        error = UpstreamError(
            404, "MANIFEST_UNKNOWN", "manifest unknown", detail={"Tag": "x"}, headers={"A": "b"}
        )
        self.assertEqual((error.status, error.code), (404, "MANIFEST_UNKNOWN"))
        self.assertEqual(
            error.as_dict(),
            {"code": "MANIFEST_UNKNOWN", "message": "manifest unknown", "detail": {"Tag": "x"}},
        )
        self.assertEqual(error.headers, {"A": "b"})

    def test_instance_only(self) -> None:
        """Relaying one upstream error does not change the class defaults."""
        UpstreamError(418, "TEAPOT", "short and stout")
        self.assertEqual((UpstreamError.status, UpstreamError.code), (500, "UNKNOWN"))
        self.assertEqual(UpstreamError(503, "UNAVAILABLE", "x").status, 503)
