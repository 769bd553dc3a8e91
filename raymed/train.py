"""`python -m raymed.train --config FILE.yaml [key=value ...]`: one fine-tuning run on a Ray cluster.

The driver side: validate the config, make sure the data exists (the built-in synthetic Med-VQA by
default), check the cluster can ever hold the run, build the `TorchTrainer` (Ray Train V2) and write one
`raymed-result.json` (its result row, raymed.results). The worker side is `raymed.worker.train_loop`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from . import elastic
from . import storage as store
from .config import Config, ConfigError, load_config

CACHE = Path(os.environ.get("RAYMED_CACHE", Path.home() / ".cache" / "raymed"))
# Logical CPUs the Ray Data preprocessing actors ask for: fractional, so they never starve the workers.
PREPROCESS_CPUS = 0.25


# Storage settings the workers need to reach the same object store as the driver (no secrets).
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


class ResourceError(RuntimeError):
    """A resource request the cluster can never satisfy."""


# ---- data ---------------------------------------------------------------------------------------
def synthetic_dataset(style: str, n: int, seed: int) -> Path:
    """Prepared shards of the built-in synthetic Med-VQA (generated once, cached by its parameters)."""
    from .data.prepare import MANIFEST, prepare
    from .data.synth import generate

    root = CACHE / "synth" / f"{style}-n{n}-s{seed}"
    prepared = root / "prepared"
    if not (prepared / MANIFEST).is_file():
        generate(root / "raw", n=n, seed=seed, style=style)
        prepare("vqa-rad", root / "raw", prepared, overwrite=True)
    return prepared


def data_plan(cfg: Config) -> tuple[str, dict[str, str]]:
    """(training data directory, eval sets name -> directory); the main eval set is named after its split."""
    if cfg.data.path is None:
        train_dir = str(synthetic_dataset(cfg.data.synth_style, cfg.data.synth_n, cfg.train.seed))
        extra = {}
        if cfg.data.synth_ood_style:
            extra["ood"] = str(synthetic_dataset(cfg.data.synth_ood_style, max(cfg.data.synth_n // 4, 10),
                                                 cfg.train.seed + 1))
    else:
        train_dir, extra = cfg.data.path, {}
    return train_dir, {cfg.data.eval_split: train_dir, **extra, **cfg.data.eval_sets}


def steps_per_epoch(train_dir: str, cfg: Config) -> int:
    """Optimizer steps per epoch: Ray Train splits `train` equally across workers (remainder dropped)."""
    from .data.prepare import read_manifest

    splits = read_manifest(train_dir)["splits"]
    if cfg.data.train_split not in splits:
        raise ConfigError([f"data.train_split: no split {cfg.data.train_split!r} in {train_dir}; "
                           f"splits: {', '.join(splits)}"])
    per_worker = splits[cfg.data.train_split]["rows"] // cfg.scaling.max_workers
    if per_worker == 0:
        raise ConfigError([f"scaling.num_workers: {cfg.scaling.max_workers} workers but only "
                           f"{splits[cfg.data.train_split]['rows']} training rows"])
    return max(1, math.ceil(per_worker / cfg.train.batch_size) // cfg.train.grad_accum)


# ---- resources ----------------------------------------------------------------------------------
def required_cpus(cfg: Config) -> float:
    """Logical CPUs of one run: workers + preprocessing actors + one Parquet read task."""
    return cfg.scaling.min_workers * cfg.scaling.cpus_per_worker + (max(cfg.data.preprocess_actors, 1) + 1) * PREPROCESS_CPUS


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


# ---- the trainer --------------------------------------------------------------------------------
def build_trainer(cfg: Config, storage: str | None = None, extra_callbacks: list | None = None,
                  track: bool = True) -> Any:
    """The Ray Train `TorchTrainer` of a validated config (the data is generated / checked here).
    `track=False` inside sweep trials: Tune's logger callbacks track them (`raymed.tracking`)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from .data.stream import encoded_split, ingest_config
    from .data.transform import FamilyEncoderFactory
    from .models import resolve
    from .tracking import tracking_dir
    from .worker import train_loop

    train_dir, eval_sets = data_plan(cfg)
    storage = storage or storage_path(cfg)
    name = cfg.run_name()
    # Ray workers do not run in the driver's directory: a relative model directory is made absolute for them
    # (after the run name, so the name does not depend on where the command ran).
    model_name = str(Path(cfg.model.name).resolve()) if Path(cfg.model.name).is_dir() else cfg.model.name
    loop_cfg = cfg.model_dump(mode="json")
    loop_cfg["model"]["name"] = model_name
    eval_sets = {k: v if "://" in str(v) else str(Path(v).resolve()) for k, v in eval_sets.items()}
    plan = {
        "run_name": name,
        "steps_per_epoch": steps_per_epoch(train_dir, cfg),
        "steps_per_epoch_at": elastic.steps_by_world(train_dir, cfg, steps_per_epoch),  # elastic: per world size
        "eval_sets": eval_sets,
        "fault_marker": store.join(storage, name, "fault-injected.txt"),
        "tracking_dir": str(tracking_dir(storage, name)) if track else None,
    }
    ray_path, ray_fs = store.ray_storage(storage)
    family = resolve(cfg.model.name).family.name
    train_ds = encoded_split(
        train_dir, cfg.data.train_split,
        FamilyEncoderFactory(family, model_name, cfg.data.max_length, train=True, template=cfg.model.template,
                             image_aspect=cfg.data.image_aspect),
        batch_size=max(cfg.train.batch_size, 16), actors=cfg.data.preprocess_actors, num_cpus=PREPROCESS_CPUS,
    )
    return TorchTrainer(
        train_loop,
        train_loop_config={"config": loop_cfg, "plan": plan},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=name, storage_path=ray_path, storage_filesystem=ray_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            callbacks=extra_callbacks or None,
        ),
        datasets={"train": train_ds},
        dataset_config=ingest_config(cfg.data.preserve_order),
    )


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


