"""Data: REFER-layout loading (RefCOCO/+/g), a synthetic RefCOCO generator, and Parquet shards.

See ``docs/shard_format.md`` for the shard format contract.
"""

from .refer import (
    DATASET_SPLITS,
    ReferDataError,
    ReferDataset,
    ReferRef,
    Sentence,
    coco_image_filename,
)
from .shards import (
    SHARD_SCHEMA,
    ExpressionSample,
    PrepareReport,
    build_image_row,
    iter_expressions,
    prepare_shards,
    read_image_rows,
    shard_dir,
    validate_shard_schema,
)
from .synth import SynthConfig, synthesize

__all__ = [
    "DATASET_SPLITS",
    "SHARD_SCHEMA",
    "ExpressionSample",
    "PrepareReport",
    "ReferDataError",
    "ReferDataset",
    "ReferRef",
    "Sentence",
    "SynthConfig",
    "build_image_row",
    "coco_image_filename",
    "iter_expressions",
    "prepare_shards",
    "read_image_rows",
    "shard_dir",
    "synthesize",
    "validate_shard_schema",
]
