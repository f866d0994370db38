"""
Upstream pull quotas (Docker Hub's ``ratelimit-remaining``), per upstream
and account, for the status page.

Docker Hub answers manifest requests with::

    ratelimit-limit: 100;w=21600
    ratelimit-remaining: 76;w=21600

hammal feeds every such answer into a L{QuotaBoard}, keyed by the upstream
host and the *account* the request used: a non-secret name chosen by the
caller (``anonymous`` without credentials). An account pool can feed the
same board: L{QuotaBoard.register} lists an account before upstream has
said anything about it, L{QuotaBoard.observe} records what upstream said,
L{QuotaBoard.rest} marks an account resting until its window resets.
Nothing here is secret: account names must never be passwords or tokens.
"""

from __future__ import annotations

from typing import Iterable

import attrs

#: The account of requests made without credentials.
ANONYMOUS = "anonymous"

#: The most (upstream, account) entries kept: a pool is small, and only
#: configured upstreams are ever contacted.
MAX_ENTRIES = 256


@attrs.frozen
class Quota:
    """
    What is known of one account's quota at one upstream.

    @ivar remaining: pulls left in the window, L{None} until upstream said.
    @ivar limit: pulls allowed per window, if upstream said.
    @ivar window: the window's length in seconds, if upstream said.
    @ivar observed_at: when upstream last said (clock seconds).
    @ivar resting_until: when a resting account may be used again.
    """

    upstream: str
    account: str
    remaining: int | None = None
    limit: int | None = None
    window: float | None = None
    observed_at: float | None = None
    resting_until: float | None = None


def parse_ratelimit(value: str | None) -> tuple[int, float | None] | None:
    """C{"76;w=21600"} → C{(76, 21600.0)}; L{None} when not a count."""
    if value is None:
        return None
    count, _, parameters = value.partition(";")
    count = count.strip()
    if not count.isdigit() or len(count) > 12:
        return None
    window: float | None = None
    for parameter in parameters.split(";"):
        name, _, text = parameter.strip().partition("=")
        if name.strip().lower() == "w" and text.strip().isdigit():
            window = float(text.strip())
    return int(count), window


class QuotaBoard:
    """The latest quota of each (upstream, account), bounded in size."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._entries: dict[tuple[str, str], Quota] = {}
        self._max_entries = max_entries

    def _put(self, quota: Quota) -> None:
        key = (quota.upstream, quota.account)
        if key not in self._entries and len(self._entries) >= self._max_entries:
            return
        self._entries[key] = quota

    def _get(self, upstream: str, account: str) -> Quota:
        return self._entries.get((upstream, account)) or Quota(upstream, account)

    def register(self, upstream: str, account: str = ANONYMOUS) -> None:
        """List C{account} at C{upstream}, quota unknown until upstream says."""
        if (upstream, account) not in self._entries:
            self._put(Quota(upstream, account))

    def observe(
        self,
        upstream: str,
        account: str,
        remaining: int,
        at: float,
        limit: int | None = None,
        window: float | None = None,
    ) -> None:
        """Record that upstream said C{account} has C{remaining} pulls left."""
        known = self._get(upstream, account)
        self._put(
            attrs.evolve(
                known,
                remaining=remaining,
                limit=limit if limit is not None else known.limit,
                window=window if window is not None else known.window,
                observed_at=at,
            )
        )

    def observe_headers(
        self, upstream: str, account: str, headers: Iterable[tuple[str, str]], at: float
    ) -> bool:
        """
        Record Docker Hub's ``ratelimit-*`` headers from C{headers}
        (name, value pairs); C{True} when they held a remaining count.
        """
        values = {name.lower(): value for name, value in headers}
        remaining = parse_ratelimit(values.get("ratelimit-remaining"))
        if remaining is None:
            return False
        limit = parse_ratelimit(values.get("ratelimit-limit"))
        self.observe(
            upstream,
            account,
            remaining[0],
            at,
            limit=limit[0] if limit is not None else None,
            window=remaining[1] if remaining[1] is not None else (limit[1] if limit else None),
        )
        return True

    def rest(self, upstream: str, account: str, until: float | None) -> None:
        """Mark C{account} resting until C{until} (L{None}: no longer resting)."""
        self._put(attrs.evolve(self._get(upstream, account), resting_until=until))

    def quotas(self) -> list[Quota]:
        """Every entry, by upstream then account (anonymous last)."""
        return sorted(
            self._entries.values(),
            key=lambda q: (q.upstream, q.account == ANONYMOUS, q.account),
        )


#: The process's board, fed by every upstream client (like the metrics
#: registry); tests give a client a board of their own.
QUOTAS = QuotaBoard()
