"""DICOM images (pydicom's own test files): rescale, window, MONOCHROME1, multi-frame, refusals, prepare."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from PIL import Image  # noqa: E402

from raymed.data import BadRowsError, ReadOptions, prepare  # noqa: E402
from raymed.data.dicom import dicom_image, is_dicom  # noqa: E402
from raymed.data.images import decode_image, image_problem  # noqa: E402


def _bytes(name: str) -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def test_ct_rescale_and_configured_window_on_pixel_values() -> None:
    data = _bytes("CT_small.dcm")
    ds = pydicom.dcmread(io.BytesIO(data))
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert float(ds.RescaleIntercept) == -1024  # the rescale matters: raw values are not HU
    pixels = np.asarray(dicom_image(data, window=(40, 400)))
    assert pixels.dtype == np.uint8 and pixels.shape == hu.shape
    assert (pixels[hu <= -160.5] == 0).all() and (pixels[hu >= 240] == 255).all()
    inside = (hu > -150) & (hu < 230)
    assert inside.any()
    expected = np.clip(np.rint(((hu - 39.5) / 399 + 0.5) * 255), 0, 255)
    assert np.abs(pixels[inside].astype(int) - expected[inside]).max() <= 1
    # no window in the file: the frame's min..max spans 0..255
    auto = np.asarray(dicom_image(data))
    assert auto.min() == 0 and auto.max() == 255 and auto[hu.argmin() // hu.shape[1], hu.argmin() % hu.shape[1]] == 0


def test_mr_file_window_monochrome1_and_multiframe(tmp_path: Path) -> None:
    data = _bytes("MR_small.dcm")
    ds = pydicom.dcmread(io.BytesIO(data))
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (600, 1600)
    raw = ds.pixel_array.astype(np.float64)
    pixels = np.asarray(dicom_image(data))
    expected = np.clip(np.rint(((raw - 599.5) / 1599 + 0.5) * 255), 0, 255)
    assert np.abs(pixels.astype(int) - expected).max() <= 1
    assert pixels.min() == expected.min() > 0  # the file's window, not min..max
    ds.PhotometricInterpretation = "MONOCHROME1"
    buf = io.BytesIO()
    ds.save_as(buf)
    assert (np.asarray(dicom_image(buf.getvalue())) == 255 - pixels).all()
    frames = _bytes("SC_rgb_rle_2frame.dcm")  # RLE-compressed, two RGB frames: the first is used
    first = pydicom.dcmread(io.BytesIO(frames)).pixel_array[0]
    image = decode_image(frames)
    assert image.mode == "RGB" and (np.asarray(image) == first).all()


def test_unreadable_and_undecodable_dicom_are_named() -> None:
    truncated = _bytes("CT_small.dcm")[:2000]
    assert is_dicom(truncated) and "DICOM" in (image_problem(truncated) or "")
    problem = image_problem(_bytes("MR_small_jpeg_ls_lossless.dcm")) or ""
    assert "JPEG-LS Lossless Image Compression" in problem and "no decoder" in problem
    assert image_problem(_bytes("MR_small_RLE.dcm")) is None  # compressed with a decoder: fine


def _rows(tmp_path: Path, names: list[str]) -> Path:
    root = tmp_path / "src"
    (root / "scans").mkdir(parents=True)
    for name in names:
        if name != "absent.dcm":
            shutil.copy(get_testdata_file(name) if name != "broken.dcm" else get_testdata_file("CT_small.dcm"),
                        root / "scans" / name)
    if "broken.dcm" in names:
        (root / "scans" / "broken.dcm").write_bytes(_bytes("CT_small.dcm")[:2000])
    rows = [{"id": f"r{i}", "image": f"scans/{name}", "question": "is there a lesion?", "answer": "no",
             "split": "train" if i else "test"} for i, name in enumerate(names)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_prepare_embeds_windowed_png_and_names_bad_dicom_rows(tmp_path: Path) -> None:
    root = _rows(tmp_path, ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm"])
    manifest = prepare("generic", root, tmp_path / "out", options=ReadOptions(dicom_window=(40, 400)),
                       val_fraction=0)
    assert manifest["rows"] == 3
    table = pq.read_table(tmp_path / "out" / "test").to_pylist()
    png = table[0]["image"]
    assert not is_dicom(png) and Image.open(io.BytesIO(png)).format == "PNG"
    assert (np.asarray(Image.open(io.BytesIO(png))) == np.asarray(dicom_image(_bytes("CT_small.dcm"), (40, 400)))).all()
    bad = _rows(tmp_path / "bad", ["CT_small.dcm", "broken.dcm", "absent.dcm", "MR_small_jpeg_ls_lossless.dcm"])
    with pytest.raises(BadRowsError) as err:
        prepare("generic", bad, tmp_path / "out2")
    message = str(err.value)
    assert "data.jsonl row 1 (id 'r1'): unreadable DICOM" in message
    assert "row 2 (id 'r2'): missing image" in message
    assert "row 3 (id 'r3'): DICOM transfer syntax 'JPEG-LS Lossless Image Compression'" in message


def test_dicom_rows_stored_by_path_decode_on_the_worker_and_train_a_step(tmp_path: Path) -> None:
    """``--images uri`` keeps the .dcm path: the stream's decoder windows it; one tiny-llava step learns from it."""
    import torch

    from raymed.data.rows import read_split_rows
    from raymed.data.transform import DecodeAndEncode, FamilyEncoderFactory
    from raymed.models import load_model

    root = _rows(tmp_path, ["CT_small.dcm", "MR_small.dcm", "SC_rgb_rle_2frame.dcm"])
    prepare("generic", root, tmp_path / "out", images="uri", val_fraction=0)
    rows = read_split_rows(tmp_path / "out", "train")
    assert all(r["image"] is None and r["image_uri"].endswith(".dcm") for r in rows)
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    encoded = DecodeAndEncode(FamilyEncoderFactory("llava", "tiny-llava", 64))(batch)
    model = load_model("tiny-llava")
    inputs = {k: torch.from_numpy(v) for k, v in encoded.items() if k not in ("id", "has_image")}
    loss = model(**inputs).loss
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
