"""Packed trials: a fractional `scaling.gpus_per_worker` puts several single-worker trials on one GPU. On CPU
this checks what the runs ask Ray for (worker bundles, trials at once) and what the config refuses."""

from __future__ import annotations

import pytest

from raymed.cluster import scaling_config
from raymed.config import ConfigError, load_config
from raymed.tune.sweep import SweepConfig, concurrent_trials

pytestmark = pytest.mark.unit

GPU = ["model.name=tiny-llava", "scaling.use_gpu=true", "scaling.cpus_per_worker=1"]


def test_fractional_gpu_single_worker_trials_pack_four_per_gpu():
    packed = load_config(None, [*GPU, "scaling.num_workers=1", "scaling.gpus_per_worker=0.25"])
    scaling = scaling_config(packed)
    assert scaling.resources_per_worker == {"CPU": 1.0, "GPU": 0.25}
    assert scaling.total_resources == {"CPU": 1.0, "GPU": 0.25}  # the worker group's placement-group bundle
    sweep = SweepConfig(trial_cpus=0.05)
    assert concurrent_trials({"CPU": 32.0, "GPU": 1.0}, packed, sweep) == 4
    assert concurrent_trials({"CPU": 32.0, "GPU": 2.0}, packed, sweep) == 8
    assert concurrent_trials({"CPU": 4.0, "GPU": 1.0}, packed, sweep) == 2  # CPUs bound it first (1.55 a trial)
    whole = load_config(None, [*GPU, "scaling.num_workers=1"])
    assert scaling_config(whole).resources_per_worker == {"CPU": 1.0, "GPU": 1.0}
    assert concurrent_trials({"CPU": 32.0, "GPU": 1.0}, whole, sweep) == 1
    assert packed.hash() == whole.hash()  # packing does not change what a trial computes


def test_fractional_gpus_are_refused_for_multi_worker_groups():
    with pytest.raises(ConfigError, match=r"scaling.gpus_per_worker: 0.5 GPU per worker with 2 workers"):
        load_config(None, [*GPU, "scaling.num_workers=2", "scaling.gpus_per_worker=0.5"])
    with pytest.raises(ConfigError, match=r"scaling.gpus_per_worker: 1.5: more than one GPU"):
        load_config(None, [*GPU, "scaling.num_workers=1", "scaling.gpus_per_worker=1.5"])
    two = load_config(None, [*GPU, "scaling.num_workers=2", "scaling.gpus_per_worker=2"])  # whole GPUs: fine
    assert scaling_config(two).total_resources == {"CPU": 2.0, "GPU": 4.0}
