"""``prepare``: shards readable by pyarrow, manifest counts, --on-bad error writes nothing, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raymed.data import SCHEMA, BadRowsError, ReadOptions, generate, prepare
from raymed.data.cli import main

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vqa_rad_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean VQA-RAD-layout folder (the synthetic generator writes that layout)."""
    root = tmp_path_factory.mktemp("vqa_rad")
    generate(root, n=30, seed=3)
    return root


def test_prepare_counts_match_input(vqa_rad_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = prepare("vqa-rad", vqa_rad_dir, out, rows_per_shard=25, options=ReadOptions(dataset="synth"))
    # The source's train rows are the prepared train and val rows (val carved from train, by image).
    for splits, name in ((("train", "val"), "trainset.json"), (("test",), "testset.json")):
        source = json.loads((vqa_rad_dir / name).read_text())
        infos = [manifest["splits"][split] for split in splits]
        assert sum(i["rows"] for i in infos) == len(source)
        assert {t: sum(i["answer_type"][t] for i in infos) for t in ("closed", "open")} == {
            "closed": sum(r["answer_type"] == "CLOSED" for r in source),
            "open": sum(r["answer_type"] == "OPEN" for r in source)}
        assert sum(i["images"] for i in infos) == len({r["image_name"] for r in source})
        tables = [pq.read_table(out / split) for split in splits]
        for info, table in zip(infos, tables):
            assert table.schema.equals(SCHEMA) and table.num_rows == info["rows"]
            assert [s["rows"] for s in info["shards"]] == [min(25, info["rows"] - k)
                                                           for k in range(0, info["rows"], 25)]
        ids = [i for t in tables for i in t.column("id").to_pylist()]
        assert sorted(ids, key=int) == [str(r["qid"]) for r in source]
        assert all(t.column("id").to_pylist() == sorted(t.column("id").to_pylist(), key=int) for t in tables)
        assert [d for t in tables for d in t.column("dataset").to_pylist()] == ["synth"] * len(source)
        assert Counter(a for t in tables for a in t.column("answer").to_pylist()) == Counter(
            r["answer"] for r in source)
    assert manifest["rows"] == manifest["rows_read"] and manifest["skipped"]["count"] == 0
    assert manifest["images"]["unique"] == 30 == len(list((vqa_rad_dir / "VQA_RAD Image Folder").iterdir()))
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind


def _val_images(out: Path) -> dict[str, set[str]]:
    return {split: {json.loads(e)["image_name"] for e in pq.read_table(out / split).column("extra").to_pylist()}
            for split in ("train", "val", "test")}


def test_val_is_carved_from_train_by_image_seeded_and_never_from_test(vqa_rad_dir: Path, tmp_path: Path) -> None:
    import shutil

    src = tmp_path / "src"
    shutil.copytree(vqa_rad_dir, src)
    train = json.loads((src / "trainset.json").read_text())
    test = json.loads((src / "testset.json").read_text())
    train_images = sorted({r["image_name"] for r in train})
    shared = train_images[:3]  # as in VQA-RAD's release, test asks about images that train also has
    for row, image in zip(test, shared):
        row["image_name"] = image
    (src / "testset.json").write_text(json.dumps(test))

    manifest = prepare("vqa-rad", src, tmp_path / "a", val_fraction=0.25, val_seed=5)
    images = _val_images(tmp_path / "a")
    assert manifest["val_split"] == {"source": "carved", "by": "image", "fraction": 0.25, "seed": 5,
                                     "train_images": 24, "in_test": 3, "images": 6}  # round(24 x 0.25)
    assert len(images["val"]) == 6 and images["val"] | images["train"] == set(train_images)
    assert not images["val"] & images["train"] and not images["val"] & images["test"]
    assert images["train"] & images["test"] == set(shared)  # the source's own overlap stays, and is counted
    assert manifest["image_overlap"] == {"train-val": 0, "train-test": 3, "val-test": 0}
    val_rows = pq.read_table(tmp_path / "a" / "val").to_pylist()
    assert all(r["split"] == "val" for r in val_rows)
    assert len(val_rows) == sum(r["image_name"] in images["val"] for r in train)  # every question of an image

    prepare("vqa-rad", src, tmp_path / "b", val_fraction=0.25, val_seed=5)
    prepare("vqa-rad", src, tmp_path / "c", val_fraction=0.25, val_seed=6)
    assert _val_images(tmp_path / "b")["val"] == images["val"] != _val_images(tmp_path / "c")["val"]

    none = prepare("vqa-rad", src, tmp_path / "d", val_fraction=0)
    assert none["val_split"] == {"source": "none", "reason": "--val-fraction 0"} and "val" not in none["splits"]
    with pytest.raises(ValueError, match=r"--val-fraction must be in \[0, 1\), got 1.5"):
        prepare("vqa-rad", src, tmp_path / "e", val_fraction=1.5)
    assert not (tmp_path / "e").exists()


def _break_one_image(src: Path, dst: Path) -> tuple[str, str]:
    """Copy ``src`` to ``dst`` with the image of the 4th train row removed; return its (qid, image_name)."""
    import shutil

    shutil.copytree(src, dst)
    row = json.loads((dst / "trainset.json").read_text())[3]
    (dst / "VQA_RAD Image Folder" / row["image_name"]).unlink()
    return str(row["qid"]), row["image_name"]


def test_cli_on_bad_error_names_the_row_and_writes_nothing(vqa_rad_dir: Path, tmp_path: Path) -> None:
    qid, image = _break_one_image(vqa_rad_dir, tmp_path / "broken")
    rows_with_image = [r for r in json.loads((tmp_path / "broken" / "trainset.json").read_text())
                       if r["image_name"] == image]
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "raymed.data", "prepare", "--format", "vqa-rad", "--input", str(tmp_path / "broken"),
         "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert f"error: {len(rows_with_image)} bad row(s)" in result.stderr
    assert f"trainset.json row 3 (id '{qid}'): missing image: VQA_RAD Image Folder/{image}" in result.stderr
    assert "nothing was written" in result.stderr and "--on-bad skip" in result.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_on_bad_skip_records_every_skip(vqa_rad_dir: Path, tmp_path: Path) -> None:
    qid, image = _break_one_image(vqa_rad_dir, tmp_path / "broken")
    manifest = prepare("vqa-rad", tmp_path / "broken", tmp_path / "out", on_bad="skip")
    bad = [r for r in json.loads((tmp_path / "broken" / "trainset.json").read_text()) if r["image_name"] == image]
    assert [r["id"] for r in manifest["skipped"]["rows"]] == [str(r["qid"]) for r in bad]
    assert manifest["skipped"]["by_reason"] == {"missing image": len(bad)}
    assert manifest["rows"] == manifest["rows_read"] - len(bad)
    assert qid not in pq.read_table(tmp_path / "out" / "train").column("id").to_pylist()


def test_error_lists_first_rows_and_count(tmp_path: Path) -> None:
    root = tmp_path / "vqa"
    (root / "images").mkdir(parents=True)
    rows = [{"qid": i, "image_name": f"missing{i}.jpg", "question": "q?", "answer": "yes", "answer_type": "CLOSED"}
            for i in range(12)]
    (root / "trainset.json").write_text(json.dumps(rows))
    with pytest.raises(BadRowsError) as err:
        prepare("vqa-rad", root, tmp_path / "out")
    assert len(err.value.bad) == 12
    message = str(err.value)
    assert message.startswith("12 bad row(s)") and "trainset.json row 9 (id '9')" in message
    assert "row 10 " not in message and "... and 2 more" in message


def test_duplicate_ids_within_a_split_are_bad(vqa_rad_dir: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(vqa_rad_dir, tmp_path / "dup")
    rows = json.loads((tmp_path / "dup" / "trainset.json").read_text())
    rows[1]["qid"] = rows[0]["qid"]
    (tmp_path / "dup" / "trainset.json").write_text(json.dumps(rows))
    manifest = prepare("vqa-rad", tmp_path / "dup", tmp_path / "out", on_bad="skip")
    reasons = [r["reason"] for r in manifest["skipped"]["rows"]]
    assert reasons == ["duplicate id: also at trainset.json row 0 in split train"]


def test_out_folder_rules(vqa_rad_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        prepare("vqa-rad", vqa_rad_dir, tmp_path / "precious")
    with pytest.raises(FileExistsError, match="not a prepared dataset"):
        prepare("vqa-rad", vqa_rad_dir, tmp_path / "precious", overwrite=True)
    prepare("vqa-rad", vqa_rad_dir, tmp_path / "out")
    manifest = prepare("vqa-rad", vqa_rad_dir, tmp_path / "out", overwrite=True, rows_per_shard=10)
    assert sorted(p.name for p in (tmp_path / "out" / "train").iterdir()) == [s["file"] for s in
                                                                             manifest["splits"]["train"]["shards"]]


def test_cli_prepare_inspect_and_usage_errors(vqa_rad_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["prepare", "--format", "vqa-rad", "--input", str(vqa_rad_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "vqa-rad (vqa-rad):" in printed and "  train " in printed and "  test " in printed
    assert "  val " in printed
    assert "val carved from train by image: 2 of 24 train images (fraction 0.1, seed 0)" in printed
    assert main(["inspect", str(out), "--rows", "1"]) == 0
    assert "[train] 0:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--format", "vqa-rad", "--input", str(vqa_rad_dir), "--out", str(tmp_path / "x"),
              "--lang", "zh"])
    assert exit_info.value.code == 2
    assert "--lang applies to format slake, not vqa-rad" in capsys.readouterr().err
    assert main(["prepare", "--format", "slake", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 1
    assert "does not exist" in capsys.readouterr().err
