# The stats server as an image: `docker build -t statsd-server .`, then
# `docker run -p 8080:8080 -p 9000:9000 -v statsd-data:/data statsd-server`.
#
# BASE_IMAGE is an argument so that a machine without registry access can build on a local
# Debian image with python3 and python3-venv (tools/docker_smoke.sh, ../shared/docker-local.md).
ARG BASE_IMAGE=python:3.12-slim

# ---- builder: a venv with the server and its dependencies (all wheels, no compiler needed)
FROM ${BASE_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DEFAULT_TIMEOUT=120

RUN python3 -m venv /opt/venv

# Dependencies first, from pyproject.toml alone, so a source change reuses this layer.
# The cacert secret is a TLS proxy's CA bundle on machines that need one; where it is not given
# (a normal machine) BuildKit mounts nothing and the base image's own bundle stays in place.
# PIP_CERT is set only when a bundle exists at that path, so pip also works on a base without one.
WORKDIR /src
COPY pyproject.toml README.md ./
RUN --mount=type=secret,id=cacert,target=/etc/ssl/certs/ca-certificates.crt \
    if [ -s /etc/ssl/certs/ca-certificates.crt ]; then \
        export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; \
    fi \
    && /opt/venv/bin/python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > /tmp/requirements.txt \
    && /opt/venv/bin/pip install --upgrade pip 'setuptools>=68' wheel \
    && /opt/venv/bin/pip install -r /tmp/requirements.txt

# Then the packages themselves, built offline with the venv's setuptools. The running server
# needs none of the installers, nor numpy's own test suite (17 MB), so they leave the venv.
COPY statsd_server ./statsd_server
COPY sketches ./sketches
COPY persistence ./persistence
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation --no-index . \
    && /opt/venv/bin/pip uninstall --yes pip setuptools wheel \
    && find /opt/venv/lib -path '*/site-packages/numpy/*' -type d -name tests -prune \
        -exec rm -rf {} +

# ---- runtime: the base image, the venv, a non-root user and the data volume
FROM ${BASE_IMAGE}

RUN groupadd --system --gid 10001 statsd \
    && useradd --system --uid 10001 --gid statsd --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin statsd \
    && mkdir -p /data \
    && chown statsd:statsd /data

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STATS_HOST=0.0.0.0 \
    STATS_HTTP_PORT=8080 \
    STATS_TCP_PORT=9000 \
    STATS_DATA_DIR=/data

# Declared after the chown, so a new named volume starts out owned by the server's user.
VOLUME ["/data"]
WORKDIR /app
USER statsd:statsd
EXPOSE 8080 9000

# Slim images have no curl; the venv's python asks /health on the port the server listens on.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('STATS_HTTP_PORT', '8080') + '/health', timeout=4)"]

# The supervisor is PID 1: `docker stop` sends it SIGTERM, and it drains the connections and
# writes the final snapshot before it exits (allow it more than docker's default 10 s).
ENTRYPOINT ["statsd-server", "serve"]
