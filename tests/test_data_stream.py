"""Late decoding + encoding, reading rows in-process, and Ray Data streaming into a 2-worker TorchTrainer."""

from __future__ import annotations

import io
import os
import json
import sys
import threading
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import pytest
from PIL import Image

from raymed.cluster import start_local_ray
from raymed.data import ReadOptions, generate, prepare
from raymed.data.rows import read_split_rows
from raymed.data.transform import DecodeAndEncode

IMAGE, MAX_LEN = 16, 8


class TinyEncoder:
    """Stand-in for a model family's encoder: resized float pixels + a whitespace tokenizer, padded."""

    def __init__(self, image_size: int = IMAGE, max_length: int = MAX_LEN) -> None:
        self.image_size, self.max_length = image_size, max_length

    def tokens(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.max_length), dtype=np.int64)  # 0 = padding
        for i, text in enumerate(texts):
            ids = [zlib.crc32(w.encode()) % 1000 + 1 for w in text.lower().split()][: self.max_length]
            out[i, : len(ids)] = ids
        return out

    def __call__(self, rows: dict[str, list[Any]]) -> dict[str, np.ndarray]:
        size = (self.image_size, self.image_size)
        images = [im.convert("RGB").resize(size) for im in rows["image"]]  # grayscale arrives as `L`
        pixels = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])
        input_ids = self.tokens(rows["question"])
        return {"pixel_values": pixels.transpose(0, 3, 1, 2), "input_ids": input_ids,
                "attention_mask": (input_ids > 0).astype(np.int64), "labels": self.tokens(rows["answer"])}


class TinyEncoderFactory:
    """Picklable factory: the encoder is built once per Ray Data actor."""

    def __call__(self) -> TinyEncoder:
        return TinyEncoder()


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stream")
    generate(root / "raw", n=20, seed=0)
    prepare("vqa-rad", root / "raw", root / "embedded", rows_per_shard=16)
    prepare("vqa-rad", root / "raw", root / "uri", images="uri", options=ReadOptions(dataset="synth"))
    generate(root / "raw_report", n=6, seed=0, layout="r2gen")
    prepare("r2gen", root / "raw_report", root / "report")
    return root


# --- without Ray -----------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("variant", ["embedded", "uri"])
def test_decode_and_encode_shapes_and_ids(synth_data: Path, variant: str) -> None:
    rows = read_split_rows(synth_data / variant, "train")[:5]
    batch = {key: np.array([r[key] for r in rows], dtype=object) for key in rows[0]}
    out = DecodeAndEncode(TinyEncoderFactory())(batch)
    assert {k: v.shape for k, v in out.items()} == {
        "pixel_values": (5, 3, IMAGE, IMAGE), "input_ids": (5, MAX_LEN), "attention_mask": (5, MAX_LEN),
        "labels": (5, MAX_LEN), "id": (5,)}
    assert out["pixel_values"].dtype == np.float32 and out["id"].tolist() == [r["id"] for r in rows]
    first = np.asarray(Image.open(synth_data / "raw" / "VQA_RAD Image Folder" / "synth_00000.png").convert("RGB")
                       .resize((IMAGE, IMAGE)), dtype=np.float32) / 255
    np.testing.assert_array_equal(out["pixel_values"][0], first.transpose(2, 0, 1))


@pytest.mark.unit
def test_task_mode_transform_builds_the_encoder_once_per_process(synth_data: Path) -> None:
    from raymed.data.stream import decode_and_encode

    class CountingFactory(TinyEncoderFactory):
        built = 0

        def __call__(self) -> TinyEncoder:
            CountingFactory.built += 1
            return super().__call__()

    factory, rows = CountingFactory(), read_split_rows(synth_data / "embedded", "test")
    batch = {key: np.array([r[key] for r in rows], dtype=object) for key in rows[0]}
    outs = [decode_and_encode(batch, encoder_factory=factory, keep=("id",), max_image_side=None) for _ in range(2)]
    assert CountingFactory.built == 1 and outs[0]["id"].tolist() == [r["id"] for r in rows]


@pytest.mark.unit
def test_decode_error_names_the_row(synth_data: Path) -> None:
    batch = {"id": np.array(["q7"]), "image": np.array([b"junk"], dtype=object), "question": np.array(["q"]),
             "answer": np.array(["a"]), "task": np.array(["vqa"]), "answer_type": np.array(["open"])}
    with pytest.raises(ValueError, match="row 'q7': cannot decode image"):
        DecodeAndEncode(TinyEncoderFactory())(batch)


