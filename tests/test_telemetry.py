"""Dashboard metrics as Ray really exports them: a 2-worker Ray Train run records raymed's telemetry, the
node's metrics endpoint is scraped over HTTP while it runs, and every Grafana panel's query is checked
against that scrape (metric names, label names, the join on Ray Train's run name, per-rank shares) and
evaluated by a real Prometheus (Debian's `prometheus`, which `.ci/run` installs) that finds the node through
Ray's service-discovery file, as `ray metrics launch-prometheus` sets it up."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from raymed.cluster import start_local_ray
from raymed.telemetry import METRICS, RANK_TAG, RUN_TAG, exported_name

pytestmark = pytest.mark.integration

DASHBOARD = Path(__file__).resolve().parents[1] / "cluster" / "grafana-raymed.json"
STEPS, BATCH = 12, 2  # rank r trains STEPS steps of BATCH * (r + 1) samples
PROMQL_WORDS = {"sum", "avg", "max", "min", "count", "rate", "irate", "increase", "by", "without",
                "label_values", "on", "ignoring", "group_left", "group_right"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_loop(config: dict) -> None:
    """A Ray Train worker recording telemetry exactly as `raymed.train.recipe.train_loop` does."""
    import ray.train

    from raymed.telemetry import Telemetry

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    telemetry = Telemetry.for_train_worker("ln", every_s=0.0)
    ray.train.report({"step": 0})  # Ray Train's own report metrics get a value
    stats = {"samples": 0, "tokens": 0, "train_s": 0.0}
    t0 = time.perf_counter()
    for step in range(1, STEPS + 1):
        stats["samples"] += BATCH * (rank + 1) * world  # the worker loop's convention: this rank x world
        stats["tokens"] += 10 * BATCH * (rank + 1) * world
        time.sleep(0.01)
        telemetry.step(1.0 / step, 1e-3 * step, stats, time.perf_counter() - t0, 1234)
    deadline = time.time() + 90
    while not Path(config["done"]).exists() and time.time() < deadline:  # stay alive until scraped
        time.sleep(0.2)
    ray.train.report({"step": STEPS})


def _parse(text: str) -> dict[str, list[dict[str, str | float]]]:
    """Prometheus text format -> {metric name: [labels + "value"]}."""
    series: dict[str, list] = defaultdict(list)
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)", line)
        if m and not line.startswith("#"):
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            series[m.group(1)].append({**labels, "value": float(m.group(3))})
    return series


def _queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target and templating query."""
    out = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    out += [(f"variable {v['name']}", v["definition"]) for v in dashboard["templating"]["list"] if "definition" in v]
    return out


def _names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) a PromQL expression uses."""
    labels = set()
    for inner in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"(\w+)\s*(?:=~|!=|!~|=)", inner))
    for inner in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {x.strip() for x in inner.split(",")}
    m = re.match(r"\s*label_values\(\s*(\w+)\s*,\s*(\w+)\s*\)", expr)
    if m:
        return {m.group(1)}, {m.group(2)}
    rest = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|without)\s*\([^)]*\)|\"[^\"]*\"", " ", expr)
    metrics = {w for w in re.findall(r"\b[a-zA-Z_:][\w:]*\b", rest) if w not in PROMQL_WORDS}
    return metrics, labels


# ---- a real Prometheus -------------------------------------------------------------------------------------------
# Ray's own template (`ray metrics launch-prometheus`, ray/dashboard/modules/metrics/templates.py) at a 1 s interval
PROMETHEUS_YML = """global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
- job_name: 'ray'
  file_sd_configs:
  - files:
    - '{sd_file}'
    refresh_interval: 1s
