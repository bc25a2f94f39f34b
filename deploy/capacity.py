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
# The part of a prompt every expression of an image shares (BOS, LLaVA-1.5's system prompt ~31 tokens,
# "USER:", 576 image tokens; docs/architecture.md, "Shared prompt prefix"); the rest (~39) is the suffix.
PREFIX_TOKENS = 611
LLM_PASSES = 2  # semantic (LoRA A) and spatial (LoRA B) pass per expression
CUDA_CONTEXT_GB = 1.5  # CUDA context, cuBLAS/NCCL workspaces, allocator slack per process (assumed)
PROCESS_RAM_GB = 3.0  # Python + torch + CUDA libraries of a worker process before weights (assumed)
MFU = 0.40  # model-FLOPs utilisation assumed for the wall-time estimate
SERVE_CONFIG = REPO / "serve_configs/llava7b_l20.yaml"  # the shipped serve limits (also in rayservice.yaml)
# segment_anything's global attention (image_encoder.Attention + add_decomposed_rel_pos) holds three
# heads x T^2 tensors at once: the scores, the scores plus the height term, and that plus the width term
# (then the sum and its softmax). SegmentationStage.encode runs one image per encoder call, so this is
# the encoder's peak per call whatever the batch.
SAM_ATTENTION_COPIES = 3
SAM_EMBEDDING = (
    256,
    64,
    64,
)  # SAM-H image embedding per image; the SAM replica caches it in the encoder's dtype


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gb: float
    bf16_tflops: float  # dense tensor-core peak
    fp32_tflops: float  # non-tensor-core peak (only for the contrast: SAM's encoder is served in bf16)


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
    llm_intermediate: int  # the decoder MLP's width
    clip: int  # CLIP vision tower
    clip_layers: int
    clip_width: int
    clip_tokens: int
    projector: int
    mllm_replica: int  # what an MLLM serve replica keeps: LLaVA + both LoRA + projection + box head
    mllm_replica_fp32: int  # of which float32 by ppcr/precision.py: LoRA, projection, box head
    fp32: int  # float32 parameters of the whole model by the dtype policy (LoRA, heads, SAM prompt enc + decoder)
    sam_encoder: int  # model.dtype (bf16) by the dtype policy
    sam: int  # encoder + prompt encoder + mask decoder (the last two float32)
    sam_tokens: int
    sam_width: int
    sam_global_blocks: int
    sam_window: int
    sam_window_blocks: int
    sam_heads: int


