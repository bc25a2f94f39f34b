"""PPCR: Semantic Understanding -> Spatial Grounding -> Instance Segmentation, one code path for
training, evaluation, serving and batch jobs.

    semantic_stage.py     LoRA A + [SEG] -> Semantic Segmentation Prompt
    spatial_stage.py      LoRA B + <sem> -> [BOX] -> normalized box
    segmentation_stage.py SAM(prompt = semantic embedding + box) -> mask
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .config import ModelConfig
from .geometry import normalized_to_sam_frame, order_box
from .inputs import Batch
from .mllm import MLLM
from .precision import apply_dtype_policy
from .segmentation_stage import SegmentationStage
from .semantic_stage import SemanticStage
from .spatial_stage import AttentionBoxHead, SpatialStage


@dataclass
class PPCROutput:
    semantic_prompt: torch.Tensor  # (B, prompt_dim)
    box: torch.Tensor | None  # (B, 4) predicted normalized XYXY (None when spatial_prompt == "none")
    sam_box: torch.Tensor | None  # (B, 4) normalized XYXY actually given to SAM (predicted, GT or None)
    low_res_masks: torch.Tensor  # (B, 4h, 4w) SAM low-res logits
    mask_logits: list[torch.Tensor]  # B × (H, W) logits at the original image size
    iou_pred: torch.Tensor  # (B,) SAM's predicted IoU of each mask (the inference `score`)
    ce: torch.Tensor  # scalar: mean answer CE of the stages that ran
    heatmap: torch.Tensor | None  # (B, T) attention-head logits over image tokens
    semantic_box: torch.Tensor | None = None  # (B, 4) auxiliary box read from the [SEG] query
    semantic_heatmap: torch.Tensor | None = None  # (B, T) its heatmap over the semantic pass's image states
    # The same mask logits grouped by image: (rows (k,), logits (k, H, W)) per distinct image, the form
    # the loss computes on (one op per image instead of one per expression). mask_logits are views of it.
    mask_groups: list[tuple[torch.Tensor, torch.Tensor]] | None = None


class Reasoning(NamedTuple):
    """What the MLLM stages hand to SAM (plus the training-only terms)."""

    semantic_prompt: torch.Tensor  # (B, prompt_dim)
    box: torch.Tensor | None  # (B, 4) normalized XYXY, None when spatial_prompt == "none"
    ce: torch.Tensor  # scalar: mean answer CE of the stages that ran
    heatmap: torch.Tensor | None
    semantic_box: torch.Tensor | None
    semantic_heatmap: torch.Tensor | None


# What a process may build: "mllm" = stages 1 + 2 (LLaVA, both LoRA branches, projection, box head),
# "sam" = stage 3 (SAM). A Serve MLLM replica builds only "mllm", a SAM replica or batch SAM actor only
# "sam" (at 7B, the LLaVA half is ~14 GB that a SAM process never needs).
PARTS = ("mllm", "sam")
# State-dict prefixes of each part (checkpoint.load_checkpoint reads only the built parts' tensors).
PART_PREFIXES = {"mllm": ("mllm.", "semantic.", "spatial."), "sam": ("segmentation.",)}


class PPCRModel(nn.Module):
    def __init__(self, cfg: ModelConfig, parts: Sequence[str] = PARTS):
        """Build `parts` of PPCR (default both) from `cfg`; the others stay None.

        Each part is initialised from its own random stream (one draw from the caller's generator, +k
        for the k-th part), so a part built alone gets the same random weights as in the whole model.
        Raises ValueError for an unknown or empty `parts`.
        """
        super().__init__()
        unknown = sorted(set(parts) - set(PARTS))
        if unknown or not parts:
            raise ValueError(f"parts must be a non-empty subset of {PARTS}; got {tuple(parts)}")
        self.cfg = cfg
        self.parts = tuple(p for p in PARTS if p in parts)
        self.mllm: MLLM | None = None
        self.semantic: SemanticStage | None = None
        self.spatial: SpatialStage | None = None
        self.segmentation: SegmentationStage | None = None
        base = int(torch.randint(0, 2**31, (), device="cpu"))  # also under a `with torch.device(...)`
        for k, part in enumerate(PARTS):
            if part not in self.parts:
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(base + k)
                if part == "mllm":
                    self.mllm = MLLM(cfg)
                    self.semantic = SemanticStage(self.mllm, cfg.prompt_dim)
                    if cfg.spatial_prompt != "none":
                        self.spatial = SpatialStage(
                            self.mllm, cfg.spatial_prompt, cfg.box_head, cfg.attention_head_layers
                        )
                else:
                    self.segmentation = SegmentationStage(cfg.sam, cfg.prompt_dim)
        apply_dtype_policy(self, cfg.dtype)

    def _require(self, part: str, what: str) -> None:
        if part not in self.parts:
            raise RuntimeError(
                f"{what} needs the {part!r} part; this model was built with parts={self.parts}"
            )

    @property
    def clip_size(self) -> int:
        """CLIP input side in pixels (the LLaVA config equals the preset's: mllm.check_llava_config)."""
        return self.cfg.vision.image_size

    @property
    def clip_mode(self) -> str:
        """CLIP preprocessing, "pad" (LLaVA-1.5) or "crop" (GLaMM): model.clip_preprocess."""
        return self.cfg.clip_preprocess

    @property
    def sam_size(self) -> int:
        """SAM's square input frame in pixels."""
        return self.cfg.sam.image_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def patch_centers(self) -> torch.Tensor | None:
        """(T, 2) patch centres used by the attention box head's heatmap target; None for other heads."""
        head = self.spatial.head if self.spatial is not None else None
        return head.centers if isinstance(head, AttentionBoxHead) else None

    def reason(
        self,
        clip_pixels: torch.Tensor,
        image_index: torch.Tensor,
        expressions: list[str],
        original_hw: torch.Tensor,
        rng: random.Random | None = None,
        max_sequences: int | None = None,
    ) -> Reasoning:
        """Stages 1 + 2 (the MLLM): semantic prompt and normalized box for each expression.

        clip_pixels: (N, 3, C, C) one row per distinct image; image_index: (B,) its row per expression;
        original_hw: (N, 2). rng: template sampling (training) or None (fixed templates, evaluation).
        max_sequences: at most this many expressions per language-model forward (larger batches run
        in consecutive chunks with the same results): bounds the work, and the latency, of one call.
        """
        self._require("mllm", "reason (stages 1 + 2)")
        # Vision tower + projector once per image, gathered per expression for both stages.
        feats = self.mllm.image_features(clip_pixels)
        hw = original_hw.to(image_index.device)
        b = len(expressions)
        if max_sequences is not None and max_sequences < 1:
            raise ValueError(f"max_sequences must be >= 1; got {max_sequences}")
        step = b if max_sequences is None else max_sequences
        parts = [
            self._reason_rows(feats, hw, image_index[i : i + step], expressions[i : i + step], rng)
            for i in range(0, max(b, 1), step)
        ]
        if len(parts) == 1:
            return parts[0]

        def cat(field: str) -> torch.Tensor | None:
            values = [getattr(p, field) for p in parts]
            return None if values[0] is None else torch.cat(values)

        sizes = [len(p.semantic_prompt) for p in parts]
        ce = sum(p.ce * n for p, n in zip(parts, sizes)) / b
        return Reasoning(
            cat("semantic_prompt"),
            cat("box"),
            ce,
            cat("heatmap"),
            cat("semantic_box"),
            cat("semantic_heatmap"),
        )

    def _reason_rows(
        self,
        image_features: torch.Tensor,
        original_hw: torch.Tensor,
        image_index: torch.Tensor,
        expressions: list[str],
        rng: random.Random | None,
    ) -> Reasoning:
        """`reason` for one chunk: image_features (N, T, hidden) and original_hw (N, 2) per image."""
        feats = image_features[image_index]
        hw = original_hw[image_index]
        sem = self.semantic(self.mllm, feats, expressions, rng)
        ce = sem.ce
        box = heat = None
        if self.spatial is not None:
            spa = self.spatial(self.mllm, feats, expressions, sem.hidden, hw, rng)
            box, heat = spa.box, spa.heatmap
            ce = (sem.ce + spa.ce) / 2
        sem_box = sem_heat = None
        if self.cfg.semantic_grounding and self.spatial is not None:
            sem_box, sem_heat = self.spatial.head(sem.hidden, sem.image_states, hw)
        return Reasoning(sem.prompt, box, ce, heat, sem_box, sem_heat)

    def segment(
        self,
        image_embeddings: torch.Tensor,
        image_index: torch.Tensor,
        semantic_prompt: torch.Tensor,
        box: torch.Tensor | None,
        original_hw: torch.Tensor,
        sam_input_hw: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Stage 3 (SAM decoder) given the prompts: low-res logits (B, 4h, 4w), predicted IoU (B,) and
        B × (H, W) mask logits at the original size.

        image_embeddings: (N, C, h, w) from `segmentation.encode`; image_index: (B,) its row per prompt;
        box: (B, 4) normalized XYXY in the original frame, or None; original_hw / sam_input_hw: (N, 2).
        """
        low, iou, groups = self._segment_groups(
            image_embeddings, image_index, semantic_prompt, box, original_hw, sam_input_hw
        )
        return low, iou, _ungroup(groups, low.shape[0])

    def _segment_groups(
        self,
        image_embeddings: torch.Tensor,
        image_index: torch.Tensor,
        semantic_prompt: torch.Tensor,
        box: torch.Tensor | None,
        original_hw: torch.Tensor,
        sam_input_hw: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """`segment` with the full-size logits grouped by image: [(rows (k,), logits (k, H, W))].
        The prompts of one image share its sizes, so each geometry op runs once per image."""
        self._require("sam", "segment (stage 3)")
        groups = [(img, (image_index == img).nonzero().flatten()) for img in image_index.unique().tolist()]
        box_frame = None
        if box is not None:
            frames = [
                normalized_to_sam_frame(box[rows], tuple(original_hw[img].tolist()), self.sam_size)
                for img, rows in groups
            ]
            box_frame = torch.cat(frames)[_inverse_order(torch.cat([rows for _, rows in groups]))]
        low, iou = self.segmentation.decode(image_embeddings, image_index, semantic_prompt, box_frame)
        masks = [
            (
                rows,
                self.segmentation.upscale(
                    low[rows], tuple(sam_input_hw[img].tolist()), tuple(original_hw[img].tolist())
                ),
            )
            for img, rows in groups
        ]
        return low, iou, masks

    def forward(
        self,
        batch: Batch,
        rng: random.Random | None = None,
        gt_box_prob: float = 0.0,
        gt_box_jitter: float = 0.0,
        oracle_box: bool = False,
        image_embeddings: torch.Tensor | None = None,
        max_sequences: int | None = None,
    ) -> PPCROutput:
        """Run the three stages on a batch (teacher-forced answers: one pass per stage).

        rng: template sampling (training) or None (fixed templates, evaluation). gt_box_prob: chance
        per expression that SAM gets the ground-truth box instead of the predicted one (training
        curriculum), with corners jittered by `gt_box_jitter` × box size. oracle_box: always give SAM
        the ground-truth box, unjittered (paper Table 3 oracle).
        image_embeddings: precomputed SAM embeddings (N, C, h, w) to reuse across calls.
        max_sequences: expressions per language-model forward (see `reason`).
        """
        r = self.reason(
            batch.clip_pixels, batch.image_index, batch.expressions, batch.original_hw, rng, max_sequences
        )
        box = r.box
        sam_box = box
        if oracle_box or (gt_box_prob > 0 and box is not None):
            if batch.gt_boxes is None:
                raise ValueError("oracle_box / gt_box_prob need ground-truth boxes in the batch")
            ref = box if box is not None else r.semantic_prompt
            gt = batch.gt_boxes.to(ref.device, ref.dtype)
            if oracle_box:
                sam_box = gt
            else:
                if gt_box_jitter > 0:
                    wh = (gt[:, 2:] - gt[:, :2]).repeat(1, 2)
                    gt = order_box((gt + torch.randn_like(gt) * gt_box_jitter * wh).clamp(0, 1))
                use_gt = torch.rand(len(batch), device=gt.device) < gt_box_prob
                sam_box = torch.where(use_gt.unsqueeze(1), gt, box)
        if image_embeddings is None:
            image_embeddings = self.segmentation.encode(batch.sam_pixels)
        low, iou, groups = self._segment_groups(
            image_embeddings,
            batch.image_index,
            r.semantic_prompt,
            sam_box,
            batch.original_hw,
            batch.sam_input_hw,
        )
        return PPCROutput(
            semantic_prompt=r.semantic_prompt,
            box=box,
            sam_box=sam_box,
            low_res_masks=low,
            mask_logits=_ungroup(groups, low.shape[0]),
            iou_pred=iou,
            ce=r.ce,
            heatmap=r.heatmap,
            semantic_box=r.semantic_box,
            semantic_heatmap=r.semantic_heatmap,
            mask_groups=groups,
        )


def _inverse_order(order: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes `order` (x[order][_inverse_order(order)] == x)."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return inverse


def _ungroup(groups: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> list[torch.Tensor]:
    """[(rows (k,), logits (k, H, W))] per image -> n × (H, W) logits in row order (views)."""
    out: list[torch.Tensor | None] = [None] * n
    for rows, logits in groups:
        for j, r in enumerate(rows.tolist()):
            out[r] = logits[j]
    return out
