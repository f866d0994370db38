"""
The ``/status`` page: the status report (L{hammal.status.report}) as one
HTML document with inline CSS and inline SVG charts. It works without
script and fetches nothing: the page, its style and its charts are all in
one response.
"""

from __future__ import annotations

import time
from html import escape
from typing import Any, Sequence

from hammal.status.charts import (
    Line,
    bar_chart,
    format_bytes,
    format_count,
    line_chart,
    ratio_chart,
)

CACHE_COLOR = "#2a9d8f"
UPSTREAM_COLOR = "#e76f51"
REQUESTS_COLOR = "#264653"

#: The page reloads itself this often (seconds).
REFRESH_SECONDS = 60

_STYLE = """
:root{color-scheme:light dark;--fg:#1d2327;--bg:#f6f7f9;--card:#fff;--muted:#5f6b76;--line:#d9dee3}
@media (prefers-color-scheme:dark){:root{--fg:#e6e9ec;--bg:#15191d;--card:#1e2328;--muted:#9aa5af;
  --line:#39414a}}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);
  background:var(--bg)}
header,main{max-width:96rem;margin:0 auto;padding:0 1rem}
header{display:flex;flex-wrap:wrap;align-items:baseline;gap:.3rem 1.5rem;padding-top:1rem}
h1{font-size:1.4rem;margin:0}
h2{font-size:1.05rem;margin:0 0 .6rem}
.muted,.axis{color:var(--muted);fill:var(--muted)}
.axis{font-size:11px}
.label{font-size:12px;fill:var(--fg)}
.grid{stroke:var(--line);stroke-width:1}
.tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(46%,11rem),1fr));gap:.75rem;
  margin:1rem 0}
.tile,.card{background:var(--card);border:1px solid var(--line);border-radius:8px;
  padding:.8rem 1rem}
.tile b{display:block;font-size:1.35rem}
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,30rem),1fr));gap:.75rem;
  margin-bottom:.75rem}
.grid3{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,24rem),1fr));gap:.75rem;
  margin-bottom:.75rem}
.grid3 .axis{font-size:18px}
svg.chart{width:100%;height:auto;display:block}
.legend span{display:inline-block;margin-right:1rem;font-size:.85rem}
.legend i{display:inline-block;width:.8rem;height:.8rem;border-radius:2px;margin-right:.3rem;
  vertical-align:-1px}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid var(--line);vertical-align:top}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:.82rem;word-break:break-all}
meter{width:100%;height:.8rem}
.state-ok{color:#2a9d8f}.state-failing,.state-cooling{color:#e76f51}
@media (max-width:40rem){.axis,.label{font-size:20px}.tile b{font-size:1.15rem}
  table{font-size:.78rem}th,td{padding:.25rem .3rem}.card{padding:.7rem .6rem}}
footer{max-width:96rem;margin:1rem auto;padding:0 1rem 2rem;font-size:.85rem}
"""


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    seconds = max(seconds, 0.0)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f} %"


def _legend(items: Sequence[tuple[str, str]]) -> str:
    spans = "".join(
        f'<span><i style="background:{color}"></i>{escape(label)}</span>' for label, color in items
    )
    return f'<div class="legend">{spans}</div>'


