"""Training metrics on Ray's metrics endpoint (Prometheus format), for Grafana and the Ray dashboard.

Metrics are recorded with `ray.util.metrics`; Ray prefixes every application metric with `ray_` and a
counter also gets `_total`, so `raymed_loss` is scraped as `ray_raymed_loss` and the counter
`raymed_samples` as `ray_raymed_samples_total` (`exported_name`; docs/DESIGN.md §6.5). The tags are
Ray Train's own keys, so raymed's series join Ray Train's metrics (`ray_train_controller_state`,
`ray_train_report_total_blocked_time_s`, ...) on the run name; `cluster/grafana-raymed.json` is the
dashboard. Every rank exports only its own share: summing a throughput over ranks gives the run's.
"""

from __future__ import annotations

import time
from typing import Any

RUN_TAG = "ray_train_run_name"  # Ray Train's tag keys (ray.train.v2._internal.metrics)
RANK_TAG = "ray_train_worker_world_rank"
TAG_KEYS = (RUN_TAG, RANK_TAG, "method")

# name as recorded -> (kind, description)
METRICS: dict[str, tuple[str, str]] = {
    "raymed_loss": ("gauge", "training loss of this worker's last micro-batch"),
    "raymed_lr": ("gauge", "current learning rate"),
    "raymed_trainable_params": ("gauge", "trainable parameters of the method"),
    "raymed_samples_per_s": ("gauge", "this worker's training samples per second since the run (re)started"),
    "raymed_tokens_per_s": ("gauge", "this worker's non-padding training tokens per second since the run (re)started"),
    "raymed_samples": ("counter", "training samples this worker has consumed"),
    "raymed_tokens": ("counter", "non-padding training tokens this worker has consumed"),
}


def exported_name(name: str) -> str:
    """The name Prometheus scrapes for a metric recorded as `name`."""
    return f"ray_{name}" + ("_total" if METRICS[name][0] == "counter" else "")


class Telemetry:
    """One worker's metrics, tagged with the Ray Train run name, its rank and the method; exported at most
    once per `every_s` seconds."""

    def __init__(self, run: str, method: str, rank: int = 0, world: int = 1, enabled: bool = True,
                 every_s: float = 2.0) -> None:
        self.enabled, self.every_s, self.world, self.last = enabled, every_s, max(world, 1), 0.0
        self.tags = {RUN_TAG: run, RANK_TAG: str(rank), "method": method}
        self.sent = {"samples": 0.0, "tokens": 0.0}
        self.metrics: dict[str, Any] = {}
        if enabled:
            from ray.util.metrics import Counter, Gauge

            kinds = {"gauge": Gauge, "counter": Counter}
            self.metrics = {n.removeprefix("raymed_"): kinds[kind](n, description=d, tag_keys=TAG_KEYS)
                            for n, (kind, d) in METRICS.items()}

    @classmethod
    def for_train_worker(cls, method: str, enabled: bool = True, every_s: float = 2.0) -> "Telemetry":
        """The metrics of the calling Ray Train worker: run name, rank and world size from its context."""
        import ray.train

        ctx = ray.train.get_context()
        return cls(ctx.get_experiment_name(), method, ctx.get_world_rank(), ctx.get_world_size(), enabled, every_s)

    def step(self, loss: Any, lr: float, stats: dict[str, float], train_s: float, trainable: int) -> None:
        """Record one training step. `stats` are the loop's run totals of `samples` and `tokens`, counted as
        this rank's batches x world size; `train_s` the seconds of training they took."""
        now = time.monotonic()
        if not self.enabled or now - self.last < self.every_s:
            return
        self.last = now
        mine = {k: stats[k] / self.world for k in self.sent}
        for k, total in mine.items():
            if total > self.sent[k]:
                self.metrics[k].inc(total - self.sent[k], tags=self.tags)
            self.sent[k] = max(self.sent[k], total)
        values = {
            "loss": float(loss), "lr": lr, "trainable_params": trainable,
            "samples_per_s": mine["samples"] / max(train_s, 1e-9),
            "tokens_per_s": mine["tokens"] / max(train_s, 1e-9),
        }
        for name, value in values.items():
            self.metrics[name].set(float(value), tags=self.tags)
