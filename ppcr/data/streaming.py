"""Ray Data training pipeline: shard folders -> per-expression model inputs, streamed to the trainer.

    read_parquet (one row per image, docs/shard_format.md)
      -> map_batches(preprocess_images)   CPU tasks: decode once per image, CLIP + SAM preprocess,
                                          one output row per expression, each image's expressions
                                          kept together (the contrast the tiny preset learns from)
      -> trainer: get_dataset_shard("train").iter_torch_batches(collate_fn=RowsToBatch(...))

Nothing is materialised: Ray Data streams blocks and Ray Train splits the stream between workers.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from ..config import ConfigError, MixEntry, RunConfig
from ..geometry import decode_image, preprocess_image
from ..inputs import Batch, ground_truth_boxes, group_images
from ..masks import decode_rle
from ..storage import filesystem_for, is_uri
from .shards import (
    SHARD_SCHEMA,
    SHARD_SCHEMA_V1,
    check_single_target,
    shard_dir,
    upgrade_row,
    validate_shard_schema,
)

#: One training row per expression (the output of `preprocess_images`).
ROW_COLUMNS = (
    "key",  # "<dataset>/<split_by>/<sent_id>": unique across a mix; the data position of a resume
    # A hash of the image's file bytes: equal images (refcoco and refcoco+ share COCO) are encoded once
    # per batch, and two data sets of a mix whose different images share a file name never swap pixels.
    "image_key",
    "clip_pixels",  # float32 (3, C, C)
    "sam_pixels",  # float32 (3, S, S)
    "original_hw",  # int64 (2,)
    "sam_input_hw",  # int64 (2,)
    "expression",  # str
    "gt_box",  # float32 (4,) normalized XYXY
    "mask_size",  # int64 (2,) = (h, w)
    "mask_counts",  # str, COCO compressed RLE
)
#: With `instances` (model.targets multi): each target on its own, as the slot matching trains on them.
#: JSON `[[x1, y1, x2, y2, counts], ...]`: pixel XYXY and COCO compressed RLE of size `mask_size`; `[]` for
#: an expression naming nothing (its gt_box/mask_counts are then [0, 0, 0, 0] and an empty mask).
TARGETS_COLUMN = "targets"


def mix_entries(cfg: RunConfig) -> list[MixEntry]:
    """The training mix: `distributed.datasets`, or `data`'s train split alone."""
    if cfg.distributed.datasets:
        return list(cfg.distributed.datasets)
    d = cfg.data
    return [MixEntry(d.shards_root, d.dataset, d.split_by, d.train_split, 1.0)]


def shard_files(entry: MixEntry) -> list[str]:
    """Sorted part files of one mix entry (paths or URIs); ConfigError naming the folder if none exist."""
    if is_uri(entry.shards_root):
        folder = f"{entry.shards_root.rstrip('/')}/{entry.dataset}_{entry.split_by}/{entry.split}"
    else:
        folder = str(shard_dir(entry.shards_root, entry.dataset, entry.split_by, entry.split))
    fs, path = filesystem_for(folder)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        raise ConfigError(f"shard folder not found: {folder} (make it with `ppcr prepare`)")
    files = sorted(
        f.path
        for f in fs.get_file_info(pafs.FileSelector(path))
        if f.base_name.startswith("part-") and f.base_name.endswith(".parquet")
    )
    if not files:
        raise ConfigError(f"no part-*.parquet shard files in {folder}")
    scheme = folder.split("://", 1)[0] + "://" if is_uri(folder) else ""
    return [scheme + f if scheme and not is_uri(f) else f for f in files]


def files_schema(files: list[str]) -> pa.Schema:
    """The schema the shard files of one split share (SHARD_SCHEMA, or SHARD_SCHEMA_V1 for version 1
    files, which preprocess_images reads the same); ConfigError when the split mixes versions."""
    versions = {validate_shard_schema(f) for f in files}
    if len(versions) > 1:
        raise ConfigError(
            f"{files[0]} and the rest of its split mix shard format versions {sorted(versions)}; "
            "prepare the split again"
        )
    return SHARD_SCHEMA_V1 if versions == {"1"} else SHARD_SCHEMA


def check_mix_single_target(cfg: RunConfig) -> None:
    """InputError (one line, naming the split and the counts) when a training split holds expressions
    without a target or with several and `model.targets` is single (the paper's model learns exactly one
    target per expression); the multi-target model trains on every kind."""
    if cfg.model.targets == "multi":
        return
    for entry in mix_entries(cfg):
        where = f"{entry.shards_root}/{entry.dataset}_{entry.split_by}/{entry.split}"
        check_single_target(shard_files(entry), where)


