"""The production geometry (LLaVA-1.5-7B + SAM ViT-H, bf16, random weights) run for real on a CPU host.

    flock /tmp/ppcr-heavy.lock python benchmarks/realsize_cpu.py --json realsize.json   # ~10 min, ~17 GB
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


def run_config(smoke: bool):
    from ppcr.config import load_config

    if smoke:  # the same code at the tiny preset's sizes, in the production dtype
        return load_config("tiny", overrides={"model": {"dtype": "bfloat16"}})
    return load_config("llava-1.5-7b")


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


def time_stages(model, calls: dict[str, list[float]]) -> None:
    """Time each stage of the requests themselves (instance attributes over the methods), so the stage
    timings cost no extra model work: `calls[stage]` gets one duration per call."""
    for stage, (owner, method) in STAGES.items():
        obj = model if owner == "model" else getattr(model, owner)
        inner = getattr(type(obj), method).__get__(obj)

        def timed(*args, _inner=inner, _stage=stage, **kwargs):
            t0 = time.perf_counter()
            out = _inner(*args, **kwargs)
            calls.setdefault(_stage, []).append(time.perf_counter() - t0)
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


# ----------------------------------------------------------------------------- the parent


def load_capacity():
    spec = importlib.util.spec_from_file_location("capacity", REPO / "deploy/capacity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["capacity"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run_phase(name: str, smoke: bool) -> dict:
    """A phase in a child process (its own memory peak); in --smoke, in this process (the tiny preset's
    figures are not what it checks, and two fewer torch imports keep it under a minute)."""
    if smoke:
        return (phase_sam if name == "sam" else phase_model)(smoke)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "phase.json"
        cmd = [sys.executable, __file__, "--phase", name, "--phase-out", str(out)] + (
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
    p.add_argument("--phase", choices=["sam", "model"], help=argparse.SUPPRESS)
    p.add_argument("--phase-out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase:
        rec = (phase_sam if a.phase == "sam" else phase_model)(a.smoke)
        a.phase_out.write_text(json.dumps(rec))
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


if __name__ == "__main__":
    main()
