"""cellstream scraped by a real Prometheus: the alert rules load, and the dashboard's queries return data.

Starts `python -m cellstream serve` (ports from its ready file) and Debian's `prometheus` binary,
both on loopback, scraping every second; sends traffic with the Python client from a background
thread (steps over more streams than --max-streams allows, so LRU evictions happen, plus
requests that fail with NOT_FOUND and INVALID_ARGUMENT); then asks Prometheus over its HTTP API.
Every wait polls with a deadline; both processes are stopped by pid.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cellstream.client import Client

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "cellstream.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
DEADLINE = 45.0  # seconds for everything after both processes are up

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def wait_for(what: str, condition: Callable[[], Any], deadline: float, interval: float = 0.25) -> Any:
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout)
    return process.returncode


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    panels = [p for top in board["panels"] for p in (top, *top.get("panels", []))]
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", []) if "expr" in t]


def grafana_to_promql(expr: str) -> str:
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$__range", "1h")
    return re.sub(r"\$\{?(job|instance|model|method)\}?", ".*", expr)


@pytest.fixture
def cellstream(tmp_path: Path) -> Iterator[dict[str, Any]]:
    ready = tmp_path / "ready.json"
    log = tmp_path / "cellstream.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLSTREAM_")}
    command = [
        sys.executable, "-m", "cellstream", "serve",
        "--address", "127.0.0.1:0",
        "--metrics-address", "127.0.0.1:0",
        "--ready-file", str(ready),
        "--state-dir", str(tmp_path / "state"),
        "--snapshot-interval", "1",
        "--max-streams", "6",
        "--evict", "lru",
        "--default-model", "gru",
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)

    def is_ready() -> bool:
        assert process.poll() is None, f"cellstream exited {process.returncode}:\n{log.read_text()}"
        return ready.exists() and ready.stat().st_size > 0

    try:
        wait_for("cellstream's ready file", is_ready, time.monotonic() + 30)
        info = json.loads(ready.read_text())
        assert info["pid"] == process.pid
        yield info
    finally:
        code = stop(process)
    assert code == 0, f"cellstream exited {code} on SIGTERM:\n{log.read_text()}"


@pytest.fixture
def prometheus(tmp_path: Path, cellstream: dict[str, Any]) -> Iterator[str]:
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(binary).exists():
        pytest.skip("prometheus not found (apt-get install prometheus)")
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [
            {"job_name": "cellstream", "static_configs": [{"targets": [cellstream["metrics_address"]]}]}
        ],
    }
    (tmp_path / "prometheus.yml").write_text(json.dumps(config, indent=2))  # JSON is YAML
    log = tmp_path / "prometheus.log"
    for _attempt in range(3):  # the free port may be taken between probing and binding
        port = free_port()
        command = [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        with log.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
        url = f"http://127.0.0.1:{port}"

        def is_ready(process: subprocess.Popen[bytes] = process, url: str = url) -> bool | None:
            if process.poll() is not None:
                return None
            try:
                with urllib.request.urlopen(url + "/-/ready", timeout=2) as response:
                    return response.status == 200
            except (urllib.error.URLError, OSError):
                return False

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and is_ready() is False:
            time.sleep(0.2)
        if is_ready():
            break
        stop(process)
    else:
        pytest.fail(f"prometheus did not start:\n{log.read_text()}")
    try:
        yield url
    finally:
        stop(process)


class Traffic(threading.Thread):
    """Steps 8 rotating streams (max_streams 6: LRU evictions) plus failing calls, until stopped."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.client = Client(address, timeout=5.0)
        self.done = threading.Event()
        self.steps = 0
        self.errors: list[str] = []

    def run(self) -> None:
        try:
            i = 0
            while not self.done.is_set() and i < 100_000:
                self.client.step(f"e2e-{i % 8}", [0.01 * (i % 13)] * 8)
                self.steps += 1
                if i % 10 == 0:
                    self.expect_failure(lambda: self.client.get_state("e2e-no-such-stream"))
                    self.expect_failure(lambda: self.client.step("e2e-bad", [0.0] * 3))
                i += 1
                time.sleep(0.005)
        except Exception as exc:  # surfaced by the test
            self.errors.append(repr(exc))

    def expect_failure(self, call: Callable[[], object]) -> None:
        try:
            call()
        except grpc.RpcError:
            return
        self.errors.append("a call that should fail succeeded")

    def stop(self) -> None:
        self.done.set()
        self.join(10)
        self.client.close()


def query(url: str, promql: str) -> list[dict[str, Any]]:
    body = get_json(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def finite_values(result: list[dict[str, Any]]) -> list[float]:
    values = [float(sample["value"][1]) for sample in result]
    return [v for v in values if math.isfinite(v)]


def test_prometheus_scrapes_cellstream(cellstream: dict[str, Any], prometheus: str) -> None:
    deadline = time.monotonic() + DEADLINE
    traffic = Traffic(cellstream["address"])
    traffic.start()
    try:
        # The target comes up on the first successful scrape.
        def target_up() -> str | None:
            targets = get_json(f"{prometheus}/api/v1/targets")["data"]["activeTargets"]
            healths = [t["health"] for t in targets if t["labels"]["job"] == "cellstream"]
            return healths[0] if healths == ["up"] else None

        wait_for("the cellstream target to be up", target_up, deadline)
        assert finite_values(query(prometheus, 'up{job="cellstream"}')) == [1.0]

        p99 = "histogram_quantile(0.99, sum by (le) (rate(cellstream_request_duration_seconds_bucket[1m])))"
        values = wait_for("a p99 step latency", lambda: finite_values(query(prometheus, p99)), deadline)
        assert 0 < values[0] < 5.0

        # The alert rules loaded in a real Prometheus (promtool only parses them).
        groups = get_json(f"{prometheus}/api/v1/rules")["data"]["groups"]
        loaded = {rule["name"] for group in groups for rule in group["rules"]}
        expected = set(re.findall(r"^\s*- alert:\s*(\w+)", ALERTS.read_text(), re.MULTILINE))
        assert loaded == expected
        unhealthy = [
            r["name"] for g in groups for r in g["rules"] if r.get("health") not in ("ok", "unknown")
        ]
        assert not unhealthy, f"rules failing to evaluate: {unhealthy}"

        # Every dashboard query returns at least one finite value, with the variables set to All.
        pending = {f"{title}: {expr}": grafana_to_promql(expr) for title, expr in dashboard_queries()}
        assert len(pending) >= 20

        def all_return_data() -> bool:
            for key, promql in list(pending.items()):
                if finite_values(query(prometheus, promql)):
                    del pending[key]
            return not pending

        try:
            wait_for("every dashboard query to return data", all_return_data, deadline, interval=0.5)
        except AssertionError:
            pytest.fail("dashboard queries without data:\n" + "\n".join(sorted(pending)))
    finally:
        traffic.stop()
    assert not traffic.errors, traffic.errors
    assert traffic.steps > 0
