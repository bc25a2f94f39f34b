"""GPU check of the production path: the real-size architecture (LLaVA-1.5-7B sizes + SAM ViT-H) with
random weights built on the GPU, in bf16 under the dtype policy (docs/precision.md). One run prints:

  1. training: ~10 bf16 steps of the real loss (`ppcr.train.compute_loss`) over the real trainable set
     (LoRA A/B, embed_tokens, lm_head, projection, box head, SAM mask decoder), through DeepSpeed ZeRO-2
     when `deepspeed` imports (else torch AdamW, `ppcr.train.train_step`): step time, peak GPU memory,
     loss finite;
  2. `Segmenter` latency per request (one image, one expression);
  3. batched inference throughput (requests/s at batch 1 / 8 / 32, distinct images) and its ratio to
     the FLOP bound: FLOPs per request are counted from the model's own matmul parameters and the tokens
     each pass actually ran (≈ 23 TFLOP: 2 LLaVA-7B passes of ~650 tokens + CLIP-L/336 + SAM-H encode),
     against the GPU's dense bf16 peak (H200 989 TFLOPS, L20 119.5).

    python benchmarks/gpu_check.py                  # real size on cuda (no downloads, no network)
    python benchmarks/gpu_check.py --tiny           # the same code, tiny preset on CPU (< 2 min; tested)
    python benchmarks/gpu_check.py --smoke          # --tiny, 2 steps, batches 1 and 2 (< 1 min on 2 cores)
    python benchmarks/gpu_check.py --json out.json  # also write the numbers

It needs torch, transformers, peft, segment-anything, pycocotools and scikit-image (the photographs);
deepspeed and ray are optional. The Ray layers (Train, Serve) only orchestrate this same model code: with
ray installed, `--ray-train` also runs one Ray Train + DeepSpeed job of a few steps on synthetic shards;
without ray the script says so and skips it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ppcr.config import RunConfig, load_config
from ppcr.inputs import Item, collate
from ppcr.model import PPCRModel
from ppcr.precision import apply_dtype_policy, configure_device, dtype_report
from ppcr.predictor import Segmenter

# Dense bf16 tensor-core peaks (datasheets), matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "L20": 119.5, "A100": 312.0, "L40S": 362.0}
LLAVA_HF_VOCAB_ROWS = 32064  # llava-hf/llava-1.5-7b-hf: text_config.vocab_size
EXPRESSIONS = ("the person on the left", "the cup of coffee", "the cat's face", "the rocket on the pad")


def say(msg: str) -> None:
    print(msg, flush=True)


def photographs() -> list[np.ndarray]:
    """Real photographs shipped inside scikit-image (RGB uint8)."""
    from skimage import data

    return [
        np.ascontiguousarray(f()[..., :3]) for f in (data.astronaut, data.coffee, data.chelsea, data.rocket)
    ]


def distinct(image: np.ndarray, i: int) -> np.ndarray:
    """A copy that differs in one pixel, so the Segmenter's content hash encodes it again."""
    out = image.copy()
    out[0, 0, 0] = (int(out[0, 0, 0]) + i) % 256
    return out


def run_config(tiny: bool, micro_batch: int, extra: dict | None = None) -> RunConfig:
    """The preset under test: llava-1.5-7b sizes with random weights (no paths), or tiny; bf16.
    `extra`: further overrides, merged on top."""
    if tiny:
        over = {"model": {"dtype": "bfloat16"}}
    else:
        # Random init from sizes; 32064 embedding rows as the llava-hf checkpoint has.
        over = {
            "model": {"mllm_path": None, "dtype": "bfloat16", "language": {"vocab_size": LLAVA_HF_VOCAB_ROWS}}
        }
    over["train"] = {"steps": 1000, "batch_size": micro_batch, "warmup_steps": 2}
    over["distributed"] = {"num_workers": 1, "micro_batch_size": micro_batch}
    for key, value in (extra or {}).items():
        over[key] = {**over.get(key, {}), **value}
    return load_config("tiny" if tiny else "llava-1.5-7b", overrides=over)