def summarize(result: Any) -> dict[str, Any]:
    """The run's result row (raymed.results): the `row.json` of its final checkpoint, read alone (never the
    whole checkpoint, which holds optimizer state)."""
    from .results import ROW_FILE

    if result.checkpoint is None:
        raise RuntimeError(f"run {result.path} finished without a checkpoint: {result.error}")
    ckpt = result.checkpoint
    with ckpt.filesystem.open_input_stream(f"{ckpt.path}/{ROW_FILE}") as f:
        row = json.loads(f.read())
    return {**row, "checkpoint": store.uri_of(ckpt.filesystem, ckpt.path),
            "worker_nodes": row["history"][-1].get("worker_nodes")}


def check_resume(cfg: Config) -> None:
    """Before any worker starts: a re-run of a named run resumes it only under the config it was started with
    (the worker checks again), unless `run.allow_config_change`."""
    from .config import config_changes
    from .results import CHECKPOINT_RE

    root = store.join(storage_path(cfg), cfg.run_name())
    if cfg.run.allow_config_change or not store.is_dir(root):
        return
    ckpts = sorted((int(m.group(1)), n) for n in store.listdir(root) if (m := CHECKPOINT_RE.match(n)))
    if not ckpts:
        return
    latest = store.join(root, ckpts[-1][1])
    try:
        old = store.read_json(store.join(latest, "model", "raymed.json"))["config"]
    except (OSError, KeyError, ValueError):
        return  # an incomplete checkpoint: Ray Train resumes from its own record, the worker checks
    changes = config_changes(old, cfg.model_dump(mode="json"))
    if changes:
        raise ConfigError([*changes, f"run {cfg.run_name()!r} exists ({latest}) with another config: pick a new "
                           "run.name, or set run.allow_config_change=true to continue it with the new values"])


def _read_json(fs: Any, path: str) -> Any:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def storage_path(cfg: Config) -> str:
    """Absolute local path or URI of the run storage."""
    return store.resolve(cfg.run.storage)


def check_storage(cfg: Config, storage: str | None = None) -> None:
    """Run storage and data reachable and usable (driver side, before any worker starts): raises
    `storage.StorageError` naming the URI."""
    store.check(storage or storage_path(cfg), "run.storage")
    if cfg.data.path is not None:
        store.check_dataset(cfg.data.path, "data.path")
    for name, path in cfg.data.eval_sets.items():
        store.check_dataset(path, f"data.eval_sets.{name}")


def fit(cfg: Config) -> dict[str, Any]:
    """Run training to completion (resuming a same-named run) and write `<storage>/<name>/raymed-result.json`."""
    from .results import RUN_RESULT_FILE

    check_storage(cfg)
    check_resume(cfg)
    init_ray(required_cpus(cfg) + 1)
    check_resources(cfg)
    trainer = build_trainer(cfg)
    result = trainer.fit()
    summary = summarize(result)
    out = store.uri_of(result.filesystem, f"{result.path}/{RUN_RESULT_FILE}")
    with result.filesystem.open_output_stream(f"{result.path}/{RUN_RESULT_FILE}") as f:
        f.write(json.dumps(summary, indent=2).encode())
    return {**summary, "result_json": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raymed.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (only what differs from defaults; may `inherit:` others)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 method.name=lora")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        summary = fit(cfg)
    except (ConfigError, ResourceError, store.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = summary["metrics"]
    print(f"run {summary['trial_id']}: {summary['steps']} steps in {summary['wall_s']:.0f}s, "
          f"trainable {summary['params']['trainable']:,} ({summary['params']['percent']:.3f}%)")
    for k in sorted(m):
        print(f"  {k:40s} {m[k]:.4f}" if isinstance(m[k], float) else f"  {k:40s} {m[k]}")
    print(f"result: {summary['result_json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
