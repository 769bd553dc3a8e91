"""Cluster-launcher files: valid against the autoscaler schema shipped with Ray, and safe to publish."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILES = sorted((REPO / "cluster").glob("*.yaml"))
TORCH_PIN = "torch==2.13.0"

# Shapes of real secrets; placeholders such as YOUR-BUCKET or YOUR-PROJECT-ID do not match.
SECRET_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret key setting": r"(?i)aws_secret_access_key|secret_access_key|aws_session_token",
    "private key block": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "GCP service-account key": r"\"private_key(_id)?\"|gcp_credentials",
    "inline Ray token": r"RAY_AUTH_TOKEN\s*=",
    "password": r"(?i)password\s*[:=]",
    "GitHub / Google API token": r"\b(ghp_[A-Za-z0-9]{20,}|AIza[0-9A-Za-z_\-]{30,})\b",
}


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _commands(config: dict[str, Any]) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    out = [c for k in keys for c in config.get(k) or []]
    for node in config["available_node_types"].values():
        out += [c for k in keys for c in node.get(k) or []]
    return out


def _is_spot(node_config: dict[str, Any]) -> bool:
    market = node_config.get("InstanceMarketOptions", {}).get("MarketType")  # AWS
    scheduling = node_config.get("scheduling", {})  # GCP
    return market == "spot" or scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible")


def test_both_clouds_are_present() -> None:
    assert {p.name for p in CLUSTER_FILES} >= {"aws.yaml", "gcp.yaml"}


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_valid_against_ray_autoscaler_schema(path: Path) -> None:
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = _load(path)
    jsonschema.validate(config, schema)  # raises with the offending key on failure
    # The checks `ray up` adds on top of the schema (ray.autoscaler._private.util.validate_config).
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]
    assert "cluster_synced_files" in config


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cpu_head_and_autoscaling_gpu_workers(path: Path) -> None:
    config = _load(path)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu_workers = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_workers, "no GPU worker type"
    for name, t in gpu_workers.items():
        assert t["min_workers"] == 0 and t["max_workers"] >= 0, name  # scale from zero
    assert any(t["max_workers"] > 0 for t in gpu_workers.values())
    assert any(_is_spot(t["node_config"]) for t in gpu_workers.values()), "no spot/preemptible worker type"
    assert not _is_spot(head["node_config"]), "the head must not be a spot instance"


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_dashboard_is_not_public(path: Path) -> None:
    config = _load(path)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--head" in head_start and "--dashboard-host=127.0.0.1" in head_start
    hosts = re.findall(r"--dashboard-host[= ]+(\S+)", " ".join(_commands(config)))
    assert hosts == ["127.0.0.1"], hosts
    assert "0.0.0.0" not in path.read_text()
    for command in _commands(config):
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command, command  # token authentication on every node


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_no_credentials(path: Path) -> None:
    text = path.read_text()
    for what, pattern in SECRET_PATTERNS.items():
        assert not re.search(pattern, text), f"{path.name} contains what looks like a {what}"
    config = _load(path)
    assert set(config.get("auth", {})) <= {"ssh_user"}, "keys and proxies belong to the user, not the repo"
    assert "gcp_credentials" not in config["provider"]


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_setup_installs_raymed_with_pinned_torch(path: Path) -> None:
    config = _load(path)
    for role in ("head_setup_commands", "worker_setup_commands"):
        commands = config[role]
        torch_at = next(i for i, c in enumerate(commands) if TORCH_PIN in c)
        raymed_at = next(i for i, c in enumerate(commands) if "pip install" in c and "~/raymed" in c)
        assert torch_at < raymed_at, f"{role}: pin torch before installing raymed"
    assert TORCH_PIN in (REPO / "constraints.txt").read_text().splitlines()  # the same pin CI installs
    docker = config["docker"]
    for image in (docker["head_image"], docker["worker_image"]):
        assert image.startswith(f"rayproject/ray:{ray.__version__}-py311"), image  # cluster Ray == local Ray
    for remote, local in config["file_mounts"].items():
        if remote.startswith("~/raymed"):
            assert not Path(local).is_absolute() and ".." not in Path(local).parts, local
    assert (REPO / "pyproject.toml").is_file() and (REPO / "raymed").is_dir()


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_shared_storage_is_documented(path: Path) -> None:
    text = path.read_text()
    scheme = "s3" if _load(path)["provider"]["type"] == "aws" else "gs"
    assert f"storage_path: {scheme}://YOUR-BUCKET/" in text


CAPACITY = r"""
import json, sys
import ray
from raymed.cluster import ResourceError, capacity, check_resources, report_node_types
from raymed.config import load_config
from raymed.tune.sweep import load_sweep, trial_concurrency

ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="error")
gpu = ["scaling.use_gpu=true", "scaling.num_workers=2", "scaling.cpus_per_worker=4", "data.preprocess_actors=0"]

def attempt(overrides):
    try:
        return check_resources(load_config(None, overrides, check_paths=False)).describe()
    except ResourceError as err:
        return "error: " + str(err)

out = {"before": [capacity().autoscaling, attempt(gpu)]}
# What the shipped file's head start commands record: each worker node type's resources and limits.
report_node_types(sys.argv[1])
cap = capacity()
sweep, base = load_sweep(sys.argv[2], [*gpu, "sweep.max_concurrent=8"], check_paths=False)
out["after"] = [cap.autoscaling, cap.totals.get("GPU"), cap.totals.get("CPU"), attempt(gpu),
                attempt([*gpu, f"scaling.gpus_per_worker={sys.argv[3]}"]),
                trial_concurrency(cap.totals, load_config(None, [*gpu], check_paths=False), sweep)]
print(json.dumps(out))
"""


@pytest.mark.integration
@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_a_gpu_run_on_an_autoscaling_cluster_with_no_gpu_node_yet(path: Path) -> None:
    """A head with no GPU: refused while no autoscaler reports node types; accepted once it reports the cluster
    file's (sized to their max_workers, no environment variable), and a worker no node type fits is refused."""
    import subprocess
    import sys

    workers = {n: t for n, t in _load(path)["available_node_types"].items() if t.get("max_workers")}
    gpus = sum(t["resources"].get("GPU", 0) * t["max_workers"] for t in workers.values())
    cpus = sum(t["resources"].get("CPU", 0) * t["max_workers"] for t in workers.values())  # the head is not reported here
    beyond = 1 + max(t["resources"].get("GPU", 0) for t in workers.values())  # more GPUs than any node type has
    result = subprocess.run([sys.executable, "-c", CAPACITY, str(path), str(REPO / "configs/sweeps/tiny-cpu.yaml"),
                             str(beyond)],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["before"][0] is False and out["before"][1].startswith("error: no node can host")
    assert "python -m raymed.cluster report-node-types" in out["before"][1]  # what to do, named
    autoscaling, total_gpus, total_cpus, fits, too_big, concurrency = out["after"]
    assert autoscaling and total_gpus == gpus and total_cpus == cpus and not fits.startswith("error")
    assert all(name in fits for name in workers)
    assert too_big.startswith("error: no node can host") and "node types" in too_big
    assert concurrency[0] == min(8, int(gpus // 2))  # two 1-GPU workers a trial
