"""
The operator's tool, ``hammal`` / ``python -m hammal``: L{cli} parses the
command line, L{prefetch} warms a running mirror, L{cachetool} inspects and
trims a cache directory. None of it runs inside the server.
"""
