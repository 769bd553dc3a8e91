"""Hugging Face datasets from a Hub-layout cache, offline with sockets refused (format hf, hf:// URIs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.hub_fixtures import NO_NETWORK, hub_dataset_cache, png, vqa_table
from raymed.data import BadRowsError, prepare

REPO = Path(__file__).resolve().parents[1]


def _offline_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = NO_NETWORK + "import sys\nfrom raymed.data.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=240)


def test_prepare_hf_uri_offline_from_the_hub_cache(tmp_path: Path) -> None:
    hub_dataset_cache(tmp_path / "hub", "med-org/tiny-vqa", {
        "train": vqa_table("train", 6), "validation": vqa_table("validation", 2, start=6),
        "test": vqa_table("test", 3, start=8)})
    env = _offline_env(tmp_path)
    result = _cli(["prepare", "--format", "hf", "--input", "hf://datasets/med-org/tiny-vqa", "--out",
                   str(tmp_path / "out")], env)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] == 6 and manifest["splits"]["val"]["rows"] == 2
    assert manifest["splits"]["test"]["rows"] == 3
    test = pq.read_table(tmp_path / "out" / "test").to_pylist()
    answers = [(r["answer"], r["answer_type"]) for r in test]
    assert answers == [("yes", "closed"), ("no", "closed"), ("left lung", "open")]  # yes/no closed, others open
    assert test[0]["image"] == png(8 * 13 % 256)
    missing = _cli(["prepare", "--format", "hf", "--input", "hf://datasets/med-org/absent", "--out",
                    str(tmp_path / "out2")], env)
    assert missing.returncode == 1 and "hf://datasets/med-org/absent: not in the Hub cache" in missing.stderr
    bad_rev = _cli(["prepare", "--format", "hf", "--input", "hf://datasets/med-org/tiny-vqa@v9", "--out",
                    str(tmp_path / "out3")], env)
    assert bad_rev.returncode == 1 and "hf://datasets/med-org/tiny-vqa@v9" in bad_rev.stderr


def test_hf_local_folder_captions_and_bad_rows(tmp_path: Path) -> None:
    root = tmp_path / "captions" / "data"
    root.mkdir(parents=True)
    pq.write_table(pa.table({"image": [{"bytes": png(i), "path": None} for i in range(3)],
                             "caption": ["normal chest.", "left effusion.", "cardiomegaly."]}),
                   root / "train-00000-of-00001.parquet")
    manifest = prepare("hf", tmp_path / "captions", tmp_path / "out", val_fraction=0)
    assert manifest["rows"] == 3
    rows = pq.read_table(tmp_path / "out" / "train").to_pylist()
    assert {r["task"] for r in rows} == {"report"} and rows[1]["answer"] == "left effusion."
    bad = tmp_path / "bad" / "data"
    bad.mkdir(parents=True)
    pq.write_table(pa.table({"image": [{"bytes": png(1), "path": None}, {"bytes": None, "path": "gone.png"}],
                             "question": ["q one?", "q two?"], "response": ["yes", "no"]}),
                   bad / "train-00000-of-00001.parquet")
    with pytest.raises(BadRowsError) as err:
        prepare("hf", tmp_path / "bad", tmp_path / "out2")
    message = str(err.value)
    assert "train split row 0 (id 'train-0'): missing answer" in message
    assert "train split row 1 (id 'train-1'): missing answer; missing image: gone.png" in message


def test_hf_data_path_resolves_offline_to_a_prepared_copy_keyed_by_commit(tmp_path: Path) -> None:
    hub_dataset_cache(tmp_path / "hub", "med-org/tiny-vqa", {"train": vqa_table("train", 4)})
    code = NO_NETWORK + (
        "import json, sys\nfrom raymed.config import ConfigError, load_config, local_paths, with_paths\n"
        "cfg = load_config(None, [sys.argv[1]], check_paths=False)\npaths = local_paths([cfg])\n"
        "try:\n    local_paths([load_config(None, [sys.argv[2]], check_paths=False)])\n    error = None\n"
        "except ConfigError as err:\n    error = str(err)\n"
        "print(json.dumps([paths, with_paths(cfg, paths).data.path, local_paths([cfg]) == paths, error]))\n")
    result = subprocess.run([sys.executable, "-c", code, "data.path=hf://datasets/med-org/tiny-vqa",
                             "data.path=hf://datasets/med-org/nothing"],
                            capture_output=True, text=True, env=_offline_env(tmp_path), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    paths, data_path, again, error = json.loads(result.stdout.strip().splitlines()[-1])
    expected = tmp_path / "hf-home" / "raymed-prepared" / "med-org--tiny-vqa--0123456789abcdef0123456789abcdef01234567"
    assert paths == {"hf://datasets/med-org/tiny-vqa": str(expected)} and data_path == str(expected) and again
    assert json.loads((expected / "manifest.json").read_text())["rows"] == 4
    assert "data.path hf://datasets/med-org/nothing: " in error and "not in the Hub cache" in error


# Training from `data.path: hf://datasets/...` without a prepare step, offline: tests/test_model_sources.py (one
# run reads both a Hub-id model and a Hub dataset).
