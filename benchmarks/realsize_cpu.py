"""The production geometry (LLaVA-1.5-7B + SAM ViT-H, bf16, random weights) run for real on a CPU host.

    flock /tmp/ppcr-heavy.lock python benchmarks/realsize_cpu.py --json realsize.json   # ~10 min, ~17 GB
    python benchmarks/realsize_cpu.py --batch 16 --layers 2 --json predict.json   # ~6 min, ~6 GB
    flock -x /tmp/ppcr-heavy.lock python benchmarks/realsize_cpu.py --batch 16 --json batch16.json  # ~1 h, ~18 GB
    python benchmarks/realsize_cpu.py --smoke       # the same code on the tiny preset in bf16 (< 1 min)

Two phases, each in its own process so that each has its own memory peak:

  sam    SAM ViT-H alone (`PPCRModel(parts=("sam",))`, what a SAM replica builds): build; encode of 1 and of
         2 images (one encoder call per image, `SegmentationStage.encode`); the mask decoder.
  model  `Segmenter.from_preset(preset)`: build (the "mllm" part, then SAM: split where SAM's build starts);
         one photograph (`segment`); then a `segment_batch` of two distinct photographs; then the stages
         alone: CLIP + the language pass with LoRA A (semantic), the pass with LoRA B (spatial).

Memory is the process's resident set from /proc/self/status: each step resets the peak (VmHWM, through
/proc/self/clear_refs) and reports the peak's growth over the RSS before it; the process's whole peak
(the highest VmHWM over all steps) is the goal's figure: from_preset + one photograph + a batch of two within 20 GB.
Every memory figure stands beside the deploy/capacity.py formula that predicts it (measured / computed).

--batch N: `Segmenter.from_preset` and one `segment_batch` of N <= 16 distinct photographs (one chunk of
`Segmenter.batch_size` expressions per forward at the default 16), every stage call's peak RSS growth
recorded, the process's peak against 20 GB and against `segment_batch_peak_gb`. With --layers L (real widths,
L language layers) only the chunk's `PPCRModel.reason` and one SAM encode run: a few minutes that predict
the full call's peak (the transients do not depend on the depth; the weights of the other layers are added).

FLOP rates divide the stage's FLOPs (capacity.py's formulas with the tokens actually run) by its time and
compare with the CPU's nominal bf16 peak and a measured bf16 matmul rate. Photographs: scikit-image's.
Results: docs/benchmarks.md ("Real size on a CPU") and docs/capacity.md ("Measured on CPU").
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
EXPRESSIONS = ("the person on the left", "the cup of coffee", "the cat's face")


def say(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- measuring


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_gb() -> float:
    return _status_kb("VmRSS") * 1024 / GB


_PEAK_BEFORE_RESETS = [0.0]  # the highest VmHWM seen before any reset


def reset_peak() -> None:
    """Set the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0: clear_refs value 5). The
    kernel's high-water mark is also what getrusage's ru_maxrss reads, so the peak before it is kept."""
    _PEAK_BEFORE_RESETS[0] = max(_PEAK_BEFORE_RESETS[0], peak_gb())
    Path("/proc/self/clear_refs").write_text("5")


def peak_gb() -> float:
    return _status_kb("VmHWM") * 1024 / GB


def process_peak_gb() -> float:
    """The whole process's peak RSS: the highest VmHWM before and since the resets (getrusage's
    ru_maxrss alone would only see the part since the last reset)."""
    rusage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    return max(_PEAK_BEFORE_RESETS[0], peak_gb(), rusage)


@contextlib.contextmanager
def step(record: dict, name: str):
    """Time a step and record its RSS before, its peak and the peak's growth over the RSS before (GB)."""
    before = rss_gb()
    reset_peak()
    t0 = time.perf_counter()
    yield
    seconds = time.perf_counter() - t0
    peak = peak_gb()
    record[name] = {
        "seconds": seconds,
        "rss_before_gb": before,
        "peak_gb": peak,
        "growth_gb": peak - before,
        "rss_after_gb": rss_gb(),
    }
    say(f"  {name}: {seconds:.1f} s, peak RSS {peak:.2f} GB (+{peak - before:.2f} GB over {before:.2f})")


