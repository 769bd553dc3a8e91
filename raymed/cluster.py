"""Ray start-up and resource checks: connect to (or start) the cluster, and fail early when it can never hold a run.

Used by every driver that runs on Ray: `raymed.train`, `raymed.tune`, `tools/pretrain.py` (through `train.fit`) and the
benchmark suites. What one run asks for: `worker_resources` (one training worker), `scaling_config` (its worker group)
and `required_cpus` (workers + Ray Data preprocessing actors).

`python -m raymed.cluster report-node-types CLUSTER.yaml` (run on the head by the shipped cluster files, after
`ray start --head`): tells the cluster which node types its autoscaler can launch (see `report_node_types`).
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raymed.config import Config

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


@dataclass(frozen=True)
class Capacity:
    """What the cluster can hold: the shapes of the nodes it has or can launch, and the most of each resource.

    On an autoscaling cluster the GCS holds the autoscaler's node types (their resources, `min_workers`,
    `max_workers`): a node type counts with `max_workers` nodes even while none runs. Ray's v2 autoscaler and KubeRay
    report them; the v1 autoscaler that `ray up` runs does not, so the shipped cluster files report them with
    `report_node_types` after `ray start --head`. Ray Data reads the same record
    (`ray._private.state.get_cluster_config`) to size its autoscaling."""

    shapes: tuple[dict[str, float], ...]
    totals: dict[str, float]
    autoscaling: bool
    node_types: tuple[str, ...] = ()

    def hosts(self, need: dict[str, float]) -> bool:
        return any(all(shape.get(k, 0) >= v for k, v in need.items()) for shape in self.shapes)

    def refusal_note(self) -> str:
        """What a refusal adds when the cluster reported no node types: how to report them (`report_node_types`)."""
        return "" if self.autoscaling else NOT_REPORTED

    def describe(self) -> str:
        where = f"node types {', '.join(self.node_types)} at their max_workers" if self.autoscaling else "its nodes"
        return f"{where}: {', '.join(f'{v:g} {k}' for k, v in sorted(self.totals.items()) if k in ('CPU', 'GPU'))}"


def capacity() -> Capacity:
    """The connected cluster's `Capacity`: its live nodes, and what its autoscaler can launch."""
    import ray
    from ray._private.state import state

    live = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    totals = dict(ray.cluster_resources())
    config = state.get_cluster_config()
    groups = [g for g in (config.node_group_configs if config else []) if g.max_count != 0 and g.resources]
    if not any(g.max_count == -1 or g.max_count > g.min_count for g in groups):
        return Capacity(tuple(live), totals, autoscaling=False)
    launchable = state.get_max_resources_from_cluster_config() or {}
    for key, value in launchable.items():
        totals[key] = max(totals.get(key, 0.0), float(value))
    shapes = tuple(live) + tuple({k: float(v) for k, v in g.resources.items()} for g in groups)
    return Capacity(shapes, totals, autoscaling=True, node_types=tuple(g.name for g in groups))


def check_resources(cfg: Config, cap: Capacity | None = None) -> Capacity:
    """Fail before any work when no node the cluster has or can launch can host a worker, or when even all of
    them hold too few CPUs or GPUs for the run. Returns the cluster's `Capacity`."""
    cap = cap or capacity()
    need = worker_resources(cfg)
    if not cap.hosts(need):
        raise ResourceError(
            f"no node can host one training worker needing {need} (the cluster's "
            f"{'node types' if cap.autoscaling else 'nodes'} offer {[{k: s.get(k, 0) for k in need} for s in cap.shapes]}"
            "); lower scaling.cpus_per_worker, or set scaling.use_gpu=false, or add a node type that fits "
            "(cluster/*.yaml: available_node_types)" + cap.refusal_note()
        )
    if cap.totals.get("CPU", 0) < required_cpus(cfg):
        raise ResourceError(
            f"the run needs {required_cpus(cfg):g} CPUs ({cfg.scaling.min_workers} workers x "
            f"{cfg.scaling.cpus_per_worker:g} + data actors) but the cluster holds at most {cap.describe()}"
            + cap.refusal_note()
        )
    return cap


def keep_worker_nodes_removable(cap: Capacity) -> None:
    """On an autoscaling cluster, start Ray Data's two cluster-wide actors (its autoscaling coordinator and its
    stats actor) on this, the driver's, node before any trial or worker runs. Ray Data and Ray Train create them on
    first use, detached and pinned to the node of whichever process asks first: a trial's or a training worker's
    node. A node running an actor is never idle, so the autoscaler would keep that (GPU) node for good after the
    sweep (seen with Ray's autoscaler on its fake multi-node provider, tests/test_autoscaling.py). Started here
    first, they stay on the head, where the driver of a `ray job submit` runs; later requests get the same actors."""
    if not cap.autoscaling:
        return
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )
    from ray.data._internal.stats import get_or_create_stats_actor

    get_or_create_autoscaling_coordinator()
    get_or_create_stats_actor()


NOT_REPORTED = ("; on an autoscaling cluster whose node types the GCS does not hold (Ray's v1 autoscaler), run "
                "`python -m raymed.cluster report-node-types CLUSTER.yaml` on the head (the files under cluster/ do)")


def node_types_config(cluster_file: dict[str, Any]) -> Any:
    """A cluster file's worker node types as the autoscaler's `ClusterConfig` record (resources, min, max)."""
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    for name, node in cluster_file["available_node_types"].items():
        if name == cluster_file.get("head_node_type"):
            continue
        group = config.node_group_configs.add(name=name, min_count=int(node.get("min_workers", 0)),
                                              max_count=int(node.get("max_workers", cluster_file.get("max_workers", 0))))
        for key, value in (node.get("resources") or {}).items():
            group.resources[key] = int(value)
    return config


def report_node_types(path: str | Path) -> Any:
    """Record in the connected cluster's GCS the node types the autoscaler can launch, from the cluster file it runs
    with (`ray up` puts it at `~/ray_bootstrap_config.yaml` on the head), where Ray's v2 autoscaler and KubeRay
    write them (`ray._private.state.get_cluster_config` reads it; so do `capacity` and Ray Data). Returns the
    record."""
    import ray
    import yaml
    from ray.experimental.internal_kv import _internal_kv_put

    config = node_types_config(yaml.safe_load(Path(path).expanduser().read_text()))
    _internal_kv_put(ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, config.SerializeToString(), overwrite=True,
                     namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE)
    return config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raymed.cluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report-node-types", help="record the autoscaler's node types in the cluster's GCS")
    report.add_argument("cluster_file", help="the cluster file the autoscaler runs with")
    args = ap.parse_args(argv)
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), logging_level="error")
    config = report_node_types(args.cluster_file)
    for group in config.node_group_configs:
        print(f"{group.name}: {dict(group.resources)} x {group.min_count}..{group.max_count}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
