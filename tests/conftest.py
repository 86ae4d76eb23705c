"""Shared pytest fixtures: a real Kafka broker and Redis server for the integration tests.

Endpoints, in this order:
  1. env STREAMMF_TEST_KAFKA_BOOTSTRAP / STREAMMF_TEST_REDIS_URL (set by `eval "$(deploy/local/stack up)"`);
  2. testcontainers, when a Docker engine answers;
  3. otherwise the test fails (never skips) and says how to start the local stack.

The Redis Cluster (`redis_cluster_url`, `redis_cluster_client`) comes from env STREAMMF_TEST_REDIS_CLUSTER_URL
only (set by `eval "$(deploy/local/stack up --redis-cluster)"`), else the test fails the same way: a cluster
in containers would announce addresses the host cannot reach, so there is no testcontainers step.

Every test under tests/integration/ is marked `integration`, so `pytest -m "not integration"` runs the
unit tests alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from streammf.store.layout import delete_model, require_binary_client

if TYPE_CHECKING:  # imported lazily below, after pytest_configure has silenced its import-time warnings
    from kafka import KafkaAdminClient

KAFKA_ENV = "STREAMMF_TEST_KAFKA_BOOTSTRAP"
REDIS_ENV = "STREAMMF_TEST_REDIS_URL"
KAFKA_IMAGE = "apache/kafka:4.1.1"
REDIS_IMAGE = "redis:7"
START_HINT = (
    'start the local stack first: eval "$(deploy/local/stack up)" '
    "(or run the whole suite with: bash deploy/local/test)"
)
REDIS_CLUSTER_ENV = "STREAMMF_TEST_REDIS_CLUSTER_URL"
CLUSTER_START_HINT = (
    'start the local stack with its Redis Cluster first: eval "$(deploy/local/stack up --redis-cluster)" '
    "(or run the whole suite with: bash deploy/local/test)"
)

_INTEGRATION_DIR = Path(__file__).parent / "integration"


# ------------------------------------------------------------------------------------ MovieLens 100k

DATA_ENV = "STREAMMF_DATA_DIR"
REQUIRE_DATA_ENV = "STREAMMF_REQUIRE_DATA"  # set by .ci/run: there the data is there, a skip is a bug
_REPO = Path(__file__).resolve().parents[1]
_DATA_HINT = (
    "MovieLens 100k is not redistributed with streammf (its licence forbids it). To run these tests, "
    "download https://files.grouplens.org/datasets/movielens/ml-100k.zip, unzip it, and set "
    f"{DATA_ENV}=<the folder holding ml-100k/> (or place it at ../shared/data/ml-100k beside the repo)"
)
_NOT_FOUND = "MovieLens 100k not found"
_skipped_for_data: list[str] = []


def movielens_candidates() -> list[Path]:
    """Where u.data is looked for: $STREAMMF_DATA_DIR (holding ml-100k/ or u.data), then beside the repo."""
    found = []
    if os.environ.get(DATA_ENV):
        root = Path(os.environ[DATA_ENV])
        found += [root / "ml-100k" / "u.data", root / "u.data"]
    found.append(_REPO.parent / "shared" / "data" / "ml-100k" / "u.data")
    return found


@pytest.fixture(scope="session")
def movielens_file() -> Path:
    """Path of ML-100k's u.data. Absent: the test does not run, and the run's summary says so loudly
    (with how to get the data); with STREAMMF_REQUIRE_DATA=1 (CI) it fails instead."""
    for candidate in movielens_candidates():
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in movielens_candidates())
    if os.environ.get(REQUIRE_DATA_ENV) == "1":
        pytest.fail(f"MovieLens 100k not found (looked at {looked}) and {REQUIRE_DATA_ENV}=1")
    pytest.skip(f"{_NOT_FOUND} (looked at {looked}): did not run. {_DATA_HINT}")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and _NOT_FOUND in str(report.longrepr):
        _skipped_for_data.append(report.nodeid)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _skipped_for_data:
        return
    write = terminalreporter.write_line
    terminalreporter.section(
        "MovieLens 100k not found: these tests did NOT run", sep="!", red=True, bold=True
    )
    for nodeid in sorted(set(_skipped_for_data)):
        write(f"  not run: {nodeid}")
    write(f"  looked at: {', '.join(str(c) for c in movielens_candidates())}")
    write(f"  {_DATA_HINT}")


def pytest_configure(config: pytest.Config) -> None:
    # kafka-python 3.0 loads its protocol schemas with deprecated importlib.resources calls: ~200 warnings
    # per run that are not ours to fix.
    for message in ("read_text is deprecated", "open_text is deprecated"):
        config.addinivalue_line("filterwarnings", f"ignore:{message}:DeprecationWarning")


@pytest.hookimpl(tryfirst=True)  # before the mark plugin applies -m "not integration"
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _INTEGRATION_DIR in item.path.parents:
            item.add_marker(pytest.mark.integration)


# ------------------------------------------------------------------------------------------- endpoints


def _docker_available() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def _kafka_container(stack: contextlib.ExitStack) -> str:
    """apache/kafka in KRaft mode. testcontainers' KafkaContainer only drives Confluent images, so a
    generic container: the advertised listener must name the host port, hence a fixed free port."""
    import socket

    from testcontainers.core.container import DockerContainer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    container = (
        DockerContainer(KAFKA_IMAGE)
        .with_bind_ports(9092, port)
        .with_envs(
            KAFKA_NODE_ID="1",
            KAFKA_PROCESS_ROLES="broker,controller",
            KAFKA_LISTENERS="PLAINTEXT://:9092,CONTROLLER://:9093",
            KAFKA_ADVERTISED_LISTENERS=f"PLAINTEXT://localhost:{port}",
            KAFKA_CONTROLLER_LISTENER_NAMES="CONTROLLER",
            KAFKA_LISTENER_SECURITY_PROTOCOL_MAP="CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            KAFKA_CONTROLLER_QUORUM_VOTERS="1@localhost:9093",
            KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR="1",
            KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR="1",
            KAFKA_TRANSACTION_STATE_LOG_MIN_ISR="1",
            KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR="1",
            KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR="1",
            KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS="0",
            KAFKA_NUM_PARTITIONS="1",
        )
    )
    try:  # testcontainers >= 4.13 wait strategies; older versions poll the logs after start
        from testcontainers.core.wait_strategies import LogMessageWaitStrategy

        container.waiting_for(LogMessageWaitStrategy("Kafka Server started").with_startup_timeout(120))
        stack.enter_context(container)
    except ImportError:
        from testcontainers.core.waiting_utils import wait_for_logs

        stack.enter_context(container)
        wait_for_logs(container, "Kafka Server started", timeout=120)
    return f"localhost:{port}"


def _redis_container(stack: contextlib.ExitStack) -> str:
    try:
        from testcontainers.community.redis import RedisContainer
    except ImportError:  # testcontainers < 4.14
        from testcontainers.redis import RedisContainer

    container = stack.enter_context(RedisContainer(REDIS_IMAGE))
    return f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"


def _check_kafka(bootstrap: str, timeout_s: float = 20.0) -> None:
    from kafka import KafkaAdminClient

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, bootstrap_timeout_ms=5000)
            try:
                admin.list_topics()
                return
            finally:
                admin.close()
        except Exception as exc:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"Kafka at {bootstrap} does not answer a metadata request ({exc!r}); {START_HINT}"
                )
            time.sleep(1)


def _check_redis(url: str) -> None:
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis at {url} does not answer PING ({exc!r}); {START_HINT}")
    finally:
        client.close()


@pytest.fixture(scope="session")
def _endpoints() -> Iterator[tuple[str, str]]:
    kafka_env, redis_env = os.environ.get(KAFKA_ENV), os.environ.get(REDIS_ENV)
    with contextlib.ExitStack() as stack:
        if kafka_env and redis_env:
            bootstrap, url = kafka_env, redis_env
        elif _docker_available():
            bootstrap = kafka_env or _kafka_container(stack)
            url = redis_env or _redis_container(stack)
        else:
            missing = " and ".join(n for n, v in ((KAFKA_ENV, kafka_env), (REDIS_ENV, redis_env)) if not v)
            pytest.fail(
                f"integration tests need a real Kafka and Redis: {missing} not set and no Docker engine; "
                f"{START_HINT}"
            )
        _check_kafka(bootstrap)
        _check_redis(url)
        yield bootstrap, url


@pytest.fixture(scope="session")
def kafka_bootstrap(_endpoints: tuple[str, str]) -> str:
    """host:port of a Kafka broker that answered a metadata request."""
    return _endpoints[0]


@pytest.fixture(scope="session")
def redis_url(_endpoints: tuple[str, str]) -> str:
    """redis:// URL of a Redis server that answered PING."""
    return _endpoints[1]


