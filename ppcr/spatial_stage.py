"""Stage 2 — Spatial Grounding (paper §3.3–3.4): LoRA branch B answers a spatial template in which the
Semantic Segmentation Prompt is inserted as an input embedding; the [BOX] token's hidden state (the
Spatial Segmentation Prompt) is mapped to a normalized box (x1, y1, x2, y2) in [0, 1].

Box heads: `mlp` (the paper's lightweight mapping, Eq. 4) and `attention` (Table 3's variant: the box
token queries the image-token states through self/cross-attention layers).

With `model.targets: multi` the attention head also reads K box slots and a presence score from the
[BOX] state (`AttentionBoxHead.slots`): K + 1 learned queries added to the box token's query attend to
each other and to the image tokens; each slot gives a box and an objectness logit, the extra query the
expression's presence logit (is anything it names in the image?).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .geometry import clip_square_to_normalized, grid_centers, order_box
from .mllm import MLLM, Prefix
from .precision import module_dtype
from .prompts import BOX_TOKEN, SPATIAL_ANSWER, spatial_question


@dataclass
class SpatialOutput:
    hidden: torch.Tensor  # (B, hidden) the Spatial Segmentation Prompt ([BOX] last-layer state)
    box: torch.Tensor  # (B, 4) normalized XYXY of the original image, in [0, 1]
    ce: torch.Tensor  # scalar CE over the answer tokens
    heatmap: torch.Tensor | None  # (B, T) logits over image tokens (attention head only)
    slots: SlotOutput | None = None  # model.targets multi only


@dataclass
class SlotOutput:
    """The multi-target head's answer for B expressions with K slots (`AttentionBoxHead.slots`)."""

    boxes: torch.Tensor  # (B, K, 4) normalized XYXY of the original image, in [0, 1]
    objectness: torch.Tensor  # (B, K) logits: is slot k one of the targets?
    presence: torch.Tensor  # (B,) logits: does the expression name anything in the image?
    heatmaps: torch.Tensor  # (B, K, T) each slot's logits over the image tokens


class MLPBoxHead(nn.Module):
    """Paper Eq. 4: a lightweight MLP + sigmoid."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 4))

    def forward(self, query: torch.Tensor, image_states: torch.Tensor, hw: torch.Tensor):
        """query: (B, hidden) -> normalized XYXY (B, 4) in the head's dtype, and no heatmap."""
        return order_box(torch.sigmoid(self.net(query.to(module_dtype(self.net))))), None


def _sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2-D sine-cosine positions (half the channels for x, half for y)."""
    centers = grid_centers(grid)
    quarter = dim // 4
    freqs = torch.exp(torch.arange(quarter, dtype=torch.float32) * (-math.log(100.0) / max(quarter - 1, 1)))
    parts = []
    for axis in range(2):
        ang = centers[:, axis : axis + 1] * 2 * math.pi * freqs
        parts += [ang.sin(), ang.cos()]
    out = torch.cat(parts, dim=-1)
    return nn.functional.pad(out, (0, dim - out.shape[1]))


class AttentionBoxHead(nn.Module):
    """Table 3's attention-based box prediction: the box token queries the image-token states.

    A heatmap over image tokens gives the centre (soft-argmax); an MLP on the query and the attended
    feature gives width/height. All in the CLIP square frame, then mapped to the original image.
    """

    def __init__(self, hidden: int, grid: int, layers: int, dim: int = 256, slots: int = 0):
        """slots: K box slots for `slots` (model.targets multi; 0: the single-box head only). The slot
        modules are built after the single head's, so the single head's weights are the same draw."""
        super().__init__()
        d = min(dim, hidden)
        self.grid = grid
        self.kv = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, d))
        self.q = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, d))
        self.register_buffer("pos", _sincos_2d(grid, d), persistent=False)
        self.register_buffer("centers", grid_centers(grid), persistent=False)
        layer = nn.TransformerDecoderLayer(
            d, nhead=4, dim_feedforward=2 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, num_layers=layers)
        self.heat_q = nn.Linear(d, d)
        self.size = nn.Sequential(nn.Linear(2 * d, d), nn.ReLU(inplace=True), nn.Linear(d, 2))
        self.num_slots = slots
        if slots:
            # Query 0 is the presence query, 1..K the box slots (DETR-style learned queries, N(0, 1)).
            self.slot_queries = nn.Parameter(torch.randn(slots + 1, d))
            self.presence = nn.Linear(d, 1)
            self.objectness = nn.Linear(2 * d, 1)

    def forward(self, query: torch.Tensor, image_states: torch.Tensor, hw: torch.Tensor):
        """query: (B, hidden), image_states: (B, T, hidden), hw: (B, 2) original (H, W) ->
        normalized XYXY (B, 4) of the original image and heatmap logits (B, T), in the head's dtype."""
        dtype = module_dtype(self.kv)
        query, image_states = query.to(dtype), image_states.to(dtype)
        kv = self.kv(image_states) + self.pos.to(dtype)
        q = self.decoder(self.q(query).unsqueeze(1), kv).squeeze(1)
        logits = torch.einsum("bd,btd->bt", self.heat_q(q), kv) / math.sqrt(kv.shape[-1])
        p = logits.softmax(dim=-1)
        center = p @ self.centers.to(p.dtype)
        attended = torch.einsum("bt,btd->bd", p, kv)
        wh = torch.sigmoid(self.size(torch.cat([q, attended], dim=-1)))
        box_sq = torch.cat([center - wh / 2, center + wh / 2], dim=-1)
        return clip_square_to_normalized(box_sq, hw).clamp(0.0, 1.0), logits

    def slots(self, query: torch.Tensor, image_states: torch.Tensor, hw: torch.Tensor) -> SlotOutput:
        """query: (B, hidden), image_states: (B, T, hidden), hw: (B, 2) original (H, W) -> K slot boxes
        (normalized XYXY of the original image), objectness and presence logits, in the head's dtype.
        Raises RuntimeError on a head built without slots."""
        if not self.num_slots:
            raise RuntimeError("this attention head was built without box slots (model.targets single)")
        dtype = module_dtype(self.kv)
        query, image_states = query.to(dtype), image_states.to(dtype)
        b, k = len(query), self.num_slots
        kv = self.kv(image_states) + self.pos.to(dtype)
        queries = self.q(query).unsqueeze(1) + self.slot_queries.to(dtype)
        q = self.decoder(queries, kv)
        presence = self.presence(q[:, 0]).squeeze(-1)
        q = q[:, 1:]
        logits = torch.einsum("bkd,btd->bkt", self.heat_q(q), kv) / math.sqrt(kv.shape[-1])
        p = logits.softmax(dim=-1)
        center = p @ self.centers.to(p.dtype)
        attended = torch.einsum("bkt,btd->bkd", p, kv)
        both = torch.cat([q, attended], dim=-1)
        wh = torch.sigmoid(self.size(both))
        box_sq = torch.cat([center - wh / 2, center + wh / 2], dim=-1).flatten(0, 1)
        boxes = clip_square_to_normalized(box_sq, hw.repeat_interleave(k, dim=0)).clamp(0.0, 1.0)
        return SlotOutput(boxes.view(b, k, 4), self.objectness(both).squeeze(-1), presence, logits)


