"""hammal's benchmark harness: ``python -m bench.run [--quick]``.

Everything runs on 127.0.0.1: a Docker-Hub-like upstream (token server,
token-auth Distribution redirecting blobs to an nginx "CDN"), and side by
side the three things measured: hammal, nginx ``proxy_pass`` (the limit
reference, no cache) and Distribution as a pull-through cache (the peer).
See ``bench/README.rst``.
"""