def preprocess_images(
    batch: pa.Table,
    clip_size: int,
    sam_size: int,
    dataset: str,
    split_by: str,
    clip_mode: str = "pad",
    instances: bool = False,
) -> dict:
    """Image rows (SHARD_SCHEMA, or version 1) -> one row per expression (ROW_COLUMNS, and with
    `instances` TARGETS_COLUMN), each image decoded once."""
    out: dict[str, list] = {c: [] for c in ROW_COLUMNS + ((TARGETS_COLUMN,) if instances else ())}
    for row in map(upgrade_row, batch.to_pylist()):
        name = f"{dataset}_{split_by} image {row['image_id']} ({row['file_name']})"
        image = decode_image(row["image"], name, expected_hw=(row["height"], row["width"]))
        h, w = image.shape[:2]
        clip, sam, in_hw = preprocess_image(image, clip_size, sam_size, clip_mode)
        clip, sam = clip.numpy(), sam.numpy()
        key = hashlib.blake2b(row["image"], digest_size=16).hexdigest()
        for ref in row["refs"]:
            box = ground_truth_boxes([ref["bbox"]], [(h, w)])[0].numpy()
            if instances:
                targets = json.dumps([[*t["bbox"], t["mask"]["counts"]] for t in ref["targets"]])
            for s in ref["sentences"]:
                out["key"].append(f"{dataset}/{split_by}/{s['sent_id']}")
                out["image_key"].append(key)
                out["clip_pixels"].append(clip)
                out["sam_pixels"].append(sam)
                out["original_hw"].append(np.array([h, w], dtype=np.int64))
                out["sam_input_hw"].append(np.array(in_hw, dtype=np.int64))
                out["expression"].append(s["text"])
                out["gt_box"].append(box)
                out["mask_size"].append(np.asarray(ref["mask"]["size"], dtype=np.int64))
                out["mask_counts"].append(ref["mask"]["counts"])
                if instances:
                    out[TARGETS_COLUMN].append(targets)
    strings = ("key", "image_key", "expression", "mask_counts", TARGETS_COLUMN)
    return {k: np.array(v, dtype=object) if k in strings else np.stack(v) for k, v in out.items()}


def training_dataset(cfg: RunConfig, clip_size: int, sam_size: int, seed: int | None = None):
    """One data epoch of `cfg`'s training mix, streamed (one row per expression, ROW_COLUMNS; with
    `model.targets: multi` also TARGETS_COLUMN).

    Preprocessing runs as Ray Data tasks (up to `distributed.data_cpus` at once) on one read block per
    file; tasks reuse warm worker processes when Ray Train starts the next epoch, where an actor pool
    would be created again (tests/benchmarks measured both: docs/distributed_training.md).
    """
    import ray.data

    parts = []
    for i, entry in enumerate(mix_entries(cfg)):
        files = shard_files(entry)
        read = ray.data.read_parquet(
            files, schema=files_schema(files), shuffle="files", override_num_blocks=len(files)
        )
        rows = read.map_batches(
            preprocess_images,
            fn_kwargs=dict(
                clip_size=clip_size,
                sam_size=sam_size,
                dataset=entry.dataset,
                split_by=entry.split_by,
                clip_mode=cfg.model.clip_preprocess,
                instances=cfg.model.targets == "multi",
            ),
            concurrency=max(1, int(cfg.distributed.data_cpus)),
            batch_size=4,
            batch_format="pyarrow",
            zero_copy_batch=True,
        )
        whole, frac = int(math.floor(entry.weight)), entry.weight - math.floor(entry.weight)
        copies = [rows] * whole
        if frac > 1e-9:
            copies.append(rows.random_sample(frac, seed=None if seed is None else seed + i))
        parts += copies
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


class RowsToBatch(NumpyBatchCollateFn):
    """Trainer-side collate: expression rows -> (`Batch`, keys); equal images share one pixel row.

    `skip` counts, per key, occurrences already trained on in this epoch before a restart: that many
    occurrences are dropped again (a key occurs `weight` times per epoch in a weighted mix). Returns None when
    every row was skipped. `instances`: the rows carry TARGETS_COLUMN and the batch gets `gt_instances`
    (model.targets multi). Ray calls this from prefetch threads, hence the lock.
    """

    def __init__(self, skip: Counter | None = None, instances: bool = False):
        super().__init__()
        self.skip = Counter(skip or {})
        self.instances = instances
        self._lock = threading.Lock()

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[Batch, list[str]] | None:
        keep = []
        with self._lock:
            for i, k in enumerate(batch["key"]):
                if self.skip[k] > 0:
                    self.skip[k] -= 1
                else:
                    keep.append(i)
        if not keep:
            return None
        firsts, index = group_images([batch["image_key"][i] for i in keep])
        first = [keep[j] for j in firsts]
        # Arrays from Ray's object store are read-only: copy before handing them to torch.
        t = lambda name, idx: torch.from_numpy(np.array(batch[name][idx]))  # noqa: E731
        masks = []
        for i in keep:
            h, w = (int(v) for v in batch["mask_size"][i])
            masks.append(torch.from_numpy(decode_rle({"size": [h, w], "counts": batch["mask_counts"][i]})))
        gt_instances = [_instances(batch, i) for i in keep] if self.instances else None
        out = Batch(
            clip_pixels=t("clip_pixels", first),
            sam_pixels=t("sam_pixels", first),
            original_hw=t("original_hw", first),
            sam_input_hw=t("sam_input_hw", first),
            image_index=index,
            expressions=[str(batch["expression"][i]) for i in keep],
            gt_masks=masks,
            gt_boxes=t("gt_box", keep).float(),
            meta=[{"key": str(batch["key"][i])} for i in keep],
            gt_instances=gt_instances,
        )
        return out, [str(batch["key"][i]) for i in keep]


def _instances(batch: dict[str, np.ndarray], i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i's targets (TARGETS_COLUMN) as `Batch.gt_instances` has them: (normalized XYXY (n, 4),
    bool masks (n, h, w)); n = 0 for an expression naming nothing."""
    if TARGETS_COLUMN not in batch:
        raise ValueError(f"rows without the {TARGETS_COLUMN!r} column: stream them with model.targets multi")
    h, w = (int(v) for v in batch["mask_size"][i])
    targets = json.loads(batch[TARGETS_COLUMN][i])
    if not targets:
        return torch.zeros(0, 4), torch.zeros(0, h, w, dtype=torch.bool)
    boxes = ground_truth_boxes([t[:4] for t in targets], [(h, w)] * len(targets))
    masks = [torch.from_numpy(decode_rle({"size": [h, w], "counts": t[4]})) for t in targets]
    return boxes, torch.stack(masks)
