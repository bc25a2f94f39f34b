"""The dtype policy: which parts of PPCR run in `model.dtype` and which stay float32 (docs/precision.md).

    part                                              dtype         why
    LLaVA: CLIP tower, projector, Llama, lm_head      model.dtype   7B of weights: bf16 halves memory, tensor cores
    LoRA A/B of both branches                         float32       peft's autocast_adapter_dtype (stable updates)
    SAM image encoder (frozen)                        model.dtype   ViT-H is ~5.6 TFLOP per image: bf16 is ~4x fp32
    [SEG] projection, semantic_in, box head           float32       a few M parameters; boxes are regressed in [0, 1]
    SAM prompt encoder + mask decoder                 float32       4 M parameters; its Fourier matrix is a buffer

`apply_dtype_policy` sets these dtypes; the model builder and `load_checkpoint` call it, so training,
evaluation, serving and batch jobs run the same mix. Under DeepSpeed with bf16/fp16 enabled, the engine
casts *every parameter* to that dtype (its ZeRO optimizer keeps the fp32 master copies) and leaves
*buffers* as built (deepspeed 0.19 `_cast_module_mixed_precision`). So no stage may assume a fixed dtype
for its input: every boundary casts to the dtype of the module that receives the tensor
(`module_dtype`), which is right under both regimes.
"""

from __future__ import annotations

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# State-dict prefixes of PPCRModel kept in float32 whatever `model.dtype` says (see the table above).
FLOAT32_PREFIXES = (
    "semantic.",
    "spatial.",
    "segmentation.sam.prompt_encoder.",
    "segmentation.sam.mask_decoder.",
)


def torch_dtype(name: str) -> torch.dtype:
    """`model.dtype` ("float32" | "bfloat16" | "float16") as a torch dtype; ValueError otherwise."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"model.dtype must be one of {', '.join(DTYPES)}; got {name!r}") from None


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of `module`'s first floating-point parameter (what its inputs must be cast to)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    raise ValueError(f"{type(module).__name__} has no floating-point parameters")


def apply_dtype_policy(model: nn.Module, dtype: str) -> nn.Module:
    """Cast a PPCRModel's parameters and floating buffers as the table above says; returns `model`.

    LoRA weights stay float32 (peft keeps adapters fp32 over a bf16 base; they are tiny and trained).
    Buffers follow their module (SAM's Fourier matrix stays float32 with the prompt encoder).
    """
    low = torch_dtype(dtype)
    with torch.no_grad():
        for name, module in model.named_modules():
            for pname, tensor in list(module.named_parameters(recurse=False)) + list(
                module.named_buffers(recurse=False)
            ):
                if tensor is None or not tensor.is_floating_point():
                    continue
                full = f"{name}.{pname}" if name else pname
                target = torch.float32 if _keeps_float32(full) else low
                if tensor.dtype != target:
                    tensor.data = tensor.data.to(target)
    return model


def _keeps_float32(name: str) -> bool:
    return name.startswith(FLOAT32_PREFIXES) or ".lora_A." in name or ".lora_B." in name


def dtype_report(model: nn.Module) -> dict[str, int]:
    """Parameter count per dtype name, e.g. {"bfloat16": 7.06e9, "float32": 2.1e7} (for logs and tests)."""
    counts: dict[str, int] = {}
    for p in model.parameters():
        key = str(p.dtype).removeprefix("torch.")
        counts[key] = counts.get(key, 0) + p.numel()
    return counts


def configure_device(device: str | torch.device) -> torch.device:
    """Backend switches for `device`: on CUDA, float32 matmuls/convolutions run on TF32 tensor cores
    (the float32 heads and SAM decoder: ~8x the FLOPs of strict fp32 on Ampere/Hopper, 10-bit mantissa
    products with fp32 accumulation, as PyTorch's "high" precision documents). Returns the device."""
    device = torch.device(device)
    if device.type == "cuda":
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9; mixing APIs is an error
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            torch.backends.cudnn.conv.fp32_precision = "tf32"
        else:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
    return device
