"""
Cluster parts against real processes: redis-server, SeaweedFS (S3) and
HAProxy, each started on free loopback ports by :mod:`tests.cluster.harness`.
"""
