"""DICOM images: pixel data to an 8-bit PIL image, before the model's own preprocessing.

An image column may point at a ``.dcm`` file (or hold its bytes); a DICOM file is recognised by its
``DICM`` preamble, not by its name. Decoding (``pydicom``):

1. the first frame of a multi-frame file;
2. the modality rescale (``RescaleSlope`` / ``RescaleIntercept``: CT values become Hounsfield units);
3. a window: the configured one (``--dicom-window CENTER,WIDTH``), else the file's first
   ``WindowCenter`` / ``WindowWidth``, else the frame's minimum..maximum; values map linearly to
   0..255 as in DICOM PS3.3 C.11.2.1.2 (below ``center - width/2``: 0, above ``center + width/2``: 255);
4. ``MONOCHROME1`` (low values bright) inverted, so that 255 is always bright;
5. colour files (RGB, or YBR that pydicom converts to RGB) are scaled to 8 bits without a window.

Compressed transfer syntaxes decode when pydicom has a handler for them (RLE and, with Pillow,
JPEG Baseline and JPEG 2000); others (JPEG-LS, 12-bit JPEG without ``pylibjpeg``/``gdcm``) are refused
with the transfer syntax's name.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image

DICOM_MAGIC = b"DICM"


class DicomError(ValueError):
    """A DICOM file that cannot be turned into an image (unreadable, no pixels, no decoder)."""


def is_dicom(data: bytes) -> bool:
    """True when ``data`` starts with the DICOM preamble (128 bytes, then ``DICM``)."""
    return len(data) >= 132 and data[128:132] == DICOM_MAGIC


def _pixels(data: bytes) -> tuple[np.ndarray, object]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as err:
        raise DicomError(f"unreadable DICOM: {type(err).__name__}: {err}") from None
    if "PixelData" not in ds:
        raise DicomError("unreadable DICOM: no pixel data (truncated, or not an image)")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        array = ds.pixel_array
    except (NotImplementedError, RuntimeError) as err:
        name = syntax.name if syntax is not None else "unknown"
        first = str(err).splitlines()[0].rstrip(":")
        raise DicomError(f"DICOM transfer syntax {name!r} ({syntax}): no decoder available ({first})") from None
    except (ValueError, AttributeError, KeyError) as err:
        raise DicomError(f"unreadable DICOM pixel data: {type(err).__name__}: {err}") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        array = array[0]
    return array, ds


def _first(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None  # type: ignore[arg-type,index]
    return None if value is None else float(value)  # type: ignore[arg-type]


def window_to_uint8(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear VOI window (DICOM PS3.3 C.11.2.1.2) mapped to 0..255."""
    width = max(float(width), 1.0)
    scaled = ((values - (center - 0.5)) / (width - 1.0) + 0.5) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def dicom_image(data: bytes, window: Sequence[float] | None = None) -> Image.Image:
    """The first frame of a DICOM file as an 8-bit ``L`` (grayscale) or ``RGB`` PIL image."""
    array, ds = _pixels(data)
    if array.ndim == 3 and array.shape[-1] in (3, 4):  # colour: no window, scale to 8 bits
        bits = int(ds.get("BitsStored", 8) or 8)  # type: ignore[attr-defined]
        rgb = array[..., :3].astype(np.float64) * (255.0 / (2**bits - 1))
        return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    if array.ndim != 2:
        raise DicomError(f"DICOM pixel array of shape {array.shape}: expected one 2-D frame")
    slope = float(ds.get("RescaleSlope", 1) or 1)  # type: ignore[attr-defined]
    intercept = float(ds.get("RescaleIntercept", 0) or 0)  # type: ignore[attr-defined]
    values = array.astype(np.float64) * slope + intercept
    if window is not None:
        center, width = float(window[0]), float(window[1])
    else:
        center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))  # type: ignore[attr-defined]
    if center is None or width is None:
        low, high = float(values.min()), float(values.max())
        center, width = (low + high) / 2.0 + 0.5, max(high - low, 0.0) + 1.0
    pixels = window_to_uint8(values, center, width)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":  # type: ignore[attr-defined]
        pixels = 255 - pixels
    return Image.fromarray(pixels, "L")


def dicom_png(data: bytes, window: Sequence[float] | None = None) -> bytes:
    """The DICOM file as 8-bit PNG bytes (what ``prepare`` embeds)."""
    out = io.BytesIO()
    dicom_image(data, window).save(out, format="PNG")
    return out.getvalue()
