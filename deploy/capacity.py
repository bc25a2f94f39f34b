"""The capacity plan of docs/capacity.md, computed: parameter counts from the code, the rest from them.

    python deploy/capacity.py            # prints every number docs/capacity.md quotes

Parameter counts come from building the `llava-1.5-7b` preset on the meta device (no weights, no RAM).
Without `mllm_path` the code builds its small offline tokenizer, so the embedding and LM-head matrices
get that tokenizer's rows; the real llava-hf checkpoint has 32064 rows (its `text_config.vocab_size`, which
already covers `<image>`, `<pad>` and our four added tokens, so nothing is resized). Those two matrices are
counted with 32064 rows. Everything else is arithmetic on these counts and on the constants below, each
with its source; tests/test_capacity.py checks that docs/capacity.md quotes what this file computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
GB = 1e9

LLAVA_HF_VOCAB_ROWS = 32064  # llava-hf/llava-1.5-7b-hf config.json: text_config.vocab_size
PROMPT_TOKENS = 650  # 576 image tokens + system prompt, template, expression and answer (~74)
LLM_PASSES = 2  # semantic (LoRA A) and spatial (LoRA B) pass per expression
CUDA_CONTEXT_GB = 1.5  # CUDA context, cuBLAS/NCCL workspaces, allocator slack per process (assumed)
PROCESS_RAM_GB = 3.0  # Python + torch + CUDA libraries of a worker process before weights (assumed)
MFU = 0.40  # model-FLOPs utilisation assumed for the wall-time estimate
SERVE_BATCH = 16  # max_batch_size of serve_configs/llava7b_l20.yaml (checked by the test)


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gb: float
    bf16_tflops: float  # dense tensor-core peak
    fp32_tflops: float  # non-tensor-core peak (SAM is served in float32)


L20 = Gpu("L20", 48.0, 119.5, 59.8)  # NVIDIA L20 datasheet
H200 = Gpu("H200", 141.0, 989.0, 67.0)  # NVIDIA H200 SXM datasheet


@dataclass(frozen=True)
class Counts:
    total: int
    trainable: int
    embed_rows_built: int  # rows the meta build gave embed_tokens / lm_head (offline tokenizer)
    llm_matmul: int  # language-model weights used in matmuls: layers + lm_head (not the embedding lookup)
    llm_layers: int
    hidden: int
    clip: int  # CLIP vision tower
    clip_layers: int
    clip_width: int
    clip_tokens: int
    projector: int
    mllm_replica: int  # what an MLLM serve replica keeps: LLaVA + both LoRA + projection + box head
    sam_encoder: int
    sam: int
    sam_tokens: int
    sam_width: int
    sam_global_blocks: int
    sam_window: int
    sam_window_blocks: int
    sam_heads: int


def parameter_counts() -> Counts:
    """Build the `llava-1.5-7b` preset on the meta device and count, with the real 32064-row vocabulary."""
    import torch

    from ppcr.config import load_config
    from ppcr.model import PPCRModel

    cfg = load_config("llava-1.5-7b").model
    with torch.device("meta"):
        model = PPCRModel(cfg)
    named = dict(model.named_parameters())
    rows = next(p.shape[0] for n, p in named.items() if n.endswith("embed_tokens.weight"))
    h = cfg.language.hidden_size
    extra = (LLAVA_HF_VOCAB_ROWS - rows) * h  # per matrix: embed_tokens and lm_head

    def count(pred) -> int:
        return sum(p.numel() for n, p in named.items() if pred(n))

    total = count(lambda n: True) + 2 * extra
    trainable = sum(p.numel() for p in named.values() if p.requires_grad) + 2 * extra
    lm = count(lambda n: ".language_model." in n and "lora_" not in n and "embed_tokens" not in n)
    lm_head = count(lambda n: n.endswith("lm_head.weight")) + extra
    clip = count(lambda n: ".vision_tower." in n)
    projector = count(lambda n: ".multi_modal_projector." in n)
    encoder = model.segmentation.sam.image_encoder
    windows = [b.window_size for b in encoder.blocks]
    first = encoder.blocks[0].attn
    return Counts(
        total=total,
        trainable=trainable,
        embed_rows_built=rows,
        llm_matmul=lm + lm_head,
        llm_layers=cfg.language.num_layers,
        hidden=h,
        clip=clip,
        clip_layers=cfg.vision.num_layers,
        clip_width=cfg.vision.hidden_size,
        clip_tokens=(cfg.vision.image_size // cfg.vision.patch_size) ** 2 + 1,
        projector=projector,
        mllm_replica=count(lambda n: n.startswith(("mllm.", "semantic.", "spatial."))) + 2 * extra,
        sam_encoder=count(lambda n: n.startswith("segmentation.sam.image_encoder.")),
        sam=count(lambda n: n.startswith("segmentation.")),
        sam_tokens=(cfg.sam.image_size // 16) ** 2,
        sam_width=encoder.patch_embed.proj.out_channels,
        sam_global_blocks=sum(1 for w in windows if w == 0),
        sam_window=max(windows),
        sam_window_blocks=sum(1 for w in windows if w > 0),
        sam_heads=first.num_heads,
    )


# ----------------------------------------------------------------------------- FLOPs


def llm_pass_flops(c: Counts, tokens: int = PROMPT_TOKENS) -> float:
    """One forward pass of the language model: 2·params·tokens + attention (QKᵀ and AV: 4·T²·h per layer)."""
    return 2 * c.llm_matmul * tokens + 4 * c.llm_layers * tokens**2 * c.hidden


def clip_flops(c: Counts) -> float:
    """CLIP-L/336 encode + projector (576 image tokens)."""
    t = c.clip_tokens
    return 2 * c.clip * t + 4 * c.clip_layers * t**2 * c.clip_width + 2 * c.projector * (t - 1)


def sam_encoder_flops(c: Counts) -> float:
    """SAM image encoder on one 1024² image: matmuls + global attention + windowed attention."""
    t, d = c.sam_tokens, c.sam_width
    side = math.isqrt(t)
    padded = math.ceil(side / c.sam_window) * c.sam_window
    windows = (padded // c.sam_window) ** 2
    win_t = c.sam_window**2
    attention = 4 * c.sam_global_blocks * t**2 * d + 4 * c.sam_window_blocks * windows * win_t**2 * d
    return 2 * c.sam_encoder * t + attention


def request_flops(c: Counts) -> float:
    """One request of one image and one expression: two LLM passes, one CLIP and one SAM encode."""
    return LLM_PASSES * llm_pass_flops(c) + clip_flops(c) + sam_encoder_flops(c)


def request_bound(c: Counts, gpu: Gpu) -> float:
    """Requests/s one GPU cannot exceed at 100 % of its bf16 peak (everything in bf16)."""
    return gpu.bf16_tflops * 1e12 / request_flops(c)


def mllm_bound(c: Counts, gpu: Gpu) -> float:
    """Requests/s of a GPU running only the MLLM deployment (bf16)."""
    return gpu.bf16_tflops * 1e12 / (LLM_PASSES * llm_pass_flops(c) + clip_flops(c))


def sam_bound(c: Counts, gpu: Gpu) -> float:
    """Image encodes/s of a GPU running only the SAM deployment in float32 (as served today)."""
    return gpu.fp32_tflops * 1e12 / sam_encoder_flops(c)


def train_expression_flops(c: Counts) -> float:
    """Training FLOPs per expression: the frozen LLM runs forward, again for the checkpoint recompute, and a
    backward that computes activation gradients only (no weight gradients for frozen matrices): 3×
    forward. CLIP and the SAM encoder are frozen and run forward only."""
    return 3 * LLM_PASSES * llm_pass_flops(c) + clip_flops(c) + sam_encoder_flops(c)


def train_hours(c: Counts, steps: int, batch: int, gpus: int, gpu: Gpu = L20, mfu: float = MFU) -> float:
    return steps * batch * train_expression_flops(c) / (gpus * gpu.bf16_tflops * 1e12 * mfu) / 3600


# ----------------------------------------------------------------------------- memory


def deepspeed_buckets_gb(zero: dict) -> float:
    """ZeRO-2's contiguous-gradient buffers: reduce_bucket_size bf16 elements, two of them with overlap_comm."""
    if not zero.get("contiguous_gradients"):
        return 0.0
    return zero["reduce_bucket_size"] * 2 * (2 if zero.get("overlap_comm") else 1) / GB


