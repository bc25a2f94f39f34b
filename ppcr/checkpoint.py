"""Inference checkpoints: a folder with `config.yaml`, `model.safetensors` and `tokenizer/`.

Only what inference needs is saved: every trainable tensor (LoRA branches, token embeddings/LM head,
projection and box heads, SAM mask decoder) plus any component that has no pretrained source to
rebuild it from (a random-init tiny base). Loading never unpickles: safetensors only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from .config import ConfigError, ModelConfig, from_dict, to_dict
from .model import PPCRModel
from .precision import configure_device
from .weights import check_keys

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


# Always saved: what training changes (LoRA, token rows, heads, SAM mask decoder).
_ALWAYS = ("semantic.", "spatial.", "segmentation.sam.mask_decoder.")
_ALWAYS_PARTS = ("lora_", "embed_tokens", "lm_head")


def _saved_names(model: PPCRModel) -> list[str]:
    """State-dict keys an inference checkpoint holds, chosen by design rather than by requires_grad
    flags (which evaluation passes may toggle). Components built from scratch are saved whole,
    buffers included (SAM's random Fourier matrix is a buffer)."""
    cfg = model.cfg
    names = []
    for name in model.state_dict():
        if (
            name.startswith(_ALWAYS)
            or any(part in name for part in _ALWAYS_PARTS)
            or (name.startswith("mllm.") and cfg.mllm_path is None)
            or (name.startswith("segmentation.") and cfg.sam.checkpoint is None)
        ):
            names.append(name)
    return names


def save_checkpoint(model: PPCRModel, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write an inference checkpoint to `out_dir` (atomically per file); returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    tensors = {n: state[n].detach().to("cpu").contiguous() for n in _saved_names(model)}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "ppcr-inference-v1"})
    tmp.replace(out / WEIGHTS_FILE)
    cfg = to_dict(model.cfg)
    cfg["tokenizer_path"] = None  # resolved to the saved tokenizer on load
    (out / CONFIG_FILE).write_text(yaml.safe_dump({"model": cfg}, sort_keys=False))
    model.mllm.tokenizer.save_pretrained(out / TOKENIZER_DIR)
    if extra:
        (out / "meta.json").write_text(json.dumps(extra, indent=2))
    return out


def load_model_config(ckpt_dir: str | Path) -> ModelConfig:
    ckpt = Path(ckpt_dir)
    if not (ckpt / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"not a ppcr checkpoint: {ckpt} has no {CONFIG_FILE}")
    data = yaml.safe_load((ckpt / CONFIG_FILE).read_text()) or {}
    if "model" not in data:
        raise ConfigError(f"{ckpt / CONFIG_FILE}: missing top-level 'model'")
    cfg = from_dict(ModelConfig, data["model"])
    cfg.tokenizer_path = str(ckpt / TOKENIZER_DIR)
    return cfg


def load_checkpoint(
    ckpt_dir: str | Path, overrides: dict | None = None, device: str | torch.device = "cpu"
) -> PPCRModel:
    """Rebuild the model from a checkpoint folder. `overrides` are ModelConfig fields (e.g. spatial_prompt
    is fixed by training, but paths to base weights may be moved)."""
    ckpt = Path(ckpt_dir)
    cfg = load_model_config(ckpt)
    for key, value in (overrides or {}).items():
        if not hasattr(cfg, key):
            raise ConfigError(f"unknown model override {key!r}")
        setattr(cfg, key, value)
    weights = ckpt / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint weights missing: {weights}")
    model = PPCRModel(cfg)  # dtypes per ppcr/precision.py; copy_ below keeps them
    state = load_file(str(weights))
    params = model.state_dict()  # live tensors (parameters and buffers), copied into in place
    check_keys(
        weights,
        "a checkpoint of this model (config mismatch?)",
        missing=set(_saved_names(model)) - set(state),
        unexpected=set(state) - set(params),
        mismatched=[
            (k, v.shape, params[k].shape)
            for k, v in state.items()
            if k in params and v.shape != params[k].shape
        ],
    )
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
    return model.to(configure_device(device)).eval()
