"""Shared fixtures: tiny models and batches built locally (never downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from raymed.models import load_processor, resolve


# Benchmark smoke tests run every suite end to end (minutes on 2 cores): `slow` tier, `pytest -m slow`.
SLOW_MODULES = ("test_bench.py",)


def pytest_collection_modifyitems(items):
    """Tests without a tier marker are unit tests; gpu tests skip without CUDA."""
    for item in items:
        if item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        if not any(item.get_closest_marker(m) for m in ("integration", "gpu", "slow")):
            item.add_marker(pytest.mark.unit)
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


def make_rows(n: int = 2, seed: int = 0, size: int = 40) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    qa = [("is there a lesion in the liver?", "yes"), ("how many lesions are there?", "three"),
          ("which organ is shown?", "left kidney")]
    return {
        "image": images,
        "question": [qa[i % 3][0] for i in range(n)],
        "answer": [qa[i % 3][1] for i in range(n)],
        "task": ["vqa"] * n,
        "answer_type": ["closed", "open", "open"][:n] + ["open"] * max(0, n - 3),
    }


def tiny_batch(model_name: str, n: int = 2, train: bool = True, max_length: int = 48) -> dict[str, torch.Tensor]:
    ref = resolve(model_name)
    proc = load_processor(ref)
    enc = ref.family.encode(proc, make_rows(n), train=train, max_length=max_length)
    return model_inputs(enc)


def model_inputs(enc: dict) -> dict[str, torch.Tensor]:
    """An encoded batch whose rows all have their image as the model's inputs (LLaVA's `has_image` column is for
    `cut_padding`, not the model)."""
    return {k: torch.from_numpy(v) for k, v in enc.items() if k != "has_image"}


@pytest.fixture()
def one_rank(monkeypatch):
    """A one-rank gloo process group in this process, for tests that build DeepSpeed engines directly; the rank's
    environment only while the test runs (Ray workers started later must not inherit it). The group is made once
    per session and never destroyed: DeepSpeed caches its groups, and a re-created one is not the one it knows."""
    import deepspeed
    import torch.distributed as dist

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    yield


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A local S3-API server (moto on 127.0.0.1) for one test module: tests/cluster_fixtures.py `S3Server`."""
    from tests.cluster_fixtures import start_s3

    server = start_s3(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()
