"""
Talking to registries: the upstream client and what it needs.

L{hammal.upstream.client} sends hammal's requests to one upstream registry
(token auth from L{auth} and L{challenge}, retries from L{retry}, redirects
kept off internal addresses by L{addresses}, credentials only where L{credentials}
allows, outbound proxies from L{proxy_rules} and L{forward_proxy}, account
pools from L{accounts}, schema 1 digests from L{schema1}, pull quotas
from L{quota}); L{remote} fetches manifests upstream for the pull service
and the manifest cache; L{warmup} asks each upstream ``/v2/`` once at
start. It knows nothing of hammal's clients or caches:
the pull services above call it, and the caches beside it store what it
fetched.
"""
