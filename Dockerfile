# syntax=docker/dockerfile:1
# The streammf daemon: `docker build -t streammf .` then `docker run streammf` (runs `streammf run`);
# any other subcommand works too, e.g. `docker run streammf replay --synthetic 10000`.
# Configuration comes from STREAMMF_* environment variables (see deploy/README.md).
# Read-only root filesystem friendly: the only writes go to $NUMBA_CACHE_DIR (/tmp/numba-cache; mount a
# tmpfs or an emptyDir on /tmp).

# ---- build: the package and its dependencies in a venv the runtime stage copies whole ----
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/streammf
WORKDIR /src
# README.md: pyproject.toml names it as the package readme, so the build needs it.
COPY pyproject.toml README.md ./
COPY streammf ./streammf
# Only the confluent extra (STREAMMF_KAFKA__CLIENT=confluent needs it; a manylinux wheel, no compiler):
# the test, bench and demo tools stay out of the image.
RUN /opt/streammf/bin/pip install ".[confluent]" \
    && find /opt/streammf -name '__pycache__' -type d -prune -exec rm -rf {} +

# ---- runtime ----
FROM python:3.11-slim
# NUMBA_CPU_NAME=generic: the kernels compiled at build time are for any x86-64 CPU, so the cache built on
# the build machine is valid on every node (a host-tuned cache misses on another CPU model and the daemon
# would compile for tens of seconds at start). Set NUMBA_CPU_NAME=host to trade that for host tuning.
ENV PATH=/opt/streammf/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NUMBA_CPU_NAME=generic \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    STREAMMF_NUMBA_CACHE_SEED=/opt/streammf/numba-cache
RUN groupadd --system --gid 10001 streammf \
    && useradd --system --uid 10001 --gid streammf --no-create-home --home-dir /nonexistent streammf
COPY --from=build /opt/streammf /opt/streammf
COPY --chmod=0755 deploy/docker/entrypoint.sh /usr/local/bin/streammf-entrypoint
# Compile every kernel now, in the runtime stage (the cache is keyed by the installed sources' paths and
# times), into the read-only seed the entry point copies to the writable NUMBA_CACHE_DIR.
RUN NUMBA_CACHE_DIR=$STREAMMF_NUMBA_CACHE_SEED streammf warmup \
    && chmod -R a+rX "$STREAMMF_NUMBA_CACHE_SEED"
USER 10001:10001
WORKDIR /tmp

# Prometheus /metrics, /healthz (liveness) and /readyz (readiness), on STREAMMF_METRICS__PORT.
EXPOSE 9108
# Kernels are in the image: the daemon serves /healthz within seconds of starting.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('STREAMMF_METRICS__PORT', '9108'), timeout=4)"]

ENTRYPOINT ["/usr/local/bin/streammf-entrypoint"]
CMD ["run"]