def parameter_counts(language_layers: int | None = None, model: dict | None = None) -> Counts:
    """Build the `llava-1.5-7b` preset on the meta device and count, with the real 32064-row vocabulary.
    language_layers: that many language-model layers instead of the preset's 32 (the real-width training
    benchmark's shallower models); model: overrides of the `model:` section (a training recipe's, e.g. the
    gRefCOCO recipe's attention box head and box slots); everything else at the preset's sizes."""
    import torch

    from ppcr.config import load_config
    from ppcr.model import PPCRModel
    from ppcr.precision import _keeps_float32

    over = {"model": dict(model or {})}
    if language_layers is not None:
        over["model"]["language"] = {"num_layers": language_layers}
    over["model"].pop("mllm_path", None)  # a recipe's weight paths: counted as built, nothing read
    over["model"].pop("sam", None)
    cfg = load_config("llava-1.5-7b", overrides=over).model
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
        llm_intermediate=cfg.language.intermediate_size,
        clip=clip,
        clip_layers=cfg.vision.num_layers,
        clip_width=cfg.vision.hidden_size,
        clip_tokens=(cfg.vision.image_size // cfg.vision.patch_size) ** 2 + 1,
        projector=projector,
        mllm_replica=count(lambda n: n.startswith(("mllm.", "semantic.", "spatial."))) + 2 * extra,
        mllm_replica_fp32=count(
            lambda n: n.startswith(("mllm.", "semantic.", "spatial.")) and _keeps_float32(n)
        ),
        fp32=count(_keeps_float32),
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


def suffix_pass_flops(c: Counts, tokens: int = PROMPT_TOKENS, prefix: int = PREFIX_TOKENS) -> float:
    """One expression's suffix (tokens - prefix of them) against its image's shared prefix: the matmuls of
    the suffix tokens, and their attention to every key (4·S·T·h per layer)."""
    s = tokens - prefix
    return 2 * c.llm_matmul * s + 4 * c.llm_layers * s * tokens * c.hidden


def image_llm_flops(c: Counts, expressions: int, shared: bool = True) -> float:
    """Language-model FLOPs of `expressions` expressions of one image, both passes: with the shared
    prefix, the prefix once per pass and each suffix against it; without, every whole prompt."""
    if not shared or expressions == 1:  # a lone expression runs its whole prompt either way
        return LLM_PASSES * expressions * llm_pass_flops(c)
    return LLM_PASSES * (llm_pass_flops(c, PREFIX_TOKENS) + expressions * suffix_pass_flops(c))


def image_request_flops(c: Counts, expressions: int, shared: bool = True) -> float:
    """FLOPs of one image asked `expressions` expressions: the language model (`image_llm_flops`), one CLIP
    and one SAM encode."""
    return image_llm_flops(c, expressions, shared) + clip_flops(c) + sam_encoder_flops(c)


def request_flops(c: Counts) -> float:
    """One request of one image and one expression: two LLM passes, one CLIP and one SAM encode."""
    return LLM_PASSES * llm_pass_flops(c) + clip_flops(c) + sam_encoder_flops(c)


def request_bound(c: Counts, gpu: Gpu) -> float:
    """Requests/s one GPU cannot exceed at 100 % of its bf16 peak (everything in bf16)."""
    return gpu.bf16_tflops * 1e12 / request_flops(c)


def mllm_bound(c: Counts, gpu: Gpu) -> float:
    """Requests/s of a GPU running only the MLLM deployment (bf16)."""
    return gpu.bf16_tflops * 1e12 / (LLM_PASSES * llm_pass_flops(c) + clip_flops(c))


def sam_bound(c: Counts, gpu: Gpu, tflops: str = "bf16") -> float:
    """Image encodes/s of a GPU running only the SAM deployment: its encoder runs in model.dtype (bf16, as
    served); tflops="fp32" gives the contrast of a float32 encoder."""
    peak = gpu.bf16_tflops if tflops == "bf16" else gpu.fp32_tflops
    return peak * 1e12 / sam_encoder_flops(c)


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
        # One image per encoder call (SegmentationStage.encode): the micro-batch does not multiply it.
        "SAM-H encoder peak (no grad)": sam_attention_peak_gb(c),
        "CUDA context and workspaces": CUDA_CONTEXT_GB,
    }


def sam_attention_peak_gb(c: Counts, dtype_bytes: int = 2) -> float:
    """The SAM encoder's transient peak of one encoder call (one image, `SegmentationStage.encode`):
    SAM_ATTENTION_COPIES tensors of heads x T^2 scores in the encoder's dtype (bf16), ~1.61 GB for ViT-H."""
    return SAM_ATTENTION_COPIES * c.sam_heads * c.sam_tokens**2 * dtype_bytes / GB


def segment_chunk_peak_gb(
    c: Counts, sequences: int, tokens: int = PROMPT_TOKENS, dtype_bytes: int = 2
) -> float:
    """Transient peak of one language pass (no grad, no KV cache) over `sequences` whole prompts of `tokens`
    tokens each: a chunk of `Segmenter.segment_batch` / `PPCRModel.reason(max_sequences=...)` whose images
    differ (no shared prefix). SDPA's fused attention keeps no heads x T^2 scores, so a decoder layer's MLP
    decides: three intermediate-width activations (the gate after its activation, the up projection, their
    product) and six hidden-width ones per token (the embeddings and their copy with the image features
    written in, the residual stream, the normed input, RMSNorm's float32 temporary as two), in the model's
    dtype; the depth does not enter (each layer's activations are freed before the next). Measured at real
    widths: 1.29-1.30 GB for 16 sequences of 703-705 tokens against 1.30 computed (docs/capacity.md)."""
    return sequences * tokens * (3 * c.llm_intermediate + 6 * c.hidden) * dtype_bytes / GB


def sam_input_bytes(c: Counts) -> int:
    """One image's SAM-frame input as `collate` holds it: (3, S, S) float32."""
    side = int(round(c.sam_tokens**0.5)) * 16
    return 3 * side * side * 4


