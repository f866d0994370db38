"""The targets a benchmark run is judged by, one PASS/MISS line each.

Issue 12's targets come first (cold pulls at the speed of the hash), then
issue 14's (``--workers``); the earlier ones (warm hits, manifests under
wrk, slow clients) follow. A
figure a run did not measure gives no line; a figure that could not be
measured (hammal refusing an option, say) gives a line saying so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

#: Targets of issue 12, in the figures' units.
COLD_VS_DISTRIBUTION = 1.0
COLD_VS_SHA256 = 0.85
NO_HOLD_TAIL_VS_NGINX = 0.8
TTFB_VS_DISTRIBUTION = 1.0
CONCURRENT_WALL_VS_DISTRIBUTION = 0.5
CONCURRENT_PEAK_RSS_MIB = 150
CROWD_MANIFEST_P99_MS = 50
#: Issue 14: manifest req/s with 2 workers against 1, and their p99.
WORKERS_SPEEDUP = 1.4
WORKERS_P99_MS = 20

#: The key of the ``--no-hold-tail`` hammal in the cold figures.
NO_HOLD_TAIL = "hammal --no-hold-tail"


@dataclass
class Verdict:
    """One target: what was measured against what was asked."""

    target: str
    value: Optional[float]
    goal: str
    verdict: str  # PASS, MISS or "not available"
    detail: str
    issue: str = "12"

    def line(self) -> str:
        shown = "-" if self.value is None else f"{self.value:g}"
        return (
            f"[{self.verdict:<4}] {self.target:<58} {shown:>8}  goal {self.goal:<12} {self.detail}"
        )

    def as_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or not b or (isinstance(a, float) and math.isnan(a)):
        return None
    return round(a / b, 2)


def _judge(ok: Optional[bool]) -> str:
    return "not available" if ok is None else ("PASS" if ok else "MISS")


def judge(
    figures: Dict[str, Any],
    sha256_MBps: float,
    many_slow: int = 500,
) -> List[Verdict]:
    """Every target the figures allow judging, issue 12's first."""
    rows: List[Verdict] = []

    def add(
        target: str,
        value: Optional[float],
        goal: str,
        ok: Optional[bool],
        detail: str,
        issue: str = "12",
    ) -> None:
        rows.append(Verdict(target, value, goal, _judge(ok), detail, issue))

    cold = figures.get("cold_MBps")
    if cold:
        hammal = cold["hammal"]["median"]
        dist = cold["distribution"]["median"]
        nginx = cold["nginx"]["median"]
        r = _ratio(hammal, dist)
        add(
            "cold blob: hammal / Distribution",
            r,
            f">= {COLD_VS_DISTRIBUTION}x",
            None if r is None else r >= COLD_VS_DISTRIBUTION,
            f"{hammal:.0f} vs {dist:.0f} MB/s",
        )
        r = _ratio(hammal, sha256_MBps)
        detail = f"{hammal:.0f} vs {sha256_MBps:.0f} MB/s"
        ceiling = (figures.get("hashing_client_MBps") or {}).get("nginx", {}).get("median")
        if ceiling is not None:
            detail += (
                f"; nginx + a hashing client: {ceiling:.0f}"
                f" ({_ratio(ceiling, sha256_MBps)}x, the ceiling of a hashing proxy here)"
            )
        add(
            "cold blob: hammal / sha256 on one core",
            r,
            f">= {COLD_VS_SHA256}x",
            None if r is None else r >= COLD_VS_SHA256,
            detail,
        )
        nht = figures.get("no_hold_tail", {})
        if NO_HOLD_TAIL in cold and cold[NO_HOLD_TAIL]["median"] is not None:
            value = cold[NO_HOLD_TAIL]["median"]
            r = _ratio(value, nginx)
            add(
                "cold blob --no-hold-tail: hammal / nginx",
                r,
                f">= {NO_HOLD_TAIL_VS_NGINX}x",
                None if r is None else r >= NO_HOLD_TAIL_VS_NGINX,
                f"{value:.0f} vs {nginx:.0f} MB/s",
            )
        else:
            add(
                "cold blob --no-hold-tail: hammal / nginx",
                None,
                f">= {NO_HOLD_TAIL_VS_NGINX}x",
                None,
                nht.get("reason", "not measured"),
            )
    ttfb = figures.get("ttfb_ms")
    if ttfb:
        hammal = ttfb["hammal"]["median"]
        dist = ttfb["distribution"]["median"]
        r = _ratio(hammal, dist)
        add(
            "cold blob time to first byte: hammal / Distribution",
            r,
            f"<= {TTFB_VS_DISTRIBUTION}x",
            None if r is None else r <= TTFB_VS_DISTRIBUTION,
            f"{hammal} vs {dist} ms",
        )
    conc = figures.get("concurrent_cold")
    if conc:
        h, d = conc["hammal"], conc["distribution"]
        r = _ratio(h["median_wall_s"], d["median_wall_s"])
        add(
            "50 concurrent cold: wall hammal / Distribution",
            r,
            f"<= {CONCURRENT_WALL_VS_DISTRIBUTION}x",
            None if r is None else r <= CONCURRENT_WALL_VS_DISTRIBUTION,
            f"{h['median_wall_s']:.1f} vs {d['median_wall_s']:.1f} s",
        )
        add(
            "50 concurrent cold: upstream fetches by hammal (worst run)",
            h["max_cdn_gets"],
            "== 1",
            h["max_cdn_gets"] == 1,
            f"runs {h['cdn_gets']} (Distribution {d['cdn_gets']})",
        )
        peak = max(h["peak_rss_MiB"])
        add(
            "50 concurrent cold: hammal peak RSS MiB (worst run)",
            peak,
            f"< {CONCURRENT_PEAK_RSS_MIB}",
            peak < CONCURRENT_PEAK_RSS_MIB,
            f"runs {h['peak_rss_MiB']}",
        )
    crowd = figures.get("crowd")
    if crowd:
        probe = crowd["probe"]
        p99 = probe["p99_ms"]
        measured = probe["requests"] > 0 and not math.isnan(p99)
        ok = measured and p99 < CROWD_MANIFEST_P99_MS and probe["errors"] == 0
        held = crowd["readers"]["held_open"]
        add(
            f"manifest by tag p99 ms, {crowd['count']:,} slow readers arriving",
            p99 if measured else None,
            f"< {CROWD_MANIFEST_P99_MS}",
            ok if measured else None,
            f"max {probe['max_ms']} ms, {probe['requests']} GETs, {probe['errors']} errors;"
            f" readers held {held}/{crowd['count']}",
        )
    workers = figures.get("manifest_workers")
    if workers and "1" in workers and "2" in workers:
        one, two = workers["1"], workers["2"]
        r = _ratio(two["median_req_per_s"], one["median_req_per_s"])
        add(
            "manifest by tag, wrk -c50: req/s 2 workers / 1 worker",
            r,
            f">= {WORKERS_SPEEDUP}x",
            None if r is None else r >= WORKERS_SPEEDUP,
            f"{two['median_req_per_s']:.0f} vs {one['median_req_per_s']:.0f} req/s",
            "14",
        )
        p99 = two["median_p99_ms"]
        add(
            "manifest by tag, wrk -c50, 2 workers: p99 ms",
            p99,
            f"< {WORKERS_P99_MS}",
            None if p99 is None else p99 < WORKERS_P99_MS,
            f"runs {two['p99_ms']}",
            "14",
        )
    # Earlier targets.
    warm = figures.get("warm_MBps")
    if warm:
        r = _ratio(warm["hammal"]["median"], warm["distribution"]["median"])
        add(
            "warm blob: hammal / Distribution warm",
            r,
            ">= 1.5x",
            None if r is None else r >= 1.5,
            f"{warm['hammal']['median']:.0f} vs {warm['distribution']['median']:.0f} MB/s",
            "earlier",
        )
    manifests = figures.get("manifest_by_tag")
    if manifests:
        h, d = manifests["hammal"], manifests["distribution"]
        r = _ratio(h["median_req_per_s"], d["median_req_per_s"])
        add(
            "manifest by tag, wrk -c50: req/s hammal / Distribution",
            r,
            ">= 5x",
            None if r is None else r >= 5,
            f"{h['median_req_per_s']:.0f} vs {d['median_req_per_s']:.0f} req/s",
            "earlier",
        )
        add(
            "manifest by tag, wrk -c50: hammal p99 ms",
            h["median_p99_ms"],
            "< 20",
            h["median_p99_ms"] < 20,
            f"runs {h['p99_ms']}",
            "earlier",
        )
    for size, rec in figures.get("many_slow_clients", {}).items():
        max_mb = round(rec["max_MiB"] * 1.048576, 1)
        add(
            f"{many_slow} slow clients held: max RSS MB, {size} blob",
            max_mb,
            "< 300, all held",
            max_mb < 300 and rec["held_open"] == many_slow,
            f"held {rec['held_open']}/{rec['connections']}",
            "earlier",
        )
    slow = figures.get("slow_client")
    if slow:
        growth = round(slow["max_MiB"] - slow["first_MiB"], 1)
        add(
            "1 MB/s slow client: RSS growth MiB",
            growth,
            "< 16",
            growth < 16,
            f"first {slow['first_MiB']} max {slow['max_MiB']} last {slow['last_MiB']}",
            "earlier",
        )
    return rows
