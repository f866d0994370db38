"""
Docker schema 1 manifests: what their digest covers.

A client that sends no ``Accept`` (curl, old clients) gets from Distribution
a schema 1 manifest, ``application/vnd.docker.distribution.manifest.v1+prettyjws``:
the manifest JSON with a JWS ``signatures`` array spliced into it. Its
digest (``Docker-Content-Digest``) covers the JWS payload, the manifest
*without* its signatures, as Distribution's ``schema1.SignedManifest``
computes it: every signature's ``protected`` header (base64url JSON) holds
``formatLength`` and ``formatTail``, and the payload is
``body[:formatLength] + base64url_decode(formatTail)``.
"""

from __future__ import annotations

import base64
import binascii
import json

from hammal.errors import UpstreamBadResponse

#: The signed schema 1 media type (what Distribution serves).
SIGNED_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
#: Unsigned schema 1: its digest covers the body as it is.
UNSIGNED_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"


def _b64url(text: object) -> bytes:
    if not isinstance(text, str):
        raise ValueError("not a base64url string")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def signed_payload(body: bytes) -> bytes:
    """
    The bytes a signed schema 1 manifest's digest covers.

    Every signature must describe the same payload (Distribution's libtrust
    refuses manifests whose signatures disagree).

    @raise UpstreamBadResponse: when C{body} is not a signed schema 1
        manifest whose signatures agree on a payload.
    """
    try:
        signatures = json.loads(body)["signatures"]
        payloads = set()
        for signature in signatures:
            protected = json.loads(_b64url(signature["protected"]))
            length = protected["formatLength"]
            if not isinstance(length, int) or not 0 < length <= len(body):
                raise ValueError("formatLength out of range")
            payloads.add(body[:length] + _b64url(protected["formatTail"]))
    except (ValueError, KeyError, TypeError, binascii.Error) as failure:
        raise UpstreamBadResponse(f"a schema 1 manifest with unusable signatures ({failure})")
    if len(payloads) != 1:
        raise UpstreamBadResponse("a schema 1 manifest whose signatures disagree")
    return payloads.pop()


def digested_content(body: bytes, media_type: str) -> bytes:
    """What a manifest's digest is computed over, given its C{media_type}."""
    if media_type.split(";", 1)[0].strip().lower() == SIGNED_SCHEMA1:
        return signed_payload(body)
    return body
