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

ML100K = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ml-100k" / "u.data"


@pytest.fixture(scope="session")
def movielens() -> RatingsLog:
    if not ML100K.exists():
        pytest.fail(f"MovieLens 100k is expected at {ML100K} (the shared data folder beside the repo)")
    return load_ratings(ML100K)


@pytest.fixture
def model(redis_client: redis.Redis) -> Iterator[str]:
    name = f"daemon-{uuid.uuid4().hex[:10]}"
    yield name
    keys = list(redis_client.scan_iter(match=ModelKeys(name).prefix + "*", count=1000))
    for start in range(0, len(keys), 1000):
        redis_client.unlink(*keys[start : start + 1000])
