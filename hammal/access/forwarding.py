"""
Which header a trusted reverse proxy writes the client's address into.

A proxy writes one family of headers and passes the other through from its
client untouched: the family the operator did not name
(C{--forwarded-header}) is the client's own word and is never read.

- C{x-forwarded} (the default): C{X-Forwarded-For}, C{-Proto}, C{-Host},
  C{-Port} (nginx, HAProxy, Envoy, most CDNs).
- C{forwarded}: RFC 7239's C{Forwarded} (C{for=}, C{proto=}, C{host=}).
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

#: The header families C{--forwarded-header} may name.
FORWARDED_HEADERS = ("x-forwarded", "forwarded")

_PAIR = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)\s*')


def parse_forwarded(values: Sequence[str]) -> list[dict[str, str]]:
    """
    The elements of ``Forwarded`` header values, each a dict of lower-case
    parameter names to unquoted values. A malformed element ends the list.
    """
    elements: list[dict[str, str]] = []
    text = ",".join(values)
    position = 0
    element: dict[str, str] = {}
    while position < len(text):
        match = _PAIR.match(text, position)
        if match is None:
            break
        value = match.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        element[match.group(1).lower()] = value
        position = match.end()
        if position < len(text) and text[position] == ";":
            position += 1
        elif position >= len(text) or text[position] == ",":
            elements.append(element)
            element = {}
            position += 1
        else:
            break
    return elements


def node_address(node: str) -> str:
    """A ``for=`` node without brackets or port (``[::1]:80`` -> ``::1``)."""
    node = node.strip()
    if node.startswith("["):
        return node[1:].split("]", 1)[0]
    if node.count(":") == 1:
        return node.split(":", 1)[0]
    return node


def forwarded_for(headers: Mapping[str, Sequence[str]], family: str) -> list[str]:
    """
    The addresses a proxy reports in front of it, oldest first, from the
    C{family} of headers alone (header names in lower case).
    """
    if family == "forwarded":
        elements = parse_forwarded(headers.get("forwarded", []))
        return [node_address(e["for"]) for e in elements if "for" in e]
    return [entry for value in headers.get("x-forwarded-for", []) for entry in value.split(",")]
