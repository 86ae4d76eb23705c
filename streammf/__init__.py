"""streammf: a streaming online matrix-factorisation recommender.

Kafka events -> validated -> incremental SGD -> factors in Redis, with periodic WALS refreshes that
minimise the same weighted matrix-factorisation objective.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("streammf")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"
