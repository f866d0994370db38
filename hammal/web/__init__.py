"""
The resource tree: routing and HTTP translation, no registry logic.

- L{root}: ``/``, ``/healthz``, ``/readyz``, ``/metrics``.
- L{v2}: ``/v2`` and its base; L{auth}: ``/v2/auth``, ``/v2/token``;
  L{repository}: ``/v2/<name>/(manifests|blobs|tags|referrers)/...``;
  L{endpoint}: what they share; L{routes}: ``/v2/...`` paths parsed into
  routes.
- L{respond}: the one place that writes documents, errors and streams.
- L{state}: the typed record of one request (route, upstream, trace...).
- L{gate}: client authentication and access rules.
- L{site}: the HTTP factory (access log, header limits), L{limits},
  L{forwarded}, L{health}, L{status}, L{front}, L{snippets}.

Resources hand a pull to L{hammal.pull.service.PullService} and write what it
returns; nothing here knows about Redis or cache files.
"""
