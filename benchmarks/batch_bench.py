"""The Ray Data batch job (ppcr.batch.run_batch) side by side with a plain single-process loop,
on the tiny preset (random weights: speed does not depend on them) and a RefCOCO-like manifest.

    python benchmarks/batch_bench.py [--images 100] [--ratio 7] [--scale 5] [--cpus 4] [--mllm-actors 2]
    python benchmarks/batch_bench.py --smoke   # < 1 min: 2 images x 2 expressions, the N run only

Measures, in one run:
- throughput of the batch job at N and scale×N rows, and its marginal throughput between them
  ((5N − N) rows / (T(5N) − T(N)): cluster and actor start-up cancel out);
- throughput of a plain loop (`Segmenter.segment_batch` in chunks, RLE-encode, write Parquet) over the
  same N and 5N rows (one torch thread by default, see --plain-threads);
- the ideal: cores ÷ CPU-seconds per row of the pipeline's own stage functions, run in-process on one
  thread (decode + preprocess, MLLM, SAM with RLE);
- peak memory (PSS summed over the driver and every Ray process) during the N and the 5N job, and
  the CPU-seconds those processes used: ideal CPU-s per row ÷ the job's marginal CPU-s per row is its
  efficiency whatever else loads the machine;
- encoder reuse: the same N rows where each expression has its own copy of the image (so nothing is
  shared), vs the manifest where 1 image carries `ratio` expressions.
Prints a JSON line and the Markdown rows of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from ppcr.batch import (
    BatchConfig,
    MLLMActor,
    SAMActor,
    StageConfig,
    decode_f32,
    decode_stage,
    group_by_image,
    read_manifest,
    run_batch,
)
from ppcr.checkpoint import load_checkpoint, save_checkpoint
from ppcr.config import load_config
from ppcr.data.synth import SynthConfig, synthesize
from ppcr.masks import encode_mask
from ppcr.model import PPCRModel
from ppcr.predictor import Segmenter
from ppcr.ray_cluster import init_ray

# RefCOCO-like lengths (3-10 words).
PHRASES = [
    "left guy",
    "the red circle",
    "man in white shirt on the right",
    "small blue square near the top",
    "the one in the middle",
    "big green triangle at the bottom left of the picture",
    "second object from the right",
]


class ProcessTreeMonitor:
    """Peak summed PSS, and CPU-seconds used, of this process and all its descendants (Ray's raylet,
    workers, actors), sampled every `every_s`. CPU time is what this job used whatever else runs on
    the machine, so CPU-seconds per row measure the pipeline's overhead on a shared machine."""

    def __init__(self, every_s: float = 1.0):
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self.own_cpu = 0.0  # the monitor thread's CPU (reading smaps is not cheap): not the job's
        self._cpu_start: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._names: dict[int, str] = {}

    @property
    def cpu_seconds(self) -> float:
        used = sum(v - self._cpu_start.get(pid, 0.0) for pid, v in self._cpu_last.items())
        return used - self.own_cpu

    def cpu_by_process(self) -> dict[str, float]:
        """CPU-seconds per process title (`ray::MapWorker(MapBatches(MLLMActor))`, `raylet`, ...)."""
        out: dict[str, float] = {}
        for pid, v in self._cpu_last.items():
            name = self._names.get(pid, "?")
            out[name] = round(out.get(name, 0.0) + v - self._cpu_start.get(pid, 0.0), 1)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        first = not self._cpu_last
        for p in [me, *me.children(recursive=True)]:
            try:
                with p.oneshot():
                    total += p.memory_full_info().pss
                    t = p.cpu_times()
                cpu = t.user + t.system
                cmd = p.cmdline()  # Ray retitles workers by what they run; keep the last busy title
                title = cmd[0] if cmd and cmd[0].startswith("ray::") else p.name()
                title = "driver" if p.pid == me.pid else title.split(".")[0][:60]
                if title != "ray::IDLE" or p.pid not in self._names:
                    self._names[p.pid] = title
                if first:  # processes alive at the start count from here, later ones from 0
                    self._cpu_start[p.pid] = cpu
                self._cpu_last[p.pid] = cpu
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _run(self) -> None:
        while True:
            c = time.thread_time()
            self.peak = max(self.peak, self._sample())
            self.own_cpu += time.thread_time() - c
            if self._stop.wait(self.every_s):
                break
        self._sample()  # final CPU times (the monitor's own last sample is negligible)

    def __enter__(self) -> ProcessTreeMonitor:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def write_manifest(path: Path, images: list[Path], ratio: int, copies_dir: Path | None = None) -> int:
    """`ratio` expressions per image (contiguous rows); with copies_dir, every row gets its own image file."""
    rows = []
    for i, im in enumerate(images):
        for j in range(ratio):
            src = im
            if copies_dir is not None:
                src = copies_dir / f"{i}_{j}.jpg"
                shutil.copyfile(im, src)
            rows.append({"id": f"{i}-{j}", "image": str(src), "expression": PHRASES[j % len(PHRASES)]})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return len(rows)


