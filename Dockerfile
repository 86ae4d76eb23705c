# The streammf daemon: `docker build -t streammf .` then `docker run streammf` (runs `streammf run`);
# any other subcommand works too, e.g. `docker run streammf replay --synthetic 10000`.
# Configuration comes from STREAMMF_* environment variables (see deploy/README.md).

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A venv, so the runtime stage copies exactly the installed package and its dependencies.
RUN python -m venv /opt/streammf
WORKDIR /src
# README.md: pyproject.toml names it as the package readme, so the build needs it.
COPY pyproject.toml README.md ./
COPY streammf ./streammf
# No extras: the test and bench tools stay out of the image.
RUN /opt/streammf/bin/pip install .

FROM python:3.11-slim
ENV PATH=/opt/streammf/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache
# numba caches compiled kernels; the package dir is root-owned, hence NUMBA_CACHE_DIR in /tmp.
RUN groupadd --system --gid 10001 streammf \
    && useradd --system --uid 10001 --gid streammf --create-home --home-dir /home/streammf streammf
COPY --from=build /opt/streammf /opt/streammf
USER streammf
WORKDIR /home/streammf

# Prometheus metrics and /healthz (STREAMMF_METRICS__PORT).
EXPOSE 9108
# The first run compiles the numba kernels, hence the start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('STREAMMF_METRICS__PORT', '9108'), timeout=4)"]

ENTRYPOINT ["streammf"]
CMD ["run"]
