"""
What the mirror is doing, for people: the data behind ``/status`` and
``/status.json``.

- L{ring}: per-minute counters in fixed-size ring buffers (last hour, day).
- L{top}: the most pulled repositories over the last 24 hours.
- L{recorder}: feeds the ring and the top list from finished requests.
- L{report}: gathers everything into one JSON-ready document (with the
  upstream pull quotas of L{hammal.upstream.quota}).
- L{page}, L{charts}: render that document as HTML with inline SVG charts.

Nothing here knows about HTTP requests or secrets: the web layer hands in
plain values, and the report holds no token, password or credential.
"""
