"""Stage 3 — Instance Segmentation: SAM takes the semantic embedding and the box as prompts (paper §3.4).

SAM comes from the `segment-anything` package: `vit_b/l/h` from its `sam_model_registry`, and a
`tiny` size assembled from the same `modeling` classes. The image encoder is frozen; the prompt
encoder embeds the box (in the SAM frame) and the Semantic Segmentation Prompt is appended to the
sparse prompt embeddings, as LISA/GLaMM do; the mask decoder predicts one mask and its IoU.
"""

from __future__ import annotations

from functools import lru_cache, partial
from pathlib import Path

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn
from torch.nn import functional as F

from .config import SamConfig
from .geometry import SAM_MEAN, SAM_STD
from .precision import module_dtype
from .weights import check_keys

# SAM's logit threshold for a binary mask (segment_anything.modeling.Sam.mask_threshold = 0.0): the
# answers (`inference.binarize`) and the training metrics (`losses`) cut at the same value.
MASK_THRESHOLD: float = Sam.mask_threshold


def _make_sam(cfg: SamConfig, prompt_dim: int) -> Sam:
    """SAM of size `cfg.size`, randomly initialised (on the current default device)."""
    if cfg.size == "tiny":
        emb = cfg.image_size // cfg.patch_size
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=cfg.image_size,
                patch_size=cfg.patch_size,
                embed_dim=cfg.encoder_embed_dim,
                depth=cfg.encoder_depth,
                num_heads=cfg.encoder_num_heads,
                mlp_ratio=4,
                out_chans=prompt_dim,
                qkv_bias=True,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
                use_rel_pos=True,
                window_size=cfg.encoder_window_size,
                global_attn_indexes=[cfg.encoder_depth - 1],
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=prompt_dim,
                image_embedding_size=(emb, emb),
                input_image_size=(cfg.image_size,) * 2,
                mask_in_chans=16,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(
                    depth=2, embedding_dim=prompt_dim, mlp_dim=cfg.decoder_mlp_dim, num_heads=8
                ),
                transformer_dim=prompt_dim,
                iou_head_depth=3,
                iou_head_hidden_dim=prompt_dim,
            ),
            pixel_mean=list(SAM_MEAN),
            pixel_std=list(SAM_STD),
        )
    else:
        sam = sam_model_registry[cfg.size](checkpoint=None)
    return sam


