"""`streammf bench`: where the time goes between Kafka and Redis, measured in one run on real services.

Per mode (explicit, implicit), on a fresh topic and model:

1. backlog: N synthetic events are produced (a `streammf replay` subprocess, as fast as it goes);
2. raw consume: this process reads the backlog with the Kafka client and consumer settings the daemon
   uses, doing nothing else: the ceiling the daemon's loop is compared with (`ratio_to_raw`);
3. daemon, end to end: `streammf run` (a subprocess, like production) applies the backlog to Redis through
   the exactly-once path; the rate counts from its first applied batch to the last (start-up and the
   group join are not the steady state), and Redis server time per event is the CPU time of each
   server's main thread (`INFO cpu`) over that phase: scripts, the commands they call, and the network
   I/O of their arguments and replies, each counted once. Over the same steady phase, the CPU time per
   event of each process doing the work (the daemons, each Redis server, the Kafka brokers running on
   this machine), and the rate the machine's cores would allow were they busy with those alone: on a
   shared box, where the end-to-end rate's limit is;
4. live: the same daemon, fed at a fixed offered rate by another replay subprocess (now-stamped events);
   update latency p50/p99 and freshness p99 come from the daemon's own histograms, counting only the
   observations of this phase. The replay reports the rate it actually sent at (`sent_events_per_s`);
   it sends with confluent-kafka when installed (`load_kafka_client`), whatever the daemon's client.

With `replicas` > 1, that many `streammf run` subprocesses share the topic's partitions in one consumer
group (`partitions` must be at least `replicas`: a replica without a partition idles). Their rate counts
from the moment every replica has applied a batch (the group has settled; if the backlog is gone before
that, from the daemons' start); latency and freshness merge every replica's histograms, and
`events_by_replica` says how the events were shared. The raw consume rate stays one consumer's.

Redis server time is taken on every server the model may use: each primary of a Redis Cluster
(`redis_us_per_event_by_node`), their sum being `redis_us_per_event`. With `shards` > 1 the model is split
in that many shards (STREAMMF_REDIS__SHARDS); each mode then also runs first with one shard on the same
Redis, the reference: each server's time per event is also given as a share of the reference's total
(`redis_share_of_single_by_node`), which shows whether the load splits over a cluster's primaries.

Nothing is asserted: the figures are printed as a table and written as JSON (`--json FILE`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import redis
from redis.cluster import RedisCluster

from streammf.config import Settings
from streammf.store.connect import redis_client
from streammf.store.layout import ModelKeys, delete_model, parse_int, scan_keys, unlink_all
from streammf.store.shards import shard_tags
from streammf.stream.kafka_config import client_kwargs


@dataclass(frozen=True)
class BenchRun:
    mode: str
    shards: int
    events: int
    partitions: int
    replicas: int
    kafka_client: str
    raw_consume_events_per_s: float
    daemon_events_per_s: float
    ratio_to_raw: float
    redis_us_per_event: float  # summed over the servers below
    redis_us_per_event_by_node: dict[str, float]  # "host:port" of each server (a cluster: each primary)
    # Each server's figure over the total of the same mode's one-shard run (None: no such run).
    redis_share_of_single_by_node: dict[str, float] | None
    offered_events_per_s: float
    live_events: int
    update_latency_p50_ms: float
    update_latency_p99_ms: float
    freshness_p99_ms: float
    events_by_replica: list[int]  # events each replica applied, backlog and live phase together
    # CPU per event of each process over the backlog's steady phase (µs; None: not measurable here).
    cpu_us_per_event: dict[str, float | None]
    cpu_cores: int
    # The rate the machine's cores would allow were they all busy with these processes alone.
    cpu_ceiling_events_per_s: float | None
    # Of the daemons' CPU per event, what their learner processes took (the rest: the loop's process).
    learner_cpu_us_per_event: float | None = None
    # The live phase's load as sent: the replay's own count over its own time (it falls short of
    # `offered_events_per_s` when the producer cannot keep up), and the Kafka client that sent it.
    sent_events_per_s: float = float("nan")
    load_kafka_client: str = ""
    # AOF rewrites that ran during the live phase (started in it, or already running when it began; every
    # primary's, summed): a rewrite forks and copies the dataset, a core's work for seconds on a shared
    # box, which shows in the tail.
    redis_aof_rewrites_live: int = 0


@dataclass(frozen=True)
class BenchPlan:
    events: int = 200_000
    offered_rate: float = 20_000.0
    live_seconds: float = 10.0
    partitions: int = 1
    modes: tuple[str, ...] = ("explicit", "implicit")
    factors: int = 32
    shards: int = 1
    # With shards > 1, run each mode with one shard first, on the same Redis: the reference.
    reference: bool = True
    replicas: int = 1

    def __post_init__(self) -> None:
        if self.replicas > self.partitions:
            raise ValueError(
                f"{self.replicas} replicas need at least as many partitions (--partitions), "
                f"not {self.partitions}: a replica without a partition idles"
            )

    def shard_counts(self) -> tuple[int, ...]:
        return (1, self.shards) if self.shards > 1 and self.reference else (self.shards,)


def run_bench(settings: Settings, plan: BenchPlan, say: Callable[[str], None]) -> list[BenchRun]:
    client = redis_client(settings)
    try:
        if isinstance(client, RedisCluster):
            say(f"Redis Cluster: server time measured on each primary ({', '.join(_nodes(client))})")
        runs = [
            _run_mode(settings, client, plan, mode, shards, say)
            for mode in plan.modes
            for shards in plan.shard_counts()
        ]
    finally:
        client.close()
    return with_shares(runs)


def with_shares(runs: list[BenchRun]) -> list[BenchRun]:
    """Each run's per-server figures as shares of the total of the same mode's one-shard run, for the
    modes that ran with one shard and with several."""
    single = {run.mode: run.redis_us_per_event for run in runs if run.shards == 1}
    sharded = {run.mode for run in runs if run.shards > 1}
    shared = []
    for run in runs:
        total = single.get(run.mode)
        shares = None
        if run.mode in sharded and total is not None and total > 0:
            shares = {node: us / total for node, us in run.redis_us_per_event_by_node.items()}
        shared.append(replace(run, redis_share_of_single_by_node=shares))
    return shared


def _run_mode(
    settings: Settings,
    client: redis.Redis,
    plan: BenchPlan,
    mode: str,
    shards: int,
    say: Callable[[str], None],
) -> BenchRun:
    run_id = f"{mode}-s{shards}-{uuid.uuid4().hex[:8]}"
    topic, model = f"streammf.bench.{run_id}", f"bench-{run_id}"
    envs = [
        _env(
            settings,
            topic=topic,
            model=model,
            group=f"bench-{run_id}",
            mode=mode,
            k=plan.factors,
            shards=shards,
            port=_free_port(),
        )
        for _ in range(plan.replicas)
    ]
    env = envs[0]
    stats = _stats_keys(model, shards)
    name = f"{mode}, {shards} shard{'s' if shards > 1 else ''}"
    try:
        say(f"{name}: producing a backlog of {plan.events:,} events into {topic}")
        _replay(env, plan.events, rate=None, partitions=plan.partitions)
        say(f"{name}: raw consume with the daemon's Kafka client and settings")
        raw_rate = _raw_consume_rate(settings, topic, plan.events)
        runs = "streammf run" if plan.replicas == 1 else f"{plan.replicas} replicas of streammf run"
        say(f"{name}: {runs} working off the backlog")
        usec_before = _redis_usec_by_node(client)
        with _Daemons(envs) as daemons:
            meter = _CpuMeter(client, [process.pid for process in daemons.processes])
            applied_rate, steady_events = _backlog_rate(client, stats, plan.events, daemons, meter)
            cpu = meter.per_event(steady_events)
            learner_cpu = cpu.pop("learner")
            usec_after = _redis_usec_by_node(client)
            by_node = {
                node: (usec_after.get(node, 0.0) - usec_before.get(node, 0.0)) / plan.events
                for node in sorted(usec_before.keys() | usec_after.keys())
            }
            before = _samples_once_counted(daemons, plan.events)
            rewrites_before = _aof_rewrites(client, running_as_new=True)
            live = int(plan.offered_rate * plan.live_seconds)
            say(f"{name}: live, {live:,} events offered at {plan.offered_rate:,.0f}/s")
            sent_rate = _replay(env, live, rate=plan.offered_rate, partitions=None)
            _wait_applied(client, stats, plan.events + live, daemons, timeout_s=plan.live_seconds * 10 + 120)
            after = _samples_once_counted(daemons, plan.events + live)
            rewrites = _aof_rewrites(client) - rewrites_before
            by_replica = daemons.scrape_each()
        latency = _histogram_delta(before, after, "streammf_update_latency_seconds")
        freshness = _histogram_delta(before, after, "streammf_freshness_seconds")
        return BenchRun(
            mode=mode,
            shards=shards,
            events=plan.events,
            partitions=plan.partitions,
            replicas=plan.replicas,
            kafka_client=settings.kafka.client,
            raw_consume_events_per_s=raw_rate,
            daemon_events_per_s=applied_rate,
            ratio_to_raw=applied_rate / raw_rate if raw_rate else float("nan"),
            redis_us_per_event=sum(by_node.values()),
            redis_us_per_event_by_node=by_node,
            redis_share_of_single_by_node=None,  # filled in by with_shares
            offered_events_per_s=plan.offered_rate,
            live_events=live,
            update_latency_p50_ms=1000 * _quantile(latency, 0.5),
            update_latency_p99_ms=1000 * _quantile(latency, 0.99),
            freshness_p99_ms=1000 * _quantile(freshness, 0.99),
            events_by_replica=[int(m.get("streammf_events_applied_total", 0)) for m in by_replica],
            cpu_us_per_event=cpu,
            cpu_cores=_cores(),
            cpu_ceiling_events_per_s=_ceiling(cpu),
            learner_cpu_us_per_event=learner_cpu,
            sent_events_per_s=sent_rate,
            load_kafka_client=_load_client(),
            redis_aof_rewrites_live=rewrites,
        )
    finally:
        _delete_bench_model(client, model, shards)
        _delete_topics(settings, [topic, f"{topic}.dlq"])


# ------------------------------------------------------------------------------------------- stages


def _env(
    settings: Settings, *, topic: str, model: str, group: str, mode: str, k: int, shards: int, port: int
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        STREAMMF_KAFKA__BOOTSTRAP_SERVERS=settings.kafka.bootstrap_servers,
        STREAMMF_KAFKA__TOPIC=topic,
        STREAMMF_KAFKA__GROUP_ID=group,
        STREAMMF_REDIS__URL=settings.redis.url,
        STREAMMF_REDIS__SHARDS=str(shards),
        STREAMMF_MODEL__NAME=model,
        STREAMMF_MODEL__MODE=mode,
        STREAMMF_MODEL__FACTORS=str(k),
        STREAMMF_METRICS__HOST="127.0.0.1",
        STREAMMF_METRICS__PORT=str(port),
        STREAMMF_REFRESH__EVERY_S="86400",  # a refresh is not what this measures
    )
    return env


def _load_client() -> str:
    """The Kafka client `streammf replay` sends the bench's load with: confluent-kafka when installed,
    whatever the daemon under test uses. The load is not what is measured, and kafka-python's producer
    takes ~50 µs of CPU per record: one core cannot send 20,000 records/s with it, let alone beside the
    daemon."""
    return "confluent" if importlib.util.find_spec("confluent_kafka") is not None else "kafka-python"


_SENT = re.compile(r"sent (\d+) records to \S+ in ([\d.]+) s")


def _replay(env: dict[str, str], n: int, rate: float | None, partitions: int | None) -> float:
    """Send n synthetic events with `streammf replay`; the rate it sent them at, by its own report."""
    command = [sys.executable, "-m", "streammf.cli", "replay", "--synthetic", str(n), "--no-progress"]
    command += ["--users", "20000", "--items", "5000"]
    if rate is not None:
        command += ["--rate", str(rate)]
    if partitions is not None:
        command += ["--partitions", str(partitions)]
    load_env = env | {"STREAMMF_KAFKA__CLIENT": _load_client()}
    done = subprocess.run(command, env=load_env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"replay failed: {done.stderr[-2000:]}")
    sent = _SENT.search(done.stdout)
    if sent is None:
        raise RuntimeError(f"replay did not report what it sent: {done.stdout[-2000:]}")
    seconds = float(sent.group(2))
    return int(sent.group(1)) / seconds if seconds > 0 else float("nan")


def _raw_consume_rate(settings: Settings, topic: str, n: int) -> float:
    """Records/s the daemon's Kafka client (STREAMMF_KAFKA__CLIENT) reads the backlog at, with the daemon's
    consumer settings (no group: it reads what it assigns itself)."""
    from kafka.structs import TopicPartition

    from streammf.stream.clients import kafka_consumer

    consumer = kafka_consumer(settings.kafka, group_id=None)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        started, seen = time.perf_counter(), 0
        deadline = started + 600
        while seen < n and time.perf_counter() < deadline:
            polled = consumer.poll(
                timeout_ms=settings.kafka.poll_timeout_ms, max_records=settings.kafka.max_poll_records
            )
            seen += sum(len(records) for records in polled.values())
        elapsed = time.perf_counter() - started
    finally:
        consumer.close(autocommit=False)
    return seen / elapsed


class _Daemons:
    """`streammf run` subprocesses, one per env (replicas of one consumer group), each serving metrics on
    its env's port; stopped with SIGTERM on exit."""

    def __init__(self, envs: list[dict[str, str]]) -> None:
        tmp = Path(os.environ.get("TMPDIR", "/tmp"))
        self.ports = [int(env["STREAMMF_METRICS__PORT"]) for env in envs]
        model = envs[0]["STREAMMF_MODEL__NAME"]
        self.logs = [tmp / f"streammf-bench-{model}-{replica}.log" for replica in range(len(envs))]
        self.processes = [
            subprocess.Popen(
                [sys.executable, "-m", "streammf.cli", "run"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log.open("wb"),
            )
            for env, log in zip(envs, self.logs, strict=True)
        ]

    def check(self) -> None:
        for process, log in zip(self.processes, self.logs, strict=True):
            if process.poll() is not None:
                raise RuntimeError(f"a daemon exited ({process.returncode}); see {log}")

    def scrape_each(self) -> list[dict[str, float]]:
        return [_scrape(port) for port in self.ports]

    def all_applied_some(self) -> bool:
        """Whether every replica has applied a batch (a single daemon: always, its start is the store's)."""
        if len(self.ports) == 1:
            return True
        return all(m.get("streammf_events_applied_total", 0) > 0 for m in self.scrape_each())

    def __enter__(self) -> _Daemons:
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _shard_keys(model: str, shards: int) -> list[ModelKeys]:
    """The keys of each shard of the model the daemon creates (known before it exists: the tags depend on
    the name and the number of shards only)."""
    keys = ModelKeys(model)
    return [keys.shard(tag) for tag in shard_tags(model, shards)] if shards > 1 else [keys]


def _stats_keys(model: str, shards: int) -> list[str]:
    return [keys.stats for keys in _shard_keys(model, shards)]


def _applied(client: redis.Redis, stats: list[str]) -> int:
    """Events applied on every shard (each shard's stats count every batch it took part in)."""
    return min(parse_int(client.hget(key, "events_applied"), key, "field 'events_applied'") for key in stats)


def _delete_bench_model(client: redis.Redis, model: str, shards: int) -> None:
    """Every key of the model on every shard: `delete_model` finds the shards in the meta, and the
    prefixes of the shards the daemon would have made are swept too (a daemon that died before writing
    the meta leaves shard keys no meta names)."""
    delete_model(client, model)
    for keys in _shard_keys(model, shards):
        leftover = list(scan_keys(client, keys.prefix))
        for start in range(0, len(leftover), 1000):
            unlink_all(client, leftover[start : start + 1000])


def _backlog_rate(
    client: redis.Redis, stats: list[str], n: int, daemons: _Daemons, meter: _CpuMeter
) -> tuple[float, int]:
    """Events/s from the first applied batch (of every replica, once each has applied one) to the last
    event of the backlog, and the events counted. A backlog applied before a second look (a small one) is
    timed from the daemons' start instead, start-up included. `meter` is started with the count."""
    started = time.perf_counter()
    meter.start()
    deadline = time.monotonic() + 1800
    since: tuple[float, int] | None = None  # the first applied batch (of every replica)
    while time.monotonic() < deadline:
        daemons.check()
        applied = _applied(client, stats)
        now = time.perf_counter()
        if since is None and 0 < applied < n and daemons.all_applied_some():
            since = (now, applied)
            meter.start()
        if applied >= n:
            meter.stop()
            if since is None or now <= since[0]:
                return applied / (now - started), applied
            return (applied - since[1]) / (now - since[0]), applied - since[1]
        time.sleep(0.05)
    raise TimeoutError(f"the daemons applied {_applied(client, stats)} of {n} events in 30 minutes")


class _CpuMeter:
    """CPU time (user + system) of the processes doing the work: the daemons (/proc/<pid>/stat), Redis
    (`INFO cpu` of every primary: the whole server, background threads included) and the Kafka brokers
    running on this machine (found by their main class in /proc; none when Kafka runs elsewhere)."""

    def __init__(self, client: redis.Redis, daemon_pids: list[int]) -> None:
        self.client = client
        self.daemon_pids = daemon_pids
        self.broker_pids = _local_broker_pids()
        self._start: dict[str, float | None] = {}
        self._stop: dict[str, float | None] = {}

    def _now(self) -> dict[str, float | None]:
        brokers = [_process_cpu_s(pid) for pid in self.broker_pids]
        daemons = [_process_tree_cpu_s(pid) for pid in self.daemon_pids]
        loops = [_process_cpu_s(pid) for pid in self.daemon_pids]
        known_brokers = [b for b in brokers if b is not None]
        daemon = None if None in daemons else sum(d for d in daemons if d is not None)
        loop = None if None in loops else sum(d for d in loops if d is not None)
        return {
            "daemon": daemon,
            "learner": None if daemon is None or loop is None else daemon - loop,
            "redis": sum(_redis_process_cpu_s(self.client).values()),
            "kafka_broker": sum(known_brokers) if known_brokers else None,
        }

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> None:
        self._stop = self._now()

    def per_event(self, events: int) -> dict[str, float | None]:
        def us(name: str) -> float | None:
            start, stop = self._start.get(name), self._stop.get(name)
            return None if start is None or stop is None or events <= 0 else 1e6 * (stop - start) / events

        return {name: us(name) for name in ("daemon", "learner", "redis", "kafka_broker")}


def _ceiling(cpu: dict[str, float | None]) -> float | None:
    if any(us is None for us in cpu.values()):
        return None
    total = sum(us for us in cpu.values() if us is not None)
    return _cores() * 1e6 / total if total > 0 else None


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process of this machine (Linux), None if it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _process_tree_cpu_s(pid: int) -> float | None:
    """`_process_cpu_s` of a process and its live descendants (a daemon's learner process)."""
    children = _children_by_parent()
    tree, seen = [pid], 0
    while seen < len(tree):
        tree += children.get(tree[seen], [])
        seen += 1
    times = [_process_cpu_s(member) for member in tree]
    return None if times[0] is None else sum(t for t in times if t is not None)


def _children_by_parent() -> dict[int, list[int]]:
    """parent pid -> its children's pids, from /proc/<pid>/stat (`task/*/children` is not everywhere)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(proc.name))
    return children


def _local_broker_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"kafka.Kafka" in command:
            pids.append(int(proc.name))
    return pids


def _redis_process_cpu_s(client: redis.Redis) -> dict[str, float]:
    """CPU seconds of each server's whole process so far (background threads included)."""
    infos = _redis_cpu_info_by_node(client).items()
    return {name: float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]) for name, cpu in infos}


