"""A Redis client for the configured endpoint: one server, or a Redis Cluster (redis-py's cluster client),
told apart by asking the server (`INFO cluster`), so STREAMMF_REDIS__URL may name either."""

from __future__ import annotations

from typing import Any, cast

import redis
from redis.cluster import RedisCluster

from streammf.config import Settings


def redis_client(settings: Settings) -> redis.Redis:
    """Binary replies (rows are bytes). A cluster client is typed as `redis.Redis`: the store and the
    reader call only what both offer (scripts, single-slot pipelines, hash and string commands)."""
    password = settings.redis.password.get_secret_value() if settings.redis.password else None
    common: dict[str, Any] = {
        "password": password,
        "socket_timeout": settings.redis.socket_timeout_s,
        "socket_connect_timeout": settings.redis.socket_timeout_s,
    }
    client = redis.Redis.from_url(settings.redis.url, health_check_interval=30, **common)
    if not is_cluster(client):
        return client
    client.close()
    return cast(redis.Redis, RedisCluster.from_url(settings.redis.url, **common))


def is_cluster(client: redis.Redis) -> bool:
    """Whether the server is a Redis Cluster node (INFO's cluster_enabled)."""
    return bool(int(client.info("cluster").get("cluster_enabled", 0)))
