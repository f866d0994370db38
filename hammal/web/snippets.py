"""
Client configuration for the front page: containerd ``hosts.toml`` and
podman/CRI-O ``registries.conf`` for every registry this mirror serves.

Plain-HTTP mirrors need ``skip_verify``/``insecure``; with TLS those lines
are left out, so a page copied from an HTTPS mirror never weakens a client.
"""

from __future__ import annotations

import re

import attrs

from hammal.reference import is_docker_hub

#: Registry names that can be a path prefix (``HOST/ghcr.io/owner/repo``):
#: hammal routes a first path component with a dot, and a name has no ``:``.
_PREFIXABLE = re.compile(r"[a-z0-9]+(?:[.-][a-z0-9]+)*\Z")


@attrs.frozen
class ServedRegistry:
    """
    A registry the mirror serves, as clients name it.

    @ivar name: what clients call it (``docker.io``, ``ghcr.io``).
    @ivar route_host: the mirror host name routed to it (``--route``), if any.
    """

    name: str
    route_host: str | None = None

    @property
    def server(self) -> str:
        """The registry's own address, for containerd's ``server``."""
        if is_docker_hub(self.name.rsplit(":", 1)[0]):
            return "https://registry-1.docker.io"
        return f"https://{self.name}"

    @property
    def is_docker_hub(self) -> bool:
        return is_docker_hub(self.name.rsplit(":", 1)[0])


def hosts_toml(registry: ServedRegistry, host: str, secure: bool) -> str:
    """
    ``/etc/containerd/certs.d/<registry>/hosts.toml``: pull through C{host}
    (containerd says which registry with ``?ns=``, so one host serves all).
    """
    scheme = "https" if secure else "http"
    lines = [
        f'server = "{registry.server}"',
        "",
        f'[host."{scheme}://{host}"]',
        '  capabilities = ["pull", "resolve"]',
    ]
    if not secure:
        lines.append("  skip_verify = true")
    return "\n".join(lines) + "\n"


def mirror_location(registry: ServedRegistry, host: str) -> str:
    """Where podman finds C{registry} on this mirror."""
    if registry.is_docker_hub:
        return host
    if "." in registry.name and _PREFIXABLE.match(registry.name):
        return f"{host}/{registry.name}"
    if registry.route_host is not None:
        port = host.rsplit(":", 1)[1] if host.count(":") == 1 else None
        return f"{registry.route_host}:{port}" if port else registry.route_host
    return host


def registries_conf(registries: list[ServedRegistry], host: str, secure: bool) -> str:
    """``/etc/containers/registries.conf`` entries mirroring every registry."""
    blocks = []
    for registry in registries:
        name = "docker.io" if registry.is_docker_hub else registry.name
        lines = [
            "[[registry]]",
            f'location = "{name}"',
            "[[registry.mirror]]",
            f'location = "{mirror_location(registry, host)}"',
        ]
        if not secure:
            lines.append("insecure = true")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"