class SpatialStage(nn.Module):
    def __init__(self, mllm: MLLM, mode: str, box_head: str, attention_layers: int = 2, slots: int = 0):
        """slots: K box slots of the attention head (model.targets multi), 0 for the paper's one box."""
        super().__init__()
        h = mllm.hidden_size
        self.mode = mode
        self.num_slots = slots
        # Maps the semantic [SEG] state into the input-embedding space at the <sem> placeholder.
        self.semantic_in = nn.Linear(h, h) if "semantic" in mode else None
        grid = int(math.isqrt(mllm.num_image_tokens))
        if box_head == "mlp":
            self.head: nn.Module = MLPBoxHead(h)
        else:
            if grid * grid != mllm.num_image_tokens:
                raise ValueError(
                    f"attention box head needs a square token grid; got {mllm.num_image_tokens} tokens"
                )
            self.head = AttentionBoxHead(h, grid, attention_layers, slots=slots)
        if slots and box_head != "attention":
            raise ValueError("box slots (model.targets multi) need the attention box head")

    def forward(
        self,
        mllm: MLLM,
        image_features: torch.Tensor | None,
        expressions: Sequence[str],
        semantic_hidden: torch.Tensor | None,
        original_hw: torch.Tensor,
        rng: random.Random | None = None,
        prefix: Prefix | None = None,
    ) -> SpatialOutput:
        """image_features: (B, T, hidden), or None with `prefix` (branch B's shared prefixes of the
        expressions' images, `Prefix.rows` set); semantic_hidden: (B, hidden) [SEG] states;
        original_hw: (B, 2)."""
        questions = [spatial_question(e, self.mode, rng) for e in expressions]
        inserted = None
        if self.semantic_in is not None:
            inserted = self.semantic_in(semantic_hidden.to(module_dtype(self.semantic_in)))
        st = mllm.run_stage(
            "spatial", questions, SPATIAL_ANSWER, BOX_TOKEN, image_features, inserted, prefix=prefix
        )
        hw = original_hw.to(st.token.device)
        if self.num_slots:
            # Multi-target: `box` / `heatmap` are the most object-like slot's.
            slots = self.head.slots(st.token, st.image, hw)
            best = slots.objectness.argmax(dim=1)
            rows = torch.arange(len(best), device=best.device)
            return SpatialOutput(st.token, slots.boxes[rows, best], st.ce, slots.heatmaps[rows, best], slots)
        box, heat = self.head(st.token, st.image, hw)
        return SpatialOutput(hidden=st.token, box=box, ce=st.ce, heatmap=heat)
