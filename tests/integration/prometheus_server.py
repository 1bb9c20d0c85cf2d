"""A real Prometheus (Debian's `prometheus` package) for tests: 127.0.0.1, free port, own storage.

    with PrometheusServer(tmp, targets=["127.0.0.1:9090"], rule_files=[RULES]) as prom:
        prom.wait_target_up()
        prom.query('sum(sniproxy_connections_total)')     # the API's `data.result`

It scrapes and evaluates rules every second so a test sees data within a few seconds; every
wait has a deadline and a failure shows Prometheus' own log.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tests.integration.harness import free_port, wait_until

JOB = "sni-proxy"          # the job name the alert rules select on
START_TIMEOUT_S = 30


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


class PrometheusError(AssertionError):
    pass


class PrometheusServer:
    def __init__(self, directory: Path, targets: list[str], rule_files: list[Path] = (),
                 interval_s: int = 1):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = self.dir / "prometheus.yml"
        self.log_path = self.dir / "prometheus.log"
        rules = "".join(f"  - {json.dumps(str(p))}\n" for p in rule_files)
        self.config_path.write_text(
            "global:\n"
            f"  scrape_interval: {interval_s}s\n"
            f"  scrape_timeout: {interval_s}s\n"
            f"  evaluation_interval: {interval_s}s\n"
            + (f"rule_files:\n{rules}" if rules else "")
            + "scrape_configs:\n"
            f"  - job_name: {JOB}\n"
            "    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "PrometheusServer":
        binary = prometheus_binary()
        if binary is None:
            raise PrometheusError("prometheus is not installed: `apt-get install prometheus` "
                                  "(scripts/bootstrap.sh does it)")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.config_path}",
             f"--storage.tsdb.path={self.dir / 'data'}", "--storage.tsdb.retention.time=1h",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self._ready, START_TIMEOUT_S, "Prometheus /-/ready", interval=0.1)
        return self

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise PrometheusError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.HTTPError):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    # --- HTTP API ---------------------------------------------------------------------------
    def api(self, path: str, **params) -> dict:
        """GET /api/v1/<path>: the `data` of a success, PrometheusError with the error text else."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        return self.api("query", query=promql)["result"]

    def value(self, promql: str) -> float | None:
        """The single value of an instant query; None when it returns nothing."""
        result = self.query(promql)
        if not result:
            return None
        if len(result) != 1:
            raise PrometheusError(f"{promql}: expected one series, got {len(result)}: {result}")
        return float(result[0]["value"][1])

    def metric_names(self) -> set[str]:
        return set(self.api("label/__name__/values"))

    def targets(self) -> list[dict]:
        return self.api("targets")["activeTargets"]

    def wait_target_up(self, timeout: float = 20) -> dict:
        def up():
            ts = [t for t in self.targets() if t["labels"].get("job") == JOB]
            return ts[0] if ts and all(t["health"] == "up" for t in ts) else None
        try:
            return wait_until(up, timeout, "the sni-proxy target to be up", interval=0.2)
        except TimeoutError:
            raise PrometheusError(f"target not up: {self.targets()}\n{self.log()}") from None

    def wait_value(self, promql: str, predicate, timeout: float = 20) -> float:
        last: list = [None]

        def check():
            last[0] = self.value(promql)
            return last[0] is not None and predicate(last[0])
        try:
            wait_until(check, timeout, promql, interval=0.2)
        except TimeoutError:
            raise PrometheusError(f"{promql}: last value {last[0]}") from None
        return last[0]

    def rules(self) -> list[dict]:
        return [r for g in self.api("rules")["groups"] for r in g["rules"]]
