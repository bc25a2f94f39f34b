"""Stage 1 — Semantic Understanding (paper §3.2): LoRA branch A answers the semantic template with
[SEG]; that token's last-layer hidden state, projected, is the Semantic Segmentation Prompt."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .mllm import MLLM, Prefix
from .precision import module_dtype
from .prompts import SEG_TOKEN, SEMANTIC_ANSWER, semantic_question


@dataclass
class SemanticOutput:
    hidden: torch.Tensor  # (B, hidden) last-layer state at [SEG] (or before it: model.semantic_state)
    prompt: torch.Tensor  # (B, prompt_dim) the Semantic Segmentation Prompt (SAM sparse prompt)
    ce: torch.Tensor  # scalar CE over the answer tokens
    image_states: torch.Tensor  # (B, T, hidden) last-layer states at the <image> positions


class SemanticStage(nn.Module):
    def __init__(self, mllm: MLLM, prompt_dim: int):
        super().__init__()
        h = mllm.hidden_size
        # LISA's "text_hidden_fcs": Linear(h, h) -> ReLU -> Linear(h, prompt_dim).
        self.projection = nn.Sequential(nn.Linear(h, h), nn.ReLU(inplace=True), nn.Linear(h, prompt_dim))

    def forward(
        self,
        mllm: MLLM,
        image_features: torch.Tensor | None,
        expressions: Sequence[str],
        rng: random.Random | None = None,
        prefix: Prefix | None = None,
    ) -> SemanticOutput:
        """image_features: (B, T, hidden), one row per expression, or None with `prefix` (branch A's
        shared prefixes of the expressions' images, `MLLM.prefix` + `Prefix.rows`); rng picks
        templates (None: fixed, for eval)."""
        questions = [semantic_question(e, rng) for e in expressions]
        # model.semantic_state "predicting": the state one position before [SEG] (LISA/GLaMM's reading).
        offset = -1 if mllm.cfg.semantic_state == "predicting" else 0
        st = mllm.run_stage(
            "semantic", questions, SEMANTIC_ANSWER, SEG_TOKEN, image_features, offset=offset, prefix=prefix
        )
        # The LLM runs in model.dtype, the projection in float32 (ppcr/precision.py): cast at the boundary.
        prompt = self.projection(st.token.to(module_dtype(self.projection)))
        return SemanticOutput(hidden=st.token, prompt=prompt, ce=st.ce, image_states=st.image)