# ----------------------------------------------------------------------------- the machine


def cpu_info() -> dict:
    """Model, cores, clock and the instructions that decide bf16 matmul speed: AMX-BF16 (tile unit),
    AVX-512 BF16 (VDPBF16PS dot products) or only AVX2 (bf16 converted to float32 FMAs)."""
    text = Path("/proc/cpuinfo").read_text()
    first = text.split("\n\n")[0]
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    if "amx_bf16" in flags:
        isa, flop_per_cycle = "AMX-BF16", 2048  # one TMUL: 1024 bf16 multiply-adds per cycle
    elif "avx512_bf16" in flags:
        # Two 512-bit VDPBF16PS per cycle (32 bf16 multiply-adds each): the most any AVX-512 core issues;
        # cores that split 512-bit ops into two 256-bit halves (AMD Zen 4) reach half of it.
        isa, flop_per_cycle = "AVX-512 BF16 (no AMX)", 128
    elif "avx2" in flags:
        isa, flop_per_cycle = "AVX2 only (bf16 computed as float32 FMAs)", 32  # two 256-bit FMAs
    else:
        isa, flop_per_cycle = "no AVX2", 8
    import torch

    cores = torch.get_num_threads()
    mhz = float(fields.get("cpu MHz", "0") or 0)
    return {
        "model": fields.get("model name", platform.processor()),
        "isa": isa,
        "avx2": "avx2" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "threads": cores,
        "cpus": os.cpu_count(),
        "mhz": mhz,
        "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB,
        "nominal_bf16_gflops": cores * mhz * 1e6 * flop_per_cycle / 1e9,
        "flop_per_cycle_per_core": flop_per_cycle,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
    }


def matmul_gflops(seconds: float = 3.0) -> float:
    """Best bf16 GEMM rate over a few (2048 x 4096) @ (4096 x 4096) products: what this CPU gives torch."""
    import torch

    a = torch.randn(2048, 4096, dtype=torch.bfloat16)
    b = torch.randn(4096, 4096, dtype=torch.bfloat16)
    a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * 2048 * 4096 * 4096 / (time.perf_counter() - t0) / 1e9)
    return best


# ----------------------------------------------------------------------------- phases (child processes)


def photographs() -> list:
    """Three scikit-image photographs (RGB uint8): astronaut 512², coffee 400x600, chelsea 300x451."""
    import numpy as np
    from skimage import data

    return [np.ascontiguousarray(f()[..., :3]) for f in (data.astronaut, data.coffee, data.chelsea)]


def distinct_photographs(n: int) -> list:
    """n <= 16 distinct photographs (RGB uint8): scikit-image's astronaut, coffee, chelsea, rocket, Hubble
    deep field, immunohistochemistry, retina and camera (grey, as RGB), then the same eight mirrored."""
    import numpy as np
    from skimage import data

    names = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
    names += ("retina", "camera")
    if not 1 <= n <= 2 * len(names):
        raise SystemExit(f"--batch {n}: this benchmark has 1 to {2 * len(names)} distinct photographs")
    photos = []
    for name in names:
        a = getattr(data, name)()
        photos.append(np.ascontiguousarray(np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a[..., :3]))
    photos += [np.ascontiguousarray(p[:, ::-1]) for p in photos]
    return photos[:n]


def run_config(smoke: bool, layers: int | None = None):
    from ppcr.config import load_config

    if smoke:  # the same code at the tiny preset's sizes, in the production dtype
        return load_config("tiny", overrides={"model": {"dtype": "bfloat16"}})
    if layers is None:
        return load_config("llava-1.5-7b")
    return load_config("llava-1.5-7b", overrides={"model": {"language": {"num_layers": layers}}})