def train_gpu_gb(c: Counts, gpus: int, micro_batch: int, zero: dict) -> dict[str, float]:
    """Per-GPU memory of ZeRO-2 bf16 training with gradient checkpointing, by item (GB)."""
    t, h = PROMPT_TOKENS, c.hidden
    heads = c.sam_heads
    return {
        "bf16 weights (every rank holds all)": c.total * 2 / GB,
        "ZeRO-2 shard: bf16 grads + fp32 master + Adam m, v": c.trainable * (2 + 12) / gpus / GB,
        "ZeRO-2 gradient buckets": deepspeed_buckets_gb(zero),
        # One bf16 hidden state per layer per pass is kept; one layer is recomputed at a time during
        # backward (≈34·T·h bytes with fused attention); logits are kept in bf16 and fp32 for the CE.
        "activations (checkpoints + one recomputed layer + logits)": micro_batch
        * (
            LLM_PASSES * c.llm_layers * t * h * 2
            + 34 * t * h
            + LLM_PASSES * t * LLAVA_HF_VOCAB_ROWS * (2 + 4)
        )
        / GB,
        # segment_anything materialises the global-attention matrix (heads × T²) and its softmax in bf16.
        "SAM-H encoder peak (no grad)": micro_batch * 2 * heads * c.sam_tokens**2 * 2 / GB,
        "CUDA context and workspaces": CUDA_CONTEXT_GB,
    }


