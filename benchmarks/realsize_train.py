"""One ZeRO-2 training step at real width on a CPU host: LLaVA-1.5-7B widths (4096 hidden, 32064 vocabulary
rows) with a few language layers, CLIP ViT-L/336 and SAM ViT-H whole, bf16, gradient checkpointing,
micro-batch 1, world size 1; memory per item against deploy/capacity.py's `train_gpu_gb`, fitted per language
layer and extrapolated to 32.

    flock -x /tmp/ppcr-heavy.lock python benchmarks/realsize_train.py --layers 4 8 --json train.json  # ~10 min
    flock -x /tmp/ppcr-heavy.lock python benchmarks/realsize_train.py --ray --layers 4 --json ray.json  # ~15 min
    python benchmarks/realsize_train.py --smoke      # both paths on the tiny preset in bf16 (~1-3 min)

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

--ray: the same depths through ppcr's distributed path itself: four scikit-image photographs written as
Parquet shards by `ppcr prepare --format jsonl`'s code, then `ppcr.distributed_train.run_training` on a local
Ray cluster (`ray.init()`): `TorchTrainer` with one worker actor of --threads CPUs, TorchConfig's gloo group,
Ray Data streaming the micro-batches (`training_dataset`, `RowsToBatch`), DeepSpeed ZeRO-2 from the shipped
config, two optimizer steps and the final checkpoint `ppcr train` writes. Inside the worker actor, ppcr's
`train_loop_per_worker` runs unchanged, wrapped so that the model's build, `deepspeed.initialize`, each step
(`compute_loss` to the end of `engine.step`) and the final checkpoint are measured in the actor's own process
(RSS, VmHWM reset before each); the actor writes its numbers to a file that the driver reads back.
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


def model_facts(model) -> dict:
    """Parameter counts and the vocabulary rows built, recorded beside each run's memory."""
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "vocab_rows": model.mllm.llava.get_input_embeddings().num_embeddings,
    }


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
    rec.update(model_facts(model))
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


# ----------------------------------------------------------------------------- through Ray Train


def write_shards(root: Path, photos: int) -> dict:
    """`photos` scikit-image photographs (realsize_cpu's distinct ones) as PNG files, each with one
    expression and a polygon mask in a JSONL manifest, written as shards by `ppcr prepare --format jsonl`'s
    own code (`read_jsonl` + `prepare_custom`) under root/shards/realsize_custom/train/."""
    from PIL import Image

    from ppcr.data.custom import prepare_custom, read_jsonl

    cpu = load_module("realsize_cpu", REPO / "benchmarks/realsize_cpu.py")
    (root / "photos").mkdir(parents=True)
    lines = []
    for i, photo in enumerate(cpu.distinct_photographs(photos)):
        h, w = photo.shape[:2]
        Image.fromarray(photo).save(root / "photos" / f"{i}.png")
        x0, y0, x1, y1 = w // 4, h // 5, 3 * w // 4, 4 * h // 5
        polygon = [[x0, y0, x1, y0, x1, y1, x0, y1]]
        lines.append({"image": f"photos/{i}.png", "expression": "the thing in the middle", "mask": polygon})
    manifest = root / "refs.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    prepare_custom(read_jsonl(manifest, "realsize"), root / "shards", progress=False)
    return {"photos": photos, "expressions": len(lines)}


def ray_config(layers: int, smoke: bool, root: Path, threads: int):
    """run_config's model and schedule, trained from root/shards through Ray Train: one worker of
    `threads` CPUs, a checkpoint only at the last step (as `ppcr train` writes one there)."""
    from ppcr.config import from_dict, to_dict

    base = to_dict(run_config(layers, smoke))
    base["data"].update(
        shards_root=str(root / "shards"), dataset="realsize", split_by="custom", train_split="train"
    )
    base["train"].update(steps=2, log_every=1)
    base["distributed"].update(
        num_workers=1,
        cpus_per_worker=threads,
        data_cpus=1,
        checkpoint_every=1000,
        keep_checkpoints=1,
        max_failures=0,
        storage_path=str(root / "ray"),
        name=f"realsize-{layers}",
    )
    from ppcr.config import RunConfig

    return from_dict(RunConfig, base)