def _wait_applied(client: redis.Redis, stats: list[str], n: int, daemons: _Daemons, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while _applied(client, stats) < n:
        daemons.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the daemon applied {_applied(client, stats)} of {n} events")
        time.sleep(0.1)


def _samples_once_counted(daemons: _Daemons, n: int, timeout_s: float = 30.0) -> dict[str, float]:
    """The daemons' metrics summed, once they count `n` events applied (or after `timeout_s`, e.g. when
    some events were dead-lettered): a batch is counted in the metrics just after Redis has it, and a
    scrape in between would move that batch's freshness (its events waited in the backlog) into the live
    phase's histograms."""
    deadline = time.monotonic() + timeout_s
    while (samples := sum_samples(daemons.scrape_each())).get("streammf_events_applied_total", 0) < n:
        daemons.check()
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return samples


def _nodes(client: RedisCluster) -> list[str]:
    return sorted(node.name for node in client.get_primaries())


def _redis_usec_by_node(client: redis.Redis) -> dict[str, float]:
    """CPU time of each server's main thread so far, in µs. All clients count; the bench's own polling is
    a few HGETs. (Summing `INFO commandstats` would count a script's inner commands twice: once in its
    EVALSHA, once on their own.)"""
    return {name: main_thread_cpu_us(cpu) for name, cpu in _redis_cpu_info_by_node(client).items()}


def _redis_cpu_info_by_node(client: redis.Redis) -> dict[str, dict[str, Any]]:
    """`INFO cpu` of each primary of a Redis Cluster (replicas serve no reads of ours), else of the one
    server."""
    return _info_by_node(client, "cpu")


def _info_by_node(client: redis.Redis, section: str) -> dict[str, dict[str, Any]]:
    if isinstance(client, RedisCluster):
        # One node per call: its own INFO.
        return {node.name: client.info(section, target_nodes=node) for node in client.get_primaries()}
    return {_server_name(client): client.info(section)}


def _aof_rewrites(client: redis.Redis, running_as_new: bool = False) -> int:
    """AOF rewrites started so far, summed over the servers (`INFO persistence`: Redis counts a rewrite
    when it forks it; 0 without an AOF); with `running_as_new`, one running now is left out, so that a
    count taken later counts it as one of its own."""
    infos = _info_by_node(client, "persistence").values()
    started = sum(int(info.get("aof_rewrites", 0)) for info in infos)
    running = sum(int(info.get("aof_rewrite_in_progress", 0)) for info in infos)
    return started - running if running_as_new else started


def main_thread_cpu_us(cpu: dict[str, Any]) -> float:
    """User + system CPU of the server's main thread (where commands and scripts run), from `INFO cpu`;
    servers before Redis 6.2 report only the whole process's."""
    if "used_cpu_user_main_thread" in cpu:
        return 1e6 * (float(cpu["used_cpu_user_main_thread"]) + float(cpu["used_cpu_sys_main_thread"]))
    return 1e6 * (float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]))


