"""Experiment tracking (TensorBoard, MLflow, Weights & Biases) and per-step progress lines.

`run.report_to` names the trackers (default: TensorBoard). A sweep logs through Ray Tune's logger callbacks
(`tune_callbacks`): one entry per trial report, i.e. per epoch. A single run logs from rank 0 of its worker
group (`RunTracker`): every `train.log_every` optimizer steps a progress line (loss, lr, throughput, ETA)
and the same scalars, then each epoch's metrics. Nothing leaves the machine unless asked: TensorBoard writes
event files, MLflow a local `file:` store unless `MLFLOW_TRACKING_URI` names a server, W&B runs offline
unless `WANDB_MODE` says otherwise.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

# tracker -> (module it imports, what to install)
TRACKERS = {"tensorboard": ("tensorboardX", "tensorboardX"), "mlflow": ("mlflow", "mlflow-skinny"),
            "wandb": ("wandb", "wandb")}


def missing_packages(report_to: Sequence[str]) -> list[str]:
    """Config errors for trackers whose package is not installed here."""
    return [f"run.report_to: {name} needs the {module} package (pip install {pkg})"
            for name, (module, pkg) in TRACKERS.items()
            if name in report_to and importlib.util.find_spec(module) is None]


def tracking_dir(storage: str, run_name: str) -> Path:
    """Where a single run's tracking files go: beside its checkpoints on local storage; on remote storage
    (s3://, gs://), under the local cache of the node that runs rank 0."""
    if "://" in storage:
        cache = Path(os.environ.get("RAYMED_CACHE", Path.home() / ".cache" / "raymed"))
        return cache / "tracking" / run_name
    return Path(storage) / run_name


def mlflow_uri(directory: Path) -> str:
    """`MLFLOW_TRACKING_URI` when set, else a `file:` store in `directory/mlruns` (no server, no database;
    MLflow 3 asks for `MLFLOW_ALLOW_FILE_STORE=true` to use one, set here for this process)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (Path(directory).resolve() / "mlruns").as_uri()


def tracker_name(key: str) -> str:
    """A metric's name in the trackers: a scoring rule's `@` (`closed_acc@llava-med`, docs/scoring.md) becomes `_`,
    as TensorBoard writes it anyway and MLflow refuses `@`."""
    return key.replace("@", "_")


def tune_callbacks(report_to: Sequence[str], experiment: str, directory: Path) -> list[Any]:
    """Ray Tune logger callbacks for a sweep's `RunConfig(callbacks=...)`."""
    callbacks: list[Any] = []
    if "tensorboard" in report_to:  # Tune adds it by default too; named here so the choice is visible
        from ray.tune.logger import TBXLoggerCallback

        callbacks.append(TBXLoggerCallback())
    if "mlflow" in report_to:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        class MLflowNames(MLflowLoggerCallback):  # Ray's callback, with metric names MLflow accepts
            def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
                super().log_trial_result(iteration, trial, {tracker_name(k): v for k, v in result.items()})

        callbacks.append(MLflowNames(tracking_uri=mlflow_uri(directory), experiment_name=experiment))
    if "wandb" in report_to:
        from ray.air.integrations.wandb import WandbLoggerCallback

        os.environ.setdefault("WANDB_MODE", "offline")
        callbacks.append(WandbLoggerCallback(project="raymed", group=experiment, dir=str(directory)))
    return callbacks


class RunTracker:
    """Rank 0's progress lines and tracker logging for one run; on other ranks (or with `directory=None`:
    inside a sweep trial, where Tune's callbacks track) only the progress lines of rank 0 remain."""

    def __init__(self, report_to: Sequence[str], run_name: str, directory: Path | None, every: int,
                 total_steps: int, log: Callable[[str], None], params: Mapping[str, Any] | None = None,
                 rank: int = 0) -> None:
        self.every, self.total, self.log, self.rank = every, total_steps, log, rank
        self.first_step: int | None = None
        self.last_step = -1
        self.tb = self.mlflow = self.wandb = None
        if rank != 0 or directory is None:
            return
        directory = Path(directory)
        if "tensorboard" in report_to:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(directory / "tensorboard"))
        if "mlflow" in report_to:
            import mlflow

            # `set_tracking_uri` also sets MLFLOW_TRACKING_URI for the process (and every Ray worker it starts
            # later): put the user's value back on close, so the next run writes beside its own checkpoints.
            self._user_uri = os.environ.get("MLFLOW_TRACKING_URI")
            mlflow.set_tracking_uri(mlflow_uri(directory))
            mlflow.set_experiment("raymed")
            self.mlflow = mlflow.start_run(run_name=run_name)
            mlflow.log_params(dict(params or {}))
        if "wandb" in report_to:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            self.wandb = wandb.init(project="raymed", name=run_name, dir=str(directory), config=dict(params or {}))
        if report_to:
            log(f"tracking ({', '.join(report_to)}) in {directory}")

    @classmethod
    def for_worker(cls, cfg: Any, plan: Mapping[str, Any], rank: int, total_steps: int,
                   log: Callable[[str], None]) -> "RunTracker":
        """The tracker of a Ray Train worker: `plan["tracking_dir"]` is None inside sweep trials."""
        directory = plan.get("tracking_dir")
        return cls(cfg.run.report_to, plan["run_name"], Path(directory) if directory else None, cfg.train.log_every,
                   total_steps, log, flat_params(cfg.as_written()), rank)

    def step(self, step: int, loss: Any, lr: float, stats: Mapping[str, float], train_s: float) -> None:
        """Called after every micro-batch; logs at optimizer steps that are multiples of `every`. `loss` may be a
        device tensor: it is read (a host sync) only at those steps.
        `stats` are the run's all-worker totals of samples and tokens, `train_s` their training seconds."""
        if self.first_step is None:
            self.first_step = step - 1  # a resumed run starts past 0
        if self.rank != 0 or self.every <= 0 or step % self.every or step == self.last_step:
            return
        self.last_step = step
        done = step - self.first_step
        eta = (self.total - step) * train_s / max(done, 1)
        loss = float(loss)
        values = {"loss": loss, "lr": lr, "samples_per_s": stats["samples"] / max(train_s, 1e-9),
                  "tokens_per_s": stats["tokens"] / max(train_s, 1e-9)}
        if stats.get("padded_tokens"):
            values["padding_fraction"] = 1 - stats["tokens"] / stats["padded_tokens"]
        self.log(f"step {step}/{self.total}: loss {loss:.4f}, lr {lr:.2e}, {values['samples_per_s']:.1f} samples/s, "
                 f"{values['tokens_per_s']:.0f} tokens/s, ETA {_duration(eta)}")
        self._scalars({f"train/{k}": v for k, v in values.items()}, step)

    def epoch(self, metrics: Mapping[str, Any]) -> None:
        """An epoch's report: every numeric metric, at its optimizer step."""
        if self.rank != 0:
            return
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._scalars({k if "/" in k else f"epoch/{k}": v for k, v in numbers.items()}, int(metrics["step"]))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            import mlflow

            mlflow.end_run()
            mlflow.set_tracking_uri(self._user_uri or "")
            if self._user_uri is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
        if self.wandb is not None:
            self.wandb.finish()

    def _scalars(self, values: Mapping[str, float], step: int) -> None:
        values = {tracker_name(k): v for k, v in values.items()}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.mlflow is not None:
            import mlflow

            mlflow.log_metrics(values, step=step)
        if self.wandb is not None:
            self.wandb.log(dict(values), step=step)


def flat_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A config as dotted key -> string value (what MLflow and W&B take as run parameters)."""
    out: dict[str, str] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping) and v:
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:500]
    return out


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"
