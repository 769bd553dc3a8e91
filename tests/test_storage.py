"""Storage URIs without a Ray cluster: the S3 helpers against a local S3 server, the driver's checks on bad
storage (each a clear error naming the URI, before any worker starts), and the `ray job submit` package."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from raymed import storage
from raymed.train.launch import main as train_main
from tests.cluster_fixtures import REPO, S3Server, free_port

pytestmark = pytest.mark.unit


@pytest.fixture
def s3_env(s3, monkeypatch) -> S3Server:
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return s3


def test_helpers_round_trip_on_s3_and_local(s3_env, tmp_path):
    for root in (s3_env.uri("helpers"), str(tmp_path / "helpers")):
        storage.write_text(storage.join(root, "a", "x.json"), json.dumps({"k": 1}))
        storage.write_text(storage.join(root, "b", "x.json"), "not json")
        assert storage.read_json(storage.join(root, "a", "x.json")) == {"k": 1}
        assert storage.is_file(storage.join(root, "a", "x.json")) and storage.is_dir(storage.join(root, "a"))
        assert storage.listdir(root) == ["a", "b"]
        assert [p for p, _ in storage.walk_files(root, "x.json")] == [storage.join(root, "a", "x.json"),
                                                                    storage.join(root, "b", "x.json")]
        local = tmp_path / f"up-{storage.is_uri(root)}"
        (local / "sub").mkdir(parents=True)
        (local / "sub" / "f.bin").write_bytes(b"\0" * 10)
        with storage.staged_output(storage.join(root, "staged")) as out:
            shutil.copytree(local, out, dirs_exist_ok=True)
        assert storage.read_bytes(storage.join(root, "staged", "sub", "f.bin")) == b"\0" * 10
        storage.remove(storage.join(root, "staged"))
        assert not storage.exists(storage.join(root, "staged", "sub", "f.bin"))
    assert s3_env.keys("helpers/a/") == {"helpers/a/x.json": 8}  # really on the S3 server


def test_staged_output_uploads_nothing_when_the_writer_fails(s3_env):
    with pytest.raises(RuntimeError, match="boom"):
        with storage.staged_output(s3_env.uri("failed")) as out:
            (out / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert s3_env.keys("failed/") == {}


def _train_error(capsys, *overrides: str) -> str:
    rc = train_main(["model.name=tiny-llava", *overrides])
    err = capsys.readouterr().err
    assert rc == 2, err
    return err


def test_bad_storage_is_refused_before_any_worker_starts(s3_env, monkeypatch, capsys):
    import ray

    # 1. a bucket that does not exist
    err = _train_error(capsys, "run.storage=s3://no-such-bucket-raymed/runs")
    assert "s3://no-such-bucket-raymed/runs" in err and "bucket 'no-such-bucket-raymed' does not exist" in err
    # 2. data.path on S3 without a manifest
    storage.write_text(s3_env.uri("notdata", "readme.txt"), "not a dataset")
    err = _train_error(capsys, f"run.storage={s3_env.uri('runs')}", f"data.path={s3_env.uri('notdata')}")
    assert f"data.path: {s3_env.uri('notdata')} has no manifest.json" in err
    # 3. an eval set that does not exist
    err = _train_error(capsys, f"run.storage={s3_env.uri('runs')}", f"data.eval_sets.ood={s3_env.uri('nothing')}")
    assert f"data.eval_sets.ood: {s3_env.uri('nothing')} has no manifest.json" in err
    # 4. an endpoint nobody listens on
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    err = _train_error(capsys, f"run.storage={s3_env.uri('runs')}")
    assert f"run.storage: {s3_env.uri('runs')} is not reachable (endpoint http://127.0.0.1:" in err
    # 5. no credentials anywhere in the standard chain
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    err = _train_error(capsys, f"run.storage={s3_env.uri('runs')}")
    assert f"run.storage: {s3_env.uri('runs')}: no AWS credentials found" in err
    assert not ray.is_initialized()  # refused in the driver: no cluster, no worker


def test_prepare_to_s3_uploads_the_manifest_and_refuses_to_overwrite(s3_env, tmp_path):
    from raymed.data.cli import main as data_main
    from raymed.data.rows import read_split_rows

    raw = tmp_path / "raw"
    assert data_main(["synth", "--out", str(raw), "--n", "12"]) == 0
    uri = s3_env.uri("prepared", "synth")
    assert data_main(["prepare", "--format", "vqa-rad", "--input", str(raw), "--out", uri]) == 0
    manifest = storage.read_json(storage.join(uri, "manifest.json"))
    assert manifest["splits"]["test"]["rows"] == len(read_split_rows(uri, "test"))  # rows read back through S3
    assert data_main(["prepare", "--format", "vqa-rad", "--input", str(raw), "--out", uri]) == 1  # not empty
    assert data_main(["prepare", "--format", "vqa-rad", "--input", str(raw), "--out", uri, "--overwrite"]) == 0


def _package(root: Path, out: Path) -> zipfile.ZipFile:
    """The `ray job submit --working-dir ROOT` package, built by Ray's own packaging code."""
    from ray._private.runtime_env.packaging import create_package

    create_package(str(root), out, include_gitignore=True)
    return zipfile.ZipFile(out)


def test_job_package_excludes_data_models_runs_and_experiments(tmp_path):
    # A copy of the checkout (tracked files + .rayignore) with the folders the configs create beside it.
    tree = tmp_path / "checkout"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, tree / name)
    for folder in ("data/vqa-rad", "models/llava-med", "runs/r1", "experiments/default", ".venv/lib", ".git/objects"):
        (tree / folder).mkdir(parents=True)
        (tree / folder / "big.bin").write_bytes(b"\1" * (1 << 20))
    package = _package(tree, tmp_path / "pkg.zip")
    names = package.namelist()
    size = (tmp_path / "pkg.zip").stat().st_size
    print(f"job package: {len(names)} entries, {size / 2**20:.2f} MiB")
    assert not [n for n in names if n.split("/")[0] in ("data", "models", "runs", "experiments", ".venv", ".git")]
    assert "raymed/train/launch.py" in names and "raymed/data/stream.py" in names and "raymed/models/__init__.py" in names
    assert "configs/sweeps/tiny-cpu.yaml" in names and "pyproject.toml" in names
    assert size < 12 * 2**20  # code, configs and the two shipped tiny bases (~7.5 MiB)
