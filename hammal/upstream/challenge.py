"""
Parsing of ``WWW-Authenticate`` challenges (RFC 7235) from upstream
registries: ``Bearer realm="...",service="...",scope="..."`` and
``Basic realm="..."``.
"""

from __future__ import annotations

import re
from typing import Iterable

import attrs

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_PARAM = re.compile(rf"\s*({_TOKEN})\s*=\s*({_QUOTED}|{_TOKEN})\s*(,|\Z)")
_SCHEME = re.compile(rf"\s*,?\s*({_TOKEN})(?:\s+|(?=,)|\Z)")
_UNESCAPE = re.compile(r"\\(.)")


@attrs.frozen
class Challenge:
    """
    One authentication challenge.

    @ivar scheme: lower-cased scheme (``bearer``, ``basic``).
    @ivar params: auth parameters, names lower-cased.
    """

    scheme: str
    params: dict[str, str] = attrs.field(factory=dict, hash=False)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")

    @property
    def service(self) -> str | None:
        return self.params.get("service")

    @property
    def scope(self) -> str | None:
        return self.params.get("scope")


def parse_challenges(header: str) -> list[Challenge]:
    """
    Parse one ``WWW-Authenticate`` header value into its challenges.

    Malformed trailing input is ignored rather than raised: a challenge is a
    hint from upstream, and a garbled one means "no usable challenge".
    """
    challenges: list[Challenge] = []
    position = 0
    while position < len(header):
        scheme_match = _SCHEME.match(header, position)
        if scheme_match is None:
            break
        scheme = scheme_match.group(1).lower()
        position = scheme_match.end()
        params: dict[str, str] = {}
        while position < len(header):
            param_match = _PARAM.match(header, position)
            if param_match is None:
                break
            name, value = param_match.group(1).lower(), param_match.group(2)
            if value.startswith('"'):
                value = _UNESCAPE.sub(r"\1", value[1:-1])
            params[name] = value
            position = param_match.end()
        challenges.append(Challenge(scheme, params))
    return challenges


def select_challenge(headers: Iterable[str]) -> Challenge | None:
    """
    Pick the challenge hammal answers from all ``WWW-Authenticate`` values:
    Bearer with a realm first, then Basic.
    """
    parsed = [c for value in headers for c in parse_challenges(value)]
    for scheme in ("bearer", "basic"):
        for challenge in parsed:
            if challenge.scheme == scheme and (scheme == "basic" or challenge.realm):
                return challenge
    return None