def build_sam(cfg: SamConfig, prompt_dim: int) -> Sam:
    """A SAM of size `cfg.size`: random init, or the official .pth `cfg.checkpoint` loaded strictly
    (every key with its shape, WeightsError otherwise).

    With a checkpoint, SAM is built on the meta device and takes the file's tensors as its own
    (`load_state_dict(assign=True)`): a randomly initialised SAM beside the loaded state dict would hold
    SAM twice in float32 at the start-up peak (2 x 2.5 GB for ViT-H). The non-persistent buffers (the
    pixel mean and std, in no state dict) are made again on the CPU.
    """
    if cfg.checkpoint is None:
        return _make_sam(cfg, prompt_dim)
    path = Path(cfg.checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint not found: {path} (model.sam.checkpoint)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    with torch.device("meta"):
        sam = _make_sam(cfg, prompt_dim)
    own = sam.state_dict()
    check_keys(
        path,
        f"a SAM {cfg.size} checkpoint",
        missing=set(own) - set(state),
        unexpected=set(state) - set(own),
        mismatched=[
            (k, v.shape, own[k].shape) for k, v in state.items() if k in own and v.shape != own[k].shape
        ],
        hint="model.sam.checkpoint must be an official sam_vit_{b,l,h}_*.pth of model.sam.size",
    )
    sam.load_state_dict(state, strict=True, assign=True)
    sam.pixel_mean = torch.tensor(SAM_MEAN, dtype=torch.float32).view(-1, 1, 1)
    sam.pixel_std = torch.tensor(SAM_STD, dtype=torch.float32).view(-1, 1, 1)
    left = [n for n, t in [*sam.named_parameters(), *sam.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"SAM tensors left on the meta device after loading {path}: {left}")
    return sam


class SegmentationStage(nn.Module):
    def __init__(self, cfg: SamConfig, prompt_dim: int):
        super().__init__()
        self.cfg = cfg
        self.sam = build_sam(cfg, prompt_dim)
        self.sam.image_encoder.requires_grad_(False)  # paper §3.4: frozen image encoder
        self.sam.prompt_encoder.requires_grad_(False)

    @property
    def image_size(self) -> int:
        return self.sam.image_encoder.img_size

    @torch.no_grad()
    def encode(self, sam_pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised, padded pixels in the SAM frame -> (N, C, S/p, S/p) image embeddings.

        One image per encoder call: segment_anything's global attention materialises heads x T^2
        scores, their relative-position sum and softmax (~1.6 GB per 1024^2 image for ViT-H in bf16),
        so stacking N images would multiply that peak by N for no speed-up on large images. The
        answer equals a stacked call's (tests/test_realsize.py).
        """
        enc = self.sam.image_encoder
        was_training = enc.training
        enc.eval()
        pixels = sam_pixels.to(module_dtype(enc))
        out = torch.cat([enc(pixels[i : i + 1]) for i in range(pixels.shape[0])])
        enc.train(was_training)
        return out

    def decode(
        self,
        image_embeddings: torch.Tensor,
        image_index: torch.Tensor,
        semantic_prompt: torch.Tensor | None,
        box_sam: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one mask per prompt, all prompts of all images in one decoder pass.

        image_embeddings: (N, C, h, w); image_index: (B,) row of image_embeddings for each prompt;
        semantic_prompt: (B, C) or None; box_sam: (B, 4) XYXY in the SAM frame or None.
        Returns low-res mask logits (B, 4h, 4w) and predicted IoU (B,).
        """
        pe = self.sam.prompt_encoder
        # Box coordinates meet SAM's random-Fourier matrix, a *buffer*: DeepSpeed's bf16 cast leaves it
        # float32 while the decoder's parameters become bf16. Cast to each receiver (ppcr/precision.py).
        fourier = pe.pe_layer.positional_encoding_gaussian_matrix.dtype
        dtype = module_dtype(self.sam.mask_decoder)
        n = image_index.shape[0]
        if box_sam is not None:
            sparse, dense = pe(points=None, boxes=box_sam.to(fourier), masks=None)
        else:
            sparse = torch.empty((n, 0, pe.embed_dim), dtype=dtype, device=image_embeddings.device)
            dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, *pe.image_embedding_size)
        sparse = sparse.to(dtype)
        if semantic_prompt is not None:
            sparse = torch.cat([sparse, semantic_prompt.unsqueeze(1).to(dtype)], dim=1)
        if sparse.shape[1] == 0:
            raise ValueError("SAM needs at least one prompt (semantic embedding or box)")
        low, iou = _predict_masks_per_prompt(
            self.sam.mask_decoder,
            image_embeddings[image_index].to(dtype),
            pe.get_dense_pe().to(dtype),
            sparse,
            dense.to(dtype),
        )
        # multimask_output=False: SAM's first mask token is the single-mask output.
        return low[:, 0], iou[:, 0]

    def upscale(
        self, low_res: torch.Tensor, input_hw: tuple[int, int], original_hw: tuple[int, int]
    ) -> torch.Tensor:
        """(4h, 4w) or (k, 4h, 4w) low-res logits of one image -> (H, W) or (k, H, W) logits at the
        original size, in low_res's dtype (computed in float32).

        The numbers of SAM's `postprocess_masks` (bilinear, align_corners=False, to the S×S frame;
        crop to the resized image `input_hw`; bilinear to `original_hw`), computed as `Ay @ m @ Ax.T`:
        bilinear resizing is linear and separable, so both resizes and the crop are one (H, 4h) and
        one (W, 4w) matrix, built from F.interpolate's own weights (`_resize_matrix`). Equal to SAM's
        call to ~1e-6 (tests/test_segmentation_stage.py); its backward is two matrix products, where
        F.interpolate's scatters into the low-res grid (tiny preset, 2 CPU threads: 19 -> 9.5 ms a step).
        """
        if low_res.dim() == 2:
            return self.upscale(low_res[None], input_hw, original_hw)[0]
        h, w = low_res.shape[-2:]
        s = self.image_size
        ay = _resize_matrix(h, s, int(input_hw[0]), int(original_hw[0])).to(low_res.device)
        ax = _resize_matrix(w, s, int(input_hw[1]), int(original_hw[1])).to(low_res.device)
        return (ay @ low_res.float() @ ax.T).to(low_res.dtype)


# Kept in host memory, so a replica that sees many image sizes never holds them on its GPU; the demo's
# 630 training images need ~630 entries (~40 MB).
@lru_cache(maxsize=1024)
def _resize_matrix(n_low: int, frame: int, n_input: int, n_original: int) -> torch.Tensor:
    """(n_original, n_low) float32 on the CPU: one axis of SAM's postprocess_masks as a matrix —
    bilinear n_low -> frame, keep the first n_input, bilinear n_input -> n_original. Each resize's
    weights are F.interpolate's own (applied to the identity), so they match it exactly."""

    def resize(n_in: int, n_out: int) -> torch.Tensor:  # (n_out, n_in)
        eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, 1, n_in, 1)
        out = F.interpolate(eye, size=(n_out, 1), mode="bilinear", align_corners=False)
        return out[:, 0, :, 0].T

    composed = resize(n_input, n_original) @ resize(n_low, frame)[:n_input]
    return composed.float()


def _predict_masks_per_prompt(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`MaskDecoder.predict_masks` for prompts that each carry their own image embedding.

    SAM's `predict_masks` repeats ONE image's embedding once per prompt, so a batch of B images with
    one prompt each would cost B² decoder rows (or B separate calls). This runs the same modules in
    the same order on (B, C, h, w) per-prompt embeddings; tests/test_segmentation_stage.py checks it
    against SAM's own per-image call.
    """
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1)
    tokens = torch.cat((output_tokens, sparse), dim=1)
    src = image_embeddings + dense
    pos_src = image_pe.expand(src.shape[0], -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : (1 + decoder.num_mask_tokens), :]
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper_in = torch.stack(
        [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
    )
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    return masks, decoder.iou_prediction_head(iou_token_out)