def _server_name(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if kwargs.get("path"):
        return str(kwargs["path"])
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


# --------------------------------------------------------------------------------- metrics, quantiles


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[str, float]:
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                text = response.read().decode()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    return parse_samples(text)


def sum_samples(scraped: list[dict[str, float]]) -> dict[str, float]:
    """Several replicas' samples added up (counters and histogram buckets of one group)."""
    total: dict[str, float] = {}
    for samples in scraped:
        for name, value in samples.items():
            total[name] = total.get(name, 0.0) + value
    return total


def parse_samples(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {'name{labels}': value} (what the daemon's /metrics serves)."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def _histogram_delta(
    before: dict[str, float], after: dict[str, float], name: str
) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of the observations made between two scrapes."""
    prefix = f'{name}_bucket{{le="'
    buckets = []
    for key, value in after.items():
        if key.startswith(prefix):
            bound = float(key[len(prefix) : -2])
            buckets.append((bound, value - before.get(key, 0.0)))
    return sorted(buckets)


def _quantile(buckets: Sequence[tuple[float, float]], q: float) -> float:
    """Prometheus' histogram_quantile: linear within the bucket that holds the quantile."""
    if not buckets or buckets[-1][1] <= 0:
        return float("nan")
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            share = (rank - lower_count) / (count - lower_count) if count > lower_count else 1.0
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return lower_bound


def _delete_topics(settings: Settings, topics: list[str]) -> None:
    from kafka import KafkaAdminClient

    try:
        admin = KafkaAdminClient(**client_kwargs(settings.kafka))
        try:
            existing = set(admin.list_topics())
            admin.delete_topics([t for t in topics if t in existing])
        finally:
            admin.close()
    except Exception:  # cleaning up is best effort; the figures are already taken
        pass


# ------------------------------------------------------------------------------------------- report


COLUMNS = (
    ("mode", "mode", "{}"),
    ("shards", "shards", "{}"),
    ("replicas", "replicas", "{}"),
    ("events", "events", "{:,}"),
    ("raw consume/s", "raw_consume_events_per_s", "{:,.0f}"),
    ("daemon/s", "daemon_events_per_s", "{:,.0f}"),
    ("ratio", "ratio_to_raw", "{:.2f}"),
    ("redis us/event", "redis_us_per_event", "{:.1f}"),
    ("offered/s", "offered_events_per_s", "{:,.0f}"),
    ("sent/s", "sent_events_per_s", "{:,.0f}"),
    ("latency p50 ms", "update_latency_p50_ms", "{:.1f}"),
    ("latency p99 ms", "update_latency_p99_ms", "{:.1f}"),
    ("freshness p99 ms", "freshness_p99_ms", "{:.0f}"),
    ("AOF rewrites live", "redis_aof_rewrites_live", "{}"),
)


def table(runs: list[BenchRun]) -> list[str]:
    """The figures of each run; then, when the model was sharded or Redis has several primaries, the
    Redis server time per event of each server (and its share of the one-shard total, if measured)."""
    cells = [[fmt.format(getattr(run, field)) for _, field, fmt in COLUMNS] for run in runs]
    lines = _aligned([header for header, _, _ in COLUMNS], cells)
    nodes = sorted({node for run in runs for node in run.redis_us_per_event_by_node})
    if len(nodes) > 1 or any(run.shards > 1 for run in runs):
        lines += ["", _NODE_TABLE_TITLE]
        node_cells = [
            [
                run.mode,
                str(run.shards),
                *(_node_cell(run, node) for node in nodes),
                f"{run.redis_us_per_event:.1f}",
            ]
            for run in runs
        ]
        lines += _aligned(["mode", "shards", *nodes, "total"], node_cells)
    return lines + _cpu_table(runs)


_NODE_TABLE_TITLE = (
    "redis us/event on each server (share: of the same mode's 1-shard total on the same Redis)"
)


_CPU_TABLE_TITLE = (
    "CPU us/event over the backlog's steady phase, by process (daemon: every replica, loop and learner "
    "processes; ceiling: the rate these cores allow were they busy with these processes alone)"
)


def _cpu_table(runs: list[BenchRun]) -> list[str]:
    def cell(us: float | None) -> str:
        return "n/a" if us is None else f"{us:.1f}"

    rows = []
    for run in runs:
        cpu = run.cpu_us_per_event
        known = [us for us in cpu.values() if us is not None]
        ceiling = run.cpu_ceiling_events_per_s
        rows.append([run.mode, str(run.shards), str(run.replicas), cell(cpu.get("daemon")),
                     cell(run.learner_cpu_us_per_event), cell(cpu.get("kafka_broker")),
                     cell(cpu.get("redis")), f"{sum(known):.1f}", str(run.cpu_cores),
                     "n/a" if ceiling is None else f"{ceiling:,.0f}",
                     f"{run.daemon_events_per_s:,.0f}"])  # fmt: skip
    headers = ["mode", "shards", "replicas", "daemon", "of it learner", "kafka broker", "redis", "total",
               "cores", "ceiling/s", "daemon/s"]  # fmt: skip
    return ["", _CPU_TABLE_TITLE, *_aligned(headers, rows)]


def _node_cell(run: BenchRun, node: str) -> str:
    us = run.redis_us_per_event_by_node.get(node, 0.0)
    shares = run.redis_share_of_single_by_node
    return f"{us:.1f}" if shares is None else f"{us:.1f} ({shares.get(node, 0.0):.2f})"


def _aligned(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max([len(header), *(len(row[i]) for row in rows)]) for i, header in enumerate(headers)]
    lines = ["  ".join(header.rjust(w) for header, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return lines


def as_json(runs: list[BenchRun], plan: BenchPlan) -> dict[str, Any]:
    return {"plan": asdict(plan), "runs": [asdict(run) for run in runs]}


def write_json(path: Path, runs: list[BenchRun], plan: BenchPlan) -> None:
    path.write_text(json.dumps(as_json(runs, plan), indent=2) + "\n")