def segment_batch_peak_gb(
    c: Counts, sequences: int, tokens: int = PROMPT_TOKENS, vocab_rows: int | None = None
) -> float:
    """RSS growth of a process that builds the whole model (`Segmenter.from_preset`, bf16) and answers one
    `segment_batch` chunk of `sequences` distinct images, at its peak, over the process before the build:
    the weights held after the build (`llava_weights_gb` + `sam_weights_gb`), the chunk's SAM-frame inputs,
    and the larger of the chunk's language pass (`segment_chunk_peak_gb`) and one image's SAM encode
    (`sam_attention_peak_gb`: the encoder runs one image per call); the build's own peak (SAM in float32,
    `host_ram_random_init_gb`) comes before and is not counted here. No process overhead."""
    held = llava_weights_gb(c, vocab_rows) + sam_weights_gb(c) + sequences * sam_input_bytes(c) / GB
    return held + max(segment_chunk_peak_gb(c, sequences, tokens), sam_attention_peak_gb(c))


def host_ram_random_init_gb(c: Counts, vocab_rows: int | None = None) -> float:
    """Build peak of the whole model from random weights in one process (`Segmenter.from_preset`, no base
    weights): LLaVA built in bf16 from the start (its float32 LoRA and heads), then SAM built in float32
    and cast to bf16 by the dtype policy, both held at once at that moment; no process overhead counted
    (compare with the RSS growth of the build). vocab_rows: rows of the embedding and LM-head matrices
    (None: llava-hf's 32064; a random init without a tokenizer folder has its offline tokenizer's rows)."""
    return llava_weights_gb(c, vocab_rows) + c.sam * 4 / GB


def llava_weights_gb(c: Counts, vocab_rows: int | None = None) -> float:
    """The "mllm" part's weights by the dtype policy: LLaVA in bf16, LoRA, projection and box head in float32.
    vocab_rows: rows of the embedding and LM-head matrices (None: llava-hf's 32064)."""
    rows = LLAVA_HF_VOCAB_ROWS if vocab_rows is None else vocab_rows
    fewer = 2 * (LLAVA_HF_VOCAB_ROWS - rows) * c.hidden  # the counts hold 32064 rows
    non_sam_fp32 = c.fp32 - (c.sam - c.sam_encoder)  # LoRA + heads: the float32 part outside SAM
    return ((c.total - c.sam - non_sam_fp32 - fewer) * 2 + non_sam_fp32 * 4) / GB


def host_ram_per_worker_gb(c: Counts) -> float:
    """Start-up peak of one training worker (it builds the whole model; a serve replica builds only its
    part, `host_ram_replica_gb`, so this bounds it too). PPCRModel
    builds the MLLM first (LLaVA in bf16, its float32 LoRA and heads), then `build_sam` reads the float32 .pth
    (torch.load) and gives its tensors to a SAM built on the meta device (no second, random copy); only
    afterwards does the dtype policy cast the encoder to bf16. That moment is the peak; load_checkpoint's
    safetensors (the trainables, ~0.8 GB) come later, when SAM is already half its float32 size."""
    return llava_weights_gb(c) + c.sam * 4 / GB + PROCESS_RAM_GB


def host_ram_replica_gb(c: Counts) -> dict[str, float]:
    """Host-RAM peak of one serve replica, which builds only its part (load_checkpoint(parts=...)): an
    MLLM replica LLaVA (bf16) with its float32 LoRA and heads; a SAM replica the larger of its start-up
    peak (the float32 .pth's tensors become SAM's own, before the encoder is cast to bf16: 2.56 GB for
    ViT-H) and its peak while it answers (`sam_weights_gb` + `sam_attention_peak_gb`: 2.90 GB), which
    decides: measured at real size on a CPU, the SAM replica peaked during its first encode, not at load
    (docs/capacity.md, "Measured on CPU")."""
    sam = max(c.sam * 4 / GB, sam_weights_gb(c) + sam_attention_peak_gb(c))
    return {"MLLM": llava_weights_gb(c) + PROCESS_RAM_GB, "SAM": sam + PROCESS_RAM_GB}


def prefix_bytes(c: Counts, tokens: int = PREFIX_TOKENS) -> int:
    """One image's shared prefix under one LoRA branch: keys and values of every layer in bf16."""
    return c.llm_layers * 2 * tokens * c.hidden * 2