def measured_loop(config: dict, out: str) -> None:
    """Inside the Ray Train worker actor: ppcr's own `train_loop_per_worker`, with the model's build,
    `deepspeed.initialize` and each step (`compute_loss` to the end of `engine.step`) measured in this
    process (RSS, VmHWM reset before each through /proc/self/clear_refs), then the process's own peak
    RSS written to `out` as JSON."""
    os.environ.setdefault(
        "DS_ACCELERATOR", "cpu"
    )  # as train_loop_per_worker sets it, before deepspeed's import
    import deepspeed
    import torch

    import ppcr.distributed_train
    import ppcr.model
    import ppcr.train

    cpu = load_module("realsize_cpu", REPO / "benchmarks/realsize_cpu.py")
    rec: dict = {"pid": os.getpid(), "rss_start_gb": cpu.rss_gb(), "steps": []}
    build, init, loss_fn = ppcr.model.PPCRModel, deepspeed.initialize, ppcr.train.compute_loss
    current: dict = {}

    def built(*args, **kwargs):
        with cpu.step(rec, "build"):
            model = build(*args, **kwargs)
        ppcr.model.PPCRModel = build
        rec.update(model_facts(model))
        rec["gradient_checkpointing"] = bool(
            model.mllm.llava.model.language_model.is_activation_checkpointing
        )
        return model

    def initialized(*args, **kwargs):
        with cpu.step(rec, "deepspeed_initialize"):
            out_ = init(*args, **kwargs)
        deepspeed.initialize = init
        engine = out_[0]
        rec["zero_stage"] = engine.zero_optimization_stage()
        rec["torch_threads"] = torch.get_num_threads()
        engine_step = engine.step

        def stepped(*a, **k):
            result = engine_step(*a, **k)
            peak = cpu.peak_gb()
            rec["steps"].append(
                {
                    "seconds": time.perf_counter() - current["t0"],
                    "rss_before_gb": current["before"],
                    "peak_gb": peak,
                    "growth_gb": peak - current["before"],
                    "rss_after_gb": cpu.rss_gb(),
                    "loss": current["loss"],
                }
            )
            current["after"] = cpu.rss_gb()
            cpu.reset_peak()
            return result

        engine.step = stepped
        return out_

    def loss(*args, **kwargs):
        current.update(before=cpu.rss_gb(), t0=time.perf_counter())
        cpu.reset_peak()
        value, logs = loss_fn(*args, **kwargs)
        current["loss"] = float(value.detach())
        return value, logs

    ppcr.model.PPCRModel, deepspeed.initialize, ppcr.train.compute_loss = built, initialized, loss
    try:
        ppcr.distributed_train.train_loop_per_worker(config)  # this process's module: not the driver's patch
    finally:
        ppcr.train.compute_loss = loss_fn
    peak = cpu.peak_gb()  # since the last step: the final checkpoint (DeepSpeed's + the inference one)
    rec["checkpoint"] = {
        "rss_before_gb": current["after"],
        "peak_gb": peak,
        "growth_gb": peak - current["after"],
    }
    rec["process_peak_gb"] = cpu.process_peak_gb()
    Path(out).write_text(json.dumps(rec))


def phase_ray(layers: int, smoke: bool, threads: int) -> dict:
    """One depth through `ppcr.distributed_train.run_training` (TorchTrainer, Ray Data, a local Ray
    cluster), its worker loop wrapped by `measured_loop`."""
    import ppcr.distributed_train as dt

    cpu = load_module("realsize_cpu", REPO / "benchmarks/realsize_cpu.py")
    with tempfile.TemporaryDirectory(prefix="ppcr-realsize-ray-") as d:
        root = Path(d)
        rec: dict = {"layers": layers, "driver_rss_start_gb": cpu.rss_gb()}
        t0 = time.perf_counter()
        rec["data"] = write_shards(root, 4)
        rec["prepare_seconds"] = time.perf_counter() - t0
        cfg = ray_config(layers, smoke, root, threads)
        rec["layers"] = cfg.model.language.num_layers
        out = root / "worker.json"
        original = dt.train_loop_per_worker

        def loop(config: dict) -> None:  # pickled by value to the worker (this script is __main__)
            measured_loop(config, str(out))

        dt.train_loop_per_worker = loop  # run_training passes it to TorchTrainer
        t0 = time.perf_counter()
        try:
            result = dt.run_training(cfg, out=root / "export")
        finally:
            dt.train_loop_per_worker = original
        rec["run_training_seconds"] = time.perf_counter() - t0
        rec["worker"] = json.loads(out.read_text())
        rec["log"] = [
            json.loads(x) for x in (Path(result.run_dir) / "train_log.jsonl").read_text().splitlines()
        ]
        rec["steps_done"] = result.steps
        rec["exported"] = result.checkpoint is not None and (result.checkpoint / "config.yaml").is_file()
        rec["driver_peak_gb"] = cpu.process_peak_gb()
    import ray

    ray.shutdown()
    return rec


