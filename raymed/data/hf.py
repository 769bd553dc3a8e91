"""Hugging Face datasets: ``hf://datasets/ORG/NAME[@revision]`` or a local dataset folder (format ``hf``).

The Hub id is resolved with ``huggingface_hub.snapshot_download`` into its standard cache (``HF_HOME`` /
``HF_HUB_CACHE`` honoured); with ``HF_HUB_OFFLINE=1`` a filled cache is enough and nothing is contacted.
``datasets`` then reads the snapshot folder (``datasets.load_dataset`` with a repo id does not read the Hub
cache offline; reading the resolved folder does), with its own rules for splits and data files
(``data/train-*.parquet``, ``validation/...``, ``test.jsonl``...); a ``validation`` / ``valid`` / ``dev``
split becomes raymed's ``val``. Images stay the bytes the dataset stores (no decode at read time).

Column mapping (first column present wins; ``--columns field=column`` overrides): as the ``generic``
format (:data:`raymed.data.generic.GENERIC_FIELDS`): ``image`` (an ``Image`` struct with bytes, bytes, or
a path relative to the dataset folder), ``question``, ``answer``, ``answer_type``, ``id``. Without an
``answer_type`` column the answer type is derived: **closed when the answer is yes or no, open otherwise**.
A dataset with no question column is a caption / report dataset (task ``report``; the text comes from
``answer``, ``report``, ``caption`` or ``text``), unless ``--task`` says otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from raymed.data.generic import GENERIC_FIELDS, _image, field_names
from raymed.data.schema import canonical_split, lookup
from raymed.data.source import ReadContext, SourceRow, build_row
from raymed.hub import HubError, raymed_cache
from raymed.hub import snapshot as hub_snapshot

HF_PREFIX = "hf://datasets/"


class HubDatasetError(HubError):
    """An ``hf://datasets/...`` reference that cannot be resolved (bad form, not found, offline + not cached)."""


def is_hf_uri(ref: object) -> bool:
    return isinstance(ref, str) and ref.startswith(HF_PREFIX)


def parse_hf_uri(uri: str) -> tuple[str, str | None]:
    """``hf://datasets/ORG/NAME[@revision]`` -> (``ORG/NAME``, revision or None)."""
    rest = uri[len(HF_PREFIX):].strip("/")
    repo, _, revision = rest.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise HubDatasetError(f"{uri}: expected hf://datasets/ORG/NAME[@revision]")
    return repo, revision or None


def snapshot(uri: str) -> Path:
    """The local snapshot folder of ``uri`` (downloaded into the Hub cache unless offline and cached)."""
    repo, revision = parse_hf_uri(uri)
    try:
        return hub_snapshot(repo, revision, repo_type="dataset", what=uri)
    except HubError as err:
        raise HubDatasetError(str(err)) from None


def local_folder(source: Path | str) -> Path:
    """``source`` as a local dataset folder: an ``hf://`` reference resolved, a path as is."""
    return snapshot(str(source)) if is_hf_uri(source) else Path(source)


def prepared_folder(uri: str) -> Path:
    """``uri`` prepared once into ``$HF_HOME/raymed-prepared/ORG--NAME--COMMIT`` and reused (``data.path: hf://``).

    The folder is keyed by the snapshot's commit, so a new revision of the dataset is prepared again and a
    run resumed later reads the same rows. Bad rows are an error, as in ``prepare``'s default.
    """
    from raymed.data.prepare import MANIFEST, prepare

    folder = snapshot(uri)
    repo, _ = parse_hf_uri(uri)
    out = raymed_cache("prepared") / f"{repo.replace('/', '--')}--{folder.name}"
    if not (out / MANIFEST).is_file():
        prepare("hf", folder, out, overwrite=True)
    return out


def split_files(root: Path) -> dict[str, list[str]]:
    """raymed split -> data files, by the ``datasets`` library's own data-file patterns."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    if root.is_file():
        return {"train": [str(root)]}
    try:
        patterns = get_data_patterns(str(root))
    except Exception as err:  # datasets raises EmptyDatasetError (a FileNotFoundError) and others
        raise FileNotFoundError(f"{root}: no data files that the datasets library recognises ({err})") from None
    files = DataFilesDict.from_patterns(patterns, base_path=str(root))
    out: dict[str, list[str]] = {}
    for split, paths in files.items():
        key = canonical_split(str(split)) or str(split)
        out.setdefault(key, []).extend(str(p) for p in paths)
    return out


def _records(files: list[str]) -> Iterator[dict[str, Any]]:
    """Records of ``files``, streamed by ``datasets`` without decoding images."""
    import datasets

    builder = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}.get(Path(files[0]).suffix)
    if builder is None:
        raise FileNotFoundError(f"{files[0]}: not a Parquet, JSON or CSV data file")
    stream = datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
    yield from stream.decode(False)


def read_hf(ctx: ReadContext) -> Iterator[SourceRow]:
    """Rows of a Hugging Face dataset folder (``prepare`` resolves ``hf://`` references first)."""
    opts = ctx.options
    fields = field_names(dict(opts.columns))
    fields = {**fields, "answer": (*fields["answer"], "text")} if "answer" not in opts.columns else fields
    dirs = [opts.image_root] if opts.image_root else [ctx.root if ctx.root.is_dir() else ctx.root.parent]
    for split, files in split_files(ctx.root).items():
        for index, record in enumerate(_records(files)):
            has_question = lookup(record, *fields["question"])[0] is not None
            task = opts.task if opts.task != "vqa" or has_question else "report"
            row = build_row(
                ctx, record, file=f"{split} split", index=index, split=canonical_split(split), task=task,
                fields=fields, image=lambda ref: _image(ref, dirs, ctx), default_id=f"{split}-{index}",
                split_note=f"dataset split {split!r} (expected train, validation or test)",
            )
            yield row


__all__ = ["GENERIC_FIELDS", "HubDatasetError", "is_hf_uri", "local_folder", "prepared_folder", "read_hf", "snapshot"]
