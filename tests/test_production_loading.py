"""The production path loads weights from local folders in their official formats.

No LLaVA-7B or SAM ViT-H weights exist here, so a tiny LLaVA is written with transformers'
`save_pretrained` (the llava-hf folder format) and a tiny SAM state dict with `torch.save` (the
format of the official `sam_vit_*.pth` files); the model is then built from those paths as the
`llava-1.5-7b` preset is.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ppcr.config import load_config
from ppcr.mllm import build_llava, build_tokenizer
from ppcr.model import PPCRModel
from ppcr.segmentation_stage import build_sam


@pytest.fixture(scope="module")
def local_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    cfg = load_config("tiny").model
    tok = build_tokenizer(cfg)
    torch.manual_seed(0)
    llava = build_llava(cfg, tok)
    llava.save_pretrained(root / "llava")
    tok.save_pretrained(root / "llava")
    sam = build_sam(cfg.sam, cfg.prompt_dim)
    torch.save(sam.state_dict(), root / "sam_tiny.pth")
    return root, llava, sam


def test_model_builds_from_local_official_formats(local_weights):
    root, llava, sam = local_weights
    cfg = load_config("tiny").model
    cfg = dataclasses.replace(
        cfg,
        mllm_path=str(root / "llava"),
        sam=dataclasses.replace(cfg.sam, checkpoint=str(root / "sam_tiny.pth")),
    )
    model = PPCRModel(cfg)
    loaded = model.mllm.llava.state_dict()
    for name, tensor in llava.state_dict().items():
        # peft moves a LoRA-wrapped layer's own weight under `base_layer`, unchanged.
        module, leaf = name.rsplit(".", 1)
        key = name if name in loaded else f"{module}.base_layer.{leaf}"
        torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0)
    for name, tensor in sam.state_dict().items():
        torch.testing.assert_close(model.segmentation.sam.state_dict()[name], tensor, rtol=0, atol=0)


def test_missing_local_paths_are_clear_errors(tmp_path):
    cfg = load_config("tiny").model
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        PPCRModel(dataclasses.replace(cfg, mllm_path=str(tmp_path / "no_llava")))
    bad_sam = dataclasses.replace(cfg.sam, checkpoint=str(tmp_path / "no_sam.pth"))
    with pytest.raises(FileNotFoundError, match="no_sam.pth"):
        build_sam(bad_sam, cfg.prompt_dim)


def test_sam_checkpoint_of_another_size_is_rejected(tmp_path, local_weights):
    _, _, sam = local_weights
    cfg = load_config("tiny").model
    state = sam.state_dict()
    state.pop("mask_decoder.iou_token.weight")
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="not a SAM tiny checkpoint"):
        build_sam(dataclasses.replace(cfg.sam, checkpoint=str(tmp_path / "broken.pth")), cfg.prompt_dim)


def test_production_preset_is_llava_1_5_7b_with_sam_vit_h():
    cfg = load_config("llava-1.5-7b").model
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.num_layers) == (336, 14, 24)
    assert (cfg.language.hidden_size, cfg.language.num_layers) == (4096, 32)
    assert cfg.sam.size == "vit_h" and cfg.prompt_dim == 256 and cfg.box_head == "mlp"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (
        8,
        16,
        0.05,
        ["q_proj", "v_proj"],
    )
    assert cfg.train_base is False and cfg.image_position == "before"


def test_registry_sam_is_built_from_segment_anything():
    cfg = load_config("tiny").model
    sam = build_sam(dataclasses.replace(cfg.sam, size="vit_b", image_size=1024), 256)
    assert sam.image_encoder.img_size == 1024
    assert sam.prompt_encoder.embed_dim == 256
    assert sum(p.numel() for p in sam.image_encoder.parameters()) > 80_000_000  # ViT-B
