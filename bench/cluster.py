"""
The cluster row of ``make bench``: 3 hammal nodes behind HAProxy (a cluster:
Redis fill leases, SeaweedFS as S3, peer streaming) against 1 node behind
the same HAProxy (and, for scale, 3 independent nodes, as before the
cluster), each with *clients* concurrent cold clients (curl) of one blob:
upstream fetches, wall time, every body complete, and each node's peak RSS.

Run alone (small, for a look)::

    PYTHONPATH=. .venv/bin/python -m bench.cluster --size-mib 16 --clients 10
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Dict, List

from bench.clients import RSSSampler, curl_many
from tests.cluster.rig import ClusterRig, MiB

REPOSITORY = "bench/cluster"


def _one(nodes: int, cluster: bool, size: int, clients: int, rate: int) -> Dict[str, Any]:
    """One setting's figures (the rig started and stopped here)."""
    rig = ClusterRig(nodes=nodes, cluster=cluster, rate=rate).start()
    try:
        digest = rig.add_blob(size, f"bench-{nodes}-{time.time_ns()}".encode())
        url = f"{rig.haproxy.url}/v2/{REPOSITORY}/blobs/{digest}"
        samplers = [
            RSSSampler(lambda n=node: [p for p in [n.pid()] if p], 0.1) for node in rig.nodes
        ]
        for sampler in samplers:
            sampler.__enter__()
        try:
            wall, results = curl_many(url, clients)
        finally:
            for sampler in samplers:
                sampler.__exit__()
        complete = sum(1 for r in results if r.code == 200 and r.size == size)
        return {
            "nodes": nodes,
            "cluster": cluster,
            "clients": clients,
            "blob_MiB": round(size / MiB, 1),
            "wall_s": round(wall, 2),
            "upstream_fetches": len(rig.upstream_gets(digest)),
            "complete": complete,
            "peak_rss_MiB_per_node": [round(s.peak, 1) for s in samplers],
        }
    finally:
        rig.stop()


def cluster_row(size: int, clients: int = 50, rate: int = 200 * MiB) -> Dict[str, Any]:
    """
    The figures: C{"one_node"} and C{"three_nodes"} (see L{_one}); C{rate}
    is the upstream's speed per transfer.
    """
    return {
        "one_node": _one(1, False, size, clients, rate),
        "three_independent": _one(3, False, size, clients, rate),
        "three_nodes": _one(3, True, size, clients, rate),
    }


def describe(figures: Dict[str, Any]) -> List[str]:
    """The report's lines for the row."""
    lines = []
    for key, label in (
        ("one_node", "1 node"),
        ("three_independent", "3 independent nodes"),
        ("three_nodes", "3 nodes (cluster)"),
    ):
        f = figures.get(key)
        if f is None:
            continue
        lines.append(
            f"{f['clients']} cold clients of a {f['blob_MiB']:.0f} MiB blob via HAProxy,"
            f" {label}: {f['wall_s']} s, upstream fetches {f['upstream_fetches']},"
            f" complete {f['complete']}/{f['clients']}, peak RSS per node MiB"
            f" {f['peak_rss_MiB_per_node']}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description="hammal's cluster row on its own")
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--clients", type=int, default=50)
    args = parser.parse_args()
    figures = cluster_row(args.size_mib * MiB, args.clients)
    print("\n".join(describe(figures)))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
