"""Measure the Redis layout choices: bytes per vector, batched read throughput, apply latency.

    python bench/bench_store.py [--redis-url redis://127.0.0.1:6379/0] [--k 32] [--vectors 20000]

Prints figures only (no pass/fail). Everything is written under keys of its own (`bench:{<random>}:…` and a
`bench-<random>` model) and deleted afterwards. Run it against an otherwise idle server: the read figures
include the network round trip and share the machine with the server.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from collections.abc import Callable

import numpy as np
import redis

from streammf.client import StreamMFClient
from streammf.store.contract import BatchUpdate
from streammf.store.layout import ModelKeys
from streammf.store.redis_store import RedisStore

PIPELINE_CHUNK = 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("STREAMMF_REDIS__URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--k", type=int, default=32, help="factors per vector (the blob holds k+1 floats)")
    parser.add_argument("--vectors", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=1.0, help="time per throughput figure")
    args = parser.parse_args()

    client = redis.Redis.from_url(args.redis_url)
    server = client.info("server")
    print(f"redis {server['redis_version']} at {args.redis_url}; k={args.k}, {args.vectors} vectors\n")
    namespace = f"bench:{{{uuid.uuid4().hex[:8]}}}:"
    model = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        layouts = load_layouts(client, namespace, args.k, args.vectors)
        print_memory(client, layouts, args.vectors)
        print_read_throughput(client, layouts, args.k, args.vectors, args.seconds)
        print_apply_latency(client, model, args.k, args.seconds)
        print_matrix_load(client, model, args.k, args.vectors)
    finally:
        delete_matching(client, namespace + "*")
        delete_matching(client, ModelKeys(model).prefix + "*")


# ------------------------------------------------------------------------------------------- layouts


class Layout:
    """One way of storing the vectors: how to write them, read a batch back, and what it costs."""

    def __init__(
        self,
        name: str,
        keys: list[str],
        read: Callable[[list[str]], np.ndarray],
    ) -> None:
        self.name = name
        self.keys = keys  # the keys holding the vectors, for MEMORY USAGE
        self.read = read  # ids -> (n, k+1) float32


def load_layouts(client: redis.Redis, namespace: str, k: int, n: int) -> list[Layout]:
    rng = np.random.default_rng(0)
    rows = rng.normal(0, 0.1, size=(n, k + 1)).astype("<f4")
    ids = [str(i) for i in range(n)]
    blob_hash, json_hash = namespace + "blob", namespace + "json"
    string_keys = [f"{namespace}vec:{i}" for i in ids]

    pipe = client.pipeline(transaction=False)
    for start in range(0, n, PIPELINE_CHUNK):
        chunk = range(start, min(start + PIPELINE_CHUNK, n))
        pipe.hset(blob_hash, mapping={ids[i]: rows[i].tobytes() for i in chunk})
        pipe.hset(json_hash, mapping={ids[i]: to_json(rows[i]) for i in chunk})
        pipe.mset({string_keys[i]: rows[i].tobytes() for i in chunk})
        pipe.execute()

    def read_blob_hash(batch: list[str]) -> np.ndarray:
        return np.frombuffer(b"".join(client.hmget(blob_hash, batch)), dtype="<f4").reshape(len(batch), k + 1)

    def read_strings(batch: list[str]) -> np.ndarray:
        blobs = client.mget([f"{namespace}vec:{i}" for i in batch])
        return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(batch), k + 1)

    def read_json_hash(batch: list[str]) -> np.ndarray:
        return np.array([json.loads(raw) for raw in client.hmget(json_hash, batch)], dtype=np.float32)

    return [
        Layout("float32 blob in one hash (chosen)", [blob_hash], read_blob_hash),
        Layout("float32 blob, one string key each", string_keys, read_strings),
        Layout("JSON array in one hash", [json_hash], read_json_hash),
    ]


def to_json(row: np.ndarray) -> str:
    # The shortest decimal that reads back as the same float32: the most compact honest JSON.
    return "[" + ",".join(np.format_float_positional(x, unique=True, trim="-") for x in row) + "]"


def print_memory(client: redis.Redis, layouts: list[Layout], n: int) -> None:
    print("memory per vector (MEMORY USAGE … SAMPLES 0, key and overhead included)")
    for layout in layouts:
        pipe = client.pipeline(transaction=False)
        for key in layout.keys:
            pipe.memory_usage(key, samples=0)
        total = sum(pipe.execute())
        print(f"  {layout.name:<36} {total / n:8.1f} bytes")
    print()


def print_read_throughput(client: redis.Redis, layouts: list[Layout], k: int, n: int, seconds: float) -> None:
    print("batched reads, decoded to a numpy (n, k+1) array: vectors/s (calls/s)")
    rng = np.random.default_rng(1)
    for batch_size in (1, 100, 1000):
        for layout in layouts:
            calls = 0
            started = time.perf_counter()
            while time.perf_counter() - started < seconds:
                batch = [str(i) for i in rng.integers(0, n, batch_size)]
                layout.read(batch)
                calls += 1
            elapsed = time.perf_counter() - started
            rate, call_rate = calls * batch_size / elapsed, calls / elapsed
            label = f"batch {batch_size:>4}  {layout.name}"
            print(f"  {label:<46} {rate:>10,.0f} vectors/s ({call_rate:,.0f} calls/s)")
    print()


# ------------------------------------------------------------------------------------- store operations


def print_apply_latency(client: redis.Redis, model: str, k: int, seconds: float) -> None:
    """One daemon batch: 500 events over 400 users and 300 items, implicit mode (Gramians too)."""
    store = RedisStore.open(client, model, "implicit", k)
    rng = np.random.default_rng(2)
    n_events, n_users, n_items = 500, 400, 300
    read_ms: list[float] = []
    apply_ms: list[float] = []
    server_before = evalsha_usec(client)
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(apply_ms) < 5:
        users = [f"u{u}" for u in rng.choice(100_000, n_users, replace=False)]
        items = [f"i{i}" for i in rng.choice(5_000, n_items, replace=False)]
        pair_users = [users[u] for u in rng.integers(0, n_users, n_events)]
        pair_items = [items[i] for i in rng.integers(0, n_items, n_events)]
        step = len(apply_ms)
        update = BatchUpdate(
            version=1,
            offsets={0: (step * n_events, (step + 1) * n_events)},
            users=users,
            user_rows=rng.normal(size=(n_users, k)).astype(np.float32),
            user_bias=np.zeros(n_users, dtype=np.float32),
            items=items,
            item_base=rng.normal(size=(n_items, k)).astype(np.float32),
            item_delta=rng.normal(size=(n_items, k)) * 1e-3,
            item_bias_delta=np.zeros(n_items),
            item_count_delta=np.ones(n_items, dtype=np.int64),
            pair_users=pair_users,
            pair_items=pair_items,
            pair_values=np.ones(n_events),
            value_sum_delta=float(n_events),
            value_count_delta=n_events,
            events_applied=n_events,
            item_gramian_delta=rng.normal(size=(k, k)) * 1e-3,
            user_gramian_delta=rng.normal(size=(k, k)) * 1e-3,
        )
        t0 = time.perf_counter()
        store.read_batch_state(users, items, list(zip(pair_users, pair_items, strict=True)))
        t1 = time.perf_counter()
        store.apply(update)
        t2 = time.perf_counter()
        read_ms.append(1000 * (t1 - t0))
        apply_ms.append(1000 * (t2 - t1))
    server_ms = (evalsha_usec(client) - server_before) / 1000 / len(apply_ms)
    print(f"one batch of {n_events} events ({n_users} users, {n_items} items, implicit, k={k}); median (p90)")
    for label, times in (
        ("read_batch_state (one Lua script)", read_ms),
        ("apply (one Lua script)", apply_ms),
    ):
        print(f"  {label:<34} {np.median(times):6.2f} ms ({np.percentile(times, 90):.2f})")
    print(f"  of which Redis server time, both   {server_ms:6.2f} ms (INFO commandstats)")
    total_s = (np.median(read_ms) + np.median(apply_ms)) / 1000
    print(f"  => {n_events / total_s:,.0f} events/s through the store alone (one writer)\n")


def evalsha_usec(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("usec", 0))


def print_matrix_load(client: redis.Redis, model: str, k: int, n: int) -> None:
    """What a StreamMFClient pays to copy the item matrix (after a version flip or the cache TTL)."""
    store = RedisStore.attach(client, model)
    version = store.begin_version()
    ids = [f"item{i}" for i in range(n)]
    store.write_rows(version, "items", ids, np.random.default_rng(3).normal(size=(n, k)).astype(np.float32))
    started = time.perf_counter()
    store.publish(version, expected_current=store.current_version())
    publish_s = time.perf_counter() - started
    reader = StreamMFClient(client, model, item_cache_ttl_s=0.0)
    started = time.perf_counter()
    reader.similar_items("item0")
    load_s = time.perf_counter() - started
    print(f"version of {n} items: publish {1000 * publish_s:.2f} ms")
    print(f"  StreamMFClient copying the item matrix (after a flip or the TTL): {1000 * load_s:.0f} ms")


def delete_matching(client: redis.Redis, pattern: str) -> None:
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= PIPELINE_CHUNK:
            client.unlink(*batch)
            batch.clear()
    if batch:
        client.unlink(*batch)


if __name__ == "__main__":
    main()
