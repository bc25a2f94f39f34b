"""Offline batch segmentation and distributed evaluation: one Ray Data pipeline (docs/batch.md).

config.py    BatchConfig / StageConfig: actor pools and batch sizes (configs/batch/*.yaml)
io.py        output folders, the Arrow schemas between stages, manifest and shard readers
stages.py    decode + preprocess (CPU tasks), MLLMActor and SAMActor (actor pools), overlays, metrics
pipeline.py  build_pipeline, run_batch (`ppcr batch`), evaluate_shards (`ppcr evaluate --ray`)
"""

from .config import BatchConfig, StageConfig, load_batch_config
from .io import group_by_image, read_manifest, shard_rows_to_images
from .pipeline import BatchSummary, build_pipeline, evaluate_shards, run_batch
from .stages import MLLMActor, SAMActor, decode_f32, decode_stage, metrics_stage

__all__ = [
    "BatchConfig",
    "BatchSummary",
    "MLLMActor",
    "SAMActor",
    "StageConfig",
    "build_pipeline",
    "decode_f32",
    "decode_stage",
    "evaluate_shards",
    "group_by_image",
    "load_batch_config",
    "metrics_stage",
    "read_manifest",
    "run_batch",
    "shard_rows_to_images",
]