@pytest.mark.unit
def test_rows_per_rank(synth_data: Path) -> None:
    data = synth_data / "embedded"
    rows = read_split_rows(data, "test")
    per_rank = [[r["id"] for r in read_split_rows(data, "test", rank=k, world_size=3)] for k in range(3)]
    assert sorted(sum(per_rank, [])) == sorted(r["id"] for r in rows) and len(rows) == 4 * 3  # 4 images x 3 questions
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1
    assert set(read_split_rows(data, "test", columns=["id", "answer"])[0]) == {"id", "answer"}
    with pytest.raises(ValueError, match="rank 3"):
        read_split_rows(data, "test", rank=3, world_size=3)
    with pytest.raises(KeyError, match="no split 'dev'; splits are: train, val, test"):
        read_split_rows(data, "dev")


@pytest.mark.unit
@pytest.mark.parametrize("family,preset", [("miss", "tiny-miss"), ("llava", "tiny-llava")])
def test_family_encoders_take_stream_rows(synth_data: Path, family: str, preset: str) -> None:
    """The contract with raymed.models: both families encode VQA and report rows, train and eval."""
    pytest.importorskip("raymed.models")
    from raymed.data.transform import FamilyEncoderFactory

    vqa = read_split_rows(synth_data / "embedded", "train")[:3]
    report = read_split_rows(synth_data / "report", "train")[:2]
    for train in (True, False):
        transform = DecodeAndEncode(FamilyEncoderFactory(family, preset, max_length=64, train=train))
        for rows in (vqa, report):
            out = transform({key: np.array([r[key] for r in rows], dtype=object) for key in rows[0]})
            assert out["id"].tolist() == [r["id"] for r in rows]
            assert all(len(v) == len(rows) for v in out.values()) and "pixel_values" in out
            assert out["pixel_values"].dtype == np.float32 and out["input_ids"].ndim == 2
    with pytest.raises(ValueError, match="belongs to family"):
        FamilyEncoderFactory("llava" if family == "miss" else "miss", preset, max_length=24)()


# --- Ray -------------------------------------------------------------------------------------------

OBJECT_STORE = 80 * 1024**2  # ~ Ray's minimum; the big dataset below is ~1.7x larger


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray cluster is already initialised in this process")
    import ray.cloudpickle

    # Ray workers cannot import this test module: ship its encoder and train loop by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # A fresh local cluster (never one left by `ray start` in another test), retried on a missed start-up deadline.
    start_local_ray(num_cpus=4, object_store_memory=OBJECT_STORE, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def big_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """~135 MB of embedded image bytes (noise JPEGs barely compress): larger than the object store."""
    root = tmp_path_factory.mktemp("big")
    images = root / "raw" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(4):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=95)
        (images / f"noise{k}.jpg").write_bytes(buffer.getvalue())
    n = 440
    rows = [{"qid": i, "image_name": f"noise{i % 4}.jpg", "question": f"question {i}?", "answer": "yes",
             "answer_type": "CLOSED"} for i in range(n)]
    (root / "raw" / "trainset.json").write_text(json.dumps(rows))
    # every row in train (no val carved): the point is one split larger than the object store
    manifest = prepare("vqa-rad", root / "raw", root / "data", rows_per_shard=50, row_group_rows=10, val_fraction=0)
    assert manifest["rows"] == manifest["splits"]["train"]["rows"] == n
    size = sum(p.stat().st_size for p in (root / "data" / "train").iterdir())
    assert size > 1.5 * OBJECT_STORE
    return root / "data", n


@pytest.mark.integration
def test_read_split_is_lazy_and_compressed(ray_cluster: Any, synth_data: Path) -> None:
    from ray.util.state import list_actors

    from raymed.data.stream import read_split

    def footer_readers() -> set[str]:
        # this test's own cluster: without an address the state API picks the newest cluster on the machine
        address = ray_cluster.get_runtime_context().gcs_address
        found = list_actors(address=address, filters=[("class_name", "=", "FooterReader")], limit=1000)
        return {a.actor_id for a in found}

    before = footer_readers()
    ds = read_split(synth_data / "embedded", "train")
    rows = ds.take_all()
    # Ray Data starts 32 footer-reading actor processes a Parquet read by default: one for this split's 3 shards
    assert len(list((synth_data / "embedded" / "train").glob("*.parquet"))) == 3
    assert len(footer_readers() - before) == 1
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in read_split_rows(synth_data / "embedded", "train"))
    for row in rows:  # still the PNG file bytes, not decoded pixels
        name = json.loads(row["extra"])["image_name"]
        assert row["image"] == (synth_data / "raw" / "VQA_RAD Image Folder" / name).read_bytes()
    assert ds.context.target_max_block_size == OBJECT_STORE // 16  # store / (4 x 4 CPUs)


