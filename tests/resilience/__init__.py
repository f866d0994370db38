"""Resilience tests: hammal as a real process on 127.0.0.1 against upstream
faults, load, a redis outage and bad input.

* ``test_upstream_faults``: resets mid-blob, 5xx bursts, hanging and slow
  upstreams, a CDN that refuses ``Range``, connection refused. Each pull ends
  with the exact bytes or a clear error; nothing wrong is cached; hammal's
  file descriptors and connections come back to where they were.
* ``test_deadlines``: a token, manifest or error body that stalls (token
  auth like Docker Hub's), a 5xx with a stalled or large page before a
  ``--mirror``: a clean error within the deadlines or a failover, and the
  next pull works.
* ``test_upstream_meaning``: answers hammal cannot vouch for (no digest, no
  length) are relayed but never cached; conditionals never go upstream.
* ``test_load``: 500 concurrent client connections through one hammal; a
  slow client among fast ones.
* ``test_redis_outage``: redis killed and restarted under load (uses the
  integration environment).
* ``test_bad_input``: hypothesis over paths, names, references, digests and
  headers, plus oversized and malformed requests on raw sockets.
* ``test_harness``: the upstream below cuts transfers short only when a
  fault says so, however slowly its client reads.

The upstream of most tests is ``upstream.FaultyRegistry``, a threaded
raw-socket registry with faults on demand; ``support`` starts hammal in a
sandbox directory and holds the shared checks. Run alone with::

    PYTHONPATH=. .venv/bin/trial tests.resilience      # about a minute
"""
