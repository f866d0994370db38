"""
Tests for L{hammal.upstream.schema1}: the digest of a signed schema 1
manifest covers its JWS payload, not the body upstream sends.
"""

from __future__ import annotations

import base64
import hashlib
import json

from twisted.trial.unittest import SynchronousTestCase

from hammal.errors import UpstreamBadResponse
from hammal.upstream.schema1 import SIGNED_SCHEMA1, digested_content, signed_payload


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(payload: bytes, signatures: int = 1, tails: list[bytes] | None = None) -> bytes:
    """
    A schema 1 manifest signed the way libtrust does it: the signatures
    spliced in before the payload's closing C{\\n}}.
    """
    length = len(payload) - 2
    assert payload[length:] == b"\n}"
    entries = []
    for index in range(signatures):
        tail = tails[index] if tails else payload[length:]
        protected = {
            "formatLength": length,
            "formatTail": _b64url(tail),
            "time": "2026-12-01T00:00:00Z",
        }
        entries.append(
            {
                "header": {
                    "jwk": {"kty": "EC", "crv": "P-256", "x": "x", "y": "y"},
                    "alg": "ES256",
                },
                "signature": _b64url(b"sig%d" % index),
                "protected": _b64url(json.dumps(protected).encode()),
            }
        )
    spliced = ',\n   "signatures": ' + json.dumps(entries, indent=3).replace("\n", "\n   ") + "\n}"
    return payload[:length] + spliced.encode()


PAYLOAD = json.dumps(
    {
        "schemaVersion": 1,
        "name": "library/alpine",
        "tag": "3.20",
        "architecture": "amd64",
        "fsLayers": [{"blobSum": "sha256:" + "a" * 64}],
        "history": [{"v1Compatibility": "{}"}],
    },
    indent=3,
).encode()


class SignedPayloadTests(SynchronousTestCase):
    def test_payload_without_signatures(self) -> None:
        """The payload is the manifest as it was before signing."""
        body = signed(PAYLOAD)
        self.assertNotEqual(body, PAYLOAD)
        self.assertEqual(signed_payload(body), PAYLOAD)

    def test_digest_is_that_of_the_payload(self) -> None:
        """What Distribution announces: sha256 of the payload."""
        content = digested_content(signed(PAYLOAD), SIGNED_SCHEMA1)
        self.assertEqual(hashlib.sha256(content).hexdigest(), hashlib.sha256(PAYLOAD).hexdigest())

    def test_media_type_parameters_ignored(self) -> None:
        body = signed(PAYLOAD)
        self.assertEqual(digested_content(body, SIGNED_SCHEMA1 + "; charset=utf-8"), PAYLOAD)

    def test_several_signatures_agreeing(self) -> None:
        self.assertEqual(signed_payload(signed(PAYLOAD, signatures=2)), PAYLOAD)

    def test_signatures_disagreeing(self) -> None:
        body = signed(PAYLOAD, signatures=2, tails=[b"\n}", b"\n}\n"])
        self.assertRaises(UpstreamBadResponse, signed_payload, body)

    def test_other_types_digest_the_body(self) -> None:
        body = b'{"schemaVersion": 2}'
        self.assertIs(
            digested_content(body, "application/vnd.docker.distribution.manifest.v2+json"), body
        )

    def test_unsigned_or_broken(self) -> None:
        """Anything else labelled signed schema 1 is a bad upstream answer, never a crash."""
        for body in (
            PAYLOAD,
            b"not json",
            b'{"signatures": "x"}',
            b'{"signatures": [{"protected": "!!!"}]}',
            b'{"signatures": [{"protected": "'
            + _b64url(b'{"formatLength": 99999}').encode()
            + b'"}]}',
            b'{"signatures": []}',
        ):
            with self.subTest(body=body[:40]):
                self.assertRaises(UpstreamBadResponse, digested_content, body, SIGNED_SCHEMA1)
