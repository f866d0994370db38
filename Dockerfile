# hammal, the registry mirror, in a container.
#
#   docker build -t hammal .
#   docker run -d -p 5000:5000 -v hammal-cache:/var/cache/hammal --stop-timeout 45 hammal
#
# Configure it with HAMMAL_* variables (`twistd -n hammal --help` lists
# them). The health check assumes HTTP on port 5000: adapt it if you change
# HAMMAL_PORT or set HAMMAL_TLS.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml requirements.txt README.rst ./
COPY hammal ./hammal
COPY twisted/plugins/hammal_plugin.py ./twisted/plugins/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The pinned dependencies first: they change less often than hammal.
COPY requirements.txt /tmp/requirements.txt
RUN pip install --requirement /tmp/requirements.txt && rm /tmp/requirements.txt

# Then hammal, and Twisted's plugin cache built now: the unprivileged user
# cannot write it into site-packages at run time.
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-deps /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

RUN useradd --system --user-group --uid 10001 --home-dir /var/cache/hammal \
        --no-create-home --shell /usr/sbin/nologin hammal \
    && install -d -o hammal -g hammal -m 0750 /var/cache/hammal

# Listen on all interfaces inside the container; cache on the volume.
# The MALLOC_* settings keep glibc from mapping and unmapping memory on
# every read with large socket buffers (README, "Performance").
ENV HAMMAL_PORT=tcp:5000 \
    HAMMAL_CACHE_DIR=/var/cache/hammal \
    MALLOC_MMAP_THRESHOLD_=4194304 \
    MALLOC_TRIM_THRESHOLD_=67108864

USER hammal
VOLUME /var/cache/hammal
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/healthz', timeout=4)"]
# SIGTERM (docker stop) drains in-flight transfers for HAMMAL_DRAIN_TIMEOUT
# (default 30 s): give `docker stop` / `--stop-timeout` a little more.
CMD ["twistd", "--pidfile=", "-n", "hammal"]
