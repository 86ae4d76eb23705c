"""Fixtures of the integration tests: fresh model names whose keys are deleted after the test, and
MovieLens 100k from the shared data folder beside the repo."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from streammf.store.layout import ModelKeys
from streammf.tools.ratings import RatingsLog, load_ratings


@pytest.fixture(scope="session")
def movielens(movielens_file: Path) -> RatingsLog:
    """ML-100k in time order (see tests/conftest.py's `movielens_file` for where it is looked for)."""
    return load_ratings(movielens_file)


@pytest.fixture
def model(redis_client: redis.Redis) -> Iterator[str]:
    name = f"daemon-{uuid.uuid4().hex[:10]}"
    yield name
    keys = list(redis_client.scan_iter(match=ModelKeys(name).prefix + "*", count=1000))
    for start in range(0, len(keys), 1000):
        redis_client.unlink(*keys[start : start + 1000])


@pytest.fixture(params=["kafka-python", "confluent"])
def kafka_client(request: pytest.FixtureRequest) -> str:
    """The daemon's Kafka client (STREAMMF_KAFKA__CLIENT): a test that asks for it runs against both. The
    confluent one must be installed (the `confluent` extra, which deploy/local/test installs), never
    skipped."""
    if request.param == "confluent":
        try:
            import confluent_kafka  # noqa: F401
        except ModuleNotFoundError:
            pytest.fail("confluent-kafka is not installed: pip install -e '.[test,confluent]'")
    return str(request.param)
