"""PPCR: Semantic Understanding -> Spatial Grounding -> Instance Segmentation, one code path for
training, evaluation, serving and batch jobs.

    semantic_stage.py     LoRA A + [SEG] -> Semantic Segmentation Prompt
    spatial_stage.py      LoRA B + <sem> -> [BOX] -> normalized box
    segmentation_stage.py SAM(prompt = semantic embedding + box) -> mask
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .config import ModelConfig
from .geometry import normalized_to_sam_frame, order_box
from .inputs import Batch
from .mllm import MLLM, Prefix, PrefixCache
from .precision import apply_dtype_policy
from .segmentation_stage import SegmentationStage
from .semantic_stage import SemanticStage
from .slots import kept_slots, match_slots
from .spatial_stage import AttentionBoxHead, SlotOutput, SpatialStage


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
    # model.targets multi: SAM runs once per (expression, slot) row instead of once per expression, so
    # sam_box, low_res_masks, mask_logits, iou_pred and mask_groups are per row (R rows). In training
    # the rows are the slots matched to targets (`slots.match_slots`), in inference the kept slots
    # (`slots.kept_slots`); `box` / `heatmap` are each expression's most object-like slot's.
    slots: SlotOutput | None = None  # boxes (B, K, 4), objectness (B, K) / presence (B,) logits
    row_expression: torch.Tensor | None = None  # (R,) long: the expression of each SAM row
    row_slot: torch.Tensor | None = None  # (R,) long: its slot
    row_target: torch.Tensor | None = None  # (R,) long: the target it is matched to (training), else -1


class Reasoning(NamedTuple):
    """What the MLLM stages hand to SAM (plus the training-only terms).

    With `model.targets: multi`, `slot_boxes`, `objectness_logits` and `presence_logits` hold the K box
    slots (`objectness` and `presence` give them as probabilities; `slots.kept_slots` picks the slots
    to segment) and `box` is each expression's most object-like slot's box. With `model.presence_from:
    query+semantic` the presence logit is the head's presence query's plus the peak of
    `semantic_heatmap` (the [SEG] query's grounding).
    """

    semantic_prompt: torch.Tensor  # (B, prompt_dim)
    box: torch.Tensor | None  # (B, 4) normalized XYXY, None when spatial_prompt == "none"
    ce: torch.Tensor  # scalar: mean answer CE of the stages that ran
    heatmap: torch.Tensor | None
    semantic_box: torch.Tensor | None
    semantic_heatmap: torch.Tensor | None
    slot_boxes: torch.Tensor | None = None  # (B, K, 4) normalized XYXY of the original image
    objectness_logits: torch.Tensor | None = None  # (B, K)
    presence_logits: torch.Tensor | None = None  # (B,)
    slot_heatmaps: torch.Tensor | None = None  # (B, K, T)

    @property
    def boxes(self) -> torch.Tensor | None:
        """(B, K, 4) the slots' normalized XYXY boxes (model.targets multi), else None."""
        return self.slot_boxes

    @property
    def objectness(self) -> torch.Tensor | None:
        """(B, K) each slot's probability of being one of the targets (model.targets multi), else None."""
        return None if self.objectness_logits is None else self.objectness_logits.sigmoid()

    @property
    def presence(self) -> torch.Tensor | None:
        """(B,) the probability that the expression names something in the image (multi), else None."""
        return None if self.presence_logits is None else self.presence_logits.sigmoid()

    @property
    def slots(self) -> SlotOutput | None:
        if self.slot_boxes is None:
            return None
        return SlotOutput(self.slot_boxes, self.objectness_logits, self.presence_logits, self.slot_heatmaps)


logger = logging.getLogger("ppcr.model")
_SAID: set[str] = set()


def _say_once(message: str) -> None:
    """Log `message` once per process (why prefix sharing is off: a property of the config, not of a call)."""
    if message not in _SAID:
        _SAID.add(message)
        logger.warning(message)


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
                            self.mllm,
                            cfg.spatial_prompt,
                            cfg.box_head,
                            cfg.attention_head_layers,
                            slots=cfg.max_targets if cfg.targets == "multi" else 0,
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

    def shares_prefix(self) -> bool:
        """Whether `reason` runs each image's prompt prefix once per pass and every expression's suffix
        against its keys and values (`MLLM.prefix`): `model.share_prefix`, prompts that open with the
        image (`image_position: before`), and no gradient checkpointing in training (the gradients of a
        shared step equal the unshared step's to float tolerance). When the config asks for it but
        cannot have it, the reason is logged once per process (the tiny preset, whose prompts put the
        image after the question, says `share_prefix: false`)."""
        if self.mllm is None or not self.cfg.share_prefix:
            return False
        if not self.mllm.can_share_prefix:
            _say_once(
                "prefix sharing off: model.image_position is 'after' (the question precedes the image), "
                "so every expression runs its whole prompt through the language model"
            )
            return False
        if self.training and self.cfg.gradient_checkpointing:
            # transformers turns the KV cache off under gradient checkpointing in training.
            _say_once(
                "prefix sharing off in training with model.gradient_checkpointing: every expression "
                "runs its whole prompt"
            )
            return False
        return True

    def reason(
        self,
        clip_pixels: torch.Tensor,
        image_index: torch.Tensor,
        expressions: list[str],
        original_hw: torch.Tensor,
        rng: random.Random | None = None,
        max_sequences: int | None = None,
        image_keys: Sequence[Hashable] | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> Reasoning:
        """Stages 1 + 2 (the MLLM): semantic prompt and normalized box for each expression.

        clip_pixels: (N, 3, C, C) one row per distinct image; image_index: (B,) its row per expression;
        original_hw: (N, 2). rng: template sampling (training) or None (fixed templates, evaluation).
        max_sequences: at most this many expressions per language-model forward (larger batches run
        in consecutive chunks, in order, with the same results): bounds the work, and the latency, of
        one call.

        With prefix sharing (`shares_prefix`), each chunk runs the shared prompt prefix once per distinct
        image and LoRA branch and its expressions' suffixes against it: the answers equal the
        unshared path's to float tolerance. A chunk in which no image appears twice runs whole prompts
        (sharing would save nothing there), unless a prefix cache is given.
        prefix_cache (with image_keys (N,), one key per image row): prefixes kept across calls
        (`PrefixCache`), looked up before and stored after they are run; an image whose prefixes are
        all cached needs no vision tower either.
        """
        self._require("mllm", "reason (stages 1 + 2)")
        b = len(expressions)
        if max_sequences is not None and max_sequences < 1:
            raise ValueError(f"max_sequences must be >= 1; got {max_sequences}")
        if prefix_cache is not None and (image_keys is None or len(image_keys) != len(clip_pixels)):
            raise ValueError("a prefix cache needs one image key per image row (image_keys)")
        hw = original_hw.to(image_index.device)
        step = b if max_sequences is None else max_sequences
        chunks = [slice(i, i + step) for i in range(0, max(b, 1), step)]
        if self.shares_prefix():
            features = _FeatureMemo(self.mllm, clip_pixels)
            if prefix_cache is None:
                features(range(len(clip_pixels)))  # every image: one vision-tower batch
            else:
                features([i for i, k in enumerate(image_keys) if not prefix_cache.holds(k, self._adapters)])
            parts = []
            for sl in chunks:
                images, local = torch.unique(image_index[sl], return_inverse=True)
                images = images.tolist()
                if prefix_cache is None and len(images) == len(local):
                    # No image twice in the chunk and nothing kept across calls: sharing would save
                    # nothing and cost a second forward per pass, so the whole prompts run.
                    parts.append(self._reason_rows(features.all(), hw, image_index[sl], expressions[sl], rng))
                    continue

                def prefix_for(adapter: str, images=images, local=local) -> Prefix:
                    if prefix_cache is None:
                        return self.mllm.prefix(adapter, features(images)).rows(local)
                    keys = [image_keys[i] for i in images]
                    found = prefix_cache.lookup(keys, adapter)
                    todo = [j for j, p in enumerate(found) if p is None]
                    if todo:
                        new = self.mllm.prefix(adapter, features([images[j] for j in todo]))
                        for n, j in enumerate(todo):
                            found[j] = new.select([n])
                            prefix_cache.put(keys[j], adapter, found[j])
                    return Prefix.cat(found).rows(local)

                parts.append(self._reason_rows(None, hw, image_index[sl], expressions[sl], rng, prefix_for))
        else:
            # Vision tower + projector once per image, gathered per expression for both stages.
            feats = self.mllm.image_features(clip_pixels)
            parts = [self._reason_rows(feats, hw, image_index[sl], expressions[sl], rng) for sl in chunks]
        if len(parts) == 1:
            return parts[0]

        def cat(field: str) -> torch.Tensor | None:
            values = [getattr(p, field) for p in parts]
            return None if values[0] is None else torch.cat(values)

        sizes = [len(p.semantic_prompt) for p in parts]
        ce = sum(p.ce * n for p, n in zip(parts, sizes)) / b
        return Reasoning(*[ce if f == "ce" else cat(f) for f in Reasoning._fields])

    @property
    def _adapters(self) -> tuple[str, ...]:
        """The LoRA branches `reason` runs: A (semantic), and B (spatial) with a spatial stage."""
        return ("semantic", "spatial") if self.spatial is not None else ("semantic",)

    def _reason_rows(
        self,
        image_features: torch.Tensor | None,
        original_hw: torch.Tensor,
        image_index: torch.Tensor,
        expressions: list[str],
        rng: random.Random | None,
        prefix_for: Callable[[str], Prefix] | None = None,
    ) -> Reasoning:
        """`reason` for one chunk: image_features (N, T, hidden) and original_hw (N, 2) per image; or,
        sharing prefixes, prefix_for(branch) -> that branch's prefixes of the chunk's images, indexed
        by row (asked when the pass runs, so one branch's keys and values are alive at a time)."""
        hw = original_hw[image_index]
        shared = prefix_for is not None
        feats = None if shared else image_features[image_index]
        sem = self.semantic(
            self.mllm, feats, expressions, rng, prefix=prefix_for("semantic") if shared else None
        )
        ce = sem.ce
        box = heat = slots = None
        if self.spatial is not None:
            spa = self.spatial(
                self.mllm,
                feats,
                expressions,
                sem.hidden,
                hw,
                rng,
                prefix=prefix_for("spatial") if shared else None,
            )
            box, heat, slots = spa.box, spa.heatmap, spa.slots
            ce = (sem.ce + spa.ce) / 2
        sem_box = sem_heat = None
        if self.cfg.semantic_grounding and self.spatial is not None:
            sem_box, sem_heat = self.spatial.head(sem.hidden, sem.image_states, hw)
        if slots is None:
            return Reasoning(sem.prompt, box, ce, heat, sem_box, sem_heat)
        presence = slots.presence
        if self.cfg.presence_from == "query+semantic":
            # The [SEG] query's peak heatmap logit: high where the semantic pass finds what is named.
            presence = presence + sem_heat.amax(dim=-1).to(presence.dtype)
        return Reasoning(
            sem.prompt,
            box,
            ce,
            heat,
            sem_box,
            sem_heat,
            slots.boxes,
            slots.objectness,
            presence,
            slots.heatmaps,
        )

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
        match_targets: bool | None = None,
    ) -> PPCROutput:
        """Run the three stages on a batch (teacher-forced answers: one pass per stage).

        rng: template sampling (training) or None (fixed templates, evaluation). gt_box_prob: chance
        per expression that SAM gets the ground-truth box instead of the predicted one (training
        curriculum), with corners jittered by `gt_box_jitter` × box size. oracle_box: always give SAM
        the ground-truth box, unjittered (paper Table 3 oracle).
        image_embeddings: precomputed SAM embeddings (N, C, h, w) to reuse across calls.
        max_sequences: expressions per language-model forward (see `reason`).
        match_targets (model.targets multi; None: the module's training mode): SAM segments the slots
        matched to the batch's targets (`batch.gt_instances`, training) instead of the kept slots
        (inference); the ground-truth box options then give SAM the matched target's box.
        """
        r = self.reason(
            batch.clip_pixels, batch.image_index, batch.expressions, batch.original_hw, rng, max_sequences
        )
        if r.slot_boxes is not None:
            match = self.training if match_targets is None else match_targets
            return self._forward_slots(
                batch, r, match, gt_box_prob, gt_box_jitter, oracle_box, image_embeddings
            )
        box = r.box
        sam_box = box
        if oracle_box or (gt_box_prob > 0 and box is not None):
            if batch.gt_boxes is None:
                raise ValueError("oracle_box / gt_box_prob need ground-truth boxes in the batch")
            ref = box if box is not None else r.semantic_prompt
            gt = batch.gt_boxes.to(ref.device, ref.dtype)
            sam_box = _teacher_box(box, gt, oracle_box, gt_box_prob, gt_box_jitter)
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

    def _forward_slots(
        self,
        batch: Batch,
        r: Reasoning,
        match: bool,
        gt_box_prob: float,
        gt_box_jitter: float,
        oracle_box: bool,
        image_embeddings: torch.Tensor | None,
    ) -> PPCROutput:
        """`forward` of the multi-target model: SAM segments one row per matched (training) or kept
        (inference) slot, each with its expression's semantic prompt and the slot's box."""
        device = r.semantic_prompt.device
        target_rows = None
        if match:
            if batch.gt_instances is None:
                raise ValueError("matching slots to targets needs the targets in the batch (gt_instances)")
            expr, slot, target = [], [], []
            for i, (gt, _) in enumerate(batch.gt_instances):
                if len(gt) == 0:
                    continue  # no target: presence is trained, nothing is segmented
                k, j = match_slots(r.slot_boxes[i].detach(), r.objectness_logits[i].detach(), gt)
                expr += [i] * len(k)
                slot += k.tolist()
                target += j.tolist()
            target_rows = torch.tensor(target, dtype=torch.long, device=device)
        else:
            if oracle_box or gt_box_prob > 0:
                raise ValueError("the ground-truth box options of the multi-target model need match_targets")
            cfg = self.cfg
            kept = kept_slots(
                r.presence.detach(),
                r.objectness.detach(),
                r.slot_boxes.detach(),
                cfg.presence_threshold,
                cfg.objectness_threshold,
                cfg.slot_nms_iou,
            )
            expr = [i for i, ks in enumerate(kept) for _ in ks]
            slot = [k for ks in kept for k in ks]
        row_expr = torch.tensor(expr, dtype=torch.long, device=device)
        row_slot = torch.tensor(slot, dtype=torch.long, device=device)
        sam_box = r.slot_boxes[row_expr, row_slot]
        if match and (oracle_box or gt_box_prob > 0) and len(row_expr):
            gt = torch.stack([batch.gt_instances[i][0][j] for i, j in zip(expr, target)]).to(sam_box)
            sam_box = _teacher_box(sam_box, gt, oracle_box, gt_box_prob, gt_box_jitter)
        image_index = batch.image_index.to(device)[row_expr]
        if len(row_expr):
            if image_embeddings is None:
                image_embeddings = self.segmentation.encode(batch.sam_pixels)
            low, iou, groups = self._segment_groups(
                image_embeddings,
                image_index,
                r.semantic_prompt[row_expr],
                sam_box,
                batch.original_hw,
                batch.sam_input_hw,
            )
        else:  # nothing to segment: every expression names nothing
            low, iou, groups = r.semantic_prompt.new_zeros(0, 1, 1), r.semantic_prompt.new_zeros(0), []
        return PPCROutput(
            semantic_prompt=r.semantic_prompt,
            box=r.box,
            sam_box=sam_box,
            low_res_masks=low,
            mask_logits=_ungroup(groups, len(row_expr)),
            iou_pred=iou,
            ce=r.ce,
            heatmap=r.heatmap,
            semantic_box=r.semantic_box,
            semantic_heatmap=r.semantic_heatmap,
            mask_groups=groups,
            slots=r.slots,
            row_expression=row_expr,
            row_slot=row_slot,
            row_target=target_rows if match else torch.full_like(row_expr, -1),
        )


def _teacher_box(
    pred: torch.Tensor | None, gt: torch.Tensor, oracle: bool, prob: float, jitter: float
) -> torch.Tensor:
    """The (R, 4) normalized XYXY boxes SAM is prompted with in training: the ground truth `gt` when
    `oracle`; else, per row with probability `prob` (the curriculum of `train.gt_box_probability`), the
    ground truth with its corners moved by normal noise of std `jitter` × its width / height
    (`train.gt_box_jitter`), and the prediction `pred` otherwise."""
    if oracle:
        return gt
    if jitter > 0:
        wh = (gt[:, 2:] - gt[:, :2]).repeat(1, 2)
        gt = order_box((gt + torch.randn_like(gt) * jitter * wh).clamp(0, 1))
    use_gt = torch.rand(len(gt), device=gt.device) < prob
    return torch.where(use_gt.unsqueeze(1), gt, pred)


class _FeatureMemo:
    """Vision features of a call's images, each computed at most once, on first demand."""

    def __init__(self, mllm: MLLM, clip_pixels: torch.Tensor):
        self.mllm, self.clip_pixels = mllm, clip_pixels
        self.done: dict[int, torch.Tensor] = {}
        self._all: torch.Tensor | None = None

    def __call__(self, images: Sequence[int]) -> torch.Tensor:
        """(len(images), T, hidden) projected features of image rows `images` (computed in one batch)."""
        images = list(images)
        todo = [i for i in images if i not in self.done]
        if todo:
            self.done.update(zip(todo, self.mllm.image_features(self.clip_pixels[todo])))
        if not images:
            return self.clip_pixels.new_zeros(0)
        return torch.stack([self.done[i] for i in images])

    def all(self) -> torch.Tensor:
        """(N, T, hidden) features of every image row (stacked once)."""
        if self._all is None:
            self._all = self(range(len(self.clip_pixels)))
        return self._all


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
