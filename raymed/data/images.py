"""Image bytes: loading from paths or URIs, checking that they really decode, and late decoding.

``prepare`` checks every image once by fully decoding it (``Image.load()``), because ``verify()``
and header reads miss truncated JPEGs; the stream decodes the same bytes again, late, on the
workers (:func:`decode_image`).
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from raymed.data.dicom import DicomError, dicom_image, is_dicom

LOCAL_SCHEMES = ("", "file")


def is_remote_uri(ref: str) -> bool:
    """True for ``s3://``, ``gs://``, ``https://`` ... references; False for paths and ``file://``."""
    scheme = urlparse(ref).scheme
    return "://" in ref and scheme not in LOCAL_SCHEMES and len(scheme) > 1


def uri_to_path(ref: str) -> Path:
    """A local path from a path or ``file://`` URI."""
    if ref.startswith("file://"):
        return Path(unquote(urlparse(ref).path))
    return Path(ref)


def read_uri_bytes(uri: str) -> bytes:
    """The bytes behind a path or URI (``file://``, or any scheme ``pyarrow.fs`` knows: s3, gs, hdfs)."""
    if not is_remote_uri(uri):
        return uri_to_path(uri).read_bytes()
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(uri)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def image_problem(data: bytes) -> str | None:
    """Why ``data`` is not a usable image (unidentified, corrupt, truncated), or None when it decodes."""
    if not data:
        return "empty image: 0 bytes"
    if is_dicom(data):
        try:
            dicom_image(data)
        except DicomError as err:
            return str(err)
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # full decode: the only check that catches truncated JPEG/PNG data
            if image.width == 0 or image.height == 0:
                return "corrupt image: zero width or height"
    except UnidentifiedImageError:
        return "unreadable image: not a format PIL can identify"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"corrupt image: {type(err).__name__}: {err}"
    return None


def decode_image(data: bytes, *, mode: str = "RGB", max_side: int | None = None) -> Image.Image:
    """Decode compressed bytes into a PIL image in ``mode``; ``mode="keep-gray"``: 8-bit grayscale (``L``) stays
    ``L`` (LLaVA-Med pads grayscale scans with a grey of its own before converting them; the model families
    convert to RGB), every other mode becomes RGB.

    ``max_side`` bounds memory for large scans: JPEGs are decoded at a reduced DCT scale
    (``Image.draft``) and the result is shrunk to fit ``max_side`` keeping the aspect ratio.
    """
    if is_dicom(data):  # 8-bit after rescale, window and MONOCHROME1 inversion (raymed.data.dicom)
        image = dicom_image(data)
    else:
        image = Image.open(io.BytesIO(data))
    if mode == "keep-gray":
        mode = "L" if image.mode == "L" else "RGB"
    if max_side is not None:
        image.draft(mode, (max_side, max_side))
    image = image.convert(mode)
    if max_side is not None and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return image


class ImageChecker:
    """Loads and checks image files once each (rows often share an image), in a thread pool.

    PIL releases the GIL while decoding, so threads give real parallelism for the check.
    """

    def __init__(self, *, check: bool = True, workers: int = 2) -> None:
        self.check = check
        self.workers = max(1, workers)
        self._cache: dict[Path, tuple[int, str | None]] = {}

    def _load(self, path: Path) -> tuple[int, str | None]:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return 0, "missing image"
        except IsADirectoryError:
            return 0, "unreadable image: the path is a directory"
        except OSError as err:
            return 0, f"unreadable image: {err.strerror or err}"
        return len(data), image_problem(data) if self.check else None

    def prefetch(self, paths: Iterable[Path]) -> None:
        """Check every not-yet-seen path in ``paths`` (in parallel)."""
        todo = list(dict.fromkeys(p for p in paths if p not in self._cache))
        if not todo:
            return
        if self.workers == 1 or len(todo) == 1:
            results = list(map(self._load, todo))
        else:
            with ThreadPoolExecutor(self.workers) as pool:
                results = list(pool.map(self._load, todo))
        self._cache.update(zip(todo, results))

    def problem(self, path: Path) -> str | None:
        """Why the image at ``path`` is unusable, or None."""
        self.prefetch([path])
        return self._cache[path][1]

    def check_bytes(self, data: bytes) -> str | None:
        """Why embedded bytes are unusable, or None (always None when checking is off)."""
        if not data:
            return "empty image: 0 bytes"
        return image_problem(data) if self.check else None

    @property
    def files_checked(self) -> int:
        return len(self._cache)
