"""
Passthrough's upstream I/O, in the pull layer: logging a client in at the
upstream's token realm with its own credentials, and asking upstream
whether a client's token may read an object.

The gate (L{hammal.web.gate}) decides what the answers mean for the client
(throttling, allowed users, challenges); this module only talks upstream.
"""

from __future__ import annotations

from urllib.parse import urlencode, urlsplit

import attrs
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from hammal.errors import UpstreamBadResponse
from hammal.pull.service import PullService
from hammal.reference import rewrite_scope
from hammal.upstream.challenge import Challenge, select_challenge
from hammal.upstream.client import Trace

#: The largest token response hammal relays.
MAX_TOKEN_RESPONSE = 1024 * 1024


@attrs.frozen
class UpstreamAnswer:
    """
    What upstream answered, read whole.

    @ivar where: the host that answered (the realm's, for a login).
    @ivar insufficient_scope: a 401 said the token lacks the scope.
    """

    status: int
    body: bytes
    where: str
    response: IResponse
    insufficient_scope: bool = False


async def upstream_challenge(proxy: PullService) -> Challenge:
    """
    The bearer challenge of C{proxy}'s upstream.

    @raise UpstreamBadResponse: when upstream does not use token auth.
    """
    response = await proxy.client.send_direct(b"GET", f"{proxy.client.upstream.url}/v2/", Headers())
    await proxy.client.discard(response)
    challenge = select_challenge(
        v.decode("latin-1") for v in response.headers.getRawHeaders(b"www-authenticate", [])
    )
    if challenge is None or challenge.scheme != "bearer":
        raise UpstreamBadResponse("upstream does not use token authentication")
    return challenge


async def forward_login(
    proxy: PullService, authorization: bytes | None, scopes: list[str]
) -> UpstreamAnswer:
    """
    Ask C{proxy}'s upstream token realm for a token with the client's own
    C{authorization}, for C{scopes} (already without a registry prefix;
    rewritten here like names).

    @raise UpstreamBadResponse: when upstream offers no realm to log in to.
    """
    challenge = await upstream_challenge(proxy)
    realm = challenge.realm or ""
    parts = urlsplit(realm)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamBadResponse("upstream offers no token realm to log in to")
    query = [("service", challenge.service or "")] if challenge.service else []
    query += [("scope", rewrite_scope(s, proxy.library_prefix)) for s in scopes]
    headers = Headers({b"accept": [b"application/json"]})
    if authorization is not None:
        headers.setRawHeaders(b"authorization", [authorization])
    separator = "&" if parts.query else "?"
    response = await proxy.client.send_direct(
        b"GET", realm + (separator + urlencode(query) if query else ""), headers
    )
    body = await proxy.client.fetch_document(response, MAX_TOKEN_RESPONSE)
    return UpstreamAnswer(response.code, body, parts.hostname, response)


async def probe_access(
    proxy: PullService, upstream_name: str, path: str, headers: Headers, authorization: bytes
) -> UpstreamAnswer:
    """
    A C{HEAD} of C{path} of C{upstream_name} with the client's token:
    whether upstream lets it read the object. C{headers} are the ones going
    upstream (their ``Accept`` matters: Distribution hides OCI manifests
    from clients that do not accept them).
    """
    probe = headers.copy()
    probe.removeHeader(b"range")
    probe.setRawHeaders(b"authorization", [authorization])
    response = await proxy.client.request(
        b"HEAD", upstream_name, path, probe, Trace(), follow_redirects=False
    )
    body = await proxy.client.fetch_document(response, 64 * 1024)
    insufficient = False
    if response.code == 401:
        said = select_challenge(
            v.decode("latin-1") for v in response.headers.getRawHeaders(b"www-authenticate", [])
        )
        insufficient = said is not None and said.params.get("error") == "insufficient_scope"
    return UpstreamAnswer(response.code, body, proxy.upstream_host, response, insufficient)