def plain_loop(checkpoint: Path, manifest: Path, out: Path, chunk: int) -> float:
    """What a user writes without Ray: chunks of the manifest through Segmenter, RLE, one Parquet file."""
    t0 = time.perf_counter()
    seg = Segmenter(load_checkpoint(checkpoint), batch_size=chunk)
    rows = pq.read_table(manifest).to_pylist()
    records = []
    for s in range(0, len(rows), chunk):
        part = rows[s : s + chunk]
        outs = seg.segment_batch(
            [Path(r["image"]).read_bytes() for r in part], [r["expression"] for r in part]
        )
        for r, o in zip(part, outs):
            records.append({**r, "box": o.box.tolist(), "mask": encode_mask(o.mask), "score": o.score})
    pq.write_table(pa.Table.from_pylist(records), out)
    return time.perf_counter() - t0


def stage_cpu_seconds(checkpoint: Path, manifest: Path, cfg: BatchConfig, ratio: int) -> dict[str, float]:
    """CPU-seconds per row of each pipeline stage function, in-process on one thread."""
    torch.set_num_threads(1)
    model = load_checkpoint(checkpoint)
    images = group_by_image(read_manifest(manifest))
    mllm = MLLMActor(str(checkpoint), None, "cpu", 1, cfg.max_expressions)
    sam = SAMActor(str(checkpoint), None, "cpu", 1, counter=None)
    n_rows = sum(len(x) for x in images["ids"].to_pylist())
    blocks = [images.slice(s, cfg.mllm.batch_size) for s in range(0, len(images), cfg.mllm.batch_size)]
    for _ in range(2):  # the first pass warms up
        cost = {"decode": 0.0, "mllm": 0.0, "sam": 0.0}
        for block in blocks:
            c = time.process_time()
            dec = decode_stage(block, model.clip_size, model.sam_size, checkpoint=str(checkpoint))
            cost["decode"] += time.process_time() - c
            c = time.process_time()
            rea = mllm(dec)
            cost["mllm"] += time.process_time() - c
            c = time.process_time()
            sam(rea)
            cost["sam"] += time.process_time() - c
    enc = 0.0
    with torch.no_grad():
        for block in blocks:
            dec = decode_stage(block, model.clip_size, model.sam_size, checkpoint=str(checkpoint))
            s = model.sam_size
            px = torch.stack([decode_f32(b, (3, s, s)) for b in dec["sam"].to_pylist()])
            c = time.process_time()
            model.segmentation.encode(px)
            enc += time.process_time() - c
    out = {k: v / n_rows for k, v in cost.items()}
    out["sam_encoder_per_image"] = enc / len(images)
    out["ratio"] = ratio
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=100, help="images at N (N = images × ratio rows)")
    ap.add_argument("--ratio", type=int, default=7, help="expressions per image (RefCOCO ≈ 7)")
    ap.add_argument("--scale", type=int, default=5)
    ap.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    ap.add_argument("--mllm-actors", type=int, default=2, help="the MLLM is ~2/3 of the work: 2 actors")
    ap.add_argument("--sam-actors", type=int, default=1)
    ap.add_argument(
        "--plain-threads",
        type=int,
        default=1,
        help="torch threads of the plain loop (1: on a shared 2-core machine, 2 threads spin-wait on each "
        "other and cost ~8x the CPU per row)",
    )
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="check that it runs (< 1 min on 2 cores): 2 images x 2 expressions, one actor each, the plain "
        "loop and the batch job at N only; no marginal or reuse numbers",
    )
    a = ap.parse_args()
    if a.smoke:
        a.images, a.ratio, a.scale, a.cpus, a.mllm_actors, a.sam_actors = 2, 2, 2, 3, 1, 1
    cores = os.cpu_count() or 1
    work = Path(a.work or tempfile.mkdtemp(prefix="batch_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    n_big = a.images * a.scale
    synth = synthesize(work / "refer", SynthConfig(num_images=n_big, seed=0, min_objects=2, max_objects=3))
    images = sorted(Path(synth["images_dir"]).glob("*.jpg"))[:n_big]
    torch.manual_seed(0)
    ckpt = save_checkpoint(PPCRModel(load_config("tiny").model).eval(), work / "ckpt")
    (work / "copies").mkdir(exist_ok=True)
    n_rows = write_manifest(work / "n.parquet", images[: a.images], a.ratio)
    n5_rows = write_manifest(work / "n5.parquet", images, a.ratio)
    write_manifest(work / "copies.parquet", images[: a.images], a.ratio, copies_dir=work / "copies")
    cfg = BatchConfig(
        mllm=StageConfig(concurrency=a.mllm_actors, batch_size=8),
        sam=StageConfig(concurrency=a.sam_actors, batch_size=8),
        images_per_block=8,
    )

    stages = stage_cpu_seconds(ckpt, work / "n.parquet", cfg, a.ratio)
    per_row = stages["decode"] + stages["mllm"] + stages["sam"]
    ideal = cores / per_row
    torch.set_num_threads(a.plain_threads)

    res: dict = {"cores": cores, "ray_cpus": a.cpus, "rows_N": n_rows, "rows_5N": n5_rows, "stages": stages}
    rows = {"N": n_rows, "5N": n5_rows, "N_copies": n_rows}
    runs, plain = {}, {}
    # Alternate plain loop and batch job so both see the same background load.
    todo = [("N", "n.parquet"), ("5N", "n5.parquet"), ("N_copies", "copies.parquet")]
    for name, manifest in todo[:1] if a.smoke else todo:
        ray.shutdown()  # a fresh cluster per run: no idle workers of the previous run in the peak
        if name != "N_copies":
            with ProcessTreeMonitor() as mon:
                sec = plain_loop(ckpt, work / manifest, work / f"plain_{name}.parquet", 56)
            plain[name] = {
                "seconds": sec,
                "rows_per_s": rows[name] / sec,
                "cpu_s_per_row": mon.cpu_seconds / rows[name],
                "peak_pss_mb": round(mon.peak / 2**20),
            }
            print("plain", name, plain[name], flush=True)
        out = work / f"out_{name}"
        shutil.rmtree(out, ignore_errors=True)
        init_ray(num_cpus=a.cpus, object_store_mb=500)
        with ProcessTreeMonitor() as mon:
            s = run_batch(work / manifest, out, ckpt, cfg, progress=False)
        assert s.done == rows[name], s
        runs[name] = {
            **s.as_dict(),
            "peak_pss_mb": round(mon.peak / 2**20),
            "cpu_s": mon.cpu_seconds,
            "cpu_s_per_row": mon.cpu_seconds / s.done,
            "cpu_by_process": mon.cpu_by_process(),
        }
        print("batch", name, s, f"peak {mon.peak / 2**20:.0f} MiB, {mon.cpu_seconds:.0f} CPU-s", flush=True)
    if a.smoke:
        res.update(runs=runs, plain=plain, ideal_cpu_s_per_row=per_row, smoke=True)
        print(json.dumps(res, default=float))
        ray.shutdown()
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
        return
    d_rows = n5_rows - n_rows
    dt = runs["5N"]["seconds"] - runs["N"]["seconds"]
    # On a loaded machine the start-up time of a run can vary more than the 4N extra rows take.
    marginal = d_rows / dt if dt > 0 else float("nan")
    marginal_cpu = (runs["5N"]["cpu_s"] - runs["N"]["cpu_s"]) / d_rows
    res.update(
        runs=runs,
        plain=plain,
        ideal_cpu_s_per_row=per_row,
        ideal_rows_per_s=ideal,
        batch_marginal_rows_per_s=marginal,
        batch_marginal_cpu_s_per_row=marginal_cpu,
        marginal_vs_ideal=marginal / ideal,
        cpu_efficiency=per_row / marginal_cpu,
        batch_5N_vs_plain_5N=runs["5N"]["rows_per_s"] / plain["5N"]["rows_per_s"],
        pss_5N_over_N=runs["5N"]["peak_pss_mb"] / runs["N"]["peak_pss_mb"],
        reuse_saved_s=runs["N_copies"]["seconds"] - runs["N"]["seconds"],
        reuse_speedup=runs["N_copies"]["seconds"] / runs["N"]["seconds"],
        reuse_cpu_ratio=runs["N_copies"]["cpu_s"] / runs["N"]["cpu_s"],
        load_avg=os.getloadavg(),
    )
    print(json.dumps(res, default=float))
    r, p = runs, plain
    print(
        f"| {time.strftime('%Y-%m-%d')} | {n_rows} / {n5_rows} | {r['N']['rows_per_s']:.0f} / {r['5N']['rows_per_s']:.0f}"
        f" | {p['N']['rows_per_s']:.0f} / {p['5N']['rows_per_s']:.0f} | {marginal:.0f} | {ideal:.0f} "
        f"| **{marginal / ideal:.2f}** | **{per_row / marginal_cpu:.2f}** |"
    )
    print(
        f"| {time.strftime('%Y-%m-%d')} | {r['N']['peak_pss_mb']} / {r['5N']['peak_pss_mb']} MiB "
        f"(**{res['pss_5N_over_N']:.2f}×**) | {r['N']['seconds']:.1f} s / {r['N_copies']['seconds']:.1f} s "
        f"(**{res['reuse_speedup']:.2f}×**, {r['N']['encoder_calls']} vs {r['N_copies']['encoder_calls']} "
        f"encoder passes; CPU-s {r['N']['cpu_s']:.0f} vs {r['N_copies']['cpu_s']:.0f}) |"
    )
    ray.shutdown()
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
