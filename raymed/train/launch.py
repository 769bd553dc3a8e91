"""`python -m raymed.train --config FILE.yaml [key=value ...]`: one fine-tuning run on a Ray cluster.

The driver side: validate the config, make sure the data exists (the built-in synthetic Med-VQA by
default, `raymed.data.plan`), check the cluster can ever hold the run (`raymed.cluster`), build the `TorchTrainer`
(Ray Train V2) and write one `raymed-result.json` (its result row, raymed.tune.results). The worker side is
`raymed.train.recipe.train_loop`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from raymed import storage as store
from raymed.cluster import (PREPROCESS_CPUS, ResourceError, check_resources, init_ray, keep_worker_nodes_removable,
                            required_cpus, scaling_config)
from raymed.config import Config, ConfigError, load_config, local_paths, with_paths
from raymed.data.plan import data_plan, micro_batches_per_epoch


# ---- the trainer --------------------------------------------------------------------------------
def build_trainer(cfg: Config, storage: str | None = None, extra_callbacks: list | None = None,
                  track: bool = True, paths: dict[str, str] | None = None) -> Any:
    """The Ray Train `TorchTrainer` of a validated config (the data is generated / checked here).
    `paths`: its relative local paths made absolute (`config.local_paths`, by the driver that read the config;
    default: from here). `track=False` inside sweep trials: Tune's logger callbacks track them (`raymed.tracking`)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from raymed.data.stream import encoded_split, ingest_config
    from raymed.data.transform import FamilyEncoderFactory
    from raymed.models import resolve
    from raymed.tracking import tracking_dir
    from raymed.train.recipe import train_loop

    # Ray workers (and Tune trials) do not run in the driver's directory: they get the user's config and its
    # relative paths made absolute here, once; the run's name, stored config and resume checks use the config as
    # the user wrote it (`Config.as_written`), so they do not depend on where the command ran.
    paths = local_paths([cfg]) if paths is None else paths
    cfg = with_paths(cfg, paths)
    train_dir, eval_sets = data_plan(cfg)
    storage = storage or storage_path(cfg)
    name = cfg.run_name()
    model_name = cfg.model.name
    plan = {
        "run_name": name,
        "micro_batches": micro_batches_per_epoch(train_dir, cfg),  # by world size (an elastic run's varies)
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
        train_loop_config={"config": cfg.as_written(), "paths": paths, "plan": plan},
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


def summarize(result: Any) -> dict[str, Any]:
    """The run's result row (raymed.tune.results): the `row.json` of its final checkpoint, read alone (never the
    whole checkpoint, which holds optimizer state)."""
    from raymed.tune.results import ROW_FILE

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
    from raymed.config import config_changes
    from raymed.tune.results import latest_checkpoint

    root = store.join(storage_path(cfg), cfg.run_name())
    if cfg.run.allow_config_change or not store.is_dir(root):
        return
    latest = latest_checkpoint(root)
    if latest is None:
        return
    try:
        old = store.read_json(store.join(latest, "model", "raymed.json"))["config"]
    except (OSError, KeyError, ValueError):
        return  # an incomplete checkpoint: Ray Train resumes from its own record, the worker checks
    changes = config_changes(old, cfg.as_written())
    if changes:
        raise ConfigError([*changes, f"run {cfg.run_name()!r} exists ({latest}) with another config: pick a new "
                           "run.name, or set run.allow_config_change=true to continue it with the new values"])


def storage_path(cfg: Config) -> str:
    """Absolute local path or URI of the run storage."""
    return store.resolve(cfg.run.storage)


def check_storage(cfg: Config, storage: str | None = None) -> None:
    """Run storage and data reachable and usable (driver side, before any worker starts): raises
    `storage.StorageError` naming the URI."""
    store.check(storage or storage_path(cfg), "run.storage")
    if cfg.data.path is not None and not cfg.data.path.startswith("hf://"):  # hf://: prepared by local_paths
        store.check_dataset(cfg.data.path, "data.path")
    for name, path in cfg.data.eval_sets.items():
        if not path.startswith("hf://"):
            store.check_dataset(path, f"data.eval_sets.{name}")


def fit(cfg: Config) -> dict[str, Any]:
    """Run training to completion (resuming a same-named run) and write `<storage>/<name>/raymed-result.json`."""
    from raymed.tune.results import RUN_RESULT_FILE

    check_storage(cfg)
    check_resume(cfg)
    init_ray(required_cpus(cfg) + 1)
    keep_worker_nodes_removable(check_resources(cfg))
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
