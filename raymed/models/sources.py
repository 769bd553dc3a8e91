"""Where users keep models: a local folder, a Hub id, an object-storage folder, an original LLaVA-Med release.

`local_folder(name)` makes any of them a local transformers folder on this node, once:

- a path that exists is used as it is (a local folder wins over a Hub id of the same name);
- ``ORG/NAME[@revision]`` is the Hub snapshot (:mod:`raymed.hub`), fetched into the Hub cache if missing;
- ``s3://...`` / ``gs://...`` folders are copied into ``$HF_HOME/raymed-models/fetched/<key>``, the key a
  hash of the URI and each object's path, size and modification time (a changed object is fetched anew);
- a folder holding an original LLaVA-Med release (``llava_mistral`` / ``llava_llama`` config), from any of
  these, is converted once (:func:`raymed.models.llava_convert.convert_llava_med`) into
  ``$HF_HOME/raymed-models/converted/<key>``, the key a hash of the converter version and the source's content
  (a Hub snapshot's blob names, which are the files' hashes; else each file's SHA-256, remembered per
  path, size and modification time so a large local release is read once).

Each copy or conversion runs under a file lock per key into a temporary folder that is renamed when complete,
so the workers of one node that start together make it once and none reads half a folder. Every node has its
own cache (``HF_HOME``): a multi-node run needs no shared filesystem.

`pin(name)` is what the driver hands to the workers: a Hub id with its resolved commit
(``ORG/NAME@<commit>``), so every node loads the same revision even if the branch moves during the run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from raymed.models.base import ModelLoadError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
CONVERTER_VERSION = "llava-med-v1.5/1"  # bump when convert_llava_med's output changes


def is_hub_id(name: str) -> bool:
    """``ORG/NAME[@revision]`` that is not an existing local path."""
    return HUB_ID.match(name) is not None and not Path(name).expanduser().exists()


def pin(name: str) -> str:
    """``name`` with a Hub id's revision replaced by its commit (resolved once, on the driver); others as is."""
    if not is_hub_id(name):
        return name
    return f"{HUB_ID.match(name)['repo']}@{_hub_folder(name).name}"


@functools.lru_cache(maxsize=32)
def local_folder(name: str) -> Path:
    """The local transformers folder for ``name`` on this node (see the module doc); not for presets."""
    from raymed import storage

    path = Path(name).expanduser()
    if path.exists():
        folder = path
    elif storage.is_uri(name):
        folder = _fetched(name)
    elif HUB_ID.match(name):
        folder = _hub_folder(name)
    else:
        return path  # read_model_type says what is wrong with it
    return _converted(folder) if _original_type(folder) else folder


def _hub_folder(name: str) -> Path:
    from raymed.hub import HubError, snapshot

    m = HUB_ID.match(name)
    try:
        return snapshot(m["repo"], m["revision"], what=name)
    except HubError as err:
        raise ModelLoadError(f"{name!r} is no local folder (here: {Path.cwd()}); as a Hub id: {err}") from None


def _original_type(folder: Path) -> str | None:
    """The release's model type when ``folder`` holds an original LLaVA-Med checkpoint, else None."""
    from raymed.models.llava_convert import ORIGINAL_TYPES

    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if model_type in ORIGINAL_TYPES else None


def _fetched(uri: str) -> Path:
    """An object-storage folder copied once into this node's cache."""
    import pyarrow.fs as pafs

    from raymed import storage

    fs, inner = storage.filesystem(uri)
    infos = [i for i in fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
             if i.type == pafs.FileType.File]
    if not infos:
        raise ModelLoadError(f"model.name {uri}: no model files under this URI")
    listing = sorted((i.path[len(inner):].lstrip("/"), i.size, i.mtime_ns) for i in infos)
    if not any(rel == "config.json" for rel, _, _ in listing):
        raise ModelLoadError(f"model.name {uri}: no config.json under this URI (a transformers model folder, or "
                             "an original LLaVA-Med release, is expected)")
    key = _digest(json.dumps([uri.rstrip("/"), listing]))
    return _once(_cache("fetched") / key, lambda tmp: storage.download_dir(uri, tmp))


def _converted(folder: Path) -> Path:
    """An original LLaVA-Med release converted once into this node's cache."""
    from raymed.models.llava_convert import convert_llava_med

    key = _digest(json.dumps([CONVERTER_VERSION, _content(folder)]))
    return _once(_cache("converted") / key, lambda tmp: convert_llava_med(folder, tmp / "model"), sub="model")


def _content(folder: Path) -> list[tuple[str, str]]:
    """(relative path, content hash) of every file under ``folder``."""
    out = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        target = Path(os.path.realpath(f))
        hub_blob = f.is_symlink() and target.parent.name == "blobs"  # the Hub names blobs by their hash
        out.append((f.relative_to(folder).as_posix(), target.name if hub_blob else _file_sha256(target)))
    return out


def _file_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered in the cache per (path, size, modification time, inode)."""
    st = path.stat()
    memo = _cache("digests") / _digest(json.dumps([str(path), st.st_size, st.st_mtime_ns, st.st_ino]))
    if memo.is_file():
        return memo.read_text()
    with path.open("rb") as f:
        value = hashlib.file_digest(f, "sha256").hexdigest()
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
    tmp.write_text(value)
    tmp.replace(memo)
    return value


def _once(dest: Path, make, sub: str | None = None) -> Path:
    """``dest`` (or ``dest/sub``), made by ``make(tmp)`` under a file lock if it does not exist yet."""
    from filelock import FileLock

    result = dest / sub if sub else dest
    if dest.is_dir():
        return result
    with FileLock(f"{dest}.lock"):
        if not dest.is_dir():  # another process of this node may have made it while we waited
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
            try:
                make(tmp)
                tmp.rename(dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return result


def _cache(kind: str) -> Path:
    from raymed.hub import raymed_cache

    path = raymed_cache("models") / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]