def phase_sam(smoke: bool) -> dict:
    import torch

    from ppcr.inputs import Item, collate
    from ppcr.model import PPCRModel
    from ppcr.precision import dtype_report

    cfg = run_config(smoke).model
    rec: dict = {"rss_start_gb": rss_gb()}
    torch.manual_seed(0)
    with step(rec, "build"):
        model = PPCRModel(cfg, parts=("sam",)).eval()
    rec["params"] = dtype_report(model)
    photos = photographs()
    batch = collate(
        [Item(i, p, "x") for i, p in enumerate(photos[:2])], cfg.vision.image_size, model.sam_size
    )
    with torch.no_grad():
        if smoke:  # first call: oneDNN kernels chosen (at real size one encode is minutes: no warm-up)
            model.segmentation.encode(batch.sam_pixels[:1])
        with step(rec, "encode_1"):
            model.segmentation.encode(batch.sam_pixels[:1])
        with step(rec, "encode_2"):
            emb = model.segmentation.encode(batch.sam_pixels)
        index = torch.tensor([0, 1])
        semantic = torch.randn(2, cfg.prompt_dim)
        box = torch.tensor([[0.1, 0.1, 0.6, 0.7], [0.3, 0.2, 0.9, 0.8]])
        args = (emb, index, semantic, box, batch.original_hw, batch.sam_input_hw)
        model.segment(*args)
        with step(rec, "decode_2"):
            _, iou, masks = model.segment(*args)
    rec["decode_ok"] = bool(all(torch.isfinite(m).all() for m in masks) and torch.isfinite(iou).all())
    rec["process_peak_gb"] = process_peak_gb()
    return rec


STAGES = {
    "clip": ("mllm", "image_features"),  # CLIP tower + projector, once per distinct image
    "llm_lora_a": ("semantic", "forward"),  # the language pass under LoRA A (+ the [SEG] projection)
    "llm_lora_b": ("spatial", "forward"),  # the pass under LoRA B (+ the box head)
    "sam_encode": ("segmentation", "encode"),  # one encoder call per image inside
    "mask_decode": ("model", "_segment_groups"),  # prompt encoder + mask decoder + upscaling
}


def time_stages(model, calls: dict[str, list[float]], memory: dict[str, list[dict]] | None = None) -> None:
    """Time each stage of the requests themselves (instance attributes over the methods), so the stage
    timings cost no extra model work: `calls[stage]` gets one duration per call. With `memory`, each call
    also resets the peak RSS and `memory[stage]` gets its RSS before, peak and growth (GB); the stages
    do not nest, and `step_peak_gb` gives the peak of a step over its stages' resets."""
    for stage, (owner, method) in STAGES.items():
        obj = model if owner == "model" else getattr(model, owner)
        inner = getattr(type(obj), method).__get__(obj)

        def timed(*args, _inner=inner, _stage=stage, **kwargs):
            if memory is not None:
                before = rss_gb()
                reset_peak()
            t0 = time.perf_counter()
            out = _inner(*args, **kwargs)
            calls.setdefault(_stage, []).append(time.perf_counter() - t0)
            if memory is not None:
                peak = peak_gb()
                memory.setdefault(_stage, []).append(
                    {"rss_before_gb": before, "peak_gb": peak, "growth_gb": peak - before}
                )
                reset_peak()
            return out

        setattr(obj, method, timed)


