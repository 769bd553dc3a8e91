"""Paths and URIs of run storage, experiments and prepared data: local folders, `s3://`, `gs://`.

Everything goes through `pyarrow.fs`, never `pathlib` on a URI. S3-compatible endpoints (MinIO, Ceph, a
local test server) are reached the standard way: `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` and the usual
credential chain (variables, `~/.aws`, instance identity); nothing raymed-specific.

Writers that produce a folder (prepare, report, export) write into a local temporary folder and upload it
at the end (`staged_output`), so a failure never leaves a half-written folder behind under the URI (a
prepared dataset's `manifest.json` is uploaded last: a dataset without it is not a dataset).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs

REMOTE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss")


class StorageError(RuntimeError):
    """Storage that cannot be used (unreachable, no credentials, no bucket, not a dataset); names the URI."""


def is_uri(path: str | os.PathLike) -> bool:
    """True for `s3://...`, `gs://...` and the other remote schemes pyarrow knows; False for local paths."""
    return urlparse(str(path)).scheme in REMOTE_SCHEMES and "://" in str(path)


def resolve(path: str | os.PathLike) -> str:
    """A URI unchanged; a local path made absolute (`~` expanded)."""
    if is_uri(path):
        return str(path).rstrip("/")
    text = str(path)
    if text.startswith("file://"):
        text = urlparse(text).path
    return str(Path(text).expanduser().resolve())


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` for a URI or a local path."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(str(base), *parts)


@functools.lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str:
    """The region of an AWS bucket (what `FileSystem.from_uri` looks up too); us-east-1 when unknown."""
    try:
        return pafs.resolve_s3_region(bucket)
    except OSError:  # unreachable or no such bucket: `check` reports it with the URI
        return "us-east-1"


def _s3(bucket: str) -> pafs.S3FileSystem:
    """S3 with the endpoint from `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` (also honoured by pyarrow
    itself; set here so the filesystem pickled to workers carries it), short timeouts and few retries, so
    an unreachable endpoint fails in seconds, not minutes."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {
        "connect_timeout": 5.0, "request_timeout": 60.0,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or endpoint
        kwargs["scheme"] = parsed.scheme or "https"
    kwargs["region"] = region or ("us-east-1" if endpoint else _bucket_region(bucket))
    return pafs.S3FileSystem(**kwargs)


def filesystem(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) of a URI or local path."""
    if is_uri(path):
        uri = str(path)
        if urlparse(uri).scheme == "s3":
            inner = uri.split("://", 1)[1].rstrip("/")
            return _s3(inner.split("/", 1)[0]), inner
        try:
            return pafs.FileSystem.from_uri(uri)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for unknown schemes, bad URIs
            raise StorageError(f"{uri}: {e}") from e
    return pafs.LocalFileSystem(), resolve(path)


def ray_storage(path: str | os.PathLike) -> tuple[str, pafs.FileSystem | None]:
    """(`storage_path`, `storage_filesystem`) for Ray's `RunConfig`: remote storage with its filesystem."""
    if not is_uri(path):
        return resolve(path), None
    fs, inner = filesystem(path)
    return inner, fs


def uri_of(fs: pafs.FileSystem | None, path: str) -> str:
    """The URI of `path` inside `fs` (what Ray reports as `Result.path` / `Checkpoint.path`)."""
    if fs is None or isinstance(fs, pafs.LocalFileSystem) or "://" in path:
        return path
    scheme = {"s3": "s3", "gcs": "gs"}.get(fs.type_name, fs.type_name)
    return f"{scheme}://{path}"


def _info(path: str | os.PathLike) -> tuple[pafs.FileSystem, str, pafs.FileInfo]:
    fs, inner = filesystem(path)
    try:
        return fs, inner, fs.get_file_info(inner)
    except OSError as e:
        raise StorageError(f"{path}: {e}") from e


def exists(path: str | os.PathLike) -> bool:
    return _info(path)[2].type != pafs.FileType.NotFound


def is_file(path: str | os.PathLike) -> bool:
    return _info(path)[2].type == pafs.FileType.File


def is_dir(path: str | os.PathLike) -> bool:
    return _info(path)[2].type == pafs.FileType.Directory


