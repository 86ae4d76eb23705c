"""A Redis server or Kafka broker of the test's own, for faults that must not touch the shared stack:
restarting empty, FLUSHALL, eviction policies, memory limits, a broker killed for seconds.

Both are the real servers the local stack runs (Debian's `redis-server`; Kafka from the Maven jars that
`deploy/local/stack up` caches), on free 127.0.0.1 ports, in the test's tmp dir; stopped at teardown.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import pytest
import redis

from tests.integration.test_daemon import _wait_for

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("STREAMMF_CACHE", Path.home() / ".cache" / "streammf"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """`redis-server` without persistence: a restart comes back empty, as after losing its disk."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run `deploy/local/stack up` once (it installs it)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.extra = list(extra)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def start(self) -> PrivateRedis:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir), *self.extra]  # fmt: skip
        log = (self.workdir / "redis.log").open("ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        _wait_for(self._answers, 20, f"redis-server on port {self.port}")
        return self

    def _answers(self) -> bool:
        try:
            with redis.Redis.from_url(self.url, socket_timeout=1) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None


class PrivateKafka:
    """A single-node KRaft broker of the test's own (same jars and settings as the local stack's)."""

    def __init__(self, workdir: Path, cluster_id: str | None = None) -> None:
        version = _kafka_version()
        self.lib = CACHE / f"kafka-{version}" / "lib"
        if not any(self.lib.glob("kafka_*.jar")):
            pytest.fail(f"no Kafka jars in {self.lib}: run `deploy/local/stack up` once (it fetches them)")
        self.workdir = workdir
        self.port = free_port()
        self.controller_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.cluster_id = cluster_id or base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        self._format()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _java(self) -> list[str]:
        return ["java", "-Xms128m", "-Xmx384m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={REPO / 'deploy/local/log4j2.xml'}",
                f"-Dkafka.logs.dir={self.workdir / 'logs'}", "-cp", f"{self.lib}/*"]  # fmt: skip

    def _format(self) -> None:
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        props = self.workdir / "server.properties"
        props.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
                    f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
                    f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                    "inter.broker.listener.name=PLAINTEXT",
                    "controller.listener.names=CONTROLLER",
                    "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                    f"log.dirs={self.workdir / 'data'}",
                    "num.partitions=1",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=1",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "num.network.threads=1",
                    "num.io.threads=2",
                    "log.cleaner.enable=false",
                ]
            )
            + "\n"
        )
        # One id in 64 starts with '-': passed as "--cluster-id=ID" so it is never read as an option.
        cluster_id = f"--cluster-id={self.cluster_id}"
        format_command = [*self._java(), "kafka.tools.StorageTool", "format", cluster_id, "-c", str(props)]
        done = subprocess.run(format_command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            pytest.fail(f"StorageTool format failed (rc {done.returncode}):\n{done.stdout}{done.stderr}")

    def start(self) -> PrivateKafka:
        log = (self.workdir / "logs" / "stdout.log").open("ab")
        self.process = subprocess.Popen(
            [*self._java(), "kafka.Kafka", str(self.workdir / "server.properties")],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )
        _wait_for(self.answers, 120, f"Kafka on port {self.port}")
        return self

    def answers(self) -> bool:
        from kafka import KafkaAdminClient

        try:
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=3000)
        except Exception:
            return False
        try:
            admin.list_topics()
            return True
        except Exception:
            return False
        finally:
            admin.close()

    def kill(self) -> None:
        """SIGKILL, as a crashed machine would: no clean shutdown."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None


def _kafka_version() -> str:
    pom = (REPO / "deploy" / "local" / "pom.xml").read_text()
    return pom.split("<kafka.version>", 1)[1].split("</kafka.version>", 1)[0].strip()