def _table(table_id: str, headers: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> str:
    """A table; C{headers} ending in C{"#"} are numeric (the C{#} is dropped)."""
    numeric = [h.endswith("#") for h in headers]
    head = "".join(
        f'<th class="n">{escape(h[:-1])}</th>' if n else f"<th>{escape(h)}</th>"
        for h, n in zip(headers, numeric)
    )
    if not rows:
        body = f'<tr><td colspan="{len(headers)}" class="muted">{escape(empty)}</td></tr>'
    else:
        body = "".join(
            "<tr>"
            + "".join(
                f'<td class="n">{c}</td>' if n else f"<td>{c}</td>" for c, n in zip(row, numeric)
            )
            + "</tr>"
            for row in rows
        )
    return (
        f'<div class="scroll"><table id="{table_id}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def _tiles(report: dict[str, Any]) -> str:
    cache = report["cache"]
    totals = report["totals"]
    size = cache["size_bytes"]
    maximum = cache["max_size_bytes"]
    if not cache["enabled"]:
        size_text = "off (--no-cache)"
        meter = ""
    elif maximum:
        size_text = f"{format_bytes(size)} of {format_bytes(maximum)}"
        meter = f'<meter min="0" max="{maximum}" value="{min(size, maximum)}"></meter>'
    else:
        size_text = format_bytes(size)
        meter = " · no --cache-max-size"
    tiles = [
        ("Uptime", _duration(report["uptime_seconds"]), f"hammal {escape(report['version'])}"),
        (
            "Requests",
            format_count(totals["hour"]["requests"]),
            f"last hour · {format_count(totals['day']['requests'])} today",
        ),
        (
            "Pulls",
            format_count(totals["hour"]["pulls"]),
            f"last hour · {format_count(totals['day']['pulls'])} today",
        ),
        (
            "Hit ratio",
            _ratio(cache["hour"]["hit_ratio"]),
            f"last hour · {_ratio(cache['day']['hit_ratio'])} today",
        ),
        (
            "Served from cache",
            format_bytes(cache["day"]["bytes_from_cache"]),
            f"24 h · {format_bytes(cache['day']['bytes_from_upstream'])} fetched upstream",
        ),
        ("Cache", size_text, f"{format_count(cache['blobs'])} blobs{meter}"),
    ]
    return (
        '<section class="tiles" id="summary">'
        + "".join(
            f'<div class="tile"><span class="muted">{escape(name)}</span><b>{escape(value)}</b>'
            f'<span class="muted">{note}</span></div>'
            for name, value, note in tiles
        )
        + "</section>"
    )


def _charts(report: dict[str, Any]) -> str:
    cards = []
    for window, start in (("hour", "−60 min"), ("day", "−24 h")):
        series = report["series"][window]
        requests = line_chart(
            f"requests-{window}",
            f"Requests per minute, last {window}",
            [
                Line("requests", "requests", series["requests"], REQUESTS_COLOR),
                Line("cache_hits", "served from cache", series["cache_hits"], CACHE_COLOR),
            ],
            start,
        )
        traffic = line_chart(
            f"bytes-{window}",
            f"Bytes per minute, last {window}",
            [
                Line("bytes_from_cache", "from cache", series["bytes_from_cache"], CACHE_COLOR),
                Line(
                    "bytes_from_upstream",
                    "fetched upstream",
                    series["bytes_from_upstream"],
                    UPSTREAM_COLOR,
                ),
            ],
            start,
            formatter=format_bytes,
        )
        ratio = ratio_chart(
            f"hit-ratio-{window}",
            f"Cache hit ratio per minute, last {window}",
            series["cache_hits"],
            series["cache_lookups"],
            CACHE_COLOR,
            start,
        )
        cards.append(
            f'<div class="card"><h2>Requests per minute, last {window}</h2>{requests}'
            + _legend([("requests", REQUESTS_COLOR), ("served from cache", CACHE_COLOR)])
            + "</div>"
        )
        cards.append(
            f'<div class="card"><h2>Cache hit ratio, last {window}</h2>{ratio}'
            + _legend([("responses served from the cache, per minute", CACHE_COLOR)])
            + "</div>"
        )
        cards.append(
            f'<div class="card"><h2>Bytes per minute, last {window}</h2>{traffic}'
            + _legend([("from cache (saved)", CACHE_COLOR), ("fetched upstream", UPSTREAM_COLOR)])
            + "</div>"
        )
    return '<section class="grid3" id="charts">' + "".join(cards) + "</section>"


def _upstreams(report: dict[str, Any]) -> str:
    rows = []
    for route in report["upstreams"]:
        for position, member in enumerate(route["members"]):
            role = "upstream" if position == 0 else f"mirror {position}"
            errors = ", ".join(f"{escape(k)}: {v}" for k, v in sorted(member["errors"].items()))
            state = member["state"]
            cooldown = member["cooldown_seconds_left"]
            rows.append(
                [
                    escape(route["route"]),
                    f'<code>{escape(member["url"])}</code> <span class="muted">{role}</span>',
                    f'<span class="state-{escape(state.split()[0])}">{escape(state)}</span>'
                    + (f" ({_duration(cooldown)} left)" if cooldown is not None else ""),
                    escape(_duration(member["last_success_seconds_ago"]))
                    + ("" if member["last_success_seconds_ago"] is None else " ago"),
                    errors or "–",
                    str(member["failovers"]),
                ]
            )
    table = _table(
        "upstreams",
        ["Route", "Upstream", "State", "Last success", "Errors", "Failovers#"],
        rows,
        "no upstream configured",
    )
    return f'<section class="card" id="upstreams-card"><h2>Upstreams</h2>{table}</section>'


def _transfers(report: dict[str, Any]) -> str:
    rows = []
    for transfer in report["transfers"]:
        size = transfer["size"]
        progress = format_bytes(transfer["bytes"]) + (f" of {format_bytes(size)}" if size else "")
        clients = str(transfer["clients"])
        if transfer["client_addresses"]:
            clients += " (" + ", ".join(escape(a) for a in transfer["client_addresses"]) + ")"
        rows.append(
            [
                f"<code>{escape(transfer['digest'][:19])}…</code>",
                escape(f"{transfer['upstream']}/{transfer['repository']}"),
                escape(progress),
                clients,
            ]
        )
    table = _table(
        "transfers",
        ["Digest", "Repository", "Bytes so far#", "Clients attached#"],
        rows,
        "no transfer in flight",
    )
    return (
        f'<section class="card" id="transfers-card"><h2>Transfers in flight</h2>{table}</section>'
    )


def _top(report: dict[str, Any]) -> str:
    top = report["top_repositories"]
    by_pulls = [(u["repository"], float(u["pulls"])) for u in top["by_pulls"]]
    by_bytes = [(u["repository"], float(u["bytes"])) for u in top["by_bytes"]]
    pulls_chart = bar_chart(
        "top-pulls", "Top repositories by pulls, 24 h", by_pulls, REQUESTS_COLOR
    )
    bytes_chart = bar_chart(
        "top-bytes", "Top repositories by bytes, 24 h", by_bytes, CACHE_COLOR, format_bytes
    )

    def rows(entries: list[dict[str, Any]]) -> list[list[str]]:
        return [
            [
                escape(u["repository"]),
                escape(u["upstream"]),
                format_count(u["pulls"]),
                escape(format_bytes(u["bytes"])),
            ]
            for u in entries
        ]

    headers = ["Repository", "Upstream", "Pulls#", "Bytes#"]
    return (
        '<section class="grid2" id="top">'
        f'<div class="card"><h2>Top repositories by pulls, 24 h</h2>{pulls_chart}'
        + _table("top-by-pulls", headers, rows(top["by_pulls"]), "no pulls yet")
        + "</div>"
        f'<div class="card"><h2>Top repositories by bytes, 24 h</h2>{bytes_chart}'
        + _table("top-by-bytes", headers, rows(top["by_bytes"]), "nothing served yet")
        + "</div></section>"
    )


def _quota(report: dict[str, Any]) -> str:
    rows = []
    for quota in report["quota"]:
        remaining = "not reported yet" if quota["remaining"] is None else str(quota["remaining"])
        if quota["remaining"] is not None and quota["limit"] is not None:
            remaining += f" of {quota['limit']}"
        window = quota["window_seconds"]
        resting = quota["resting_seconds_left"]
        rows.append(
            [
                escape(quota["upstream"]),
                escape(quota["account"]),
                escape(remaining),
                "–" if window is None else escape(_duration(window)),
                "–"
                if quota["observed_seconds_ago"] is None
                else escape(_duration(quota["observed_seconds_ago"])) + " ago",
                "no" if resting is None else f"{escape(_duration(resting))} left",
            ]
        )
    table = _table(
        "quota",
        ["Upstream", "Account", "Remaining pulls", "Window", "Reported", "Resting"],
        rows,
        "no upstream reported a quota",
    )
    return (
        '<section class="card" id="quota-card"><h2>Upstream pull quota</h2>'
        '<p class="muted">Docker Hub\'s <code>ratelimit-remaining</code>, as upstream last '
        f"reported it.</p>{table}</section>"
    )


def render_page(report: dict[str, Any]) -> str:
    """The status page for C{report} (from L{hammal.status.report.StatusReport})."""
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(report["now"]))
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">'
        '<link rel="icon" href="data:,">'
        f"<title>hammal status</title><style>{_STYLE}</style></head><body>"
        f'<header><h1>hammal status</h1><span class="muted">version {escape(report["version"])}'
        f" · up {escape(_duration(report['uptime_seconds']))} · {escape(generated)}</span></header>"
        "<main>"
        + _tiles(report)
        + _charts(report)
        + _top(report)
        + '<div class="grid2">'
        + _upstreams(report)
        + _quota(report)
        + "</div>"
        + _transfers(report)
        + "</main>"
        '<footer class="muted">The same data for scripts: <a href="status.json">status.json</a>.'
        f" Charts hold a minute per point; this page reloads every {REFRESH_SECONDS} s.</footer>"
        "</body></html>\n"
    )