def run_phase(layers: int, smoke: bool, ray_threads: int | None = None) -> dict:
    """One depth in a child process: in process, or (ray_threads: the worker's CPUs) through Ray Train."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "phase.json"
        cmd = [sys.executable, __file__, "--phase", str(layers), "--phase-out", str(out)]
        if ray_threads is not None:
            cmd += ["--ray", "--threads", str(ray_threads)]
        subprocess.run(cmd + (["--smoke"] if smoke else []), check=True)
        return json.loads(out.read_text())


def ray_items(rec: dict) -> dict[str, float]:
    """The worker actor's measured items (GB), named as `items` names the in-process ones."""
    w = rec["worker"]
    build, init, (s1, s2) = w["build"], w["deepspeed_initialize"], w["steps"][:2]
    return {
        "weights (RSS after the build)": build["rss_after_gb"] - build["rss_before_gb"],
        "deepspeed.initialize (fp32 masters + flat groups)": init["rss_after_gb"] - init["rss_before_gb"],
        "first step: what stays (Adam m, v, gradients, buckets)": s1["rss_after_gb"] - s1["rss_before_gb"],
        "second step: peak over its start (activations, SAM, transients)": s2["growth_gb"],
        "final checkpoint (DeepSpeed's + the inference one): peak over its start": w["checkpoint"][
            "growth_gb"
        ],
        "worker process peak minus its RSS at the loop's start": w["process_peak_gb"] - w["rss_start_gb"],
    }


def main_ray(a, depths: list[int]) -> dict:
    """--ray: each depth through Ray Train (TorchTrainer, one worker actor, Ray Data from Parquet shards)."""
    capacity = None if a.smoke else load_module("capacity", REPO / "deploy/capacity.py")
    runs = {}
    for layers in depths:
        say(f"--- {layers} language layers through Ray Train ({a.threads} worker threads)")
        t0 = time.perf_counter()
        rec = run_phase(layers, a.smoke, a.threads)
        rec["wall_s"] = time.perf_counter() - t0
        runs[layers] = rec
        w = rec["worker"]
        for k, v in ray_items(rec).items():
            say(f"  {k:<74} {v:6.2f} GB")
        steps = ", ".join(f"{s['seconds']:.0f} s (loss {s['loss']:.3f})" for s in w["steps"])
        waits = ", ".join(f"{x['data_wait_fraction']:.1%}" for x in rec["log"])
        say(
            f"  worker pid {w['pid']}: ZeRO stage {w['zero_stage']}, {w['torch_threads']} torch threads, "
            f"gradient checkpointing {w['gradient_checkpointing']}; build {w['build']['seconds']:.0f} s, "
            f"deepspeed.initialize {w['deepspeed_initialize']['seconds']:.0f} s, steps {steps}; data wait {waits}"
        )
        say(
            f"  worker peak RSS {w['process_peak_gb']:.2f} GB (start {w['rss_start_gb']:.2f}); driver peak "
            f"{rec['driver_peak_gb']:.2f} GB; run_training {rec['run_training_seconds']:.0f} s; "
            f"{rec['steps_done']} steps, inference checkpoint exported {rec['exported']}"
        )
        if capacity is not None:
            import yaml

            zero = yaml.safe_load((REPO / "configs/deepspeed/zero2.yaml").read_text())["zero_optimization"]
            computed = capacity.train_gpu_gb(capacity.parameter_counts(language_layers=layers), 1, 1, zero)
            computed.pop("CUDA context and workspaces")
            rec["computed"] = computed | {"total": sum(computed.values())}
            measured = w["process_peak_gb"] - w["rss_start_gb"]
            say(
                f"  measured {measured:.2f} GB / train_gpu_gb (no CUDA context) {rec['computed']['total']:.2f} GB"
                f" = {measured / rec['computed']['total']:.2f}"
            )
    return runs


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
    p.add_argument(
        "--ray",
        action="store_true",
        help="through ppcr's distributed path instead: TorchTrainer, one worker actor, Ray Data from "
        "Parquet shards of four photographs (--smoke runs both paths)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)),
        help="with --ray: the worker's CPUs (distributed.cpus_per_worker, its torch threads)",
    )
    p.add_argument("--phase", type=int, help=argparse.SUPPRESS)
    p.add_argument("--phase-out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.threads < 1:
        raise SystemExit(f"--threads must be >= 1; got {a.threads}")
    if a.phase is not None:
        rec = phase_ray(a.phase, a.smoke, a.threads) if a.ray else phase(a.phase, a.smoke)
        a.phase_out.write_text(json.dumps(rec))
        return
    depths = [2] if a.smoke else a.layers
    load = os.getloadavg()
    say(f"load average {load[0]:.1f}; depths {depths}")
    if a.ray and not a.smoke:
        result = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "load_average_start": load,
            "ray_runs": main_ray(a, depths),
            "load_average_end": os.getloadavg(),
        }
        if a.json:
            a.json.write_text(json.dumps(result, indent=2))
            say(f"wrote {a.json}")
        return
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
    if a.smoke:  # the Ray Train path too, so that the slow tier's smoke run covers it
        result["ray_runs"] = main_ray(a, depths)
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
