"""A real Prometheus (Debian's `prometheus` package, installed by
scripts/test.sh) scrapes a running fusechat with the repository's scrape
config (k8s/prometheus/prometheus.yml), and the PromQL an operator's
dashboard runs returns data: request rate per model, the median time to
first token, generated tokens per second, queue depth. promtool checks the
scrape config and lints the /metrics output."""

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml
from openai import OpenAI

from conftest import REPO, free_port, wait_ready

SCRAPE_CONFIG = REPO / "k8s" / "prometheus" / "prometheus.yml"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is missing: install Debian's `prometheus` package (scripts/test.sh does)")
    return path


def test_promtool_accepts_the_scrape_config():
    out = subprocess.run([tool("promtool"), "check", "config", str(SCRAPE_CONFIG)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_lints_the_metrics_clean(server):
    text = httpx.get(server.base + "/metrics", timeout=10).text
    out = subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def query(prom: str, promql: str) -> list:
    r = httpx.get(prom + "/api/v1/query", params={"query": promql}, timeout=10)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture()
def prometheus(server):
    """Prometheus scraping the test server every second, with the repo's
    config: its static job pointed at the server's port (the Kubernetes job
    finds nothing outside a cluster and is left out here)."""
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    static = next(j for j in config["scrape_configs"] if j["job_name"] == "fusechat-static")
    static["static_configs"] = [{"targets": [server.base.removeprefix("http://")]}]
    static["scrape_interval"] = "1s"
    config["scrape_configs"] = [static]
    work = Path(tempfile.mkdtemp(prefix="fusechat-prometheus-"))
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(work / "prometheus.log", "w")
    proc = subprocess.Popen(
        [tool("prometheus"), f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    wait_ready(base + "/-/ready", proc, work / "prometheus.log", 60)
    yield base
    proc.terminate()
    proc.wait(timeout=30)
    log.close()
    shutil.rmtree(work, ignore_errors=True)


DASHBOARD = {
    "requests": 'sum by (model) (rate(fusechat_request_success_total[1m]))',
    "ttft_p50": 'histogram_quantile(0.5, sum by (le, model) (rate(fusechat_time_to_first_token_seconds_bucket[1m])))',
    "tokens": 'sum by (model) (rate(fusechat_generation_tokens_total[1m]))',
    "waiting": 'max by (model) (fusechat_num_requests_waiting)',
}


def dashboard(prom: str) -> dict:
    """{panel: {model: value}} for every dashboard query."""
    return {panel: {r["metric"]["model"]: float(r["value"][1]) for r in query(prom, promql)}
            for panel, promql in DASHBOARD.items()}


def test_prometheus_scrapes_the_server_and_answers_the_dashboard_queries(server, prometheus):
    client = OpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0)
    model = "smollm2-135m-instruct"
    deadline = time.time() + 90
    # Requests spread over several scrapes until every rate has two points
    # that differ (a scrape can land between a request's first token and its
    # end, so the panels fill one scrape apart).
    while True:
        for chunk in client.chat.completions.create(
            model=model, stream=True, max_tokens=16, temperature=0,
            messages=[{"role": "user", "content": "Name a colour."}],
        ):
            pass
        up = query(prometheus, 'up{job="fusechat-static"}')
        panels = dashboard(prometheus)
        ready = (up and up[0]["value"][1] == "1"
                 and panels["requests"].get(model, 0) > 0
                 and 0 < panels["ttft_p50"].get(model, float("nan")) < 60
                 and panels["tokens"].get(model, 0) > 0
                 and model in panels["waiting"])
        if ready:
            break
        assert time.time() < deadline, f"dashboard still empty after 90 s: up={up} panels={panels}"
        time.sleep(1)
