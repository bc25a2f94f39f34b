"""`ppcr batch` at real size on a CPU host: eight photographs segmented by the real-size stand-in checkpoint
(benchmarks/realsize_standins.py), one MLLM and one SAM actor; rows/s and each actor's peak RSS.

    flock -x /tmp/ppcr-heavy.lock python benchmarks/realsize_batch.py --cache /work/cache --json batch.json
    python benchmarks/realsize_batch.py --smoke       # tiny stand-ins in a temporary folder (< 2 min)

What runs: `ppcr batch --config configs/batch/cpu.yaml --set torch_threads=<cores> --input manifest.jsonl
--checkpoint <stand-in>` in a child process, over a manifest of eight scikit-image photographs (PNG files, one
expression each; sizes from 300 x 451 to 1411 x 1411). The shipped CPU config has one actor per model part,
each with one core; the actors get this host's cores as torch threads (as the in-process Segmenter has them).
Memory is sampled every second over the child's process tree (benchmarks/realsize_serve.py's Monitor): each
process's peak RSS (VmHWM) with its anonymous and file-backed parts, the sum of PSS, the host's used memory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHOTOS = (  # scikit-image photograph, expression
    ("astronaut", "the person on the left"),
    ("coffee", "the cup of coffee"),
    ("chelsea", "the cat's face"),
    ("rocket", "the rocket on the launch pad"),
    ("camera", "the man with the camera"),
    ("hubble_deep_field", "the brightest galaxy"),
    ("immunohistochemistry", "the dark stained cells"),
    ("retina", "the optic disc"),
)


def say(msg: str) -> None:
    print(msg, flush=True)


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def write_manifest(folder: Path, count: int) -> Path:
    """The first `count` photographs as RGB PNGs and a JSON-lines manifest naming them."""
    import numpy as np
    from PIL import Image
    from skimage import data

    rows = []
    for name, expression in PHOTOS[:count]:
        img = getattr(data, name)()
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        Image.fromarray(np.ascontiguousarray(img[..., :3])).save(folder / f"{name}.png")
        rows.append({"id": name, "image": f"{name}.png", "expression": expression})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=None, help="stand-ins folder (realsize_standins.py --cache)")
    p.add_argument("--smoke", action="store_true", help="tiny stand-ins in a temporary folder, 2 photographs")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    p.add_argument("--min-available-gb", type=float, default=3.0, help="stop when the host has less free")
    a = p.parse_args()
    if a.smoke and a.cache is None:
        with tempfile.TemporaryDirectory(prefix="ppcr-batch-smoke-") as tmp:
            a.cache = Path(tmp)
            run(a)
        return
    run(a)


def run(a: argparse.Namespace) -> None:
    import pyarrow.parquet as pq

    standins = load_module("realsize_standins", REPO / "benchmarks/realsize_standins.py")
    served = load_module("realsize_serve", REPO / "benchmarks/realsize_serve.py")
    paths = standins.ensure_standins(a.cache, a.smoke)
    threads = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="ppcr-realsize-batch-"))
    count = 2 if a.smoke else len(PHOTOS)
    manifest = write_manifest(work, count)
    out = work / "out"
    cmd = [sys.executable, "-m", "ppcr", "batch", "--input", str(manifest), "--out", str(out)]
    cmd += ["--checkpoint", str(paths["checkpoint"]), "--config", str(REPO / "configs/batch/cpu.yaml")]
    cmd += ["--set", f"torch_threads={threads}", "--num-cpus", "4", "--no-progress"]
    load = os.getloadavg()
    say(f"load average {load[0]:.1f}; host {served.meminfo_gb()}")
    say("$ " + " ".join(cmd))
    job = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    low: list[float] = []

    def on_low(available: float) -> None:
        low.append(available)
        say(f"STOP: the host has {available:.1f} GB available, under --min-available-gb")
        os.killpg(job.pid, signal.SIGTERM)

    monitor = served.Monitor(job.pid, 1.0, a.min_available_gb, on_low)
    monitor.start()
    t0 = time.perf_counter()
    stdout, stderr = job.communicate()
    seconds = time.perf_counter() - t0
    monitor.stop()
    if job.returncode != 0 or low:
        say(stderr[-3000:])
        raise SystemExit(f"ppcr batch failed (exit {job.returncode})")
    summary = json.loads(stdout.strip().splitlines()[-1])
    table = pq.read_table(out / "results")
    procs = {}
    for rec in monitor.procs.values():
        cmdline = rec["cmdline"]
        name = next((n for n in ("MLLMActor", "SAMActor") if n in cmdline), None)
        if name is None and "ppcr batch" in cmdline.replace("-m ppcr batch", "ppcr batch"):
            name = "driver"
        if name and rec["hwm_gb"] > procs.get(name, {}).get("hwm_gb", -1):
            procs[name] = {k: v for k, v in rec.items() if k != "cmdline"}
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "ppcr_batch": " ".join(cmd),
        "load_average_start": load,
        "load_average_end": os.getloadavg(),
        "summary": summary,
        "wall_s": seconds,
        "rows_written": table.num_rows,
        "processes": procs,
        "all_processes": list(monitor.procs.values()),
        "ray_pss_sum_peak_gb": monitor.pss_peak_gb,
        "host_used_peak_gb": monitor.host_used_peak_gb,
    }
    say(f"ppcr batch: {summary}; {table.num_rows} rows written; {seconds:.0f} s with Ray's start-up")
    for name, rec in procs.items():
        say(
            f"{name:<10} peak RSS {rec['hwm_gb']:.2f} GB (at the sampled peak: anon "
            f"{rec.get('anon_at_peak_gb', 0):.2f} + file {rec.get('file_at_peak_gb', 0):.2f})"
        )
    say(
        f"sum of PSS over the job's processes, peak {monitor.pss_peak_gb:.2f} GB; host used peak {monitor.host_used_peak_gb:.2f} GB"
    )
    shutil.rmtree(work)
    if table.num_rows != count or summary["errors"]:
        raise SystemExit(f"expected {count} results and no errors; got {summary}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
        say(f"wrote {a.json}")


if __name__ == "__main__":
    main()
