"""Evaluation over shard splits: every expression, deterministic templates, RISMetrics; plus the
trivial baselines the tiny demo is judged against (mean training box; mask of all objects)."""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import InputError
from .data.refer import GENERALIZED_DATASETS
from .data.shards import (
    ExpressionSample,
    ImageCache,
    generalized_counts,
    iter_expressions,
    read_image_rows,
    to_item,
)
from .geometry import denormalize_box, mask_to_box
from .inference import predict_torch
from .inputs import collate
from .masks import decode_rle, encode_mask
from .metrics import GRESMetrics, RISMetrics, protocol_indices, score_answer, score_generalized
from .model import PPCRModel
from .report import generalized_prediction_record, prediction_record
from .storage import parquet_files


def _chunks(samples: Iterable[ExpressionSample], size: int) -> Iterator[list[ExpressionSample]]:
    chunk: list[ExpressionSample] = []
    for s in samples:
        chunk.append(s)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def protocol_samples(
    samples: Iterable[ExpressionSample], protocol: str = "all", seed: int = 0
) -> Iterator[ExpressionSample]:
    """The samples `protocol` evaluates (metrics.protocol_indices), in shard order. `samples` must come
    image by image, as `iter_expressions` yields them."""
    if protocol == "all":
        protocol_indices(protocol, "", 0, seed)  # the same check as the other protocols
        yield from samples
        return
    for _, group in itertools.groupby(samples, key=lambda s: s.image_id):
        group = list(group)
        for i in protocol_indices(protocol, group[0].file_name, len(group), seed):
            yield group[i]


def split_is_generalized(split_dir: str | Path, dataset: str | None = None) -> bool:
    """True for a split of a generalized data set (``refer.GENERALIZED_DATASETS``, e.g. gRefCOCO) or one
    whose shards hold an expression with no target or several: such a split is scored with
    GRESMetrics (gIoU, cIoU, N-acc, T-acc) instead of RISMetrics."""
    if dataset in GENERALIZED_DATASETS:
        return True
    counts = generalized_counts(parquet_files(split_dir, "part-"))
    return bool(counts["no_target"] or counts["multi_target"])


@torch.no_grad()
def evaluate_split(
    model: PPCRModel,
    split_dir: str | Path,
    batch_size: int = 16,
    oracle_box: bool = False,
    limit_images: int | None = None,
    progress: bool = True,
    protocol: str = "all",
    seed: int = 0,
    on_prediction: Callable[[dict], None] | None = None,
    generalized: bool | None = None,
) -> dict:
    """Metrics of `model` on one shard split (RISMetrics.compute() keys): every expression, or those
    `protocol` picks ("glamm": 3 per image, drawn with `seed`; metrics.protocol_indices).

    A generalized split (`generalized`; None: `split_is_generalized` decides from the shards) is scored
    with GRESMetrics (gIoU, cIoU, N-acc, T-acc, Prec@t over target expressions): the answer is the union
    of the answer's instances (`Segmentation.mask`), and an answer without pixels means "no target"
    (the single-target model answers one instance, whose mask may be empty); `oracle_box` is refused
    there (a no-target expression has no box to give SAM).

    Expressions are batched in shard order, so the expressions of one image share its encodings.
    `on_prediction` receives each expression's result (`report.prediction_record`: sent_id, IoU, box IoU,
    predicted pixel XYXY box, RLE mask, ...) in the order the metrics add them, so replaying the records
    (`report.metrics_from_predictions`) gives these metrics exactly.
    An expression that breaks the text rules (`PromptTokenizer.check_expression`: a control token of
    the tokenizer, a prompt over the context, ...) is left out, counted under `errors` and warned
    about with its sentence id, as `ppcr evaluate --ray` does.
    """
    model.eval()
    if generalized is None:
        generalized = split_is_generalized(split_dir)
    if generalized and oracle_box:
        raise InputError(
            f"{split_dir}: --oracle-box gives SAM the ground-truth box, which an expression without a "
            "target does not have; evaluate this generalized split without it"
        )
    metrics: RISMetrics | GRESMetrics = GRESMetrics() if generalized else RISMetrics()
    cache = ImageCache(capacity=256)
    split = Path(split_dir).name
    samples = protocol_samples(iter_expressions(split_dir, limit_images=limit_images), protocol, seed)
    samples = _checked(samples, model, refused := [])
    bar = tqdm(desc=f"eval {split}", unit="expr", disable=not progress, dynamic_ncols=True)
    for chunk in _chunks(samples, batch_size):
        items = [to_item(s, cache) for s in chunk]
        batch = collate(items, model.clip_size, model.sam_size, model.clip_mode).to(model.device)
        # The box of each answer is what SAM was given: the predicted box, or the GT box as the oracle.
        for sample, item, seg in zip(chunk, items, predict_torch(model, batch, oracle_box=oracle_box)):
            if generalized:
                gres = score_generalized(seg.mask, item.gt_mask, sample.no_target)
                metrics.add(gres)
                if on_prediction is not None:
                    on_prediction(
                        generalized_prediction_record(
                            split,
                            sample.sent_id,
                            sample.file_name,
                            sample.text,
                            seg.instances,
                            gres,
                            (sample.height, sample.width),
                        )
                    )
                continue
            score = score_answer(seg.mask, item.gt_mask, seg.box, item.gt_box)
            metrics.add(score)
            if on_prediction is not None:
                on_prediction(
                    prediction_record(
                        split,
                        sample.sent_id,
                        sample.file_name,
                        sample.text,
                        seg.box,
                        encode_mask(seg.mask),
                        seg.score,
                        score,
                    )
                )
        bar.update(len(items))
    bar.close()
    out = metrics.compute()
    if refused:
        out["errors"] = len(refused)
        warnings.warn(
            f"{split_dir}: {len(refused)} expression(s) break the text rules and are not in the metrics, "
            f"e.g. {refused[0]}",
            stacklevel=2,
        )
    return out