def build(cfg: RunConfig, device: torch.device) -> PPCRModel:
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU (LLaVA in bf16 from the start: mllm.build_llava)
        model = PPCRModel(cfg.model)
    return model.to(device)


def training_items(images: list[np.ndarray], n: int) -> list[Item]:
    """n expressions with a ground truth: the central box of each photograph as mask and box."""
    items = []
    for i in range(n):
        img = images[i % len(images)]
        h, w = img.shape[:2]
        box = np.array([w * 0.25, h * 0.25, w * 0.75, h * 0.75])
        mask = np.zeros((h, w), dtype=bool)
        mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = True
        items.append(Item(i % len(images), img, EXPRESSIONS[i % len(EXPRESSIONS)], mask, box))
    return items


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def deepspeed_engine(model: PPCRModel, cfg: RunConfig, device: torch.device):
    """A world-size-1 DeepSpeed ZeRO-2 engine with the job's own config (`deepspeed_config`)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    import deepspeed

    from ppcr.distributed_train import deepspeed_config
    from ppcr.train import trainable_groups

    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29517",
        "RANK": "0",
        "WORLD_SIZE": "1",
    }.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    groups = [{"params": g} for g in trainable_groups(model)]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=deepspeed_config(cfg))
    return engine


def check_training(model: PPCRModel, cfg: RunConfig, device: torch.device, steps: int, use_ds: bool) -> dict:
    from ppcr.train import build_optimizer, compute_loss, train_step

    images = photographs()
    batch = collate(training_items(images, cfg.train.batch_size), model.clip_size, model.sam_size).to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rng = random.Random(0)
    engine = deepspeed_engine(model, cfg, device) if use_ds else None
    optimizer = None if use_ds else build_optimizer(model, cfg.train)[0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(steps):
        sync(device)
        t0 = time.perf_counter()
        if engine is not None:
            loss, logs = compute_loss(model, batch, cfg, rng, step, forward=engine)
            engine.backward(loss)
            engine.step()
        else:
            logs = train_step(model, batch, cfg, optimizer, rng, step)
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(logs["loss"])
        say(f"  step {step + 1}/{steps}: loss {logs['loss']:.4f} ({times[-1]:.2f} s)")
    result = {
        "optimizer": "deepspeed ZeRO-2" if engine is not None else "torch AdamW",
        "micro_batch": cfg.train.batch_size,
        "trainable_params": trainable,
        "step_s_median": statistics.median(times[1:] or times),  # the first step pays for allocation
        "peak_gpu_gb": peak_gb(device),
        "losses": losses,
        "loss_finite": all(np.isfinite(x) for x in losses),
    }
    del engine, optimizer
    model.zero_grad(set_to_none=True)
    apply_dtype_policy(model, cfg.model.dtype)  # DeepSpeed cast the float32 heads to bf16: undo for inference
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


@contextlib.contextmanager
def count_tokens(model: PPCRModel):
    """Record the (sequences, tokens) of every language-model forward inside the block."""
    seen: list[tuple[int, int]] = []
    language = model.mllm.language

    def wrapped(batch, *args, **kwargs):
        seen.append(tuple(batch.input_ids.shape))
        return language(batch, *args, **kwargs)

    model.mllm.language = wrapped
    try:
        yield seen
    finally:
        del model.mllm.language  # back to the bound method


def flops_per_request(model: PPCRModel, llm_tokens_per_request: float) -> float:
    """Matmul FLOPs (2 × parameters × tokens) of one request: the language-model passes over the tokens
    they ran, the CLIP tower over its patches, SAM's encoder over its 64×64 tokens (attention scores are
    left out: a few % at these lengths)."""
    llava = model.mllm.llava
    lm = sum(p.numel() for n, p in llava.model.language_model.named_parameters() if "embed_tokens" not in n)
    clip = sum(p.numel() for p in llava.model.vision_tower.parameters())
    vc = llava.config.vision_config
    clip_tokens = (vc.image_size // vc.patch_size) ** 2 + 1
    enc = model.segmentation.sam.image_encoder
    sam = sum(p.numel() for p in enc.parameters())
    sam_tokens = (model.sam_size // enc.patch_embed.proj.kernel_size[0]) ** 2
    return 2 * lm * llm_tokens_per_request + 2 * clip * clip_tokens + 2 * sam * sam_tokens


def check_inference(model: PPCRModel, device: torch.device, batches: list[int], repeats: int) -> dict:
    model.eval()
    images = photographs()
    seg = Segmenter(model, batch_size=max(batches))
    seg.segment(images[0], EXPRESSIONS[0])  # warm-up (kernels, allocator)
    latency = []
    for r in range(repeats):
        img = distinct(images[r % len(images)], r + 1)
        sync(device)
        t0 = time.perf_counter()
        mask, box, score, _ = seg.segment(img, EXPRESSIONS[r % len(EXPRESSIONS)])
        sync(device)
        latency.append(time.perf_counter() - t0)
        assert mask.shape == img.shape[:2] and np.isfinite(box).all() and np.isfinite(score)
    with count_tokens(model) as seen:
        seg.segment(distinct(images[0], 999), EXPRESSIONS[0])
    tokens = sum(b * t for b, t in seen)
    flops = flops_per_request(model, tokens)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    throughput = {}
    for b in batches:
        imgs = [distinct(images[i % len(images)], 1000 + i) for i in range(b)]
        exprs = [EXPRESSIONS[i % len(EXPRESSIONS)] for i in range(b)]
        seg.segment_batch(imgs[:1], exprs[:1])
        times = []
        for _ in range(max(1, repeats // 2)):
            sync(device)
            t0 = time.perf_counter()
            seg.segment_batch(imgs, exprs)
            sync(device)
            times.append(time.perf_counter() - t0)
        rps = b / statistics.median(times)
        achieved = rps * flops / 1e12
        throughput[b] = {
            "requests_per_s": rps,
            "achieved_tflops": achieved,
            "fraction_of_flop_bound": achieved / peak if peak else None,
        }
    return {
        "device_name": name,
        "peak_bf16_tflops": peak,
        "latency_ms_median": 1000 * statistics.median(latency),
        "llm_tokens_per_request": tokens,
        "tflop_per_request": flops / 1e12,
        "flop_bound_requests_per_s": peak / (flops / 1e12) if peak else None,
        "throughput": throughput,
    }


def check_ray_train(tiny: bool, device: torch.device) -> dict:
    """One Ray Train + DeepSpeed job (1 worker, 3 steps) of the same preset on synthetic shards."""
    import ray

    from ppcr.data.shards import prepare_shards
    from ppcr.data.synth import SynthConfig, synthesize
    from ppcr.distributed_train import run_training

    with tempfile.TemporaryDirectory(prefix="ppcr-gpu-check-") as d:
        s = synthesize(Path(d) / "refer", SynthConfig(num_images=8, seed=0))
        prepare_shards(
            s["refer_root"], s["images_dir"], "synthref", "unc", Path(d) / "shards", progress=False
        )
        extra = {
            "data": {"shards_root": str(Path(d) / "shards"), "dataset": "synthref"},
            "train": {"steps": 3, "log_every": 1},
            "distributed": {
                "use_gpu": device.type == "cuda",
                "storage_path": str(Path(d) / "runs"),
                "checkpoint_every": 3,
            },
        }
        cfg = run_config(tiny, 2, extra)
        try:
            result = run_training(cfg)
        finally:
            ray.shutdown()
        return {"steps": result.steps, "loss": result.metrics.get("loss")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny preset on CPU (the same code, < 2 min)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    p.add_argument("--steps", type=int, default=10, help="training steps")
    p.add_argument("--micro-batch", type=int, default=2, help="expressions per training step (paper: 2)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="inference batch sizes")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--no-deepspeed", action="store_true", help="torch AdamW even if deepspeed imports")
    p.add_argument("--ray-train", action="store_true", help="also run a 3-step Ray Train job (needs ray)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="check that it runs, on CPU without a GPU (< 1 min on 2 cores): --tiny, 2 steps, batches 1 and 2",
    )
    a = p.parse_args(argv)
    if a.smoke:
        a.tiny, a.steps, a.batches, a.repeats = True, 2, [1, 2], 1
    device = configure_device(a.device or ("cpu" if a.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible (use --tiny for the CPU run)")
    versions = {
        m: getattr(importlib.import_module(m), "__version__", "?") for m in ("torch", "transformers", "peft")
    }
    has_ds = importlib.util.find_spec("deepspeed") is not None and not a.no_deepspeed
    has_ray = importlib.util.find_spec("ray") is not None
    say(
        f"gpu_check: device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}); {versions}"
    )
    say(f"  deepspeed: {'used' if has_ds else 'not used (not installed or --no-deepspeed): torch AdamW'}")
    out: dict = {"device": str(device), "versions": versions, "preset": "tiny" if a.tiny else "llava-1.5-7b"}

    cfg = run_config(a.tiny, a.micro_batch)
    t0 = time.perf_counter()
    model = build(cfg, device)
    out["build_s"] = time.perf_counter() - t0
    out["params_by_dtype"] = dtype_report(model)
    say(f"built {out['preset']} (random weights) in {out['build_s']:.1f} s: {out['params_by_dtype']}")

    say(f"training {a.steps} steps, micro-batch {a.micro_batch}, bf16:")
    out["training"] = check_training(model, cfg, device, a.steps, has_ds)
    tr = out["training"]
    peak = f", peak GPU memory {tr['peak_gpu_gb']:.1f} GB" if tr["peak_gpu_gb"] is not None else ""
    say(
        f"  {tr['optimizer']}: {tr['trainable_params'] / 1e6:.1f} M trainable, {tr['step_s_median']:.3f} s/step"
        f"{peak}, loss finite: {tr['loss_finite']}"
    )

    say("inference (Segmenter, bf16):")
    out["inference"] = inf = check_inference(model, device, a.batches, a.repeats)
    say(f"  latency per request: {inf['latency_ms_median']:.1f} ms (median)")
    say(f"  {inf['tflop_per_request']:.2f} TFLOP per request ({inf['llm_tokens_per_request']} LLM tokens)")
    for b, r in inf["throughput"].items():
        frac = r["fraction_of_flop_bound"]
        ratio = f", {100 * frac:.1f}% of the bf16 FLOP bound" if frac is not None else ""
        say(
            f"  batch {b:>3}: {r['requests_per_s']:.2f} requests/s ({r['achieved_tflops']:.1f} TFLOPS{ratio})"
        )
    if inf["flop_bound_requests_per_s"] is not None:
        say(
            f"  FLOP bound: {inf['flop_bound_requests_per_s']:.1f} requests/s at {inf['peak_bf16_tflops']} TFLOPS"
        )

    if not has_ray:
        say(
            "ray: not installed here: the Ray Train and Serve layers are skipped (they orchestrate this same code)"
        )
        out["ray_train"] = "skipped: ray not installed"
    elif not a.ray_train:
        say(
            "ray: installed; Ray Train run not requested (--ray-train); Serve: tests/test_serve.py, benchmarks/serve_bench.py"
        )
        out["ray_train"] = "not requested"
    else:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        say("ray train: 1 worker, 3 steps on synthetic shards:")
        out["ray_train"] = check_ray_train(a.tiny, device)
        say(f"  {out['ray_train']}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2, default=str))
    ok = tr["loss_finite"]
    say("gpu_check: OK" if ok else "gpu_check: FAILED (non-finite loss)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