def train_loop(config: dict[str, Any]) -> None:
    """Worker side: iterate the shard for two epochs, record ids and batch shapes per epoch."""
    import ray.train

    from raymed.data.stream import quiet_data_context, torch_batches

    quiet_data_context()
    rank = ray.train.get_context().get_world_rank()
    shard = ray.train.get_dataset_shard("train")
    record: dict[str, Any] = {"epochs": [], "shapes": set(), "dtypes": set()}
    for _ in range(2):
        ids: list[str] = []
        for batch in torch_batches(shard, batch_size=config["batch_size"]):
            ids.extend(batch["id"])
            record["shapes"].add(tuple((k, tuple(v.shape)) for k, v in sorted(batch.items()) if k != "id"))
            record["dtypes"].add(str(batch["pixel_values"].dtype))
        record["epochs"].append(ids)
    record["shapes"], record["dtypes"] = sorted(record["shapes"]), sorted(record["dtypes"])
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(record))


class StoreMonitor(threading.Thread):
    """Polls the object store's bytes in use and bytes spilled (what `ray memory --stats-only` shows)."""

    def __init__(self) -> None:
        import ray

        super().__init__(daemon=True)
        self.address = ray.get_runtime_context().gcs_address
        self.peak_used = self.spilled = 0
        self.done = threading.Event()

    def sample(self) -> None:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        stats = get_memory_info_reply(get_state_from_address(self.address)).store_stats
        self.peak_used = max(self.peak_used, stats.object_store_bytes_used)
        self.spilled = max(self.spilled, stats.spilled_bytes_total)

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.sample()