def _checked(samples: Iterable[ExpressionSample], model: PPCRModel, refused: list[str]):
    """The samples whose text passes the text rules (cleaned); the others' reasons go to `refused`."""
    for s in samples:
        try:
            text = model.mllm.prompts.check_expression(s.text)
        except InputError as exc:
            refused.append(f"sentence {s.sent_id}: {exc}")
            continue
        yield dataclasses.replace(s, text=text) if text != s.text else s


def mean_training_box(train_dir: str | Path) -> np.ndarray:
    """Mean normalized XYXY ground-truth box over every expression of the training split."""
    total, n = np.zeros(4), 0
    for row in read_image_rows(train_dir):
        scale = np.array([row["width"], row["height"]] * 2, dtype=np.float64)
        for ref in row["refs"]:
            k = len(ref["sentences"])
            total += k * np.asarray(ref["bbox"]) / scale
            n += k
    if n == 0:
        raise InputError(f"no training boxes in {train_dir}")
    return total / n


def evaluate_baselines(
    train_dir: str | Path, split_dir: str | Path, limit_images: int | None = None
) -> dict[str, dict]:
    """Trivial baselines on one split.

    - `mean box`: every expression predicts the mean training box (its mask = the filled box).
    - `all objects`: the union of every annotated object's mask in the image (box = its extent).
    A model that grounds language must beat both.
    """
    mean_box = mean_training_box(train_dir)
    mb, allobj = RISMetrics(), RISMetrics()
    for n, row in enumerate(read_image_rows(split_dir)):
        if limit_images is not None and n >= limit_images:
            break
        h, w = row["height"], row["width"]
        masks = [decode_rle(ref["mask"]) for ref in row["refs"]]
        union = np.logical_or.reduce(masks)
        union_box = mask_to_box(union)
        box = denormalize_box(mean_box, (h, w))
        box_mask = np.zeros((h, w), dtype=bool)
        x1, y1, x2, y2 = np.round(box).astype(int)
        box_mask[max(y1, 0) : max(y2, 0), max(x1, 0) : max(x2, 0)] = True
        for ref, gt in zip(row["refs"], masks):
            gt_box = np.asarray(ref["bbox"])
            for _ in ref["sentences"]:
                mb.update(box_mask, gt, box, gt_box)
                allobj.update(union, gt, union_box, gt_box)
    return {"baseline: mean box": mb.compute(), "baseline: all objects": allobj.compute()}
