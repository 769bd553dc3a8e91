"""raymed's data package: published Med-VQA / report datasets -> Parquet shards -> Ray Data stream.

- :mod:`~raymed.data.schema`: the unified row schema and the normalisation of dirty values.
- :mod:`~raymed.data.readers`, :mod:`~raymed.data.generic`: one reader per input format (``FORMATS``).
- :mod:`~raymed.data.prepare`: checks rows and images, writes shards + ``manifest.json``.
- :mod:`~raymed.data.synth`: the synthetic Med-VQA dataset (``STYLES``).
- :mod:`~raymed.data.transform`: late image decoding + the model family's encoder (no Ray).
- :mod:`~raymed.data.stream`: Ray Data reading and torch batches for Ray Train workers.
- :mod:`~raymed.data.rows`: the rows of a split in-process (eval sets; per rank).
- :mod:`~raymed.data.plan`: a run's data directories, the cached synthetic sets, steps per epoch.

CLI: ``python -m raymed.data {prepare,synth,inspect,formats} --help``.
"""

from raymed.data.prepare import BadRowsError, prepare, read_manifest
from raymed.data.readers import FORMATS
from raymed.data.schema import SCHEMA, SCHEMA_VERSION
from raymed.data.source import ReadOptions
from raymed.data.synth import STYLES, generate

__all__ = ["FORMATS", "SCHEMA", "SCHEMA_VERSION", "STYLES", "BadRowsError", "ReadOptions", "generate", "prepare",
           "read_manifest"]
