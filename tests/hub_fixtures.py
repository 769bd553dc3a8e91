"""A Hugging Face Hub cache in its documented layout, and a guard that refuses outgoing sockets.

``datasets--ORG--NAME/{refs/main, blobs/<sha256>, snapshots/<commit>/data/<split>-00000-of-00001.parquet}``,
snapshot files symlinked to their blobs, as ``huggingface_hub`` writes it.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

COMMIT = "0123456789abcdef0123456789abcdef01234567"

# Run first in a child process (python -c): a connect to anything but this machine (loopback, its own
# addresses: Ray's processes talk over them) raises.
NO_NETWORK = (
    "import socket\n"
    "_connect = socket.socket.connect\n"
    "_own = {'127.0.0.1', '::1', 'localhost', socket.gethostname()}\n"
    "_own |= {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None)}\n"
    "def _refuse(self, address, *a):\n"
    "    if isinstance(address, tuple) and address[0] not in _own:\n"
    "        raise OSError(f'test: outgoing connection to {address} refused')\n"
    "    return _connect(self, address, *a)\n"
    "socket.socket.connect = _refuse\n"
)


def png(value: int, size: int = 16) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), (value, 255 - value, (value * 7) % 256)).save(out, format="PNG")
    return out.getvalue()


def vqa_table(split: str, n: int, *, start: int = 0) -> pa.Table:
    """A medical-VQA-layout table: ``image`` struct {bytes, path}, ``question``, ``answer``."""
    answers = ["yes", "no", "left lung", "the liver"]
    return pa.table({
        "image": [{"bytes": png((start + i) * 13 % 256), "path": f"{split}_{i}.png"} for i in range(n)],
        "question": [f"is there an abnormality in image {start + i}?" for i in range(n)],
        "answer": [answers[(start + i) % len(answers)] for i in range(n)],
    })


def hub_repo_cache(cache: Path, repo_type: str, repo: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """``files`` (path in the repo -> bytes) written into ``cache`` (an ``HF_HUB_CACHE``) as snapshot ``commit``
    of ``repo``: ``{repo_type}s--ORG--NAME/{refs/main, blobs/<sha256>, snapshots/<commit>/<path>}``."""
    base = cache / f"{repo_type}s--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit)
    (base / "blobs").mkdir(exist_ok=True)
    snap = base / "snapshots" / commit
    for name, data in files.items():
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snap


def hub_dataset_cache(cache: Path, repo: str, splits: dict[str, pa.Table], commit: str = COMMIT) -> Path:
    """Write ``splits`` into ``cache`` as the snapshot ``commit`` of dataset ``repo`` (Parquet, one file a split)."""
    files = {}
    for split, table in splits.items():
        buf = io.BytesIO()
        pq.write_table(table, buf)
        files[f"data/{split}-00000-of-00001.parquet"] = buf.getvalue()
    return hub_repo_cache(cache, "dataset", repo, files, commit)


def hub_model_cache(cache: Path, repo: str, folder: Path, commit: str = COMMIT) -> Path:
    """The files of the model ``folder`` written into ``cache`` as the snapshot ``commit`` of model ``repo``."""
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    return hub_repo_cache(cache, "model", repo, files, commit)