@pytest.mark.integration
def test_torch_trainer_two_workers_stream_every_row_once(ray_cluster: Any, big_data: tuple[Path, int],
                                                        tmp_path: Path) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raymed.data.stream import encoded_split

    data_dir, n = big_data
    # max_image_side: JPEGs are decoded at 1/8 DCT scale (cheap), then the encoder resizes to 16 px
    ds = encoded_split(data_dir, "train", TinyEncoderFactory(), batch_size=20, num_cpus=0.5, max_image_side=64)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"batch_size": 20, "out": str(tmp_path)},
        datasets={"train": ds},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="stream",
                             failure_config=FailureConfig(max_failures=0)),
    )
    monitor = StoreMonitor()
    monitor.start()
    trainer.fit()
    monitor.done.set()
    monitor.join()
    monitor.sample()
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in range(2):
        seen = [i for rec in records for i in rec["epochs"][epoch]]
        assert sorted(seen, key=int) == [str(i) for i in range(n)]  # every row exactly once per epoch
        assert [len(rec["epochs"][epoch]) for rec in records] == [n // 2, n // 2]
    full = [["attention_mask", [20, MAX_LEN]], ["input_ids", [20, MAX_LEN]], ["labels", [20, MAX_LEN]],
            ["pixel_values", [20, 3, IMAGE, IMAGE]]]
    for rec in records:
        assert full in rec["shapes"] and len(rec["shapes"]) <= 2  # full batches, maybe one smaller last batch
        assert rec["dtypes"] == ["torch.float32"]
    # 2 epochs x ~135 MB streamed through an 80 MB object store without spilling to disk
    assert monitor.spilled == 0 and monitor.peak_used <= OBJECT_STORE, (monitor.spilled, monitor.peak_used)


def _slow_first_block(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Holds back the block with the first row, so later blocks finish first."""
    import time

    if "0" in set(batch["id"].tolist()):
        time.sleep(3.0)
    return batch


def order_loop(config: dict[str, Any]) -> None:
    import ray.train

    from raymed.data.stream import torch_batches

    ids = [i for b in torch_batches(ray.train.get_dataset_shard("train"), batch_size=20) for i in b["id"]]
    Path(config["out"], "order.json").write_text(json.dumps(ids))


@pytest.mark.integration
def test_training_stream_keeps_file_order(ray_cluster: Any, big_data: tuple[Path, int], tmp_path: Path) -> None:
    """The recipe's ingest config: a worker gets the rows in file order even when the first block is the
    last to finish (Ray Data's default would hand the later blocks over first)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raymed.data.stream import encoded_split, ingest_config

    data_dir, n = big_data
    ds = encoded_split(data_dir, "train", TinyEncoderFactory(), batch_size=20, actors=0, num_cpus=0.25,
                       max_image_side=64)
    ds = ds.map_batches(_slow_first_block, batch_size=None, batch_format="numpy", num_cpus=0.25)
    TorchTrainer(
        order_loop, train_loop_config={"out": str(tmp_path)}, datasets={"train": ds},
        dataset_config=ingest_config(preserve_order=True),
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="order",
                             failure_config=FailureConfig(max_failures=0)),
    ).fit()
    assert json.loads((tmp_path / "order.json").read_text()) == [str(i) for i in range(n)]


# --- epochs: a seeded order per (seed, epoch) -------------------------------------------------------------------


def _epoch_order(batches, epoch: int) -> list[int]:
    return [int(v) for b in batches.epoch(epoch) for v in b["x"]]


@pytest.mark.integration
@pytest.mark.parametrize("row_kib", [0, 128])  # small rows: the shard is kept; 128 KiB rows: 1 MiB windows
def test_epochs_are_shuffled_by_seed_and_epoch_and_resume_in_order(ray_cluster, row_kib: int) -> None:
    import ray.data

    from raymed.data.epochs import EpochBatches

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # what Ray Train's ingest sets
    n = 60
    lengths = [(i * 37) % 23 + 1 for i in range(n)]  # tokens of row i (its attention mask's ones)
    items = [{"x": i, "id": str(i), "attention_mask": np.array([1] * lengths[i] + [0] * (24 - lengths[i])),
              **({"pix": np.full(row_kib * 256, i, np.float32)} if row_kib else {})} for i in range(n)]
    ds = ray.data.from_items(items, override_num_blocks=4)

    def make(seed: int, shuffle: bool = True, group: bool = False) -> EpochBatches:
        return EpochBatches(ds, 8, 1, lambda msg: None, seed=seed, shuffle=shuffle, group_by_length=group)

    run = make(seed=1)
    epochs = [_epoch_order(run, e) for e in range(3)]
    assert all(sorted(order) == list(range(n)) for order in epochs)  # every row once per epoch
    assert len({tuple(o) for o in epochs}) == 3 and list(range(n)) not in epochs  # a new order every epoch
    assert (run.kept is not None) == (row_kib == 0)  # small rows: kept and replayed; large: streamed again
    # A worker restarted at epoch 2 (nothing kept yet) trains on what the uninterrupted run trained on.
    assert _epoch_order(make(seed=1), 2) == epochs[2]
    assert _epoch_order(make(seed=2), 0) != epochs[0]  # another seed, another order
    assert [len(b["x"]) for b in run.epoch(1)] == [8] * 7 + [4]  # the same batches per epoch, windows or not
    if row_kib:  # each batch keeps its rows' own data
        assert all(torch.equal(b["pix"][:, 0], b["x"].float()) for b in run.epoch(1))
    assert _epoch_order(make(seed=1, shuffle=False), 1) == list(range(n))  # file order when asked

    # data.group_by_length: batches of similar lengths, every row once, the same batch sizes, and exact on resume.
    grouped = make(seed=1, group=True)
    by_length = [_epoch_order(grouped, e) for e in range(2)]
    assert all(sorted(order) == list(range(n)) for order in by_length)
    assert [len(b["x"]) for b in grouped.epoch(1)] == [8] * 7 + [4]
    assert _epoch_order(make(seed=1, group=True), 1) == by_length[1]  # a restarted worker: the same batches

    def padded(batches: EpochBatches) -> int:  # pad cells when each batch is cut to its longest row
        return sum(len(b["x"]) * max(lengths[int(i)] for i in b["x"]) - sum(lengths[int(i)] for i in b["x"])
                   for b in batches.epoch(0))

    print(f"pad cells per epoch: {padded(run)} shuffled, {padded(grouped)} grouped by length")
    if not row_kib:  # grouping works within a window: 1 MiB windows of 128 KiB rows hold about one batch
        assert padded(grouped) < padded(run) / 2 and by_length[0] != by_length[1]  # and a new order every epoch


def test_footer_readers_follow_the_shard_count_and_a_users_setting(monkeypatch) -> None:
    from raymed.data.stream import FOOTER_ENV, footer_readers

    monkeypatch.delenv(FOOTER_ENV, raising=False)
    for files, actors in ((1, 1), (10, 1), (11, 2), (1000, 32)):
        with footer_readers(files) as n:
            assert n == actors and os.environ[FOOTER_ENV] == str(actors)
        assert FOOTER_ENV not in os.environ  # only while Ray Data builds the read
    monkeypatch.setenv(FOOTER_ENV, "5")
    with footer_readers(1) as n:
        assert n == 5
    assert os.environ[FOOTER_ENV] == "5"
