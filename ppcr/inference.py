"""The inference runtime: how every consumer turns model outputs into answers, written once.

`Segmenter` (predictor.py), `ppcr evaluate` (evaluate.py), the Serve deployments and the batch actors all
call these functions instead of re-deriving them:

    binarize(mask_logits)              SAM's logits -> bool mask, at SAM's own `mask_threshold`
    segmentations(logits, boxes, iou)  -> Segmentation(mask, box pixel XYXY, score) per expression
    predict_torch(model, batch, ...)   the tensor API (as SamPredictor.predict_torch): stages 1-3 on a
                                       collated Batch -> (Segmentation list, boxes given to SAM)
    run_isolated(fn, items)            a batched stage call in which only the failing items fail
                                       (the Serve deployments and the batch job's actors)

Coordinate frames: boxes inside the model are normalized XYXY of the original image in [0, 1];
answers are pixel XYXY of the original image (geometry.py has every conversion).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from segment_anything.modeling import Sam

from .config import InputError
from .geometry import output_box

if TYPE_CHECKING:
    from .inputs import Batch
    from .model import PPCRModel

# SAM's logit threshold for a binary mask (segment_anything.modeling.Sam.mask_threshold = 0.0).
MASK_THRESHOLD: float = Sam.mask_threshold

logger = logging.getLogger("ppcr.inference")


class Segmentation(NamedTuple):
    mask: np.ndarray  # bool (H, W), original size
    box: np.ndarray  # (4,) float64 pixel XYXY, original frame
    score: float  # SAM's predicted IoU of `mask`


def binarize(mask_logits: torch.Tensor) -> np.ndarray:
    """(H, W) mask logits -> bool (H, W) numpy mask: logits above SAM's `mask_threshold`."""
    return (mask_logits > MASK_THRESHOLD).cpu().numpy()


def segmentations(
    mask_logits: Sequence[torch.Tensor], boxes01: torch.Tensor | None, iou: torch.Tensor
) -> list[Segmentation]:
    """One answer per expression: the binary mask, the pixel XYXY box (the box SAM was prompted with,
    or the mask's extent without a spatial stage) and SAM's predicted IoU as the score."""
    out = []
    for i, logits in enumerate(mask_logits):
        mask = binarize(logits)
        out.append(
            Segmentation(mask, output_box(None if boxes01 is None else boxes01[i], mask), float(iou[i]))
        )
    return out


@torch.no_grad()
def predict_torch(
    model: PPCRModel,
    batch: Batch,
    image_embeddings: torch.Tensor | None = None,
    oracle_box: bool = False,
    max_sequences: int | None = None,
) -> list[Segmentation]:
    """Stages 1-3 on a collated batch (on the model's device), teacher-forced, fixed templates.

    image_embeddings: (N, C, h, w) SAM embeddings of the batch's images, if already computed.
    oracle_box: prompt SAM with the ground-truth box (paper Table 3) instead of the predicted one.
    max_sequences: expressions per language-model forward (`PPCRModel.reason`).
    """
    model.eval()
    out = model(batch, image_embeddings=image_embeddings, oracle_box=oracle_box, max_sequences=max_sequences)
    return segmentations(out.mask_logits, out.sam_box, out.iou_pred)


class ItemFailure(NamedTuple):
    """What a batched stage gives for an item it could not process, in place of that item's result."""

    input_error: bool  # True: the item's own input (InputError) -> 422 over HTTP; False: a service fault
    message: str  # one line: the InputError's text, or "<ExceptionType>: <first line>" for a fault


# Terminal colour and cursor codes (ECMA-48 CSI sequences), which Ray puts in its error texts.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def one_line(exc: BaseException, limit: int = 300) -> str:
    """`exc` as "<ExceptionType>: <first line of its message>", without terminal codes, at most `limit`
    characters: what an error answer may carry (never a traceback)."""
    text = _ANSI.sub("", str(exc)).strip()
    first = text.splitlines()[0].strip() if text else ""
    out = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return out if len(out) <= limit else out[: limit - 1] + "…"


def item_failure(exc: BaseException) -> ItemFailure:
    """An InputError is the item's input error (its message as is); anything else is a service fault."""
    if isinstance(exc, InputError):
        return ItemFailure(True, _ANSI.sub("", str(exc)))
    return ItemFailure(False, one_line(exc))


def run_isolated(
    fn: Callable[[list[Any]], Sequence[Any]],
    items: Sequence[Any],
    what: str = "batch",
    on_retry: Callable[[BaseException, int], None] | None = None,
) -> list[Any]:
    """Run a batched stage so that one bad item fails alone (the rule of every batched stage).

    fn: items -> one result per item, in order. When it raises on a batch of several items, each item
    is run again alone: those that fail get an `ItemFailure` (`item_failure` of their exception) in
    place of a result, the others their normal result. `on_retry(exc, n)` is told each time a batch
    of n items failed and was split (a counter, a log). A single item that fails gets its failure
    directly. `fn` returning a result count other than its item count is a fault (ValueError).
    Only `Exception`s are caught: KeyboardInterrupt and SystemExit still stop the process.
    """
    items = list(items)
    if not items:
        return []

    def call(part: list[Any]) -> list[Any]:
        out = list(fn(part))
        if len(out) != len(part):
            raise ValueError(f"{what}: {len(out)} results for {len(part)} items")
        return out

    try:
        return call(items)
    except Exception as exc:
        if len(items) == 1:
            return [item_failure(exc)]
        logger.warning(
            "%s of %d items failed (%s); running its items one by one", what, len(items), one_line(exc)
        )
        if on_retry is not None:
            on_retry(exc, len(items))
    results: list[Any] = []
    for item in items:
        try:
            results += call([item])
        except Exception as exc:
            results.append(item_failure(exc))
    return results
