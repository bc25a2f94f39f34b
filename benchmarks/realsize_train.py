"""One ZeRO-2 training step at real width on a CPU host: LLaVA-1.5-7B widths (4096 hidden, 32064 vocabulary
rows) with a few language layers, CLIP ViT-L/336 and SAM ViT-H whole, bf16, gradient checkpointing,
micro-batch 1, world size 1; memory per item against deploy/capacity.py's `train_gpu_gb`, fitted per language
layer and extrapolated to 32.

    flock -x /tmp/ppcr-heavy.lock python benchmarks/realsize_train.py --layers 4 8 --json train.json  # ~10 min
    python benchmarks/realsize_train.py --smoke      # the tiny preset in bf16 with the same code (< 1 min)

Each depth runs in its own process, through the distributed job's own code (ppcr/distributed_train.py's
worker): `PPCRModel(cfg.model)`, `trainable_groups`, `deepspeed.initialize` with `deepspeed_config(cfg)` (the
shipped configs/deepspeed/zero2.yaml: stage 2, contiguous gradients, overlap_comm, 5e8-element buckets, bf16
with fp32 masters, torch AdamW), then `compute_loss(..., forward=engine)`, `engine.backward`, `engine.step`,
on a gloo process group of one rank (DS_ACCELERATOR=cpu). What differs from `ppcr train` on Ray Train: no Ray
Train worker actor and no Ray Data shard (the micro-batch is `collate` of one scikit-image photograph with a
mask and box, instead of `RowsToBatch` of a prepared shard row); torch.distributed is initialised by
deepspeed.init_distributed here, by Ray Train's TorchConfig there (both gloo on CPU).

Memory is the process's RSS growth (VmHWM reset before each step, /proc/self/clear_refs): the weights
(model built), the optimizer's start (after deepspeed.initialize: fp32 masters, flat bf16 groups), the
first step's peak over the RSS before it (activations, SAM's encoder, gradients, buckets, Adam moments
created at the first step) and the RSS after it (what stays: Adam m and v, gradient partitions, buckets).
The SAM encoder's part is measured alone in the same process (one encode, no grad) before the step.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
LLAVA_HF_VOCAB_ROWS = 32064


def say(msg: str) -> None:
    print(msg, flush=True)


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_config(layers: int, smoke: bool):
    from ppcr.config import load_config

    dist = {"num_workers": 1, "micro_batch_size": 1, "use_gpu": False, "cpus_per_worker": os.cpu_count() or 1}
    train = {"steps": 10, "batch_size": 1, "warmup_steps": 1}
    if smoke:
        model = {"dtype": "bfloat16", "gradient_checkpointing": True}
        return load_config("tiny", overrides={"model": model, "train": train, "distributed": dist})
    model = {"language": {"num_layers": layers, "vocab_size": LLAVA_HF_VOCAB_ROWS}}
    return load_config("llava-1.5-7b", overrides={"model": model, "train": train, "distributed": dist})


def phase(layers: int, smoke: bool) -> dict:
    """One depth: build, deepspeed.initialize, a SAM encode alone, two steps (the first allocates)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + layers))
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    import random

    import numpy as np
    import torch
    from skimage import data

    cpu = load_module("realsize_cpu", REPO / "benchmarks/realsize_cpu.py")
    import deepspeed

    from ppcr.distributed_train import deepspeed_config
    from ppcr.inputs import Item, collate
    from ppcr.model import PPCRModel
    from ppcr.train import compute_loss, trainable_groups

    warnings.simplefilter("ignore")
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = run_config(layers, smoke)
    rec: dict = {"layers": cfg.model.language.num_layers, "rss_start_gb": cpu.rss_gb()}
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    with cpu.step(rec, "build"):
        model = PPCRModel(cfg.model)
    rec["params"] = sum(p.numel() for p in model.parameters())
    rec["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rec["vocab_rows"] = model.mllm.llava.get_input_embeddings().num_embeddings
    groups = [{"params": g} for g in trainable_groups(model)]
    ds = deepspeed_config(cfg)
    rec["deepspeed"] = ds
    with cpu.step(rec, "deepspeed_initialize"):
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
    image = np.ascontiguousarray(data.astronaut()[..., :3])
    mask = np.zeros(image.shape[:2], bool)
    mask[60:400, 140:330] = True
    item = Item(
        0, image, "the person on the left", gt_mask=mask, gt_box=np.array([140.0, 60.0, 330.0, 400.0])
    )
    batch = collate([item], cfg.model.vision.image_size, model.sam_size, model.clip_mode)
    with torch.no_grad(), cpu.step(rec, "sam_encode"):  # SAM's part of the step alone (frozen, no grad)
        model.segmentation.encode(batch.sam_pixels.to(torch.bfloat16))
    rng = random.Random(0)
    for i in (1, 2):
        with cpu.step(rec, f"step_{i}"):
            loss, logs = compute_loss(model, batch, cfg, rng, i - 1, forward=engine)
            engine.backward(loss)
            engine.step()
        rec[f"step_{i}"]["loss"] = float(loss)
        rec[f"step_{i}"]["logs"] = {k: float(v) for k, v in logs.items()}
    rec["zero_stage"] = engine.zero_optimization_stage()
    rec["process_peak_gb"] = cpu.process_peak_gb()
    return rec


def run_phase(layers: int, smoke: bool) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "phase.json"
        cmd = [sys.executable, __file__, "--phase", str(layers), "--phase-out", str(out)]
        subprocess.run(cmd + (["--smoke"] if smoke else []), check=True)
        return json.loads(out.read_text())


def items(rec: dict) -> dict[str, float]:
    """The measured items (GB), named as train_gpu_gb names them."""
    build, init, s1, s2 = rec["build"], rec["deepspeed_initialize"], rec["step_1"], rec["step_2"]
    weights = build["rss_after_gb"] - build["rss_before_gb"]
    return {
        "weights (RSS after the build)": weights,
        "deepspeed.initialize (fp32 masters + flat groups)": init["rss_after_gb"] - init["rss_before_gb"],
        "first step: what stays (Adam m, v, gradients, buckets)": s1["rss_after_gb"] - s1["rss_before_gb"],
        "second step: peak over its start (activations, SAM, transients)": s2["growth_gb"],
        "SAM encode alone (no grad): peak over its start": rec["sam_encode"]["growth_gb"],
        "process peak minus start": rec["process_peak_gb"] - rec["rss_start_gb"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8], help="language-model depths to run")
    p.add_argument("--smoke", action="store_true", help="the tiny preset in bf16 (its own depth)")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    p.add_argument("--phase", type=int, help=argparse.SUPPRESS)
    p.add_argument("--phase-out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase is not None:
        a.phase_out.write_text(json.dumps(phase(a.phase, a.smoke)))
        return
    depths = [2] if a.smoke else a.layers
    load = os.getloadavg()
    say(f"load average {load[0]:.1f}; depths {depths}")
    runs = {}
    for layers in depths:
        say(f"--- {layers} language layers")
        t0 = time.perf_counter()
        rec = run_phase(layers, a.smoke)
        rec["wall_s"] = time.perf_counter() - t0
        runs[layers] = rec
        for k, v in items(rec).items():
            say(f"  {k:<68} {v:6.2f} GB")
        say(
            f"  build {rec['build']['seconds']:.0f} s, step 1 {rec['step_1']['seconds']:.0f} s, step 2 "
            f"{rec['step_2']['seconds']:.0f} s (loss {rec['step_2']['loss']:.3f}); process peak "
            f"{rec['process_peak_gb']:.2f} GB; {rec['trainable'] / 1e6:.1f} M trainable of {rec['params'] / 1e9:.2f} B"
        )
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_average_start": load,
        "load_average_end": os.getloadavg(),
        "runs": runs,
    }
    if not a.smoke and len(depths) >= 2:
        result["fit"] = fit(runs)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
        say(f"wrote {a.json}")


def fit(runs: dict[int, dict]) -> dict:
    """Each measured item as a + b x layers through the two depths, extrapolated to 32, beside
    capacity.train_gpu_gb of the same depth at world size 1 (less the CUDA context)."""
    capacity = load_module("capacity", REPO / "deploy/capacity.py")
    import yaml

    zero = yaml.safe_load((REPO / "configs/deepspeed/zero2.yaml").read_text())["zero_optimization"]
    (l1, r1), (l2, r2) = sorted(runs.items())[:2]
    m1, m2 = items(r1), items(r2)
    out: dict = {"measured": {}, "computed": {}}
    for k in m1:
        per_layer = (m2[k] - m1[k]) / (l2 - l1)
        out["measured"][k] = {
            str(l1): m1[k],
            str(l2): m2[k],
            "per_layer": per_layer,
            "at_32": m1[k] + per_layer * (32 - l1),
        }
    for layers in (l1, l2, 32):
        c = capacity.parameter_counts(language_layers=layers)
        computed = capacity.train_gpu_gb(c, 1, 1, zero)
        computed.pop("CUDA context and workspaces")
        out["computed"][str(layers)] = computed | {"total": sum(computed.values())}
    say(f"{'item':<68} {'/layer':>7} {'at 32':>7}")
    for k, v in out["measured"].items():
        say(f"{k:<68} {v['per_layer']:>6.3f}G {v['at_32']:>6.2f}G")
    for layers, v in out["computed"].items():
        say(f"train_gpu_gb at {layers} layers, world size 1, no CUDA context: {v['total']:.2f} GB")
        for k, x in v.items():
            say(f"    {k}: {x:.2f} GB")
    return out


if __name__ == "__main__":
    main()
