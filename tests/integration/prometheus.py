"""A Prometheus server of the test's own: Debian's `prometheus` binary on a free 127.0.0.1 port, scraping
the given targets every second, with the repo's alert rules loaded; its TSDB in the test's tmp dir."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.integration.private_services import free_port
from tests.integration.test_daemon import _wait_for

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
INSTALL_HINT = "run `bash deploy/local/tools` (or: apt-get install -y prometheus)"


class PrivatePrometheus:
    def __init__(self, workdir: Path, targets: list[str], job: str = "streammf") -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail(f"the prometheus server is not installed: {INSTALL_HINT}")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.targets = targets
        self.job = job
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PrivatePrometheus:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": self.job, "static_configs": [{"targets": self.targets}]}],
        }
        (self.workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        args = [self.binary, f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]  # fmt: skip
        log = (self.workdir / "prometheus.log").open("ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        _wait_for(self._ready, 60, f"prometheus on port {self.port} (log: {self.workdir / 'prometheus.log'})")
        return self

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            log = (self.workdir / "prometheus.log").read_text()[-2000:]
            raise AssertionError(f"prometheus exited {self.process.returncode}:\n{log}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; a PromQL error fails the test with Prometheus' own message."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr, "time": time.time()})
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # 400 for a bad expression, with the reason in the body
            body = json.loads(exc.read() or b"{}")
            raise AssertionError(f"{expr}: {body.get('errorType')}: {body.get('error')}") from exc
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def rule_groups(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/v1/rules", timeout=10) as response:
            return list(json.load(response)["data"]["groups"])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