def mllm_replica_gb(
    c: Counts, sequences_per_forward: int, prefix_cache_images: int = 0, chunk_images: int = 0
) -> float:
    """One MLLM serve replica: weights by the dtype policy (bf16 LLaVA; float32 LoRA, projection and box
    head) + the transient activations and bf16 logits of one language-model forward, which holds at most
    `max_sequences_per_forward` sequences whatever the batch (PPCRModel.reason runs larger batches in chunks)
    + the shared prefixes: both branches of the `prefix_cache_images` kept images, the running branch's
    of the at most `chunk_images` distinct images of a chunk (one branch runs at a time), and one layer's
    keys and values gathered per sequence."""
    t, h = PROMPT_TOKENS, c.hidden
    weights = (c.mllm_replica - c.mllm_replica_fp32) * 2 + c.mllm_replica_fp32 * 4
    transient = sequences_per_forward * (34 * t * h + t * LLAVA_HF_VOCAB_ROWS * 2)
    prefixes = (2 * prefix_cache_images + chunk_images) * prefix_bytes(c)
    gathered = sequences_per_forward * 2 * PREFIX_TOKENS * h * 2
    return (weights + transient + prefixes + gathered) / GB + CUDA_CONTEXT_GB


def sam_embedding_bytes(dtype_bytes: int = 2) -> int:
    """One cached image embedding: the encoder's output, kept in its dtype (bf16) by SAMDeployment."""
    return math.prod(SAM_EMBEDDING) * dtype_bytes


def sam_weights_gb(c: Counts) -> float:
    """SAM's weights by the dtype policy: the encoder in bf16, prompt encoder + mask decoder in float32."""
    return (c.sam_encoder * 2 + (c.sam - c.sam_encoder) * 4) / GB


def sam_replica_gb(c: Counts, cache_images: int) -> float:
    """One SAM serve replica: its weights (`sam_weights_gb`), the bf16 embedding cache, and the global-attention
    peak of one image (`sam_attention_peak_gb`): an encode call of max_batch_size new images runs the encoder
    once per image, so the batch size does not enter."""
    return (
        sam_weights_gb(c)
        + cache_images * sam_embedding_bytes() / GB
        + sam_attention_peak_gb(c)
        + CUDA_CONTEXT_GB
    )


# ----------------------------------------------------------------------------- work per serve call


def load_serve_config(path: Path = SERVE_CONFIG) -> tuple[dict, dict[str, dict]]:
    """(application args, deployment options by name) of a Serve config."""
    app = yaml.safe_load(Path(path).read_text())["applications"][0]
    return app["args"], {d["name"]: d for d in app["deployments"]}


def serve_call(
    c: Counts, args: dict, deployments: dict[str, dict], gpu: Gpu = L20, mfu: float = MFU
) -> dict[str, float]:
    """The work of one MLLM forward and one full @serve.batch call, and a request's worst-case wait.

    A batch is max_batch_size requests of up to max_expressions expressions each: that many sequences, each
    run through the language model twice (LoRA A, LoRA B), in forwards of at most max_sequences_per_forward
    sequences, plus one CLIP encode per request. A replica accepts max_ongoing_requests requests; the one
    admitted last waits for the batch being computed and then for its own batches:
    ceil(max_ongoing_requests / max_batch_size) full batches in the worst case. The SAM encode of the same
    request runs meanwhile on a SAM replica (same rule, max_batch_size images per call); the mask decoder after
    both (a few GFLOP per prompt) is left out. Requests still waiting in a caller's max_queued_requests queue
    (not yet on any replica) are overload: they are answered 503/504, and the autoscaler adds replicas."""
    rate = gpu.bf16_tflops * 1e12 * mfu
    batch, per_request = args["max_batch_size"], args["max_expressions"]
    chunk = args.get("max_sequences_per_forward") or batch * per_request  # absent: the whole batch at once
    sequences = batch * per_request
    forward = min(chunk, sequences) * LLM_PASSES * llm_pass_flops(c)
    full = sequences * LLM_PASSES * llm_pass_flops(c) + batch * clip_flops(c)
    waited = math.ceil(deployments["MLLM"]["max_ongoing_requests"] / batch)
    sam_waited = math.ceil(deployments["SAM"]["max_ongoing_requests"] / batch)
    sam_batch_s = batch * sam_encoder_flops(c) / rate
    worst = max(waited * full / rate, sam_waited * sam_batch_s)
    return {
        "sequences_per_batch": sequences,
        "forwards_per_batch": math.ceil(sequences / chunk),
        "forward_pflop": forward / 1e15,
        "batch_pflop": full / 1e15,
        "forward_s": forward / rate,
        "batch_s": full / rate,
        "batches_waited": waited,
        "sam_batch_s": sam_batch_s,
        "sam_worst_case_s": sam_waited * sam_batch_s,
        "worst_case_s": worst,
        "request_timeout_s": float(args["request_timeout_s"]),
    }


