"""Experiment tracking, offline: TensorBoard event files and a local MLflow `file:` store, written by rank 0
of a real training run and by Ray Tune's logger callbacks in a real sweep; progress lines with ETA."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from raymed.config import ConfigError, load_config
from raymed.tracking import RunTracker, flat_params, missing_packages, mlflow_uri, tune_callbacks


def read_scalars(directory: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of every scalar in the TensorBoard event files under `directory`."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, dict[int, float]] = {}
    files = sorted(directory.rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {directory}"
    for path in files:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):  # TFRecord: length (u64), crc (u32), payload, crc (u32)
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def mlflow_runs(directory: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri(directory))
    experiments = client.search_experiments()
    return [(client, run) for e in experiments for run in client.search_runs([e.experiment_id])]


def test_progress_lines_and_scalars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    lines: list[str] = []
    tracker = RunTracker(["tensorboard", "mlflow"], "unit", tmp_path, every=2, total_steps=10, log=lines.append,
                         params={"train.lr": "0.001"})
    stats = {"samples": 0, "tokens": 0}
    for step in range(4, 9):  # a resumed run: starts at step 4
        stats = {"samples": stats["samples"] + 8, "tokens": stats["tokens"] + 80}
        for _ in range(2):  # two micro-batches per optimizer step (grad_accum=2): logged once
            tracker.step(step, 1.0 / step, 1e-3, stats, train_s=float(step - 3))
    tracker.epoch({"epoch": 1, "step": 8, "loss": 0.2, "eval/test/accuracy": 0.5, "zero_stage": 2, "ok": True,
                   "eval/test/closed_acc@llava-med": 0.25})
    tracker.close()

    progress = [line for line in lines if line.startswith("step ")]
    assert [line.split(":")[0] for line in progress] == ["step 4/10", "step 6/10", "step 8/10"]
    assert progress[-1].endswith("ETA 0m02s")  # 5 steps in 5 s here, 2 steps to go
    assert "8.0 samples/s" in progress[-1] and "80 tokens/s" in progress[-1]
    scalars = read_scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == pytest.approx({4: 0.25, 6: 1 / 6, 8: 0.125})
    assert scalars["eval/test/accuracy"] == {8: 0.5} and scalars["epoch/zero_stage"] == {8: 2.0}
    assert "epoch/ok" not in scalars
    [(client, run)] = mlflow_runs(tmp_path)
    assert run.data.params == {"train.lr": "0.001"} and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert {m.step: m.value for m in history} == pytest.approx({4: 0.25, 6: 1 / 6, 8: 0.125})
    # MLflow refuses `@` in a name: a published scoring rule's key is logged with `_` everywhere
    assert scalars["eval/test/closed_acc_llava-med"] == {8: 0.25}
    assert run.data.metrics["eval/test/closed_acc_llava-med"] == 0.25
    # MLflow's set_tracking_uri exports MLFLOW_TRACKING_URI; closing the tracker takes it back, so a later run
    # in this process (or a Ray worker it starts) does not write into this run's store
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_other_ranks_and_trials_write_nothing(tmp_path: Path) -> None:
    lines: list[str] = []
    for tracker in (RunTracker(["tensorboard"], "r1", tmp_path / "rank1", 1, 5, lines.append, rank=1),
                    RunTracker(["tensorboard"], "trial", None, 1, 5, lines.append)):
        tracker.step(1, 0.5, 1e-3, {"samples": 4, "tokens": 40}, 1.0)
        tracker.epoch({"step": 1, "loss": 0.5})
        tracker.close()
    assert not list(tmp_path.rglob("*")) and len(lines) == 1  # only the trial's rank 0 prints progress


def test_config_keys_and_unknown_tracker() -> None:
    cfg = load_config(None, ["run.report_to=[tensorboard,mlflow]", "train.log_every=5"])
    assert cfg.run.report_to == ["tensorboard", "mlflow"] and cfg.train.log_every == 5
    assert cfg.hash() == load_config(None).hash()  # tracking does not change the result, nor the run name
    with pytest.raises(ConfigError, match="run.report_to.0"):
        load_config(None, ["run.report_to=[comet]"])
    assert missing_packages(["tensorboard", "mlflow"]) == []
    assert flat_params({"a": {"b": 1, "c": [1]}, "d": {}}) == {"a.b": "1", "a.c": "[1]", "d": "{}"}


@pytest.mark.integration
def test_single_run_and_sweep_write_tracking_files(tmp_path: Path) -> None:
    import ray
    from ray import tune

    from raymed.cluster import start_local_ray
    from raymed.train.launch import fit

    start_local_ray(num_cpus=4, log_to_driver=False)
    try:
        # A real single run: rank 0 of a 1-worker Ray Train group logs every optimizer step.
        cfg = load_config(None, [
            "model.name=tiny-miss", "data.synth_n=10", "data.max_eval_rows=4", "data.synth_ood_style=null",
            "data.preprocess_actors=0", "train.epochs=2", "train.batch_size=8", "train.zero_shot=false",
            "scaling.num_workers=1", "run.metrics_export=false", "run.report_to=[tensorboard,mlflow]",
            "train.log_every=1", f"run.storage={tmp_path / 'runs'}", "run.name=tracked",
        ])
        summary = fit(cfg)
        run_dir = tmp_path / "runs" / "tracked"
        scalars = read_scalars(run_dir / "tensorboard")
        steps = summary["steps"]
        assert sorted(scalars["train/loss"]) == list(range(1, steps + 1))
        assert sorted(scalars["epoch/loss"]) == [h["step"] for h in summary["history"]]
        assert scalars["epoch/loss"][steps] == pytest.approx(summary["loss"])
        assert any(tag.startswith("eval/") for tag in scalars)
        [(client, run)] = mlflow_runs(run_dir)
        assert run.info.run_name == "tracked" and run.data.params["method.name"] == cfg.method.name
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == steps

        # A real Tune run with raymed's callbacks: each trial's reports reach TensorBoard and MLflow.
        def trainable(config: dict) -> None:
            for epoch in range(1, 4):
                tune.report({"epoch": epoch, "loss": config["lr"] / epoch, "eval/test/closed_acc@miss": 0.5})

        sweep_dir = tmp_path / "sweep"
        tuner = tune.Tuner(trainable, param_space={"lr": tune.grid_search([1.0, 2.0])},
                           run_config=tune.RunConfig(name="tracked-sweep", storage_path=str(sweep_dir),
                                                     callbacks=tune_callbacks(["tensorboard", "mlflow"],
                                                                              "tracked-sweep", sweep_dir)))
        assert not tuner.fit().errors
    finally:
        ray.shutdown()
    trial_losses = sorted(read_scalars(d)["ray/tune/loss"][3] for d in (sweep_dir / "tracked-sweep").iterdir()
                          if d.is_dir() and list(d.glob("events.out.tfevents.*")))
    assert trial_losses == pytest.approx([1 / 3, 2 / 3])
    runs = mlflow_runs(sweep_dir)
    assert len(runs) == 2
    assert sorted(c.get_metric_history(r.info.run_id, "loss")[-1].value for c, r in runs) == pytest.approx([1 / 3, 2 / 3])
    assert all(r.data.metrics["eval/test/closed_acc_miss"] == 0.5 for _, r in runs)
