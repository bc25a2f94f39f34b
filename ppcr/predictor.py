"""Inference API in the spirit of SamPredictor: `Segmenter.segment(image, expression)`.

    seg = Segmenter.from_checkpoint("demo_out/checkpoint")
    answer = seg.segment(image, "the small red circle")
    answer.mask, answer.box, answer.score          # the union of the objects found
    answer.instances, answer.no_target             # each object (mask, box, score); none found

The answer is an `inference.Segmentation`: `instances`, each a mask (bool H×W at the original size), a
box (pixel XYXY of the original image) and a score (the mask decoder's predicted IoU), none when
nothing fits (`no_target`); `mask`/`box`/`score` are their union (box and score None for none). The
single-target model (the paper's) answers exactly one instance, so the union is that instance.
Inference is teacher-forced (one pass per stage), as LISA/GLaMM evaluate.
An image is a path or URI, encoded bytes, a PIL image of any mode or an array (`geometry.as_rgb_array`:
the same pixels whichever way it arrives, the displayed image for EXIF-rotated files, its shape checked
against `geometry.ImageLimits` before any model work); a bad one raises ImageDecodeError naming it.
Bad text raises InputError naming it (docs/inputs.md), before any model work.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .config import InputError, RunConfig, load_config
from .geometry import ImageInput, as_rgb_array
from .inference import Segmentation, predict_torch
from .inputs import Item, collate, image_key
from .model import PPCRModel
from .precision import configure_device


class Segmenter:
    def __init__(self, model: PPCRModel, batch_size: int = 16):
        """batch_size: expressions per model forward (`segment_batch` and `predict` split larger calls), so
        one chunk bounds a call's memory: its language pass over `batch_size` whole prompts
        (deploy/capacity.py `segment_chunk_peak_gb`) or one image's SAM encode, whichever is larger. At
        real size on a CPU, a `segment_batch` of 16 distinct photographs at the default 16 peaked at
        18.35 GB RSS (docs/capacity.md, "Measured on CPU"). ValueError if below 1."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.model = model.eval()
        self.batch_size = batch_size
        self._image: np.ndarray | None = None
        self._embedding: torch.Tensor | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", **overrides) -> Segmenter:
        return cls(load_checkpoint(path, overrides=overrides, device=device))

    @classmethod
    def from_preset(cls, preset: str | RunConfig = "tiny", device: str = "cpu") -> Segmenter:
        """An untrained model (random init for tiny): for plumbing, never for results."""
        cfg = preset if isinstance(preset, RunConfig) else load_config(preset)
        warnings.warn(
            "Segmenter.from_preset: randomly initialised weights — masks are meaningless", stacklevel=2
        )
        return cls(PPCRModel(cfg.model).to(configure_device(device)))

    @torch.no_grad()
    def segment_batch(self, images: Sequence[ImageInput], expressions: Sequence[str]) -> list[Segmentation]:
        """One result per (image, expression) pair; identical images are encoded once."""
        if len(images) != len(expressions):
            raise InputError(f"{len(images)} images but {len(expressions)} expressions")
        arrays = [as_rgb_array(im, f"image {i}") for i, im in enumerate(images)]
        texts = self._check_texts(expressions)
        keys = [image_key(a) for a in arrays]
        results: list[Segmentation] = []
        for start in range(0, len(arrays), self.batch_size):
            sl = slice(start, start + self.batch_size)
            items = [Item(k, a, t) for k, a, t in zip(keys[sl], arrays[sl], texts[sl])]
            results += self._run(items)
        return results

    def segment(self, image: ImageInput, expression: str) -> Segmentation:
        return self.segment_batch([image], [expression])[0]

    # SamPredictor-style: encode once, ask many times.
    @torch.no_grad()
    def set_image(self, image: ImageInput) -> None:
        """Decode and SAM-encode `image` once for subsequent `predict` calls."""
        arr = as_rgb_array(image)
        batch = collate(
            [Item(0, arr, "x")], self.model.clip_size, self.model.sam_size, self.model.clip_mode
        ).to(self.model.device)
        self._image = arr
        self._embedding = self.model.segmentation.encode(batch.sam_pixels)

    @torch.no_grad()
    def predict(self, expression: str | Sequence[str]) -> Segmentation | list[Segmentation]:
        """Segment one or several expressions on the image given to `set_image`."""
        if self._image is None:
            raise RuntimeError("call set_image(image) before predict(expression)")
        many = not isinstance(expression, str)
        texts = self._check_texts(expression if many else [expression])
        out = self._run([Item(0, self._image, t) for t in texts], self._embedding)
        return out if many else out[0]

    def _check_texts(self, expressions: Sequence[str]) -> list[str]:
        """The text rules every entry point applies (`PromptTokenizer.check_expressions`: encodable text,
        no control characters or tokenizer control tokens, a prompt within the language model's
        context), before any model work; InputError naming the expression's index."""
        return self.model.mllm.prompts.check_expressions(expressions)

    def _run(self, items: list[Item], image_embeddings: torch.Tensor | None = None) -> list[Segmentation]:
        batch = collate(items, self.model.clip_size, self.model.sam_size, self.model.clip_mode).to(
            self.model.device
        )
        return predict_torch(self.model, batch, image_embeddings, max_sequences=self.batch_size)
