"""Inference checkpoints: a folder with `config.yaml`, `model.safetensors` and `tokenizer/`.

Only what inference needs is saved: every trainable tensor (LoRA branches, token embeddings/LM head,
projection and box heads, SAM mask decoder) plus any component that has no pretrained source to
rebuild it from (a random-init tiny base). Loading never unpickles: safetensors only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, ModelConfig, deep_merge, from_dict, to_dict
from .model import PART_PREFIXES, PARTS, PPCRModel
from .precision import configure_device
from .weights import WeightsError, check_keys

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


# Always saved: what training changes (LoRA, token rows, heads, SAM mask decoder).
_ALWAYS = ("semantic.", "spatial.", "segmentation.sam.mask_decoder.")
_ALWAYS_PARTS = ("lora_", "embed_tokens", "lm_head")


def saved_names(model: PPCRModel) -> list[str]:
    """State-dict keys an inference checkpoint holds, chosen by design rather than by requires_grad
    flags (which evaluation passes may toggle). Components built from scratch are saved whole,
    buffers included (SAM's random Fourier matrix is a buffer); so are the base tensors listed in
    `model.base_overrides` (values that differ from the `mllm_path` folder, e.g. a converted GLaMM's)."""
    cfg = model.cfg
    overrides = set(cfg.base_overrides)
    names = []
    for name in model.state_dict():
        if (
            name in overrides
            or name.startswith(_ALWAYS)
            or any(part in name for part in _ALWAYS_PARTS)
            or (name.startswith("mllm.") and cfg.mllm_path is None)
            or (name.startswith("segmentation.") and cfg.sam.checkpoint is None)
        ):
            names.append(name)
    return names


def save_checkpoint(model: PPCRModel, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write an inference checkpoint to `out_dir` (atomically per file); returns the folder."""
    if model.parts != PARTS:
        raise ValueError(
            f"save_checkpoint needs the whole model; this one was built with parts={model.parts}"
        )
    state = model.state_dict()
    tensors = {n: state[n].detach().to("cpu").contiguous() for n in saved_names(model)}
    return write_checkpoint(out_dir, tensors, model.cfg, model.mllm.tokenizer, extra)


def write_checkpoint(
    out_dir: str | Path,
    tensors: dict[str, torch.Tensor],
    cfg: ModelConfig,
    tokenizer,
    extra: dict | None = None,
) -> Path:
    """The files of an inference checkpoint: `tensors` (CPU, contiguous: `saved_names` of the model
    `cfg` builds) as safetensors, `cfg` as config.yaml and `tokenizer` under tokenizer/. Returns the folder.
    `save_checkpoint` calls it with a built model's tensors."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "ppcr-inference-v1"})
    tmp.replace(out / WEIGHTS_FILE)
    data = to_dict(cfg)
    data["tokenizer_path"] = None  # resolved to the saved tokenizer on load
    data["init_weights"] = None  # a training-time input, already inside these weights
    (out / CONFIG_FILE).write_text(yaml.safe_dump({"model": data}, sort_keys=False))
    tokenizer.save_pretrained(out / TOKENIZER_DIR)
    if extra:
        (out / "meta.json").write_text(json.dumps(extra, indent=2))
    return out


def load_model_config(ckpt_dir: str | Path, overrides: dict | None = None) -> ModelConfig:
    """The ModelConfig a checkpoint was trained with, `overrides` merged in before validation.

    overrides: ModelConfig fields as plain values / nested dicts, e.g. {"spatial_prompt": "none",
    "sam": {"checkpoint": "/models/sam_vit_h_4b8939.pth"}}; validated like any config file
    (ConfigError naming the key). Raises FileNotFoundError for a folder without config.yaml.
    """
    ckpt = Path(ckpt_dir)
    if not (ckpt / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"not a ppcr checkpoint: {ckpt} has no {CONFIG_FILE}")
    data = yaml.safe_load((ckpt / CONFIG_FILE).read_text()) or {}
    if "model" not in data:
        raise ConfigError(f"{ckpt / CONFIG_FILE}: missing top-level 'model'")
    merged = deep_merge(data["model"], overrides or {})
    try:
        cfg = from_dict(ModelConfig, merged, "model")
    except ConfigError as exc:
        where = f"{ckpt}: model overrides {overrides}" if overrides else str(ckpt / CONFIG_FILE)
        raise ConfigError(f"{where}: {exc}") from None
    if not (overrides or {}).get("tokenizer_path"):
        cfg.tokenizer_path = str(ckpt / TOKENIZER_DIR)
    return cfg


def load_checkpoint(
    ckpt_dir: str | Path,
    overrides: dict | None = None,
    device: str | torch.device = "cpu",
    parts: Sequence[str] = PARTS,
) -> PPCRModel:
    """Rebuild the model (only `parts`: "mllm" = stages 1 + 2, "sam" = stage 3) from a checkpoint folder
    and move it to `device`. `overrides`: see `load_model_config` (e.g. base weights moved since training).

    Reads only the tensors of the built parts (safetensors, no unpickling); every one of them must be
    in the file with its shape (WeightsError otherwise).
    """
    ckpt = Path(ckpt_dir)
    cfg = load_model_config(ckpt, overrides)
    weights = ckpt / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint weights missing: {weights}")
    model = PPCRModel(cfg, parts=parts)  # dtypes per ppcr/precision.py; copy_ below keeps them
    built = tuple(prefix for part in model.parts for prefix in PART_PREFIXES[part])
    _copy_strict(model, weights, "a checkpoint of this model (config mismatch?)", prefixes=built)
    return model.to(configure_device(device)).eval()


def _copy_strict(model: PPCRModel, weights: Path, what: str, prefixes: tuple[str, ...] = ("",)) -> list[str]:
    """Copy the tensors of `weights` whose names start with `prefixes` into `model` in place (dtypes
    stay the model's). Every one must be a tensor of the model with its shape, and every tensor the
    model's own checkpoints hold (`saved_names`) must be there: WeightsError naming the file otherwise.
    Returns the names copied."""
    params = model.state_dict()  # live tensors (parameters and buffers)
    with safe_open(str(weights), framework="pt") as f:
        keys = [k for k in f.keys() if k.startswith(prefixes)]
        check_keys(
            weights,
            what,
            missing=set(saved_names(model)) - set(keys),
            unexpected=set(keys) - set(params),
            mismatched=[
                (k, tuple(f.get_slice(k).get_shape()), tuple(params[k].shape))
                for k in keys
                if k in params and tuple(f.get_slice(k).get_shape()) != tuple(params[k].shape)
            ],
        )
        with torch.no_grad():
            for name in keys:
                params[name].copy_(f.get_tensor(name))
    return keys


def load_init_weights(model: PPCRModel, ckpt_dir: str | Path) -> list[str]:
    """Warm start: copy a ppcr checkpoint's tensors into `model` (just built, before any optimizer or
    DeepSpeed wraps it), strictly. Returns the names loaded.

    Every tensor in the file must be a tensor of `model` with the same shape, every tensor the model's
    own checkpoints hold (`saved_names`) must be in the file, the LoRA settings (r, alpha, targets)
    must be equal (the same B·A means another weight under another scale), and the special tokens
    must have the same ids in both tokenizers: WeightsError naming the file otherwise. Base tensors the
    checkpoint overrides (`base_overrides`) are adopted, so the run's own checkpoints keep them.
    """
    if model.parts != PARTS:
        raise ValueError(f"a warm start needs the whole model; this one was built with parts={model.parts}")
    ckpt = Path(ckpt_dir)
    src = load_model_config(ckpt)
    weights = ckpt / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"model.init_weights: checkpoint weights missing: {weights}")
    lora, want = (
        (src.lora.r, src.lora.alpha, src.lora.target_modules),
        (
            model.cfg.lora.r,
            model.cfg.lora.alpha,
            model.cfg.lora.target_modules,
        ),
    )
    if lora != want:
        raise WeightsError(
            f"{ckpt / CONFIG_FILE}: model.lora (r, alpha, target_modules) {lora} != this run's {want}"
        )
    from .mllm import build_tokenizer, special_tokens

    theirs = build_tokenizer(src)
    ours = model.mllm.tokenizer
    moved = [
        f"{t} {theirs.convert_tokens_to_ids(t)} != {ours.convert_tokens_to_ids(t)}"
        for t in special_tokens(model.cfg)
        if theirs.convert_tokens_to_ids(t) != ours.convert_tokens_to_ids(t)
    ]
    if moved:
        raise WeightsError(
            f"{ckpt / TOKENIZER_DIR}: token ids differ from this run's tokenizer: {'; '.join(moved)}"
        )
    for name in src.base_overrides:
        if name not in model.cfg.base_overrides:
            model.cfg.base_overrides.append(name)
    return _copy_strict(model, weights, "a checkpoint this run can start from (model.init_weights)")
