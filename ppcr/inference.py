"""The inference runtime: how every consumer turns model outputs into answers, written once.

`Segmenter` (predictor.py), `ppcr evaluate` (evaluate.py), the Serve deployments and the batch actors all
call these functions instead of re-deriving them:

    binarize(mask_logits)              SAM's logits -> bool mask, at SAM's own `mask_threshold`
    segmentations(logits, boxes, iou)  -> Instance(mask, box pixel XYXY, score) per mask
    answers(instances, counts, hws)    -> Segmentation (instances + their union) per expression; a
                                       multi-target answer leaves out instances without pixels
    predict_torch(model, batch, ...)   the tensor API (as SamPredictor.predict_torch): stages 1-3 on a
                                       collated Batch -> (Segmentation list, boxes given to SAM)
    reason_rows(model, keys, ...)      stages 1 + 2 for expressions given row by row -> numpy prompts and
                                       each expression's boxes (one; or the kept slots, none for no target)
    segment_rows(model, images, ...)   stage 3 for given prompts -> answers (`encode_answer`: instances
                                       with COCO RLE masks, their union, no_target)

`reason_rows` and `segment_rows` are the model glue of both Ray layers (the Serve deployments and the
batch actors), which keep only batching, caching, statistics and Arrow <-> tensor moves.

Coordinate frames: boxes inside the model are normalized XYXY of the original image in [0, 1];
answers are pixel XYXY of the original image (geometry.py has every conversion).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from .geometry import output_box
from .inputs import group_images
from .masks import encode_mask
from .segmentation_stage import MASK_THRESHOLD
from .slots import kept_slots

if TYPE_CHECKING:
    from .inputs import Batch
    from .mllm import PrefixCache
    from .model import PPCRModel, Reasoning


class Instance(NamedTuple):
    """One object of an answer."""

    mask: np.ndarray  # bool (H, W), original size
    box: np.ndarray  # (4,) float64 pixel XYXY, original frame
    score: float  # SAM's predicted IoU of `mask`, as SAM gives it (not clamped: may leave [0, 1] a little)


class Segmentation(NamedTuple):
    """One expression's answer: the objects it refers to (`instances`: none, one or several) and their
    union. Build it with `Segmentation.of(instances, hw)`, which derives the union fields:

    - mask: bool (H, W), original size: the union of the instances' masks (all False for none);
    - box: (4,) float64 pixel XYXY, original frame: the instance's box for one, the smallest box
      enclosing every instance's box for several, None for none;
    - score: the instance's score (SAM's predicted IoU of its mask) for one, the mean of the instances'
      scores for several, None for none;
    - instances: tuple[Instance, ...], in the model's order; empty means "no target" (`no_target`).

    A single-target model (`model.targets: single`, the paper's) answers every expression with exactly
    one instance, so mask, box and score are that instance's (its mask may be empty). A 4-tuple:
    unpack it as `mask, box, score, instances = ...`, or read the fields by name.
    """

    mask: np.ndarray
    box: np.ndarray | None
    score: float | None
    instances: tuple[Instance, ...]

    @property
    def no_target(self) -> bool:
        """True when the answer has no instance: nothing in the image fits the expression."""
        return not self.instances

    @classmethod
    def of(cls, instances: Sequence[Instance], hw: Sequence[int]) -> Segmentation:
        """The answer made of `instances` (each an Instance whose mask is bool (H, W)) on an image of
        original size hw = (H, W); ValueError naming the instance whose mask has another shape."""
        h, w = (int(v) for v in hw)
        instances = tuple(
            Instance(np.asarray(i.mask, bool), np.asarray(i.box, np.float64), float(i.score))
            for i in instances
        )
        for n, inst in enumerate(instances):
            if inst.mask.shape != (h, w):
                raise ValueError(f"instance {n}: mask of shape {inst.mask.shape}, the image is {(h, w)}")
            if inst.box.shape != (4,):
                raise ValueError(f"instance {n}: box of shape {inst.box.shape}; expected (4,) pixel XYXY")
        if not instances:
            return cls(np.zeros((h, w), dtype=bool), None, None, ())
        if len(instances) == 1:
            one = instances[0]
            return cls(one.mask, one.box, one.score, instances)
        boxes = np.stack([i.box for i in instances])
        box = np.concatenate([boxes[:, :2].min(0), boxes[:, 2:].max(0)])
        mask = np.logical_or.reduce([i.mask for i in instances])
        return cls(mask, box, float(np.mean([i.score for i in instances])), instances)


def binarize(mask_logits: torch.Tensor) -> np.ndarray:
    """(H, W) mask logits -> bool (H, W) numpy mask: logits above SAM's `mask_threshold`."""
    return (mask_logits > MASK_THRESHOLD).cpu().numpy()


def segmentations(
    mask_logits: Sequence[torch.Tensor], boxes01: torch.Tensor | None, iou: torch.Tensor
) -> list[Segmentation]:
    """One instance per mask: the binary mask, the pixel XYXY box (the box SAM was prompted with, or the
    mask's extent without a spatial stage) and SAM's predicted IoU as the score. mask_logits: B
    tensors (H_i, W_i) at original size; boxes01: (B, 4) normalized XYXY or None; iou: (B,)."""
    out = []
    for i, logits in enumerate(mask_logits):
        mask = binarize(logits)
        out.append(Instance(mask, output_box(None if boxes01 is None else boxes01[i], mask), float(iou[i])))
    return out


def answers(
    instances: Sequence[Instance],
    counts: Sequence[int],
    hws: Sequence[Sequence[int]],
    drop_empty: bool = False,
) -> list[Segmentation]:
    """Instances in expression order -> one Segmentation per expression: expression e owns the next
    counts[e] instances (0: no target) and its image has original size hws[e] = (H, W).

    drop_empty: leave out the instances whose mask has no pixel. The multi-target model's answers do
    (a kept box slot in which SAM finds nothing is not an object, and an answer left without any is
    "no target"), so every surface says what the metrics count: an answer is its pixels. The
    single-target model always answers its one instance, whose mask may be empty (the paper's model).
    """
    if sum(counts) != len(instances) or len(counts) != len(hws):
        raise ValueError(f"{len(instances)} instances for counts {list(counts)} over {len(hws)} images")
    out, start = [], 0
    for k, hw in zip(counts, hws):
        own = instances[start : start + k]
        out.append(Segmentation.of([i for i in own if i.mask.any()] if drop_empty else own, hw))
        start += k
    return out


@torch.no_grad()
def predict_torch(
    model: PPCRModel,
    batch: Batch,
    image_embeddings: torch.Tensor | None = None,
    oracle_box: bool = False,
    max_sequences: int | None = None,
) -> list[Segmentation]:
    """Stages 1-3 on a collated batch (on the model's device), teacher-forced, fixed templates -> one
    Segmentation per expression: one instance (model.targets single), or one per kept box slot in
    which SAM finds pixels (multi: `slots.kept_slots`; none for an expression without a target).

    image_embeddings: (N, C, h, w) SAM embeddings of the batch's images, if already computed.
    oracle_box: prompt SAM with the ground-truth box (paper Table 3) instead of the predicted one.
    max_sequences: expressions per language-model forward (`PPCRModel.reason`).
    """
    model.eval()
    out = model(batch, image_embeddings=image_embeddings, oracle_box=oracle_box, max_sequences=max_sequences)
    instances = segmentations(out.mask_logits, out.sam_box, out.iou_pred)
    n = len(batch.expressions)
    hws = [tuple(hw) for hw in batch.original_hw[batch.image_index.cpu()].tolist()]
    if out.row_expression is None:  # the single-target model: one instance per expression
        return answers(instances, [1] * n, hws)
    # Multi-target: SAM's rows are the kept slots, expression by expression (PPCROutput.row_expression).
    counts = torch.bincount(out.row_expression.cpu(), minlength=n).tolist()
    return answers(instances, counts, hws, drop_empty=True)


@torch.no_grad()
def reason_rows(
    model: PPCRModel,
    keys: Sequence[Hashable],
    expressions: Sequence[str],
    clip_pixels: Callable[[int], torch.Tensor],
    original_hw: Callable[[int], Sequence[int]],
    max_sequences: int | None = None,
    prefix_cache: PrefixCache | None = None,
) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """Stages 1 + 2 (`PPCRModel.reason`, fixed templates) for B expressions given one by one.

    keys: (B,) the image key of each expression; equal keys share one CLIP forward and, with prefix
    sharing, one prompt prefix per pass (and, given `prefix_cache`, the keys it is stored under: they
    must then name the image's content, `inputs.image_key`). clip_pixels(i) /
    original_hw(i): the CLIP-frame pixels (3, C, C) and the original (H, W) of expression i's image,
    asked once per distinct image (its first expression). Returns the semantic prompts (B, D) float32
    and, per expression, the boxes SAM is to segment, (k, 4) float32 normalized XYXY of the original
    image: k = 1 (model.targets single), or the kept box slots (multi, `kept_boxes`: k = 0 for no
    target); None without a spatial stage (one mask per expression, from the semantic prompt alone).
    """
    first, index = group_images(keys)
    device = model.device
    out = model.reason(
        torch.stack([clip_pixels(i) for i in first]).to(device),
        index.to(device),
        list(expressions),
        torch.tensor([tuple(original_hw(i)) for i in first], dtype=torch.long),
        max_sequences=max_sequences,
        image_keys=[keys[i] for i in first],
        prefix_cache=prefix_cache,
    )
    return out.semantic_prompt.float().cpu().numpy(), kept_boxes(model, out)


def kept_boxes(model: PPCRModel, reasoning: Reasoning) -> list[np.ndarray] | None:
    """Per expression, the boxes stage 3 segments, each (k, 4) float32 normalized XYXY: the one box of
    the single-target model, or the box slots `slots.kept_slots` keeps with the model's thresholds
    (`model.presence_threshold`, `objectness_threshold`, `slot_nms_iou`; none for an expression
    without a target). None without a spatial stage."""
    if reasoning.slot_boxes is None:
        if reasoning.box is None:
            return None
        return list(reasoning.box.float().cpu().numpy()[:, None])
    cfg = model.cfg
    boxes = reasoning.slot_boxes.float().cpu()
    kept = kept_slots(
        reasoning.presence.float().cpu(),
        reasoning.objectness.float().cpu(),
        boxes,
        cfg.presence_threshold,
        cfg.objectness_threshold,
        cfg.slot_nms_iou,
    )
    return [boxes[e, slots].numpy().reshape(-1, 4) for e, slots in enumerate(kept)]


@torch.no_grad()
def segment_rows(
    model: PPCRModel,
    images: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    prompts: tuple[torch.Tensor, torch.Tensor, Sequence[torch.Tensor | np.ndarray] | None],
) -> list[dict]:
    """Stage 3 (`PPCRModel.segment`) for given prompts -> one answer per expression.

    images: per image, (embeddings (N, C, h, w) on the model's device, original_hw (N, 2), sam_input_hw
    (N, 2)); prompts: per expression, (image_index (B,), semantic prompts (B, D), boxes: B arrays
    (k, 4) normalized XYXY, as `reason_rows` gives them, or None). SAM segments each box with its
    expression's semantic prompt (without boxes: one mask per expression from the prompt alone); an
    expression with no box (no target) costs no decoder work, and a call where none has one runs no
    decoder at all. Each answer is `encode_answer` of the expression's Segmentation.
    """
    (embeddings, original_hw, sam_input_hw), (image_index, semantic, boxes) = images, prompts
    hws = [tuple(original_hw[i].tolist()) for i in image_index.tolist()]
    if boxes is None:
        counts, rows, box = [1] * len(hws), torch.arange(len(hws)), None
    else:
        if len(boxes) != len(hws):
            raise ValueError(f"{len(boxes)} box sets for {len(hws)} expressions")
        counts = [len(b) for b in boxes]
        rows = torch.repeat_interleave(torch.arange(len(hws)), torch.tensor(counts, dtype=torch.long))
        box = torch.cat([torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes])
        box = box.to(semantic.device)
    if len(rows) == 0:  # no expression has a target: nothing for the decoder
        return [encode_answer(Segmentation.of([], hw)) for hw in hws]
    rows = rows.to(image_index.device)
    _, iou, logits = model.segment(
        embeddings, image_index[rows], semantic[rows.to(semantic.device)], box, original_hw, sam_input_hw
    )
    found = answers(segmentations(logits, box, iou), counts, hws, drop_empty=model.cfg.targets == "multi")
    return [encode_answer(a) for a in found]


def encode_answer(seg: Segmentation) -> dict:
    """A Segmentation for the wire (the Serve replicas, the batch rows): {"mask": the union as COCO
    compressed RLE (`masks.encode_mask`; all zeros for no target), "box": (4,) float64 pixel XYXY or
    None, "score": float or None, "no_target": bool, "instances": [{"mask": RLE, "box", "score"}, ...]}."""
    union = encode_mask(seg.mask)
    one = len(seg.instances) == 1  # the union is the instance's mask: encoded once
    return {
        "mask": union,
        "box": seg.box,
        "score": seg.score,
        "no_target": seg.no_target,
        "instances": [
            {"mask": union if one else encode_mask(i.mask), "box": i.box, "score": i.score}
            for i in seg.instances
        ],
    }