def _check_redis_cluster(url: str, timeout_s: float = 10.0) -> None:
    """Every primary of the cluster behind the seed `url` answers CLUSTER INFO with cluster_state:ok
    (waited for a little: a primary restarted by a fault test may still be rejoining)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client = RedisCluster.from_url(url, socket_timeout=5, socket_connect_timeout=5)
            try:
                infos = client.execute_command("CLUSTER INFO", target_nodes=RedisCluster.PRIMARIES)
            finally:
                client.close()
            states = {node: info.get("cluster_state") for node, info in infos.items()}  # parsed
            if states and all(state == "ok" for state in states.values()):
                return
            problem = f"cluster_state per primary: {states}"
        except (redis.RedisError, RedisClusterException) as exc:  # the latter: no seed answered
            problem = f"no answer ({type(exc).__name__}: {exc})"
        if time.monotonic() > deadline:
            pytest.fail(f"the Redis Cluster at {url} is not ok: {problem}; {CLUSTER_START_HINT}")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def redis_cluster_url() -> str:
    """redis:// URL of one node of a Redis Cluster (the seed: the client discovers the others) whose every
    primary says cluster_state:ok."""
    url = os.environ.get(REDIS_CLUSTER_ENV)
    if not url:
        pytest.fail(
            f"this test needs a real Redis Cluster and {REDIS_CLUSTER_ENV} is not set; {CLUSTER_START_HINT}"
        )
    _check_redis_cluster(url)
    return url


@pytest.fixture
def redis_cluster_client(redis_cluster_url: str) -> Iterator[RedisCluster]:
    """A redis-py cluster client with binary replies (decode_responses=False), as the store requires."""
    client = RedisCluster.from_url(redis_cluster_url, decode_responses=False)
    require_binary_client(client)
    yield client
    client.close()


@pytest.fixture
def redis_cluster_prefix(request: pytest.FixtureRequest, redis_cluster_client: RedisCluster) -> Iterator[str]:
    """A key prefix unique to this test; its keys, on every primary, are deleted afterwards. Put a hash tag
    after it ({...}) to choose the slot: the prefix itself has no braces."""
    prefix = f"test:{_sanitised_test_name(request)}:{uuid.uuid4().hex[:8]}:"
    yield prefix
    with contextlib.suppress(redis.RedisError):  # best effort: a test may have left a primary stopped
        keys = list(redis_cluster_client.scan_iter(match=prefix + "*", count=1000))  # every primary
        if keys:
            redis_cluster_client.delete(*keys)  # redis-py splits it into one DEL per slot


# ------------------------------------------------------------------------------------- per-test helpers


def _sanitised_test_name(request: pytest.FixtureRequest, max_len: int = 60) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name).strip("-")[:max_len]


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> str:
    """A topic name unique to this test run, e.g. test-test_foo-1a2b3c4d."""
    return f"test-{_sanitised_test_name(request)}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> Iterator[KafkaAdminClient]:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    yield admin
    admin.close()


@pytest.fixture
def make_topic(kafka_admin: KafkaAdminClient) -> Iterator[Callable[[str, int], str]]:
    """make_topic(name, partitions) creates the topic, waits until every partition has a leader, and
    returns the name. Topics are deleted after the test (best effort)."""
    created: list[str] = []

    def make(name: str, partitions: int = 1) -> str:
        kafka_admin.create_topics(
            {name: {"num_partitions": partitions, "replication_factor": 1}}, wait_for_metadata=True
        )
        created.append(name)
        return name

    yield make
    if created:
        with contextlib.suppress(Exception):
            kafka_admin.delete_topics(created)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def redis_prefix(request: pytest.FixtureRequest, redis_client: redis.Redis) -> Iterator[str]:
    """A key prefix unique to this test; all keys under it are deleted afterwards (SCAN + DEL)."""
    prefix = f"test:{_sanitised_test_name(request)}:{uuid.uuid4().hex[:8]}:"
    yield prefix
    with contextlib.suppress(redis.RedisError):  # best effort: a test may have left Redis stopped
        _delete_prefix(redis_client, prefix)


def _delete_prefix(client: redis.Redis, prefix: str) -> None:
    batch: list[bytes] = []
    for key in client.scan_iter(match=prefix + "*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            client.delete(*batch)
            batch.clear()
    if batch:
        client.delete(*batch)


@pytest.fixture
def model_name(redis_client: redis.Redis) -> Iterator[str]:
    """A model name unique to this test. Model keys live under streammf:{name}: (the public layout), not
    under `redis_prefix`, so they are cleaned up here."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    with contextlib.suppress(redis.RedisError):
        delete_model(redis_client, name)  # every shard's keys too


@pytest.fixture
def cluster_model_name(redis_cluster_client: RedisCluster) -> Iterator[str]:
    """A model name unique to this test, in the Redis Cluster; its keys on every shard go afterwards."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    with contextlib.suppress(redis.RedisError):
        delete_model(redis_cluster_client, name)
