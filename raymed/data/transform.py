"""Late decoding and encoding of rows: the model-independent half of the input pipeline (no Ray).

:class:`DecodeAndEncode` turns a batch of shard rows (images still compressed) into model inputs:
it decodes each image with PIL (RGB) and calls an :class:`Encoder` built by a picklable
:data:`EncoderFactory`, once per process. The model family owns the encoder (processor, tokenizer,
padding); this module only fixes the contract: the encoder receives ``rows`` with the keys
:data:`ROW_KEYS` and returns equal-length numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
from PIL import UnidentifiedImageError

from raymed.data.images import decode_image, read_uri_bytes
from raymed.data.prepare import read_manifest

ROW_KEYS = ("image", "question", "answer", "task", "answer_type", "id", "extra")
"""Keys of the ``rows`` dict an encoder receives (``image``: a list of ``PIL.Image``, None for a text-only row;
``extra``: the row's JSON side channel, e.g. a conversation's ``history``)."""


class Encoder(Protocol):
    """Turns a batch of decoded rows into model inputs (equal-length numpy arrays)."""

    def __call__(self, rows: dict[str, list[Any]]) -> Mapping[str, np.ndarray]: ...


EncoderFactory = Callable[[], Encoder]
"""A picklable zero-argument callable building an :class:`Encoder`, called once per stream actor."""


@dataclass(frozen=True)
class FamilyEncoderFactory:
    """Builds a model family's encoder lazily, inside the worker (only these plain fields are pickled).

    ``model_ref`` is what ``raymed.models.resolve`` accepts (a preset name or a local HF directory);
    the processor comes from ``raymed.models.load_processor`` and rows go through
    ``family.encode(processor, rows, train=..., max_length=...)``.
    """

    family: str
    model_ref: str
    max_length: int
    train: bool = True
    template: str = "auto"
    image_aspect: str = "auto"

    def __call__(self) -> Encoder:
        from raymed.models import load_processor, resolve

        ref = resolve(self.model_ref)
        if ref.family.name != self.family:
            raise ValueError(f"model {self.model_ref!r} belongs to family {ref.family.name!r}, not {self.family!r}")
        family, processor = ref.family, load_processor(ref)
        kw = dict(train=self.train, max_length=self.max_length, template=self.template, image_aspect=self.image_aspect)
        return lambda rows: family.encode(processor, rows, **kw)


def shard_paths(data_dir: Path | str, split: str) -> list[str]:
    """The Parquet files of ``split``, from the manifest; unknown splits list the available ones."""
    from raymed import storage

    data_dir = storage.resolve(data_dir)
    splits = read_manifest(data_dir)["splits"]
    if split not in splits:
        raise KeyError(f"{data_dir}: no split {split!r}; splits are: {', '.join(splits) or 'none'}")
    return [storage.join(data_dir, split, *shard["file"].split("/")) for shard in splits[split]["shards"]]


def _image_bytes(data: Any, uri: Any, row_id: Any) -> bytes:
    if data is not None:
        return bytes(data)
    if uri is None:
        raise ValueError(f"row {row_id!r}: neither image bytes nor image_uri; re-run prepare")
    return read_uri_bytes(str(uri))


class DecodeAndEncode:
    """``map_batches`` class: decode each row's image (late; RGB, grayscale kept as ``L`` for the family's
    preprocessing) and apply the encoder.

    Built once per actor, so the encoder (processor, tokenizer) is loaded once. Columns in ``keep``
    (``id`` by default) pass through, so predictions can be matched to references.
    """

    def __init__(self, encoder_factory: EncoderFactory, *, keep: Sequence[str] = ("id",),
                 max_image_side: int | None = None) -> None:
        self.encode = encoder_factory()
        self.keep = tuple(keep)
        self.max_image_side = max_image_side

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch["id"]]
        uris = batch["image_uri"] if "image_uri" in batch else [None] * len(ids)
        images = []
        for data, uri, row_id in zip(batch["image"], uris, ids):
            if data is None and uri is None:  # a text-only row (prepare writes neither for one)
                images.append(None)
                continue
            try:
                images.append(decode_image(_image_bytes(data, uri, row_id), mode="keep-gray",
                                           max_side=self.max_image_side))
            except UnidentifiedImageError as err:
                raise ValueError(f"row {row_id!r}: cannot decode image (not a format PIL can identify); "
                                 "run `prepare`, which checks every image") from err
            except (OSError, ValueError) as err:
                raise ValueError(f"row {row_id!r}: cannot decode image ({type(err).__name__}: {err}); "
                                 "run `prepare`, which checks every image") from err
        rows = {key: list(batch[key]) for key in ROW_KEYS if key != "image" and key in batch}
        rows["image"] = images
        out = {key: np.asarray(value) for key, value in self.encode(rows).items()}
        for key in self.keep:
            out[key] = np.asarray(batch[key])
        bad = {key: len(value) for key, value in out.items() if len(value) != len(ids)}
        if bad:
            raise ValueError(f"encoder returned arrays whose length is not the batch size {len(ids)}: {bad}")
        return out
