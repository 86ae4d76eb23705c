"""Fixtures of the Redis store tests: a fresh model name whose keys are deleted after the test."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import pytest
import redis

from streammf.redis_store import ModelKeys


@pytest.fixture
def model_name(redis_client: redis.Redis) -> Iterator[str]:
    """A model name unique to this test. Model keys live under streammf:{name}: (the public layout), not
    under `redis_prefix`, so they are cleaned up here."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    with contextlib.suppress(redis.RedisError):
        keys = list(redis_client.scan_iter(match=ModelKeys(name).prefix + "*", count=1000))
        for start in range(0, len(keys), 1000):
            redis_client.unlink(*keys[start : start + 1000])
