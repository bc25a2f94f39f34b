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
from ppcr.mllm import build_llava, build_tokenizer, load_llava
from ppcr.model import PPCRModel
from ppcr.segmentation_stage import build_sam
from ppcr.weights import WeightsError


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


# ---- strict base-weight loading (the key names real folders ship with) -----------------------------

# llava-hf/llava-1.5-7b-hf ships its safetensors under the transformers <= 4.51 names; transformers
# 5.x renames them at load. Original LLaVA (liuhaotian/llava-v1.5-7b) and GLaMM use Llama-style names.
_LLAVA_HF_NAMES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),  # transformers < 5.x's module
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)
_ORIGINAL_LLAVA_NAMES = (
    ("model.language_model.", "model."),
    ("lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", "model.vision_tower.vision_tower.vision_model."),
    ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
    ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
    ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
)


def _write_llava_folder(folder, llava, tok, names, shards=2):
    """A llava folder as a hub download looks: config.json, tokenizer, `shards` safetensors files and
    model.safetensors.index.json, with the state dict renamed by `names` (prefix pairs)."""
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    llava.config.save_pretrained(folder)
    tok.save_pretrained(folder)
    state = {}
    for key, tensor in llava.state_dict().items():
        for new, old in names:
            if key.startswith(new):
                key = old + key[len(new) :]
                break
        state[key] = tensor.contiguous()
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        part = keys[i::shards]
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}}
    (folder / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))
    return keys


def _with_mllm(folder):
    cfg = load_config("tiny").model
    return dataclasses.replace(cfg, mllm_path=str(folder))


def test_llava_hf_folder_under_its_shipped_key_names_loads_every_weight(tmp_path, local_weights):
    _, llava, _ = local_weights
    tok = build_tokenizer(load_config("tiny").model)
    keys = _write_llava_folder(tmp_path / "llava-hf", llava, tok, _LLAVA_HF_NAMES)
    assert any(k.startswith("language_model.model.layers.0.") for k in keys)
    assert "language_model.lm_head.weight" in keys and "multi_modal_projector.linear_1.weight" in keys
    assert any(k.startswith("vision_tower.vision_model.") for k in keys)
    loaded = load_llava(_with_mllm(tmp_path / "llava-hf"))  # raises on any missing key
    for name, tensor in llava.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_original_llava_key_names_are_refused_with_the_keys_listed(tmp_path, local_weights):
    _, llava, _ = local_weights
    tok = build_tokenizer(load_config("tiny").model)
    _write_llava_folder(tmp_path / "orig", llava, tok, _ORIGINAL_LLAVA_NAMES)
    with pytest.raises(WeightsError) as exc:
        PPCRModel(_with_mllm(tmp_path / "orig"))
    msg = str(exc.value)
    assert str(tmp_path / "orig") in msg
    assert "missing tensors:" in msg and "tensors not in this model:" in msg
    assert "model.mm_projector.0.weight" in msg or "in all)" in msg
    assert "llava-hf" in msg  # says what the folder should be


def test_glamm_style_flat_config_is_refused_before_loading_weights(tmp_path, local_weights):
    """GLaMM's config.json says model_type llava with flat Llama fields: transformers then builds the
    default (7B-sized) sub-configs. The sizes check names every difference from the preset."""
    import json

    _, llava, _ = local_weights
    tok = build_tokenizer(load_config("tiny").model)
    folder = tmp_path / "glamm"
    _write_llava_folder(folder, llava, tok, _ORIGINAL_LLAVA_NAMES)
    flat = {
        "model_type": "llava",
        "architectures": ["GLaMMForCausalLM"],
        "hidden_size": 128,
        "num_hidden_layers": 3,
    }
    (folder / "config.json").write_text(json.dumps(flat))
    with pytest.raises(
        WeightsError,
        match=r"config.json: sizes differ from model preset 'tiny'.*text_config.hidden_size 4096 \(preset 128\)",
    ):
        PPCRModel(_with_mllm(folder))


def test_mis_shaped_llava_weight_is_refused(tmp_path, local_weights):
    _, llava, _ = local_weights
    tok = build_tokenizer(load_config("tiny").model)
    folder = tmp_path / "bad"
    _write_llava_folder(folder, llava, tok, _LLAVA_HF_NAMES, shards=1)
    from safetensors.torch import load_file, save_file

    shard = folder / "model-00001-of-00001.safetensors"
    state = load_file(str(shard))
    state["multi_modal_projector.linear_2.bias"] = torch.zeros(7)
    save_file(state, str(shard), metadata={"format": "pt"})
    with pytest.raises(
        WeightsError, match=r"mis-shaped tensors: model.multi_modal_projector.linear_2.bias \(7,\)"
    ):
        load_llava(_with_mllm(folder))


def test_mis_shaped_sam_weight_is_refused(tmp_path, local_weights):
    _, _, sam = local_weights
    cfg = load_config("tiny").model
    state = dict(sam.state_dict())
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 3)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(
        WeightsError,
        match=r"shape.pth: not a SAM tiny checkpoint: mis-shaped tensors: mask_decoder.iou_token.weight \(1, 3\)",
    ):
        build_sam(dataclasses.replace(cfg.sam, checkpoint=str(tmp_path / "shape.pth")), cfg.prompt_dim)