def read_bytes(path: str | os.PathLike) -> bytes:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(read_text(path))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a (small) text file; local parent folders are created (object storage has none)."""
    fs, inner = filesystem(path)
    if not is_uri(path):
        fs.create_dir(os.path.dirname(inner), recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode("utf-8"))


def listdir(path: str | os.PathLike) -> list[str]:
    """Names directly under a folder (empty when it does not exist)."""
    fs, inner = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def walk_files(path: str | os.PathLike, name: str) -> list[tuple[str, float]]:
    """(URI or path, mtime seconds) of every file called `name` below `path`, recursively."""
    fs, inner = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    out = []
    for i in infos:
        if i.type == pafs.FileType.File and posixpath.basename(i.path) == name:
            rel = posixpath.relpath(i.path, inner) if is_uri(path) else os.path.relpath(i.path, inner)
            out.append((join(path, *rel.split("/")), i.mtime.timestamp() if i.mtime else 0.0))
    return sorted(out)


def remove(path: str | os.PathLike) -> None:
    """Delete a folder and everything under it (nothing when it does not exist)."""
    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type == pafs.FileType.Directory:
        fs.delete_dir(inner)
    elif fs.get_file_info(inner).type == pafs.FileType.File:
        fs.delete_file(inner)


def upload_dir(local: str | os.PathLike, uri: str, last: tuple[str, ...] = ()) -> None:
    """Copy a local folder's files to `uri` (files named in `last` are copied after all the others)."""
    fs, inner = filesystem(uri)
    local = Path(local)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files = [p for p in files if p.name not in last] + [p for p in files if p.name in last]
    for p in files:
        rel = p.relative_to(local).as_posix()
        pafs.copy_files(str(p), f"{inner}/{rel}", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(uri: str, local: str | os.PathLike) -> None:
    """Copy everything under `uri` into a local folder."""
    fs, inner = filesystem(uri)
    pafs.copy_files(inner, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


@contextlib.contextmanager
def staged_output(out: str | os.PathLike, last: tuple[str, ...] = ()) -> Iterator[Path]:
    """A local folder to write `out` into: `out` itself when local, else a temporary folder that is
    uploaded to the URI when the block succeeds (nothing is uploaded when it raises)."""
    if not is_uri(out):
        path = Path(resolve(out))
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix="raymed-stage-"))
    try:
        yield tmp
        upload_dir(tmp, str(out), last=last)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- checks, run in the driver before any worker starts -----------------------------------------
def _credentials_missing(uri: str) -> bool:
    """True when S3 is the target and the standard AWS credential chain finds nothing (botocore's resolver,
    when installed: variables, config files, web identity, container and instance identity)."""
    if urlparse(uri).scheme != "s3":
        return False
    try:
        import botocore.session
    except ImportError:  # cannot tell: the request itself will fail with the server's message
        return False
    return botocore.session.get_session().get_credentials() is None


def check(uri: str | os.PathLike, what: str, must_exist: bool = False) -> None:
    """Fail with a `StorageError` naming `uri` when it cannot be used: an unreachable endpoint, missing
    credentials, a bucket that does not exist, or (with `must_exist`) nothing at the path. Local paths
    pass (their folders are created on write)."""
    uri = str(uri)
    if not is_uri(uri):
        if must_exist and not Path(resolve(uri)).exists():
            raise StorageError(f"{what}: {uri} does not exist")
        return
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    where = f" (endpoint {endpoint})" if endpoint and uri.startswith("s3://") else ""
    if _credentials_missing(uri):
        raise StorageError(f"{what}: {uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID / "
                           "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or run on a node with an instance identity)")
    fs, inner = filesystem(uri)
    bucket = inner.split("/", 1)[0]
    try:
        bucket_info = fs.get_file_info(bucket)
        info = fs.get_file_info(inner) if must_exist else None
    except OSError as e:
        raise StorageError(f"{what}: {uri} is not reachable{where}: {e}") from e
    if bucket_info.type == pafs.FileType.NotFound:
        raise StorageError(f"{what}: {uri}: bucket {bucket!r} does not exist{where}; create it first")
    if info is not None and info.type == pafs.FileType.NotFound:
        raise StorageError(f"{what}: {uri} does not exist")


def check_dataset(uri: str | os.PathLike, what: str, manifest: str = "manifest.json") -> None:
    """`check` plus: `uri` is a prepared dataset (has its manifest)."""
    check(uri, what)
    if not is_file(join(uri, manifest)):
        raise StorageError(f"{what}: {uri} has no {manifest}: is it the --out of `python -m raymed.data prepare`?")
