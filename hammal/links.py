"""
Tag-list pagination links as the client must follow them.

Upstream's ``Link: </v2/library/alpine/tags/list?last=b&n=1>; rel="next"``
names the repository as upstream knows it. A client that reached it through
a path prefix (``/v2/ghcr.io/owner/repo/...``), ``?ns=`` or ``?upstream=``
must stay on the same route when it follows the link, so the link is
rebuilt from the client's own name and routing parameters, keeping only
upstream's pagination (``n``, ``last``).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from hammal.replies import HeaderList

_LINK = re.compile(r"^\s*<([^>]*)>\s*(;.*)?$")
_PAGINATION = ("n", "last")


def client_link(value: bytes, client_name: str, routing: list[tuple[str, str]]) -> bytes | None:
    """
    C{value} (a ``Link`` header from upstream) pointing at C{client_name}'s
    tag list with C{routing} (``ns``, ``upstream``) kept; L{None} when it
    is not a link hammal understands.
    """
    match = _LINK.match(value.decode("latin-1"))
    if match is None:
        return None
    target, parameters = match.group(1), match.group(2) or ""
    query = [(k, v) for k, v in parse_qsl(urlsplit(target).query) if k in _PAGINATION]
    path = f"/v2/{quote(client_name, safe='/')}/tags/list"
    combined = urlencode(query + routing)
    link = f"<{path}{'?' + combined if combined else ''}>{parameters}"
    return link.encode("latin-1", "replace")


def rewrite_links(
    headers: HeaderList, client_name: str, routing: list[tuple[str, str]]
) -> HeaderList:
    """C{headers} with every tag-list ``Link`` rewritten by L{client_link}."""
    rewritten: HeaderList = []
    for name, values in headers:
        if name == b"link":
            links = [client_link(value, client_name, routing) for value in values]
            values = [link for link in links if link is not None]
            if not values:
                continue
        rewritten.append((name, values))
    return rewritten
