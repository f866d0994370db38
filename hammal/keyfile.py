"""
The cluster key file (C{--cluster-key-file}): read and checked once at
start-up by the settings, and used by the peer endpoint's signatures
(L{hammal.cluster.peerauth}).
"""

from __future__ import annotations

#: Shortest key accepted: 32 bytes (256 bits), as HMAC-SHA256 wants.
MIN_KEY_BYTES = 32


class ClusterKeyError(ValueError):
    """The cluster key file is missing, unreadable or too short."""


def load_cluster_key(path: str) -> bytes:
    """
    The key in C{path} (surrounding whitespace removed), for example made
    with C{head -c 48 /dev/urandom | base64}.

    @raises ClusterKeyError: when it cannot be read or is shorter than
        L{MIN_KEY_BYTES}.
    """
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
    except OSError as e:
        raise ClusterKeyError(f"cannot read the cluster key file {path}: {e.strerror}")
    if len(key) < MIN_KEY_BYTES:
        raise ClusterKeyError(
            f"the cluster key in {path} is {len(key)} bytes; at least {MIN_KEY_BYTES} needed"
            " (make one with: head -c 48 /dev/urandom | base64)"
        )
    return key
