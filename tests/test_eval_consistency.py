"""A model answers the same questions the same way whoever runs it: the worker's evaluation on 1 or 3 Ray Train
workers (what a run with that many workers, or an elastic run after a resize, evaluates with; 3 does not divide the
batches) and `raymed eval` in one process; batched LLaVA generation answers as one prompt at a time does.

Two models whose answers could depend on the batches: MISS converted from its original checkpoint (its recipe pads
the questions of a batch to the longest, 100 a batch, and BLIP's decoder attends to that padding) on more than 100
questions, and a LLaVA in batches of 3 (left padding). Rows used to be interleaved across ranks, so each rank's
batches, and MISS's answers, changed with the number of workers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raymed.cluster import start_local_ray
from raymed.data.prepare import prepare
from raymed.data.synth import generate
from tests.fixtures.miss_release import target_dir, write_miss_checkpoint

pytestmark = pytest.mark.integration
LLAVA_BATCH = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import ray

    from raymed.models.convert import main as convert_main

    root = tmp_path_factory.mktemp("consistency")
    write_miss_checkpoint(root / "model_base_vqa.pth")
    assert convert_main(["--family", "miss", "--input", str(root / "model_base_vqa.pth"),
                         "--config-from", str(target_dir(root)), "--out", str(root / "miss-hf")]) == 0
    generate(root / "raw", n=90, seed=5, size=32, test_fraction=0.5)
    prepare("vqa-rad", root / "raw", root / "data")
    start_local_ray(num_cpus=4, log_to_driver=False, runtime_env={"env_vars": {"TRANSFORMERS_VERBOSITY": "error"}})
    yield root
    ray.shutdown()


def evaluate_in_workers(config: dict) -> None:
    """Ray Train loop: each model (ln-tuned, untrained) evaluated by the worker's own Evaluator; rank 0 saves the
    predictions it scored."""
    import ray.train
    import torch.distributed as dist

    from raymed.config import Config
    from raymed.train.engine import build_engine
    from raymed.models.methods import apply_method
    from raymed.models import load_model, load_processor, resolve
    from raymed.eval.evaluator import Evaluator

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    for name, overrides in config["models"].items():
        cfg = Config.model_validate(overrides)
        ref = resolve(cfg.model.name)
        model, _ = apply_method(load_model(ref), ref, "ln")
        engine = build_engine(model, cfg, bf16=False, world=world, total_steps=1)
        evaluator = Evaluator(cfg, ref, load_processor(ref), engine, {"eval_sets": {"test": config["data"]}}, rank,
                              world)
        _, records = evaluator.run(prefix="eval")
        if rank == 0:
            out = Path(config["out"]) / f"{name}-{world}.json"
            out.write_text(json.dumps([(r["id"], r["prediction"]) for r in records["test"]]))
        dist.barrier()


def test_the_same_answers_with_1_and_3_workers_and_raymed_eval(setup, tmp_path):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from raymed.eval.evaluate import evaluate

    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    root = setup
    models = {"miss": {"model": {"name": str(root / "miss-hf")}, "train": {"max_new_tokens": 10}},
              "llava": {"model": {"name": "tiny-llava"}, "data": {"max_length": 64},
                        "train": {"eval_batch_size": LLAVA_BATCH, "max_new_tokens": 6}}}
    rows = json.loads((root / "data" / "manifest.json").read_text())["splits"]["test"]["rows"]
    assert rows > 100  # more than one of MISS's batches
    for world in (1, 3):
        TorchTrainer(evaluate_in_workers, torch_config=TorchConfig(backend="gloo"),
                     train_loop_config={"models": models, "data": str(root / "data"), "out": str(tmp_path)},
                     scaling_config=ray.train.ScalingConfig(num_workers=world, resources_per_worker={"CPU": 0.5}),
                     run_config=ray.train.RunConfig(storage_path=str(tmp_path / "ray"))).fit()
    for name, overrides in models.items():
        answers = [json.loads((tmp_path / f"{name}-{w}.json").read_text()) for w in (1, 3)]
        assert len(answers[0]) == rows and answers[0] == answers[1], name
        # `raymed eval` of the same model (its defaults but for the lengths), in one process
        summary = evaluate(overrides["model"]["name"], str(root / "data"), out=tmp_path / f"eval-{name}",
                           batch_size=overrides["train"].get("eval_batch_size"),
                           max_new_tokens=overrides["train"]["max_new_tokens"])
        assert summary["rows"] == rows
        in_process = [(r["id"], r["prediction"]) for r in map(json.loads, (tmp_path / f"eval-{name}" /
                                                                               "predictions.jsonl").open())]
        assert [list(a) for a in in_process] == answers[0], name
