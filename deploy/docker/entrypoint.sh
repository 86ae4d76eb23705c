#!/bin/sh
# The image's entry point: put the kernels compiled at build time where numba can use them, then exec
# streammf with the container's arguments (PID 1 becomes streammf, so SIGTERM reaches it).
#
# numba only uses a cache directory it can write to (it probes with a temporary file), and the root
# filesystem may be read-only: the image keeps the warmed cache at $STREAMMF_NUMBA_CACHE_SEED and copies it
# once into the writable $NUMBA_CACHE_DIR (an emptyDir or tmpfs). Copying ~1 MB takes milliseconds;
# compiling takes tens of seconds.
set -eu
seed=${STREAMMF_NUMBA_CACHE_SEED:-/opt/streammf/numba-cache}
if [ -n "${NUMBA_CACHE_DIR:-}" ] && [ -d "$seed" ] && [ ! -e "$NUMBA_CACHE_DIR/.seeded" ]; then
  mkdir -p "$NUMBA_CACHE_DIR"
  cp -R "$seed/." "$NUMBA_CACHE_DIR/"
  touch "$NUMBA_CACHE_DIR/.seeded"
fi
exec streammf "$@"
