"""/readyz of a real daemon: ready once it owns partitions and Redis answers; a replica without partitions
and a daemon whose Redis died are alive (/healthz 200) but not ready (/readyz 503)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from tests.integration.private_services import PrivateRedis
from tests.integration.test_daemon import _free_port, _InProcessDaemon, _produce, _settings, _wait_for

pytestmark = pytest.mark.integration


def _status(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:  # not listening yet
        return 0, str(exc)


def test_readyz_needs_partitions_and_redis(
    kafka_bootstrap, make_topic, topic_name, model, tmp_path, kafka_client
):
    private_redis = PrivateRedis(tmp_path / "redis").start()
    topic = make_topic(topic_name, 1)
    event = json.dumps({"user_id": "u1", "item_id": "i1", "value": 4}).encode()
    _produce(kafka_bootstrap, topic, [(b"u1", event)])
    first_port, second_port = _free_port(), _free_port()
    try:
        with _InProcessDaemon(
            _settings(kafka_bootstrap, private_redis.url, topic, model, first_port, kafka_client)
        ):
            _wait_for(lambda: _status(first_port, "/readyz")[0] == 200, 60, "the first daemon ready")
            # Same group, one partition: one replica owns it, the other must not take traffic. Either may
            # end up the owner (the group's assignor decides), so the test asks which one is idle.
            second_settings = _settings(
                kafka_bootstrap, private_redis.url, topic, model, second_port, kafka_client
            )
            with _InProcessDaemon(second_settings):
                _wait_for(lambda: _status(second_port, "/healthz")[0] == 200, 60, "the second daemon alive")

                def one_owner_one_idle() -> bool:
                    first, second = _status(first_port, "/readyz"), _status(second_port, "/readyz")
                    idle = [s for s in (first, second) if "no partitions assigned" in s[1]]
                    ready = [s for s in (first, second) if s[0] == 200]
                    return len(idle) == 1 and len(ready) == 1 and idle[0][0] == 503

                _wait_for(one_owner_one_idle, 60, "one replica ready and the other reporting no partition")
            # The second replica left: the first owns the partition again once the group has settled.
            _wait_for(lambda: _status(first_port, "/readyz")[0] == 200, 60, "the first daemon ready again")
            private_redis.kill()
            _wait_for(lambda: "redis does not answer" in _status(first_port, "/readyz")[1], 30, "not ready")
            assert _status(first_port, "/readyz")[0] == 503
            assert _status(first_port, "/healthz")[0] == 200  # alive: a Redis outage is no reason to restart
    finally:
        private_redis.kill()
