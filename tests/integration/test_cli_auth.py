"""The CLI against a Redis that requires a password (its own redis-server, started with --requirepass):
`recommend`, `similar` and `refresh` all take it from STREAMMF_REDIS__PASSWORD, like the daemon; a wrong
or missing one is a one-line error that never shows a password."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner, Result

from streammf.cli import cli
from streammf.cli.read import similar
from streammf.store.layout import ModelKeys
from tests.integration.test_client import K, KnownModel

PASSWORD = f"pw-{uuid.uuid4().hex}"
WRONG_PASSWORD = f"wrong-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class AuthRedis:
    url: str  # without credentials
    password: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def auth_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthRedis]:
    """A private redis-server with --requirepass and no persistence, killed at teardown."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail('redis-server is not on PATH; eval "$(deploy/local/stack up)" installs it')
    workdir: Path = tmp_path_factory.mktemp("auth-redis")
    port = _free_port()
    log_path = workdir / "redis.log"
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", PASSWORD]
    args += ["--save", "", "--appendonly", "no", "--dir", str(workdir)]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            args,
            cwd=workdir,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"redis://127.0.0.1:{port}/0"
        probe = redis.Redis.from_url(url, password=PASSWORD, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + 15
        while True:
            try:
                probe.ping()
                break
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"redis-server on port {port} did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.05)
        probe.close()
        yield AuthRedis(url, PASSWORD)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def auth_client(auth_redis: AuthRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(auth_redis.url, password=auth_redis.password)
    yield client
    client.close()


@pytest.fixture
def auth_model(auth_client: redis.Redis) -> Iterator[tuple[str, KnownModel]]:
    name = f"test-{uuid.uuid4().hex[:12]}"
    model = KnownModel(auth_client, name)
    yield name, model
    with contextlib.suppress(redis.RedisError):
        keys = list(auth_client.scan_iter(match=ModelKeys(name).prefix + "*"))
        if keys:
            auth_client.unlink(*keys)


def _env(auth_redis: AuthRedis, name: str, password: str | None) -> dict[str, str | None]:
    env: dict[str, str | None] = {
        "STREAMMF_REDIS__URL": auth_redis.url,
        "STREAMMF_MODEL__NAME": name,
        "STREAMMF_MODEL__MODE": "explicit",
        "STREAMMF_MODEL__FACTORS": str(K),
        "STREAMMF_REDIS__PASSWORD": password,  # None: unset
    }
    return env


def _assert_one_line_error(result: Result) -> None:
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.output.startswith("Error: "), result.output
    assert result.output.strip().count("\n") == 0, result.output
    assert PASSWORD not in result.output and WRONG_PASSWORD not in result.output


def test_recommend_reads_the_password_from_the_environment(
    auth_redis: AuthRedis, auth_model: tuple[str, KnownModel]
) -> None:
    name, model = auth_model
    result = CliRunner().invoke(cli, ["recommend", "alice", "-k", "4"], env=_env(auth_redis, name, PASSWORD))
    assert result.exit_code == 0, result.output
    assert [line.split("\t")[0] for line in result.output.splitlines()] == model.top("alice", 4, True)


def test_similar_reads_the_password_from_the_environment(
    auth_redis: AuthRedis, auth_model: tuple[str, KnownModel]
) -> None:
    name, _ = auth_model
    env = _env(auth_redis, name, PASSWORD)
    for command, args in ((cli, ["similar", "m4", "-k", "3"]), (similar, ["m4", "-k", "3"])):  # group, alone
        result = CliRunner().invoke(command, args, env=env)
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert len(lines) == 3 and all(line.startswith("m") and "\t" in line for line in lines)


def test_options_override_the_url_and_model_of_the_environment(
    auth_redis: AuthRedis, auth_model: tuple[str, KnownModel]
) -> None:
    name, model = auth_model
    env = {
        "STREAMMF_REDIS__URL": f"redis://127.0.0.1:{_free_port()}/0",  # nothing listens there
        "STREAMMF_MODEL__NAME": "no-such-model",
        "STREAMMF_REDIS__PASSWORD": PASSWORD,
    }
    args = ["recommend", "bob", "-k", "2", "--redis-url", auth_redis.url, "--model", name]
    result = CliRunner().invoke(cli, args, env=env)
    assert result.exit_code == 0, result.output
    assert [line.split("\t")[0] for line in result.output.splitlines()] == model.top("bob", 2, True)


def test_refresh_reads_the_password_from_the_environment(
    auth_redis: AuthRedis, auth_model: tuple[str, KnownModel]
) -> None:
    name, _ = auth_model
    result = CliRunner().invoke(cli, ["refresh", "--iterations", "2"], env=_env(auth_redis, name, PASSWORD))
    assert result.exit_code == 0, result.output
    assert "published" in result.output


@pytest.mark.parametrize("args", [["recommend", "alice"], ["similar", "m4"], ["refresh"]])
def test_a_wrong_password_is_one_error_line(
    auth_redis: AuthRedis, auth_model: tuple[str, KnownModel], args: list[str]
) -> None:
    name, _ = auth_model
    result = CliRunner().invoke(cli, args, env=_env(auth_redis, name, WRONG_PASSWORD))
    _assert_one_line_error(result)
    assert "AuthenticationError" in result.output
    assert "STREAMMF_REDIS__PASSWORD" in result.output


@pytest.mark.parametrize("args", [["recommend", "alice"], ["similar", "m4"], ["refresh"]])
def test_a_missing_password_is_one_error_line(
    auth_redis: AuthRedis, auth_model: tuple[str, KnownModel], args: list[str]
) -> None:
    name, _ = auth_model
    result = CliRunner().invoke(cli, args, env=_env(auth_redis, name, None))
    _assert_one_line_error(result)
    assert "STREAMMF_REDIS__PASSWORD" in result.output
