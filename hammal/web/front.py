"""
The front page: copy-paste client configuration for this very host, or a
redirect (``--url302``). The ``Host`` header is client input: it is
validated and HTML-escaped before it appears in the page.
"""

from __future__ import annotations

import functools
import html
import re
from typing import Sequence

from twisted.web.resource import Resource
from twisted.web.server import Request

from hammal.web.snippets import ServedRegistry, hosts_toml, registries_conf

_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}(?::\d{1,5})?\Z|\[[0-9A-Fa-f:.]{2,45}\](?::\d{1,5})?\Z")

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hammal registry mirror</title>
<style>body{{font-family:sans-serif;max-width:52em;margin:2em auto;padding:0 1em}}
pre{{background:#f4f4f4;padding:.8em;overflow-x:auto}}</style></head><body>
<h1>hammal registry mirror</h1>
<p>This host mirrors container images from {served}. Pull through it with any client:</p>
{docker}<h2>podman, CRI-O, skopeo</h2>
<p><code>/etc/containers/registries.conf</code>:</p>
<pre>{registries_conf}</pre>
<h2>containerd</h2>
{containerd}</body></html>
"""

_DOCKER = """<h2>Docker</h2>
<p><code>/etc/docker/daemon.json</code>, then restart the daemon:</p>
<pre>{{"registry-mirrors": ["{scheme}://{host}"]}}</pre>
<p>or name the mirror directly:</p>
<pre>docker pull {host}/library/alpine:latest</pre>
"""

_CONTAINERD = """<p><code>/etc/containerd/certs.d/{name}/hosts.toml</code>:</p>
<pre>{hosts_toml}</pre>
"""

#: What a mirror of the default upstream serves when nothing else is said.
DOCKER_HUB_ONLY = (ServedRegistry("docker.io"),)


def front_page(
    host: str, secure: bool, registries: Sequence[ServedRegistry] = DOCKER_HUB_ONLY
) -> bytes:
    """
    The page for C{host}, with client configuration for every registry
    served; an invalid Host header becomes a placeholder.
    """
    if not _HOST.match(host):
        host = "mirror.example.com"
    scheme = "https" if secure else "http"
    # Text inside <pre> and <code>: quotes stay readable, markup cannot start.
    escape = functools.partial(html.escape, quote=False)
    served = list(registries)
    docker = any(r.is_docker_hub for r in served)
    containerd = "".join(
        _CONTAINERD.format(name=escape(r.name), hosts_toml=escape(hosts_toml(r, host, secure)))
        for r in served
    )
    return _PAGE.format(
        served=", ".join(escape(r.name) for r in served),
        docker=_DOCKER.format(scheme=scheme, host=escape(host)) if docker else "",
        registries_conf=escape(registries_conf(served, host, secure)),
        containerd=containerd,
    ).encode()


class FrontPage(Resource):
    """``/``: usage for this host, or a redirect to C{url302}."""

    isLeaf = True

    def __init__(
        self, url302: str | None = None, registries: Sequence[ServedRegistry] = DOCKER_HUB_ONLY
    ) -> None:
        super().__init__()
        self._url302 = url302
        self._registries = tuple(registries)

    def render_GET(self, request: Request) -> bytes:
        if self._url302 is not None:
            request.setResponseCode(302)
            request.setHeader(b"location", self._url302.encode())
            return b""
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(
            b"content-security-policy", b"default-src 'none'; style-src 'unsafe-inline'"
        )
        return front_page(host, request.isSecure(), self._registries)

    render_HEAD = render_GET
