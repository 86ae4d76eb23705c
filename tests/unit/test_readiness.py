"""/readyz: alive, and every readiness condition met; /healthz stays about liveness only."""

from __future__ import annotations

import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry

from streammf.stream.metrics import Heartbeat, serve_metrics


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_not_ready_until_the_daemon_adds_its_conditions():
    heartbeat = Heartbeat(max_silence_s=30, clock=FakeClock())
    assert heartbeat.not_ready() == ["starting: not consuming yet"]
    assert heartbeat.problems() == []  # alive while starting


def test_ready_when_every_condition_is_met_and_alive():
    clock = FakeClock()
    heartbeat = Heartbeat(max_silence_s=30, clock=clock)
    partitions: list[int] = []
    heartbeat.ready_when(lambda: None if partitions else "no partitions assigned")
    heartbeat.ready_when(lambda: None)
    assert heartbeat.not_ready() == ["no partitions assigned"]
    partitions.append(0)
    assert heartbeat.not_ready() == []
    clock.now += 31  # the poll loop stalled: neither alive nor ready
    assert heartbeat.not_ready() == ["poll loop stalled for 31.0s"]


def test_a_raising_condition_means_not_ready():
    heartbeat = Heartbeat(max_silence_s=30, clock=FakeClock())

    def broken() -> str | None:
        raise RuntimeError("boom")

    heartbeat.ready_when(broken)
    assert heartbeat.not_ready() == ["readiness check failed: boom"]


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_readyz_and_healthz_answer_separately_over_http():
    heartbeat = Heartbeat(max_silence_s=30, clock=FakeClock())
    server = serve_metrics(CollectorRegistry(), heartbeat, "127.0.0.1", 0)
    port = server.server_address[1]
    try:
        assert _get(port, "/healthz") == (200, "ok\n")
        assert _get(port, "/readyz") == (503, "starting: not consuming yet\n")
        heartbeat.ready_when(lambda: None)
        assert _get(port, "/readyz") == (200, "ok\n")
    finally:
        server.shutdown()
        server.server_close()