def replicas_per_gpu(replica_gb: float, gpu: Gpu = L20) -> int:
    return int(gpu.memory_gb // replica_gb)


# ----------------------------------------------------------------------------- the plan


def plan() -> dict:
    """Every number docs/capacity.md quotes, from the shipped configs and the code."""
    train = yaml.safe_load((REPO / "configs/train/ppcr_llava7b.yaml").read_text())
    zero = yaml.safe_load((REPO / "configs/deepspeed/zero2.yaml").read_text())["zero_optimization"]
    serve, deployments = load_serve_config()
    d, t = train["distributed"], train["train"]
    c = parameter_counts()
    gpus = d["num_workers"]
    mem = {mb: train_gpu_gb(c, gpus, mb, zero) for mb in (1, 2)}
    # A chunk of a batch holds at most one distinct image per request of the batch.
    chunk_images = min(serve["max_sequences_per_forward"], serve["max_batch_size"])
    replica_args = (serve["max_sequences_per_forward"], serve.get("prefix_cache_images", 4), chunk_images)
    # The gRefCOCO recipe (model.targets multi): its own model section, the same ZeRO-2 config.
    gref = yaml.safe_load((REPO / "configs/train/ppcr_llava7b_grefcoco.yaml").read_text())
    gc = parameter_counts(model=gref["model"])
    gref_mem = train_gpu_gb(
        gc, gref["distributed"]["num_workers"], gref["distributed"]["micro_batch_size"], zero
    )
    return {
        "grefcoco": {
            "counts": gc,
            "train_gpu_gb": gref_mem,
            "train_gpu_total_gb": sum(gref_mem.values()),
            "steps": gref["train"]["steps"],
            "batch": gref["train"]["batch_size"],
            "train_hours": train_hours(gc, gref["train"]["steps"], gref["train"]["batch_size"], gpus),
        },
        "counts": c,
        "gpus": gpus,
        "micro_batch": d["micro_batch_size"],
        "train_gpu_gb": mem,
        "train_gpu_total_gb": {mb: sum(v.values()) for mb, v in mem.items()},
        "host_ram_per_worker_gb": host_ram_per_worker_gb(c),
        "host_ram_replica_gb": host_ram_replica_gb(c),
        "serve": serve,
        "mllm_replica_gb": mllm_replica_gb(c, *replica_args),
        "prefix_gb": prefix_bytes(c) / GB,
        "sam_replica_gb": sam_replica_gb(c, serve["cache_images"]),
        "sam_attention_peak_gb": sam_attention_peak_gb(c),
        "host_ram_random_init_gb": host_ram_random_init_gb(c),
        "mllm_per_l20": replicas_per_gpu(mllm_replica_gb(c, *replica_args)),
        "sam_per_l20": replicas_per_gpu(sam_replica_gb(c, serve["cache_images"])),
        "sam_embedding_mb": sam_embedding_bytes() / 1e6,
        "serve_call": {g.name: serve_call(c, serve, deployments, g) for g in (L20, H200)},
        # The limits shipped before max_sequences_per_forward: 16 x 16 sequences in one forward, 32 ongoing.
        "serve_call_before": serve_call(
            c,
            {**serve, "max_batch_size": 16, "max_expressions": 16, "max_sequences_per_forward": None},
            {**deployments, "MLLM": {**deployments["MLLM"], "max_ongoing_requests": 32}},
        ),
        "serve_call_before_mfu50": serve_call(
            c,
            {**serve, "max_batch_size": 16, "max_expressions": 16, "max_sequences_per_forward": None},
            {**deployments, "MLLM": {**deployments["MLLM"], "max_ongoing_requests": 32}},
            mfu=0.5,
        ),
        "tflop": {
            "llm_pass": llm_pass_flops(c) / 1e12,
            "clip": clip_flops(c) / 1e12,
            "sam": sam_encoder_flops(c) / 1e12,
            "request": request_flops(c) / 1e12,
            "prefix_pass": llm_pass_flops(c, PREFIX_TOKENS) / 1e12,
            "suffix_pass": suffix_pass_flops(c) / 1e12,
            "train_expression": train_expression_flops(c) / 1e12,
        },
        "req_s": {
            "L20": request_bound(c, L20),
            "H200": request_bound(c, H200),
            "L20 MLLM only": mllm_bound(c, L20),
            "L20 SAM bf16": sam_bound(c, L20),
            "H200 SAM bf16": sam_bound(c, H200),
            "H200 SAM fp32 (not served)": sam_bound(c, H200, "fp32"),
        },
        # TFLOP per expression of an image asked k expressions: shared prefix vs every whole prompt.
        "per_expression": {
            k: {share: image_request_flops(c, k, share) / k / 1e12 for share in (False, True)}
            for k in (1, 2, 4, 7, 8)
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
    r = p["host_ram_replica_gb"]
    print(f"host RAM per serve replica, peak: MLLM {r['MLLM']:.1f} GB, SAM {r['SAM']:.1f} GB")
    print(f"MLLM replica {p['mllm_replica_gb']:.1f} GB -> {p['mllm_per_l20']} per L20")
    print(f"  (one image's shared prefix per branch {p['prefix_gb']:.2f} GB in bf16)")
    print(f"SAM replica {p['sam_replica_gb']:.1f} GB -> {p['sam_per_l20']} per L20")
    print(f"  (SAM-H encoder attention peak per image {p['sam_attention_peak_gb']:.2f} GB in bf16)")
    print(f"host RAM to build the whole model from random weights: {p['host_ram_random_init_gb']:.1f} GB")
    print(f"  (cached image embedding {p['sam_embedding_mb']:.1f} MB in bf16)")
    for k, v in p["tflop"].items():
        print(f"TFLOP {k}: {v:.1f}")
    for k, v in p["req_s"].items():
        print(f"req/s bound {k}: {v:.1f}")
    one = p["per_expression"][1][False]
    for k, v in p["per_expression"].items():
        print(
            f"{k} expression(s) of one image: TFLOP per expression {v[False]:.1f} whole prompts, "
            f"{v[True]:.1f} shared prefix ({v[True] / one:.2f}x one expression's)"
        )
    s = p["serve"]
    print(
        f"serve call ({SERVE_CONFIG.name}): max_batch_size {s['max_batch_size']} x max_expressions "
        f"{s['max_expressions']}, max_sequences_per_forward {s['max_sequences_per_forward']}, at {MFU:.0%} MFU"
    )
    for name, v in p["serve_call"].items():
        print(
            f"  {name}: forward of {s['max_sequences_per_forward']} sequences {v['forward_pflop']:.2f} PFLOP "
            f"{v['forward_s']:.1f} s; batch of {v['sequences_per_batch']} sequences ({v['forwards_per_batch']} "
            f"forwards) {v['batch_pflop']:.2f} PFLOP {v['batch_s']:.1f} s; worst case {v['batches_waited']} "
            f"batches {v['worst_case_s']:.1f} s vs request_timeout_s {v['request_timeout_s']:g} s"
        )
    v = p["serve_call"]["L20"]
    print(
        f"  L20 SAM encode call of {s['max_batch_size']} images {v['sam_batch_s']:.2f} s; "
        f"worst case {v['sam_worst_case_s']:.1f} s"
    )
    b = p["serve_call_before"]
    print(
        f"  before (16 x 16 in one forward, 32 ongoing), L20: batch {b['batch_pflop']:.2f} PFLOP "
        f"{b['batch_s']:.1f} s ({p['serve_call_before_mfu50']['batch_s']:.1f} s at 50% MFU); "
        f"worst case {b['batches_waited']} batches {b['worst_case_s']:.1f} s"
    )
    print(
        f"wall time {p['steps']} steps x batch {p['batch']} on {p['gpus']} x L20 at {MFU:.0%} MFU: {p['train_hours']:.2f} h"
    )
    g = p["grefcoco"]
    print(
        f"gRefCOCO recipe: trainable {g['counts'].trainable / 1e6:,.1f} M (attention box head with box slots, "
        f"against {c.trainable / 1e6:,.1f} M with the MLP head), per GPU micro-batch 1 "
        f"{g['train_gpu_total_gb']:.1f} GB, {g['steps']} steps x batch {g['batch']} on {p['gpus']} x L20 "
        f"at {MFU:.0%} MFU: {g['train_hours']:.2f} h"
    )


if __name__ == "__main__":
    main()
