"""The machine description: where a run trained, where a report was built, where a benchmark measured.

One function, `describe`, for every consumer: each result row carries it (`raymed.tune.results.result_row`), so does
`provenance.json` of a pretrained base (`tools/pretrain.py`); the report prints the host it was built on
(`raymed.tune.report`), and benchmark and analysis documents add the load average and the commit.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "ray", "transformers", "deepspeed", "peft")


def cpu_model() -> str:
    """The CPU's model name (`/proc/cpuinfo`), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.processor())
    except OSError:
        return platform.processor()


def gpu_name() -> str | None:
    """The first CUDA device's name, or None."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def commit() -> str | None:
    """The short commit of the checkout raymed runs from (None outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def describe(*, load: bool = False, with_commit: bool = False) -> dict[str, Any]:
    """CPU, cores, memory, OS, GPU and library versions (read from package metadata: importing deepspeed alone
    takes seconds); `load`: the load average now (benchmarks); `with_commit`: raymed's git commit."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in PACKAGES:
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    out: dict[str, Any] = {
        "cpu": cpu_model(), "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(), "gpu": gpu_name(), "versions": versions,
    }
    if load:
        out["load_average"] = load_average()
    if with_commit:
        out["commit"] = commit()
    return out


def summary(m: dict[str, Any]) -> str:
    """A `describe` result on one line, for reports."""
    versions = m.get("versions") or {}
    parts = [m.get("cpu"), f"{m.get('cores')} cores", f"{m.get('memory_gb')} GiB", f"GPU {m.get('gpu') or 'none'}",
             m.get("platform"), *(f"{k} {v}" for k, v in versions.items() if v)]
    return ", ".join(str(p) for p in parts if p)
