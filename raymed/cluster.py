"""Ray start-up and resource checks: connect to (or start) the cluster, and fail early when it can never hold a run.

Used by every driver that runs on Ray: `raymed.train`, `raymed.tune`, `tools/pretrain.py` (through `train.fit`) and the
benchmark suites. What one run asks for: `worker_resources` (one training worker), `scaling_config` (its worker group)
and `required_cpus` (workers + Ray Data preprocessing actors).
"""

from __future__ import annotations

import math
import os
from typing import Any

from .config import Config

# Logical CPUs the Ray Data preprocessing actors ask for: fractional, so they never starve the workers.
PREPROCESS_CPUS = 0.25

# Storage settings the workers need to reach the same object store as the driver (no secrets).
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


class ResourceError(RuntimeError):
    """A resource request the cluster can never satisfy."""


# ---- what a run asks for ------------------------------------------------------------------------
def worker_resources(cfg: Config) -> dict[str, float]:
    """Ray resources of one training worker (a fractional GPU packs single-worker trials on one GPU)."""
    return {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": cfg.scaling.gpus_per_worker} if cfg.scaling.use_gpu else {})}


def scaling_config(cfg: Config) -> Any:
    """Ray Train's `ScalingConfig` of a run: what its worker group asks the cluster for."""
    import ray.train

    return ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                   placement_strategy=cfg.scaling.placement_strategy,
                                   elastic_resize_monitor_interval_s=cfg.scaling.resize_interval_s,
                                   resources_per_worker=worker_resources(cfg))


def required_cpus(cfg: Config) -> float:
    """Logical CPUs of one run: workers + preprocessing actors + one Parquet read task."""
    data = (max(cfg.data.preprocess_actors, 1) + 1) * PREPROCESS_CPUS
    return cfg.scaling.min_workers * cfg.scaling.cpus_per_worker + data


def init_ray(min_cpus: float) -> None:
    """Connect to the cluster named by `RAY_ADDRESS` (set by `ray job submit`; `auto` for a `ray start`
    cluster on this machine) or start a new local one.

    A local cluster gets logical CPUs = max(cores, `min_cpus`): on a 2-core machine a 2-worker run plus
    its data tasks (or two light sweep trials) still schedule (docs/DESIGN.md §6.4).
    """
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"TRANSFORMERS_VERBOSITY": "error", "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
                        # where object storage is (never credentials: workers use their own identity)
                        **{k: os.environ[k] for k in STORAGE_ENV if k in os.environ}}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=env)
    else:
        cpus = max(os.cpu_count() or 1, math.ceil(min_cpus))
        start_local_ray(num_cpus=cpus, runtime_env=env)


def start_local_ray(attempts: int = 3, **kwargs: Any) -> None:
    """`ray.init` of a new local cluster, retried when the node misses Ray's fixed start-up deadline
    (seen on overloaded 2-core machines: "The current node timed out during startup").

    The cluster always gets its dashboard (on 127.0.0.1, a free port), and every process of the job is
    told its address (`RAY_API_SERVER_ADDRESS`): Ray Train's `PlacementGroupCleaner` asks the State API
    whether a run's controller is alive and removes the workers' placement group when it is not. Tune
    kills a trial's controller when ASHA stops it (or at its last epoch), so without a reachable State
    API each trial leaks its workers' CPUs until a small cluster deadlocks. Without `RAY_ADDRESS` the
    State API client would resolve the *latest `ray start` cluster* on the machine, not this one.
    """
    import socket

    import ray

    for attempt in range(attempts):
        with socket.socket() as sock:  # a free port for this cluster's dashboard
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        runtime_env = dict(kwargs.get("runtime_env") or {})
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}),
                                   "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
        try:
            ray.init(address="local", **{**kwargs, "runtime_env": runtime_env}, include_dashboard=True,
                     dashboard_host="127.0.0.1", dashboard_port=port)
            return
        except Exception as err:  # Ray raises a bare Exception here
            ray.shutdown()
            if attempt == attempts - 1 or "timed out during startup" not in str(err):
                raise


def check_resources(cfg: Config) -> None:
    """Fail before any work when no node can ever host a worker, or the cluster lacks GPUs entirely."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    need = worker_resources(cfg)
    if not any(all(node.get(k, 0) >= v for k, v in need.items()) for node in nodes):
        autoscaling = bool(os.environ.get("RAYMED_AUTOSCALING"))
        if not autoscaling:
            raise ResourceError(
                f"no node can host one training worker needing {need} (nodes offer "
                f"{[{k: node.get(k, 0) for k in need} for node in nodes]}); lower scaling.cpus_per_worker, "
                "set scaling.use_gpu=false, or set RAYMED_AUTOSCALING=1 on an autoscaling cluster"
            )
    total = ray.cluster_resources()
    if total.get("CPU", 0) < required_cpus(cfg) and not os.environ.get("RAYMED_AUTOSCALING"):
        raise ResourceError(
            f"the run needs {required_cpus(cfg):g} CPUs ({cfg.scaling.min_workers} workers x "
            f"{cfg.scaling.cpus_per_worker:g} + data actors) but the cluster has {total.get('CPU', 0):g}"
        )