"""


def _prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found:
        return found
    message = "Prometheus not installed: apt-get install prometheus (Debian's package; .ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@contextmanager
def prometheus(folder: Path, sd_file: Path) -> Iterator[str]:
    """A Prometheus server on 127.0.0.1 scraping what Ray's service-discovery file lists; yields its URL."""
    binary = _prometheus_binary()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prometheus.yml").write_text(PROMETHEUS_YML.format(sd_file=sd_file))
    url = f"http://127.0.0.1:{_free_port()}"
    with open(folder / "prometheus.log", "wb") as log:
        proc = subprocess.Popen([binary, f"--config.file={folder / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={folder / 'tsdb'}", f"--web.listen-address={url[7:]}"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, (folder / "prometheus.log").read_text()[-2000:]
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _promql(url: str, expr: str) -> list[dict]:
    """An instant query through Prometheus' HTTP API: the result's series."""
    query = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def _label_values(url: str, metric: str, label: str) -> list[str]:
    query = urllib.parse.urlencode({"match[]": metric})
    with urllib.request.urlopen(f"{url}/api/v1/label/{label}/values?{query}", timeout=10) as resp:
        return json.loads(resp.read())["data"]


def _answers(url: str, dashboard: dict, run_name: str) -> dict[str, list[dict]]:
    """Every dashboard query as Grafana sends it (`$run` set to the run), answered by Prometheus."""
    out = {}
    for title, expr in _queries(dashboard):
        m = re.match(r"\s*label_values\(\s*(\w+)\s*,\s*(\w+)\s*\)", expr)
        if m:
            out[f"{title}: {expr}"] = [{"metric": {m.group(2): v}} for v in _label_values(url, m.group(1), m.group(2))]
        else:
            out[f"{title}: {expr}"] = _promql(url, expr.replace("$run", run_name))
    return out


def test_query_parser_separates_metrics_from_labels() -> None:
    metrics, labels = _names('sum by (ray_train_run_name, method) (rate(ray_raymed_samples_total{a=~"$run"}[1m]))')
    assert metrics == {"ray_raymed_samples_total"} and labels == {"ray_train_run_name", "method", "a"}


def test_dashboard_covers_every_raymed_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used = set().union(*(_names(q)[0] for _, q in _queries(dashboard)))
    assert {exported_name(n) for n in METRICS} <= used
    for panel in dashboard["panels"]:
        assert panel["targets"] and panel["datasource"]["type"] == "prometheus", panel["title"]


def test_metrics_endpoint_serves_what_the_dashboard_queries(tmp_path: Path) -> None:
    import ray
    import ray.train
    from ray import cloudpickle
    from ray.train.torch import TorchConfig, TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    _prometheus_binary()  # before Ray starts: skip (or fail in CI) early
    port = _free_port()
    start_local_ray(num_cpus=4, log_to_driver=False, _metrics_export_port=port,
                    _system_config={"metrics_report_interval_ms": 500})
    session = Path(ray._private.worker._global_node.get_session_dir_path())  # where Ray writes its SD file
    servers = ExitStack()
    try:
        prom_url = servers.enter_context(prometheus(tmp_path / "prometheus",
                                                    session / "prom_metrics_service_discovery.json"))
        done = tmp_path / "scraped"
        run_name = "telemetry-scrape"
        trainer = TorchTrainer(
            _train_loop, train_loop_config={"done": str(done)},
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
            run_config=ray.train.RunConfig(name=run_name, storage_path=str(tmp_path / "runs")),
        )
        outcome: dict = {}
        fit = threading.Thread(target=lambda: outcome.update(result=trainer.fit()), daemon=True)
        fit.start()

        dashboard = json.loads(DASHBOARD.read_text())
        wanted = set().union(*(_names(q)[0] for _, q in _queries(dashboard)))
        series: dict = {}
        deadline, ready, counts = time.time() + 90, False, {}
        while not ready and time.time() < deadline and fit.is_alive():
            time.sleep(1)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                series = _parse(resp.read().decode())
            counts = {s[RANK_TAG]: s["value"] for s in series.get(exported_name("raymed_samples"), [])
                      if s.get(RUN_TAG) == run_name}
            last = [s for s in series.get(exported_name("raymed_loss"), []) if s.get(RUN_TAG) == run_name]
            ready = len(last) == 2 and all(s["value"] == pytest.approx(1.0 / STEPS) for s in last)  # last step seen
            ready = ready and wanted <= set(series)
        # The same moment through Prometheus: every query Grafana sends gets series (a rate needs two scrapes).
        answers, deadline = {}, time.time() + 60
        while ready and time.time() < deadline and fit.is_alive():
            answers = _answers(prom_url, dashboard, run_name)
            if all(answers.values()):
                break
            time.sleep(1)
        done.write_text("ok")
        assert ready, f"scrape never showed all panel metrics from both ranks: samples {counts}, " \
                      f"missing {sorted(wanted - set(series))}"
        empty = [q for q, res in answers.items() if not res]
        assert answers and not empty, f"Prometheus answered no series for: {empty}"
        fit.join(timeout=120)
        assert not fit.is_alive(), "the training run did not finish after the scrape"
        assert outcome["result"].error is None, outcome["result"].error
    finally:
        servers.close()
        ray.shutdown()

    # Prometheus' answers carry the labels each query groups by, for this run; per-worker panels one series a rank.
    for query, result in answers.items():
        _, expr = query.split(": ", 1)
        _, labels = _names(expr)
        grouped = re.search(r"\bby\s*\(([^)]*)\)", expr)
        for item in result:
            have = set(item["metric"])
            if grouped:
                assert have == {x.strip() for x in grouped.group(1).split(",")}, (query, item)
            else:
                assert labels <= have, (query, item)
            assert item["metric"].get(RUN_TAG) == run_name, (query, item)
        if "per worker" in query:
            assert sorted(item["metric"][RANK_TAG] for item in result) == ["0", "1"], (query, result)
    assert float(answers[next(q for q in answers if q.startswith("Trainable"))][0]["value"][1]) == 1234

    # Every metric and label a panel queries is in the scrape.
    for title, expr in _queries(dashboard):
        metrics, labels = _names(expr)
        for name in metrics:
            assert name in series, f"panel {title!r}: {name} not scraped (have {sorted(k for k in series if 'raymed' in k or 'train' in k)})"
            have = set().union(*(s.keys() for s in series[name]))
            assert labels <= have, f"panel {title!r}: labels {labels - have} missing on {name}"

    # raymed's series carry Ray Train's run name, and join Ray Train's own metrics on it.
    for name in METRICS:
        mine = [s for s in series[exported_name(name)] if s.get(RUN_TAG) == run_name]
        assert sorted(s[RANK_TAG] for s in mine) == ["0", "1"], (name, mine)
        assert all(s["method"] == "ln" for s in mine)
    assert any(s.get(RUN_TAG) == run_name for s in series["ray_train_controller_state"])
    assert not any(k.startswith("raymed_") for k in series), "unprefixed raymed metric: Ray's naming changed"

    # Each rank exports its own share: counters are exact, and summing over ranks gives the run total.
    by_rank = {s[RANK_TAG]: s for s in series[exported_name("raymed_samples")] if s.get(RUN_TAG) == run_name}
    assert {r: s["value"] for r, s in by_rank.items()} == {"0": STEPS * BATCH, "1": STEPS * BATCH * 2}
    tokens = {s[RANK_TAG]: s["value"] for s in series[exported_name("raymed_tokens")] if s.get(RUN_TAG) == run_name}
    assert tokens == {"0": STEPS * BATCH * 10, "1": STEPS * BATCH * 20}
    loss = [s["value"] for s in series[exported_name("raymed_loss")] if s.get(RUN_TAG) == run_name]
    assert loss == pytest.approx([1.0 / STEPS] * 2)
    rates = {s[RANK_TAG]: s["value"] for s in series[exported_name("raymed_samples_per_s")] if s.get(RUN_TAG) == run_name}
    assert sorted(rates) == ["0", "1"] and all(v > 0 for v in rates.values()), rates
