"""
Errors hammal reports to clients, as types.

Each type carries the OCI distribution-spec error code and the HTTP status
that goes with it; :mod:`hammal.web.respond` turns them into the
``{"errors": [...]}`` body in one place. Code that detects a problem raises
one of these and never writes an HTTP response itself.
"""

from __future__ import annotations

from typing import Any, ClassVar


class RegistryError(Exception):
    """
    A failure with an OCI error code, an HTTP status and a message for the
    client.

    @ivar headers: extra response headers (for example ``Retry-After``).
    """

    code: ClassVar[str] = "UNKNOWN"
    status: ClassVar[int] = 500

    def __init__(
        self,
        message: str,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers: dict[str, str] = dict(headers or {})

    def as_dict(self) -> dict[str, Any]:
        """The error as one entry of an OCI ``errors`` list."""
        entry: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            entry["detail"] = self.detail
        return entry


class NameInvalid(RegistryError):
    code = "NAME_INVALID"
    status = 400


class TagInvalid(RegistryError):
    code = "TAG_INVALID"
    status = 400


class DigestInvalid(RegistryError):
    code = "DIGEST_INVALID"
    status = 400


class RangeInvalid(RegistryError):
    code = "RANGE_INVALID"
    status = 416


class Unsupported(RegistryError):
    """The operation is not offered by a pull-only mirror (push, delete)."""

    code = "UNSUPPORTED"
    status = 405


class NotFound(RegistryError):
    """The path is not part of the registry API."""

    code = "UNSUPPORTED"
    status = 404


class Denied(RegistryError):
    code = "DENIED"
    status = 403


class Unauthorized(RegistryError):
    code = "UNAUTHORIZED"
    status = 401


class UpstreamError(RegistryError):
    """
    Upstream answered with an error of its own; hammal relays its status,
    code and message.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, detail, headers)
        self.status = status  # type: ignore[misc]
        self.code = code  # type: ignore[misc]


class TooManyRequests(RegistryError):
    code = "TOOMANYREQUESTS"
    status = 429


class UpstreamUnavailable(RegistryError):
    """Upstream could not be reached, or broke the connection."""

    code = "UNAVAILABLE"
    status = 502


class UpstreamTimeout(RegistryError):
    """Upstream stayed silent for longer than the read timeout."""

    code = "UNAVAILABLE"
    status = 504


class UpstreamBadResponse(RegistryError):
    """Upstream sent something that is not what was asked for."""

    code = "UNAVAILABLE"
    status = 502


class NotCachedUpstreamDown(RegistryError):
    """
    A blob the cache does not hold while upstream cannot be reached (a
    manifest served stale names it): a clear ``503`` with ``Retry-After``,
    not an upstream's ``502``.
    """

    code = "UNAVAILABLE"
    status = 503