def phase_model(smoke: bool) -> dict:
    import numpy as np
    import torch

    import ppcr.model as model_module
    from ppcr.precision import dtype_report
    from ppcr.predictor import Segmenter
    from ppcr.prompts import clean_expression

    cfg = run_config(smoke)
    rec: dict = {"rss_start_gb": rss_gb()}
    marks: dict = {}
    original = model_module.SegmentationStage

    class Marked(original):  # where the "mllm" part's build ends and SAM's begins
        def __init__(self, *args, **kwargs):
            marks["sam_start"] = (time.perf_counter(), peak_gb(), rss_gb())
            super().__init__(*args, **kwargs)
            marks["sam_end"] = (time.perf_counter(), peak_gb(), rss_gb())

    model_module.SegmentationStage = Marked
    torch.manual_seed(0)
    try:
        with step(rec, "build"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # from_preset's "random weights" warning: known here
            t0, before = time.perf_counter(), rss_gb()
            seg = Segmenter.from_preset(cfg, device="cpu")
    finally:
        model_module.SegmentationStage = original
    (t_sam, peak_mllm, rss_mllm), (_, _, rss_sam_fp32) = marks["sam_start"], marks["sam_end"]
    rec["build_mllm"] = {"seconds": t_sam - t0, "growth_gb": peak_mllm - before, "rss_after_gb": rss_mllm}
    rec["build_sam"] = {
        "seconds": rec["build"]["seconds"] - (t_sam - t0),
        "growth_gb": rec["build"]["peak_gb"] - rss_mllm,
        "float32_gb": rss_sam_fp32 - rss_mllm,  # SAM built in float32, before the dtype policy's cast
        "rss_after_gb": rec["build"]["rss_after_gb"],
    }
    model = seg.model
    rec["params"] = dtype_report(model)
    rec["vocab_rows"] = model.mllm.llava.get_input_embeddings().num_embeddings
    photos = photographs()
    calls: dict[str, list[float]] = {}
    time_stages(model, calls)
    with step(rec, "segment_1"):
        one = seg.segment(photos[0], EXPRESSIONS[0])
    rec["stages_segment_1"] = dict(calls)
    calls.clear()
    distinct = [photos[1], photos[2]]
    with step(rec, "segment_batch_2"):
        two = seg.segment_batch(distinct, list(EXPRESSIONS[1:3]))
    rec["stages_segment_batch_2"] = dict(calls)
    answers = [one, *two]
    rec["answers"] = [
        {"shape": list(a.mask.shape), "mask_pixels": int(a.mask.sum()), "box": [float(v) for v in a.box]}
        for a in answers
    ]
    rec["answers_ok"] = all(
        a.mask.shape == p.shape[:2] and np.isfinite(a.box).all() and np.isfinite(a.score)
        for a, p in zip(answers, [photos[0], *distinct])
    )
    rec["goal_peak_gb"] = process_peak_gb()

    text = clean_expression(EXPRESSIONS[0])
    prompts = model.mllm.prompts
    rec["tokens"] = {
        name: int(prompts.encode([q], a).input_ids.shape[1])
        for name, (q, a) in zip(("lora_a", "lora_b"), prompts.inference_prompts(text))
    }
    rec["process_peak_gb"] = process_peak_gb()
    return rec


def phase_batch(smoke: bool, n: int, layers: int | None) -> dict:
    """`Segmenter.from_preset` and a `segment_batch` of n distinct photographs with n expressions, every
    stage call's peak RSS growth recorded. With `layers` (fewer language layers than the preset, real
    widths: the prediction), the same chunk's `PPCRModel.reason` (CLIP of the n images and both language
    passes over the n sequences) and one SAM encode, instead of the n encodes of the whole call."""
    import torch

    from ppcr.inputs import Item, collate, image_key
    from ppcr.predictor import Segmenter
    from ppcr.prompts import clean_expression

    cfg = run_config(smoke, layers)
    rec: dict = {"rss_start_gb": rss_gb(), "n": n, "layers": cfg.model.language.num_layers}
    torch.manual_seed(0)
    with step(rec, "build"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # from_preset's "random weights" warning: known here
        seg = Segmenter.from_preset(cfg, device="cpu")
    model = seg.model
    rec["batch_size"] = seg.batch_size
    rec["vocab_rows"] = model.mllm.llava.get_input_embeddings().num_embeddings
    photos = distinct_photographs(n)
    if len({image_key(p) for p in photos}) != n:
        raise RuntimeError("the photographs are not distinct")
    rec["photographs"] = [list(p.shape) for p in photos]
    expressions = [EXPRESSIONS[i % len(EXPRESSIONS)] for i in range(n)]
    calls: dict[str, list[float]] = {}
    memory: dict[str, list[dict]] = {}
    time_stages(model, calls, memory)
    name = "segment_batch" if layers is None else "reason"
    before = rss_gb()
    reset_peak()
    t0 = time.perf_counter()
    with torch.no_grad():
        if layers is None:
            answers = seg.segment_batch(photos, expressions)
            rec["answers_ok"] = len(answers) == n and all(
                a.mask.shape == p.shape[:2] and bool(torch.isfinite(torch.as_tensor(a.box)).all())
                for a, p in zip(answers, photos)
            )
        else:
            items = [Item(image_key(p), p, t) for p, t in zip(photos, expressions)]
            batch = collate(items, model.clip_size, model.sam_size, model.clip_mode)
            model.reason(
                batch.clip_pixels,
                batch.image_index,
                batch.expressions,
                batch.original_hw,
                max_sequences=seg.batch_size,
            )
    seconds = time.perf_counter() - t0
    peak = max([peak_gb()] + [m["peak_gb"] for v in memory.values() for m in v])
    rec[name] = {"seconds": seconds, "rss_before_gb": before, "peak_gb": peak, "growth_gb": peak - before}
    rec[name]["rss_after_gb"] = rss_gb()
    say(f"  {name}: {seconds:.1f} s, peak RSS {peak:.2f} GB (+{peak - before:.2f} GB over {before:.2f})")
    if layers is not None:
        with torch.no_grad():
            model.segmentation.encode(batch.sam_pixels[:1])  # SAM's peak: one image per encoder call
    rec["stage_seconds"] = calls
    rec["stage_memory"] = memory
    prompts = model.mllm.prompts
    pairs = [prompts.inference_prompts(clean_expression(e)) for e in expressions]
    rec["tokens"] = {  # (sequences, padded tokens) of each pass's forward
        name: list(prompts.encode([q[k][0] for q in pairs], pairs[0][k][1]).input_ids.shape)
        for k, name in enumerate(("lora_a", "lora_b"))
    }
    for stage, v in memory.items():
        worst = max(v, key=lambda m: m["growth_gb"])
        say(
            f"    {stage:<12} {len(v):>2} calls, {sum(calls[stage]):7.1f} s; largest growth "
            f"{worst['growth_gb']:.2f} GB over {worst['rss_before_gb']:.2f} GB"
        )
    rec["process_peak_gb"] = process_peak_gb()
    return rec


# ----------------------------------------------------------------------------- the parent


def load_capacity():
    spec = importlib.util.spec_from_file_location("capacity", REPO / "deploy/capacity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["capacity"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run_phase(name: str, smoke: bool, extra: tuple[str, ...] = ()) -> dict:
    """A phase in a child process (its own memory peak); in --smoke, in this process (the tiny preset's
    figures are not what it checks, and two fewer torch imports keep it under a minute)."""
    if smoke and name != "batch":
        return (phase_sam if name == "sam" else phase_model)(smoke)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "phase.json"
        cmd = [sys.executable, __file__, "--phase", name, "--phase-out", str(out), *extra] + (
            ["--smoke"] if smoke else []
        )
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def flops(cap, c, rec: dict) -> dict:
    """FLOPs of each timed stage (capacity.py's formulas with the tokens the passes actually ran)."""
    return {
        "clip": cap.clip_flops(c),
        "llm_lora_a": cap.llm_pass_flops(c, rec["tokens"]["lora_a"]),
        "llm_lora_b": cap.llm_pass_flops(c, rec["tokens"]["lora_b"]),
        "sam_encode_1": cap.sam_encoder_flops(c),
    }


def compare(cap, c, sam: dict, model: dict) -> list[tuple[str, float, float]]:
    """(figure, measured GB, computed GB) for every memory figure capacity.py predicts."""
    rows = model["vocab_rows"]
    return [
        (
            "whole build from random weights (RSS growth)",
            model["build"]["growth_gb"],
            cap.host_ram_random_init_gb(c, rows),
        ),
        (
            "  mllm part: LLaVA bf16 + LoRA/heads fp32",
            model["build_mllm"]["growth_gb"],
            cap.llava_weights_gb(c, rows),
        ),
        ("  SAM built in float32 (before the cast)", model["build_sam"]["float32_gb"], c.sam * 4 / GB),
        ("SAM part alone: build peak (float32)", sam["build"]["growth_gb"], c.sam * 4 / GB),
        (
            "SAM part alone: after the cast",
            sam["build"]["rss_after_gb"] - sam["rss_start_gb"],
            cap.sam_weights_gb(c),
        ),
        ("SAM encode, 1 image (transient)", sam["encode_1"]["growth_gb"], cap.sam_attention_peak_gb(c)),
        ("SAM encode, 2 images (transient)", sam["encode_2"]["growth_gb"], cap.sam_attention_peak_gb(c)),
        (
            "goal: process peak (build + 1 photo + batch of 2) minus start RSS",
            model["goal_peak_gb"] - model["rss_start_gb"],
            cap.host_ram_random_init_gb(c, rows),
        ),
    ]


def main_batch(a) -> None:
    """--batch: one process's peak RSS over a `segment_batch` of distinct photographs (or, with --layers,
    its prediction from the same chunk at real widths with few layers), beside capacity.py's formulas."""
    load_start = os.getloadavg()
    if a.reuse_batch is not None:
        result = json.loads(a.reuse_batch.read_text())
        rec = result["batch"]
        if rec["n"] != a.batch or (a.layers is not None and rec["layers"] != a.layers):
            raise SystemExit(
                f"--reuse-batch {a.reuse_batch}: a batch of {rec['n']} at {rec['layers']} layers"
            )
        say(f"segment_batch of {a.batch}: taken from {a.reuse_batch} ({result['command']})")
    else:
        extra = ("--batch", str(a.batch)) + (() if a.layers is None else ("--layers", str(a.layers)))
        say(f"segment_batch of {a.batch} distinct photographs; load average {load_start[0]:.1f}")
        rec = run_phase("batch", a.smoke, extra)
        result = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)),
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
            "preset": "tiny (bf16)" if a.smoke else "llava-1.5-7b",
            "batch": rec,
        }
        if a.json:  # the measurement first: an hour's run is kept whatever the comparison below does
            a.json.write_text(json.dumps(result, indent=2))
    if not a.smoke:
        cap = load_capacity()
        c = cap.parameter_counts(language_layers=rec["layers"])
        seqs, tokens = max(rec["tokens"].values(), key=lambda st: st[1])
        mem = rec["stage_memory"]
        lm = max(m["growth_gb"] for k in ("llm_lora_a", "llm_lora_b") for m in mem[k])
        sam = max(m["growth_gb"] for m in mem["sam_encode"])
        chunk = cap.segment_chunk_peak_gb(c, seqs, tokens)
        result["language_chunk"] = {"measured_gb": lm, "computed_gb": chunk, "ratio": lm / chunk}
        say(
            f"language pass over {seqs} sequences x {tokens} tokens: +{lm:.2f} GB; segment_chunk_peak_gb "
            f"{chunk:.2f} GB ({lm / chunk:.2f}); SAM encode +{sam:.2f} GB; sam_attention_peak_gb "
            f"{cap.sam_attention_peak_gb(c):.2f} GB"
        )
        rows = rec["vocab_rows"]
        full = cap.parameter_counts()
        computed = cap.segment_batch_peak_gb(full, seqs, tokens, rows)
        if a.layers is not None:  # the prediction: the same transients over the 32-layer model's RSS
            deeper = cap.llava_weights_gb(full, rows) - cap.llava_weights_gb(c, rows)
            held = mem["llm_lora_b"][-1]["rss_before_gb"] + deeper
            held_sam = mem["sam_encode"][-1]["rss_before_gb"] + deeper
            peak = max(held + lm, held_sam + sam)
            result["prediction_32_layers"] = {
                "weights_added_gb": deeper,
                "language_peak_gb": held + lm,
                "sam_encode_peak_gb": held_sam + sam,
                "peak_gb": peak,
                "computed_growth_gb": computed,
                "computed_peak_gb": computed + rec["rss_start_gb"],
            }
            say(
                f"PREDICTION at 32 layers (+{deeper:.2f} GB of language layers): the language pass peaks at "
                f"{held + lm:.2f} GB, a SAM encode at {held_sam + sam:.2f} GB: process peak ~{peak:.2f} GB "
                f"({'within' if peak <= 20 else 'OVER'} 20 GB); segment_batch_peak_gb {computed:.2f} GB + the "
                f"process's {rec['rss_start_gb']:.2f} GB = {computed + rec['rss_start_gb']:.2f} GB"
            )
        else:
            growth = rec["segment_batch"]["peak_gb"] - rec["rss_start_gb"]
            result["segment_batch_peak"] = {
                "measured_gb": growth,
                "computed_gb": computed,
                "ratio": growth / computed,
            }
            say(
                f"segment_batch's peak over the process before the build: {growth:.2f} GB; "
                f"segment_batch_peak_gb {computed:.2f} GB ({growth / computed:.2f})"
            )
    goal = rec["process_peak_gb"]
    if a.layers is None:
        goal = max(goal, rec["segment_batch"]["peak_gb"])
        say(
            f"GOAL segment_batch of {rec['n']} distinct photographs ({rec['batch_size']} per forward): "
            f"{rec['segment_batch']['seconds']:.0f} s, process peak RSS {goal:.2f} GB "
            f"({'within' if goal <= 20 else 'OVER'} 20 GB); answers {'ok' if rec['answers_ok'] else 'BAD'}"
        )
    else:
        say(f"process peak RSS {goal:.2f} GB")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
        say(f"wrote {a.json}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny preset in bf16: the same code in < 1 min")
    p.add_argument("--json", type=Path, default=None, help="also write every number here")
    p.add_argument(
        "--only",
        choices=["sam"],
        help="run only the SAM phase (a shorter hold of the machine); pass its --json to --reuse-sam later",
    )
    p.add_argument("--reuse-sam", type=Path, default=None, help="take the SAM phase from this earlier --json")
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="instead: from_preset and one segment_batch of this many distinct photographs (<= 16)",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="with --batch: real widths with this many language layers, the chunk's reason and one SAM "
        "encode only (the cheap prediction of the full call's peak)",
    )
    p.add_argument(
        "--reuse-batch",
        type=Path,
        default=None,
        help="with --batch: take the measurement from this earlier --json",
    )
    p.add_argument("--phase", choices=["sam", "model", "batch"], help=argparse.SUPPRESS)
    p.add_argument("--phase-out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.layers is not None and a.batch is None:
        raise SystemExit("--layers goes with --batch")
    if a.phase:
        if a.phase == "batch":
            rec = phase_batch(a.smoke, a.batch, a.layers)
        else:
            rec = (phase_sam if a.phase == "sam" else phase_model)(a.smoke)
        a.phase_out.write_text(json.dumps(rec))
        return
    if a.batch is not None:
        main_batch(a)
        return

    cpu = cpu_info()
    say(
        f"CPU: {cpu['model']}, {cpu['threads']} threads, {cpu['mhz']:.0f} MHz, {cpu['isa']}; "
        f"torch {cpu['torch']} ({cpu['torch_cpu_capability']}); {cpu['memory_gb']:.1f} GB RAM"
    )
    load_start = os.getloadavg()
    cpu["matmul_bf16_gflops"] = matmul_gflops(1.0 if a.smoke else 3.0)
    say(
        f"bf16 GEMM {cpu['matmul_bf16_gflops']:.0f} GFLOPS measured; nominal peak {cpu['nominal_bf16_gflops']:.0f} "
        f"({cpu['flop_per_cycle_per_core']} FLOP/cycle/core x {cpu['threads']} x {cpu['mhz']:.0f} MHz); "
        f"load average {load_start[0]:.1f}"
    )
    preset = "tiny (bf16)" if a.smoke else "llava-1.5-7b"
    if a.reuse_sam is not None:
        earlier = json.loads(a.reuse_sam.read_text())
        if earlier.get("preset") != preset:
            raise SystemExit(f"--reuse-sam {a.reuse_sam}: preset {earlier.get('preset')!r}, not {preset!r}")
        sam = earlier["sam"]
        say(f"phase sam: taken from {a.reuse_sam} (load average then {earlier['load_average_start'][0]:.1f})")
    else:
        say(f"phase sam ({preset}): SAM part alone")
        sam = run_phase("sam", a.smoke)
    if a.only == "sam":
        result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "cpu": cpu, "preset": preset}
        result.update(load_average_start=load_start, load_average_end=os.getloadavg(), sam=sam)
        if a.json:
            a.json.write_text(json.dumps(result, indent=2))
        return
    say(f"phase model ({preset}): Segmenter.from_preset, one photograph, segment_batch of two, the stages")
    model = run_phase("model", a.smoke)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpu": cpu,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "preset": preset,
        "sam": sam,
        "model": model,
    }
    goal = model["goal_peak_gb"]
    say(
        f"GOAL from_preset + 1 photograph + segment_batch of 2: process peak RSS {goal:.2f} GB "
        f"({'within' if goal <= 20 else 'OVER'} 20 GB); answers {'ok' if model['answers_ok'] else 'BAD'}"
    )
    say(
        f"latency: segment {model['segment_1']['seconds']:.1f} s; segment_batch of 2 "
        f"{model['segment_batch_2']['seconds']:.1f} s; build {model['build']['seconds']:.0f} s "
        f"(mllm {model['build_mllm']['seconds']:.0f} s, SAM {model['build_sam']['seconds']:.0f} s)"
    )
    if not a.smoke:
        cap = load_capacity()
        c = cap.parameter_counts()
        stage_flops = flops(cap, c, model)
        one = model["stages_segment_1"]  # the single request: one call of each stage
        times = {
            "clip": one["clip"][0],
            "llm_lora_a": one["llm_lora_a"][0],
            "llm_lora_b": one["llm_lora_b"][0],
            "sam_encode_1": one["sam_encode"][0],  # in the request: the same process and moment
        }
        result["stages"] = {
            k: {
                "seconds": times[k],
                "tflop": stage_flops[k] / 1e12,
                "gflops": stage_flops[k] / times[k] / 1e9,
                "of_nominal_peak": stage_flops[k] / times[k] / 1e9 / cpu["nominal_bf16_gflops"],
                "of_matmul": stage_flops[k] / times[k] / 1e9 / cpu["matmul_bf16_gflops"],
            }
            for k in times
        }
        say(f"{'stage':<14} {'s':>7} {'TFLOP':>6} {'GFLOPS':>7} {'of peak':>8} {'of GEMM':>8}")
        for k, v in result["stages"].items():
            say(
                f"{k:<14} {v['seconds']:>7.1f} {v['tflop']:>6.2f} {v['gflops']:>7.0f} "
                f"{v['of_nominal_peak']:>8.0%} {v['of_matmul']:>8.0%}"
            )
        say(f"  stages of segment (s): { {k: round(v[0], 1) for k, v in one.items()} }")
        two = model["stages_segment_batch_2"]
        say(f"  stages of segment_batch of 2 (s): { {k: round(sum(v), 1) for k, v in two.items()} }")
        say(
            f"  SAM encode of 2 images {sam['encode_2']['seconds']:.1f} s; mask decode of 2 {sam['decode_2']['seconds']:.2f} s"
        )
        result["memory"] = [
            {"figure": f, "measured_gb": m, "computed_gb": cgb, "ratio": m / cgb}
            for f, m, cgb in compare(cap, c, sam, model)
        ]
        say(f"{'memory figure':<66} {'measured':>9} {'computed':>9} {'ratio':>6}")
        for r in result["memory"]:
            say(f"{r['figure']:<66} {r['measured_gb']:>8.2f}G {r['computed_gb']:>8.2f}G {r['ratio']:>6.2f}")
    else:
        say(
            f"SAM part: encode 1 image {sam['encode_1']['seconds']:.2f} s, 2 images {sam['encode_2']['seconds']:.2f} s"
        )
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
        say(f"wrote {a.json}")
    if a.smoke:  # the --batch mode too, so that the slow tier's smoke run covers it
        main_batch(argparse.Namespace(**{**vars(a), "batch": 4, "json": None}))


if __name__ == "__main__":
    main()
