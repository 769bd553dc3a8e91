"""What we ship runs as shipped: every file under configs/train/ and configs/sweeps/, and the built-in default sweep,
run end to end from a project folder laid out as the docs lay it out (configs/, models/llava-med-v1.5-hf,
models/miss-hf, data/<dataset>), with the relative paths as shipped.

Only hardware and size change, through the command-line overrides a user has (`HARDWARE`, `SIZE`): CPU instead of
GPUs, one worker (its ZeRO stage kept with `deepspeed.shard_single_worker`), fp32 where bf16 needs a GPU, Ray Data
tasks; one epoch, four evaluation questions, three new tokens, one learning rate of the grid. Every other shipped
key keeps its value (gradient checkpointing, grad_accum, ZeRO stage, offload, template, image aspect, batch size,
max_length, ...): each trial's stored config is compared with the file. Every (model family, method) of every
grid trains, `ln` with every tower choice, and every file trains (tests/fixtures/shipped.py `tier_plan`: one trial
costs ~100 CPU-seconds of Ray start-up here, so not every point of every file).
The models and data are tiny stand-ins written in the real releases' layouts and converted / prepared with the
documented commands (tests/fixtures/).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from raymed.cluster import start_local_ray
from raymed.config import set_dotted
from raymed.tune.sweep import DEFAULT_SWEEP, grid_points, load_sweep
from tests.fixtures import datasets
from tests.fixtures.llava_release import write_llava_med_v15
from tests.fixtures.miss_release import target_dir, write_miss_checkpoint
from tests.fixtures.shipped import (SWEEP_SIZE, _family, _units, assert_kept, assert_schedule, latest_checkpoint,
                                    shrink, tier_plan)

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml")) + [DEFAULT_SWEEP]
TRAIN = sorted((ROOT / "configs" / "train").glob("*.yaml"))
PLAN = tier_plan(SWEEPS)

# ---- the project folder -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """configs/ as shipped; the models and datasets the configs name, converted and prepared as documented."""
    from raymed.models.convert import main as convert_main
    from raymed.data.cli import main as data_main

    root = tmp_path_factory.mktemp("project")
    shutil.copytree(ROOT / "configs", root / "configs")
    raw = tmp_path_factory.mktemp("downloads")
    # configs/models/llava-med-v1.5.yaml, docs/llava-med.md step 2
    write_llava_med_v15(raw / "llava-med-v1.5-mistral-7b")
    assert convert_main(["--family", "llava", "--input", str(raw / "llava-med-v1.5-mistral-7b"),
                         "--out", str(root / "models" / "llava-med-v1.5-hf")]) == 0
    # configs/models/miss-base.yaml (a tiny MISS architecture stands for miss-base as --config-from)
    write_miss_checkpoint(raw / "model_base_vqa.pth")
    assert convert_main(["--family", "miss", "--input", str(raw / "model_base_vqa.pth"),
                         "--config-from", str(target_dir(raw)), "--out", str(root / "models" / "miss-hf")]) == 0
    # configs/data/*.yaml: `raymed data prepare --format FORMAT --input RAW --out data/NAME`
    for name, fmt, write in (("vqa-rad", "vqa-rad", datasets.vqa_rad), ("slake", "slake", datasets.slake),
                             ("pathvqa", "pathvqa", datasets.pathvqa), ("iu-xray", "r2gen", datasets.iu_xray)):
        write(raw / name)
        assert data_main(["prepare", "--format", fmt, "--input", str(raw / name),
                          "--out", str(root / "data" / name)]) == 0
    return root


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    # RAYMED_FAULT_DELAY_S: an injected fault lands after Ray Train recorded the last checkpoint (the resume test)
    start_local_ray(num_cpus=6, log_to_driver=False, runtime_env={"env_vars": {"TRANSFORMERS_VERBOSITY": "error",
                                                                               "RAYMED_FAULT_DELAY_S": "3"}})
    yield
    ray.shutdown()


# ---- sweeps -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem if p != DEFAULT_SWEEP else "default")
def test_shipped_sweep_runs_every_grid_point_as_shipped(project, ray_cluster, path, monkeypatch, capsys):
    from raymed.tune.sweep import main as tune_main

    monkeypatch.chdir(project)
    config = f"configs/sweeps/{path.name}" if path != DEFAULT_SWEEP else None
    sweep, base = load_sweep(path, [], check_paths=False)
    lr = max(sweep.search["train.lr"])
    overrides = [*shrink(base), f"sweep.search.train.lr=[{lr}]", *PLAN[path], *SWEEP_SIZE]
    args = [*(["--config", config] if config else []), "--out", "experiments", *overrides]
    assert tune_main(args) == 0, capsys.readouterr().err[-3000:]

    exp = project / "experiments" / sweep.name
    trials = json.loads((exp / "results.json").read_text())["trials"]
    shrunk, _ = load_sweep(path, [o for o in overrides if o.startswith("sweep.")], check_paths=False)
    points = grid_points(shrunk, base)
    assert len(trials) == len(points) and {t["method"] for t in trials} == set(shrunk.search["method.name"])
    for trial in trials:
        assert not trial.get("error") and trial["epochs"] == 1 and trial["steps"] > 0, trial["trial_id"]
        point: dict[str, Any] = {}  # the trial's grid point, from its stored config
        shipped = base
        for key in shrunk.search:
            section, name = key.split(".", 1)
            point[key] = trial["config"][section][name]
            shipped = set_dotted(shipped, key, point[key])
        assert point in points, point
        assert_kept(trial["config"], shipped, [o for o in overrides if not o.startswith("sweep.")])
        assert_schedule(latest_checkpoint(exp / "runs" / trial["trial_id"]))


def test_the_tier_trains_every_method_of_every_shipped_grid():
    """Across the sweep files, every (model family, method) of every grid trains once, `ln` with every tower choice,
    and every file trains at least one point (tests/fixtures/shipped.py says why not every point of every file)."""
    wanted, covered = set(), set()
    for path in SWEEPS:
        sweep, base = load_sweep(path, [], check_paths=False)
        shrunk, _ = load_sweep(path, [o for o in PLAN[path]], check_paths=False)
        family = _family(base)
        wanted |= {(family, m, str(t)) for m, t in _units(sweep.search)}
        points = grid_points(shrunk, base)
        assert points, path.name
        covered |= {(family, p["method.name"], str(p.get("method.towers"))) for p in points}
        assert set(shrunk.search["method.name"]) <= set(sweep.search["method.name"])  # only shipped values
    assert wanted <= covered, wanted - covered


# ---- single runs ------------------------------------------------------------------------------------------------
RESUMED = "llava-med-vqa-rad-ln"  # the train command of docs/llava-med.md, also killed and re-run


@pytest.mark.parametrize("path", TRAIN, ids=lambda p: p.stem)
def test_shipped_train_config_runs_as_shipped(project, ray_cluster, path, monkeypatch):
    """The train command as documented, to the end. The documented LLaVA-Med one is killed in its second epoch and
    the same command resumes from the first epoch's checkpoint and finishes (a crashed LoRA run resuming exactly,
    with gradient accumulation on two workers, is tests/test_train.py's)."""
    from raymed.config import load_config, read_yaml
    from raymed.data.plan import data_plan, micro_batches_per_epoch, optimizer_steps
    from raymed.train.launch import main as train_main

    monkeypatch.chdir(project)
    base = read_yaml(project / "configs" / "train" / path.name)
    resumed = path.stem == RESUMED
    epochs = 2 if resumed else 1
    overrides = [*shrink(base), f"train.epochs={epochs}"]
    cfg = load_config(f"configs/train/{path.name}", overrides)
    micro = micro_batches_per_epoch(data_plan(cfg)[0], cfg)[cfg.scaling.min_workers]
    per_epoch = optimizer_steps(micro, cfg.train.grad_accum)
    command = ["--config", f"configs/train/{path.name}", *overrides]
    run = project / "runs" / cfg.run_name()
    if resumed:
        with pytest.raises(Exception):  # a worker dies at the first step of epoch 2
            train_main([*command, f"run.fail_at_step={per_epoch + 1}"])
        assert (run / "fault-injected.txt").is_file() and (run / "epoch-0001").is_dir()
    assert train_main(command) == 0  # after a crash, the same command again resumes after epoch 1

    result = json.loads((run / "raymed-result.json").read_text())
    assert [h["epoch"] for h in result["history"]] == list(range(1, epochs + 1))
    assert result["steps"] == epochs * per_epoch
    assert_kept(result["config"], base, overrides)
    assert_schedule(latest_checkpoint(run))
    assert math.isfinite(result["loss"])
