"""
Repository names, tags, digests and token scopes: parsing and validation.

The grammar is the OCI distribution-spec's. Everything a client sends in a
path goes through here before it reaches upstream or the cache, so a name
that passes cannot traverse directories or smuggle URL syntax.
"""

from __future__ import annotations

import hashlib
import re
from typing import Union
from urllib.parse import urlsplit

import attrs

from hammal.errors import DigestInvalid, NameInvalid, TagInvalid

MAX_NAME_LENGTH = 255

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*\Z")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
_LOWER_HEX = re.compile(r"[0-9a-f]+")
_DIGEST = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):([A-Za-z0-9=_-]+)\Z")

#: Digest algorithms hammal can verify, with their hex length.
DIGEST_HEX_LENGTHS: dict[str, int] = {"sha256": 64, "sha512": 128}

#: Hosts that mean Docker Hub, where one-part names live under ``library/``.
DOCKER_HUB_HOSTS = frozenset(
    {"registry-1.docker.io", "docker.io", "index.docker.io", "registry.hub.docker.com"}
)


@attrs.frozen
class Digest:
    """A content digest such as ``sha256:<64 hex>``."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """
        Parse and validate C{text}.

        @raise DigestInvalid: for anything but a well-formed sha256/sha512
            digest in lower-case hex.
        """
        match = _DIGEST.match(text)
        if match is None:
            raise DigestInvalid(f"invalid digest: {text[:200]!r}")
        algorithm, value = match.groups()
        length = DIGEST_HEX_LENGTHS.get(algorithm)
        if length is None:
            raise DigestInvalid(f"unsupported digest algorithm: {algorithm[:32]!r}")
        if len(value) != length or _LOWER_HEX.fullmatch(value) is None:
            raise DigestInvalid(
                f"invalid {algorithm} digest: expected {length} lower-case hex characters"
            )
        return cls(algorithm, value)

    def hasher(self) -> "hashlib._Hash":
        """A fresh hash object of this digest's algorithm."""
        return hashlib.new(self.algorithm)

    def matches(self, hasher: "hashlib._Hash") -> bool:
        """Whether C{hasher}'s digest so far equals this digest."""
        return hasher.hexdigest() == self.hex

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        """The digest of C{data}."""
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


Reference = Union[Digest, str]
"""A manifest reference: a L{Digest}, or a tag as a L{str}."""


def validate_name(name: str) -> str:
    """
    Return C{name} if it is a valid repository name.

    @raise NameInvalid: otherwise (grammar, length, empty or ``..`` parts,
        upper case).
    """
    if not name:
        raise NameInvalid("repository name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise NameInvalid(f"repository name is longer than {MAX_NAME_LENGTH} characters")
    if _NAME.match(name) is None:
        raise NameInvalid(
            f"invalid repository name: {name[:100]!r}",
            detail={"name": name[:MAX_NAME_LENGTH]},
        )
    return name


def parse_tag(tag: str) -> str:
    """
    Return C{tag} if it is a valid tag.

    @raise TagInvalid: otherwise.
    """
    if _TAG.match(tag) is None:
        raise TagInvalid(f"invalid tag: {tag[:140]!r}")
    return tag


def parse_reference(text: str) -> Reference:
    """
    Parse a manifest reference: a digest if it contains ``:``, else a tag.
    """
    if ":" in text:
        return Digest.parse(text)
    return parse_tag(text)


def is_docker_hub(host: str) -> bool:
    """Whether C{host} is one of Docker Hub's registry hosts."""
    return host.lower() in DOCKER_HUB_HOSTS


def registry_names(url: str, stands_for: str | None = None) -> frozenset[str]:
    """
    The names clients use for the registry at C{url}: its own ``host[:port]``,
    the registry it was configured to stand for (``docker.io=URL``), and all
    of Docker Hub's host names when either is the Hub.
    """
    parts = urlsplit(url)
    names = {(parts.netloc or "").lower()}
    hub = is_docker_hub(parts.hostname or "")
    if stands_for:
        names.add(stands_for.lower())
        hub = hub or is_docker_hub(stands_for.rsplit(":", 1)[0])
    if hub:
        names |= DOCKER_HUB_HOSTS
    return frozenset(names)


def upstream_name(name: str, library_prefix: bool) -> str:
    """
    The name upstream knows C{name} by: one-part names gain ``library/``
    when C{library_prefix} is on (Docker Hub's official images).
    """
    if library_prefix and "/" not in name:
        return f"library/{name}"
    return name


def pull_scope(name: str) -> str:
    """The token scope that allows pulling C{name}."""
    return f"repository:{name}:pull"


def rewrite_scope(scope: str, library_prefix: bool) -> str:
    """
    Rewrite the repository in a token scope (``repository:alpine:pull``) the
    way L{upstream_name} rewrites names. Other scopes pass unchanged.
    """
    parts = scope.split(":")
    if len(parts) >= 3 and parts[0] == "repository":
        name = ":".join(parts[1:-1])
        return f"repository:{upstream_name(name, library_prefix)}:{parts[-1]}"
    return scope