def host_ram_per_worker_gb(c: Counts) -> float:
    """Start-up peak of one training worker or MLLM+SAM process: LLaVA loaded in bf16 on the CPU, SAM built
    in float32 plus its float32 state dict (torch.load) at the same time, plus the process itself."""
    llava = (c.total - c.sam) * 2 / GB
    return llava + 2 * c.sam * 4 / GB + PROCESS_RAM_GB


def mllm_replica_gb(c: Counts, batch: int = SERVE_BATCH) -> float:
    """One MLLM serve replica: bf16 weights + one batch's transient activations and bf16 logits."""
    t, h = PROMPT_TOKENS, c.hidden
    transient = batch * (34 * t * h + t * LLAVA_HF_VOCAB_ROWS * 2)
    return c.mllm_replica * 2 / GB + transient / GB + CUDA_CONTEXT_GB


def sam_replica_gb(c: Counts, cache_images: int) -> float:
    """One SAM serve replica: float32 weights + the embedding cache + one encode's attention peak."""
    embedding = 256 * 64 * 64 * 4  # (256, 64, 64) float32 per cached image
    peak = 2 * c.sam_heads * c.sam_tokens**2 * 4
    return (c.sam * 4 + cache_images * embedding + peak) / GB + CUDA_CONTEXT_GB


def replicas_per_gpu(replica_gb: float, gpu: Gpu = L20) -> int:
    return int(gpu.memory_gb // replica_gb)


# ----------------------------------------------------------------------------- the plan


def plan() -> dict:
    """Every number docs/capacity.md quotes, from the shipped configs and the code."""
    train = yaml.safe_load((REPO / "configs/train/ppcr_llava7b.yaml").read_text())
    zero = yaml.safe_load((REPO / "configs/deepspeed/zero2.yaml").read_text())["zero_optimization"]
    serve = yaml.safe_load((REPO / "serve_configs/llava7b_l20.yaml").read_text())["applications"][0]["args"]
    d, t = train["distributed"], train["train"]
    c = parameter_counts()
    gpus = d["num_workers"]
    mem = {mb: train_gpu_gb(c, gpus, mb, zero) for mb in (1, 2)}
    return {
        "counts": c,
        "gpus": gpus,
        "micro_batch": d["micro_batch_size"],
        "train_gpu_gb": mem,
        "train_gpu_total_gb": {mb: sum(v.values()) for mb, v in mem.items()},
        "host_ram_per_worker_gb": host_ram_per_worker_gb(c),
        "mllm_replica_gb": mllm_replica_gb(c, serve["max_batch_size"]),
        "sam_replica_gb": sam_replica_gb(c, serve["cache_images"]),
        "mllm_per_l20": replicas_per_gpu(mllm_replica_gb(c, serve["max_batch_size"])),
        "sam_per_l20": replicas_per_gpu(sam_replica_gb(c, serve["cache_images"])),
        "tflop": {
            "llm_pass": llm_pass_flops(c) / 1e12,
            "clip": clip_flops(c) / 1e12,
            "sam": sam_encoder_flops(c) / 1e12,
            "request": request_flops(c) / 1e12,
            "train_expression": train_expression_flops(c) / 1e12,
        },
        "req_s": {
            "L20": request_bound(c, L20),
            "H200": request_bound(c, H200),
            "L20 MLLM only": mllm_bound(c, L20),
            "L20 SAM fp32": sam_bound(c, L20),
            "H200 SAM fp32": sam_bound(c, H200),
        },
        "steps": t["steps"],
        "batch": t["batch_size"],
        "train_hours": train_hours(c, t["steps"], t["batch_size"], gpus),
    }


def main() -> None:
    p = plan()
    c: Counts = p["counts"]
    print(f"parameters: total {c.total / 1e6:,.0f} M, trainable {c.trainable / 1e6:,.1f} M")
    print(f"  (meta build's embedding rows {c.embed_rows_built} counted as {LLAVA_HF_VOCAB_ROWS})")
    for mb, items in p["train_gpu_gb"].items():
        print(f"training, per GPU, micro-batch {mb}: {p['train_gpu_total_gb'][mb]:.1f} GB")
        for k, v in items.items():
            print(f"  {k}: {v:.2f} GB")
    print(f"host RAM per worker at start-up: {p['host_ram_per_worker_gb']:.1f} GB")
    print(f"MLLM replica {p['mllm_replica_gb']:.1f} GB -> {p['mllm_per_l20']} per L20")
    print(f"SAM replica {p['sam_replica_gb']:.1f} GB -> {p['sam_per_l20']} per L20")
    for k, v in p["tflop"].items():
        print(f"TFLOP {k}: {v:.1f}")
    for k, v in p["req_s"].items():
        print(f"req/s bound {k}: {v:.1f}")
    print(
        f"wall time {p['steps']} steps x batch {p['batch']} on {p['gpus']} x L20 at {MFU:.0%} MFU: {p['train_hours']:.2f} h"
    )


if __name__ == "__main__":
    main()
