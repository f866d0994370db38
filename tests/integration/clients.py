"""Real container clients configured to use hammal as a ``docker.io`` mirror.

* :class:`Containerd`: a private ``containerd`` daemon (its own root, state
  and socket under a temp dir; no CRI) driven with ``ctr``; pulls use a
  ``--hosts-dir`` whose ``docker.io/hosts.toml`` names the mirror, as
  operators configure ``/etc/containerd/certs.d``.
* :func:`podman_pull`: ``podman pull`` with its own ``--root``/``--runroot``
  and a ``registries.conf`` mirroring ``docker.io``.

Neither can reach the real Docker Hub from here (loopback only), so a pull
that succeeds came through the mirror. Both need root (as the test machines
run), the Debian packages ``containerd`` and ``podman``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import List, Optional

from tests.integration.environment import (
    ManagedProcess,
    clean_env,
    make_tempdir,
    wait_until,
)

CTR_BIN = shutil.which("ctr") or "/usr/bin/ctr"
CONTAINERD_BIN = shutil.which("containerd") or "/usr/bin/containerd"
PODMAN_BIN = shutil.which("podman") or "/usr/bin/podman"

#: The real Hub is never reachable from the tests; this makes sure a
#: fallback to the upstream ``server`` fails at once instead of resolving.
UNREACHABLE_SERVER = "http://127.0.0.1:9"


def missing_clients() -> List[str]:
    """The client programs these tests need that are not installed."""
    return [b for b in (CTR_BIN, CONTAINERD_BIN, PODMAN_BIN) if not os.access(b, os.X_OK)]


def hosts_toml(mirror: str, server: str = UNREACHABLE_SERVER) -> str:
    """``hosts.toml`` for a registry namespace whose pulls go to *mirror* first."""
    return (
        f'server = "{server}"\n\n'
        f'[host."{mirror}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
        "  skip_verify = true\n"
    )


class Containerd:
    """A throwaway containerd daemon, stopped by :meth:`stop`."""

    def __init__(self) -> None:
        self.dir = make_tempdir("hammal-it-containerd-")
        self.socket = os.path.join(self.dir, "containerd.sock")
        config = os.path.join(self.dir, "config.toml")
        with open(config, "w") as f:
            f.write(
                "version = 2\n"
                f'root = "{self.dir}/root"\n'
                f'state = "{self.dir}/state"\n'
                'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                f'[grpc]\n  address = "{self.socket}"\n'
                f'[ttrpc]\n  address = "{self.socket}.ttrpc"\n'
                '[debug]\n  address = ""\n'
                '[metrics]\n  address = ""\n'
            )
        self.process = ManagedProcess(
            "containerd",
            [CONTAINERD_BIN, "--config", config],
            os.path.join(self.dir, "containerd.log"),
        ).start()
        wait_until(lambda: self.ctr("version").returncode == 0, "containerd", 30, self.process)

    def ctr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address SOCKET ARGS``."""
        return subprocess.run(
            [CTR_BIN, "--address", self.socket, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=clean_env(),
        )

    def pull_through(
        self, mirror: str, image: str, namespace: str = "docker.io", hosts: Optional[str] = None
    ) -> subprocess.CompletedProcess[str]:
        """
        ``ctr images pull --hosts-dir DIR NAMESPACE/IMAGE`` with *mirror*
        (``http://127.0.0.1:PORT``) as the namespace's mirror. Content is
        fetched for every platform and not unpacked (no snapshotter needed).
        """
        hosts_dir = make_tempdir("hammal-it-certs.d-")
        os.makedirs(os.path.join(hosts_dir, namespace))
        with open(os.path.join(hosts_dir, namespace, "hosts.toml"), "w") as f:
            f.write(hosts if hosts is not None else hosts_toml(mirror))
        return self.ctr(
            "images",
            "pull",
            "--snapshotter",
            "native",
            "--hosts-dir",
            hosts_dir,
            f"{namespace}/{image}",
        )

    def image_digest(self, reference: str) -> Optional[str]:
        """The digest containerd stored for *reference*, if any."""
        listing = self.ctr("images", "ls")
        for line in listing.stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == reference:
                for field in fields:
                    if field.startswith("sha256:"):
                        return field
        return None

    def stop(self) -> None:
        self.process.stop()


def registries_conf(mirror_location: str, insecure: bool = True) -> str:
    """``registries.conf`` naming *mirror_location* (``HOST:PORT``) for docker.io."""
    return (
        'unqualified-search-registries = ["docker.io"]\n\n'
        "[[registry]]\n"
        'location = "docker.io"\n'
        "[[registry.mirror]]\n"
        f'location = "{mirror_location}"\n' + ("insecure = true\n" if insecure else "")
    )


def podman(
    workdir: str, registries: str, *args: str, timeout: float = 180.0
) -> subprocess.CompletedProcess[str]:
    """Run podman with its own storage under *workdir* and *registries* as registries.conf."""
    conf = os.path.join(workdir, "registries.conf")
    with open(conf, "w") as f:
        f.write(registries)
    auth = os.path.join(workdir, "auth.json")
    if not os.path.exists(auth):
        with open(auth, "w") as f:
            f.write('{"auths": {}}')
    run = os.path.join(workdir, "run")
    os.makedirs(run, mode=0o700, exist_ok=True)
    env = clean_env(
        CONTAINERS_REGISTRIES_CONF=conf,
        REGISTRY_AUTH_FILE=auth,
        XDG_RUNTIME_DIR=run,
        HOME=workdir,
    )
    argv = [
        PODMAN_BIN,
        "--root",
        os.path.join(workdir, "root"),
        "--runroot",
        os.path.join(workdir, "runroot"),
        "--storage-driver",
        "vfs",
        "--cgroup-manager",
        "cgroupfs",
        "--events-backend",
        "file",
        *args,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
