"""Training metrics on the Ray dashboard: `ray.util.metrics` gauges, exported through Ray's Prometheus
endpoint (and the dashboard's Grafana panels when Grafana is configured)."""

from __future__ import annotations

import time
from typing import Any

_NAMES = {
    "loss": "training loss of the last micro-batch",
    "lr": "current learning rate",
    "samples_per_s": "training samples per second (all workers)",
    "tokens_per_s": "non-padding training tokens per second (all workers)",
    "trainable_params": "trainable parameters of the method",
}


class Telemetry:
    """Gauges tagged with run and method, set at most once per `every_s` seconds."""

    def __init__(self, run: str, method: str, enabled: bool = True, every_s: float = 2.0) -> None:
        self.enabled, self.every_s, self.last = enabled, every_s, 0.0
        self.tags = {"run": run, "method": method}
        self.gauges: dict[str, Any] = {}
        if enabled:
            from ray.util.metrics import Gauge

            self.gauges = {n: Gauge(f"raymed_{n}", description=d, tag_keys=("run", "method")) for n, d in _NAMES.items()}

    def step(self, loss: float, lr: float, stats: dict[str, float], train_s: float, trainable: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < self.every_s:
            return
        self.last = now
        values = {
            "loss": loss, "lr": lr, "trainable_params": trainable,
            "samples_per_s": stats["samples"] / max(train_s, 1e-9),
            "tokens_per_s": stats["tokens"] / max(train_s, 1e-9),
        }
        for name, value in values.items():
            self.gauges[name].set(float(value), tags=self.tags)
