"""Inference checkpoints: safetensors only, exact round trip, clear errors on broken folders."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from ppcr.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_DIR,
    WEIGHTS_FILE,
    load_checkpoint,
    load_model_config,
    save_checkpoint,
)
from ppcr.config import ConfigError, load_config
from ppcr.inputs import Item, collate
from ppcr.model import PPCRModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = PPCRModel(load_config("tiny").model)
    # Move every parameter away from its initialisation (lora_B starts at zero), so a load that
    # silently kept init values would be caught.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    return m.eval()


@pytest.fixture(scope="module")
def batch(model):
    rng = np.random.default_rng(0)
    items = []
    for key, (h, w), expr in [("a", (60, 90), "the red circle"), ("b", (100, 70), "the blue square")]:
        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), dtype=bool)
        mask[10:40, 5:50] = True
        items.append(Item(key, img, expr, mask, np.array([5, 10, 50, 40], dtype=np.float64)))
    items.append(Item("a", items[0].image, "the thing on the right", items[0].gt_mask, items[0].gt_box))
    return collate(items, model.clip_size, model.sam_size)


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory):
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "checkpoint", extra={"steps": 3})


@pytest.fixture(scope="module")
def loaded(ckpt):
    # A different seed than the saved model's: everything must come from the checkpoint, not the RNG.
    torch.manual_seed(12345)
    return load_checkpoint(ckpt)


def _outputs(model, batch):
    with torch.no_grad():
        return model(batch)


def test_folder_layout(ckpt):
    assert (ckpt / CONFIG_FILE).is_file()
    assert (ckpt / WEIGHTS_FILE).is_file()
    assert (ckpt / TOKENIZER_DIR).is_dir()
    assert json.loads((ckpt / "meta.json").read_text()) == {"steps": 3}
    data = yaml.safe_load((ckpt / CONFIG_FILE).read_text())
    assert set(data) == {"model"}
    assert data["model"]["tokenizer_path"] is None
    assert data["model"]["box_head"] == "attention"


def test_weights_are_safetensors_not_pickle(ckpt, model):
    path = ckpt / WEIGHTS_FILE
    head = path.read_bytes()[:8]
    assert not head.startswith(b"\x80") and not head.startswith(b"PK")  # pickle / torch zip
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "ppcr-inference-v1"}
        keys = set(f.keys())
        name = "semantic.projection.0.weight"
        torch.testing.assert_close(f.get_tensor(name), dict(model.named_parameters())[name], rtol=0, atol=0)
    # A from-scratch tiny model has no pretrained source: every parameter and persistent buffer is saved
    # (SAM's random Fourier matrix is a buffer).
    assert keys == set(model.state_dict())
    assert "segmentation.sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in keys
    assert any(".lora_B.semantic." in k for k in keys) and any(".lora_B.spatial." in k for k in keys)


def test_load_model_config(ckpt, model):
    cfg = load_model_config(ckpt)
    assert cfg.tokenizer_path == str(ckpt / TOKENIZER_DIR)
    cfg.tokenizer_path = None
    assert cfg == model.cfg


def test_round_trip_parameters_identical(model, loaded):
    assert not loaded.training
    ref = dict(model.named_parameters())
    got = dict(loaded.named_parameters())
    assert set(got) == set(ref)
    for name, p in got.items():
        assert torch.equal(p, ref[name]), name
    assert loaded.mllm.ids == model.mllm.ids
    assert len(loaded.mllm.tokenizer) == len(model.mllm.tokenizer)


def test_round_trip_tokenizer_identical(model, loaded):
    text = "USER: <image>\nPlease segment the red circle in this image. ASSISTANT: It is [SEG]."
    assert loaded.mllm.tokenizer(text).input_ids == model.mllm.tokenizer(text).input_ids


def test_round_trip_language_outputs_identical(model, loaded, batch):
    model.eval()
    a, b = _outputs(model, batch), _outputs(loaded, batch)
    torch.testing.assert_close(b.semantic_prompt, a.semantic_prompt, rtol=0, atol=0)
    torch.testing.assert_close(b.box, a.box, rtol=0, atol=0)
    torch.testing.assert_close(b.heatmap, a.heatmap, rtol=0, atol=0)
    torch.testing.assert_close(b.ce, a.ce, rtol=0, atol=0)


def test_round_trip_masks_identical(model, loaded, batch):
    model.eval()
    a, b = _outputs(model, batch), _outputs(loaded, batch)
    torch.testing.assert_close(b.low_res_masks, a.low_res_masks, rtol=0, atol=0)
    torch.testing.assert_close(b.iou_pred, a.iou_pred, rtol=0, atol=0)
    for x, y in zip(b.mask_logits, a.mask_logits):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_missing_weights_file(ckpt, tmp_path):
    bad = tmp_path / "no_weights"
    bad.mkdir()
    shutil.copy(ckpt / CONFIG_FILE, bad / CONFIG_FILE)
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_checkpoint(bad)


def test_folder_without_config(ckpt, tmp_path):
    bad = tmp_path / "no_config"
    bad.mkdir()
    shutil.copy(ckpt / WEIGHTS_FILE, bad / WEIGHTS_FILE)
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "does_not_exist")


def test_config_without_model_key(ckpt, tmp_path):
    bad = tmp_path / "no_model_key"
    bad.mkdir()
    (bad / CONFIG_FILE).write_text("train: {steps: 3}\n")
    with pytest.raises(ConfigError, match="model"):
        load_checkpoint(bad)


def test_unknown_override(ckpt):
    with pytest.raises(ConfigError, match="box_hed"):
        load_checkpoint(ckpt, overrides={"box_hed": "mlp"})


def test_config_mismatch_names_tensors(ckpt, tmp_path):
    """A checkpoint trained with the attention head, but whose config says mlp, must not load silently."""
    bad = tmp_path / "mismatch"
    shutil.copytree(ckpt, bad)
    data = yaml.safe_load((bad / CONFIG_FILE).read_text())
    data["model"]["box_head"] = "mlp"
    data["model"]["semantic_grounding"] = False  # reads the attention head, so off with it
    (bad / CONFIG_FILE).write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ValueError) as exc:
        load_checkpoint(bad)
    msg = str(exc.value)
    assert WEIGHTS_FILE in msg
    assert "not in this model" in msg or "missing tensors" in msg
    assert "spatial.head." in msg


def test_save_after_eval_forward_keeps_semantic_lora(model, batch, tmp_path):
    model.eval()
    _outputs(model, batch)
    old = model.cfg.mllm_path
    model.cfg.mllm_path = str(tmp_path / "pretend-pretrained-llava")  # production: base weights not saved
    try:
        out = save_checkpoint(model, tmp_path / "prod")
    finally:
        model.cfg.mllm_path = old
    with safe_open(str(out / WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())
    for adapter in ("semantic", "spatial"):
        expected = {n for n, _ in model.named_parameters() if f".lora_B.{adapter}." in n}
        assert expected and expected <= keys, f"{adapter} LoRA missing from the checkpoint"
