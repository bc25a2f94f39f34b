"""`ppcr serve` at real size on a CPU host: the real-size stand-in checkpoint (benchmarks/realsize_standins.py)
served by one MLLM and one SAM replica, each its own Ray process, one photograph segmented over HTTP; each
replica's peak RSS against deploy/capacity.py; Serve vs in-process latency.

    flock -x /tmp/ppcr-heavy.lock python benchmarks/realsize_serve.py --cache /work/cache --json serve.json
    python benchmarks/realsize_serve.py --smoke       # tiny stand-ins in a temporary folder (< 2 min)

What runs: `ppcr serve --config <serve_configs/tiny_cpu.yaml with the overrides below> --checkpoint <stand-in>`
in a child process (Ray, Serve's controller and proxy, the Ingress, one MLLM and one SAM replica), then, in
this process, `Segmenter.from_checkpoint` on the same checkpoint (the in-process baseline). Overrides of the
shipped CPU config: one replica per deployment, `torch_threads` = this host's cores for every replica (as the
in-process Segmenter has them), no request deadline short of minutes (a real-size request on a CPU takes
minutes; the shipped 30 s would answer 504).

Requests: scikit-image's astronaut (512², PNG, lossless) and "the person on the left", every request with a
different pixel value in its first row, so neither the SAM replica's embedding cache nor the MLLM replica's
prefix cache ever hits: each request does the whole work, as the in-process call does. `--requests` over HTTP
first (the first is the processes' first: oneDNN's set-up), then Serve and Ray are stopped and as many run
in-process (`Segmenter.segment` on the same bytes). Not interleaved, because of memory: the replicas and the
in-process model side by side would need ~24 GB of this 24 GB host (the MLLM replica's 13 GB of memory-mapped
weights are shared page cache, but each process's anonymous part, ~3 GB for each model, and SAM's encoder
peak are not); each request records the load average, and `outside_compute_s` (a served request's time minus
its replicas' compute: HTTP, the ingress, Serve's routing and the hops between deployments) does not depend
on the load.

Memory, sampled every second: each process's RSS (anonymous and file-backed) and, at the end, its kernel
peak (VmHWM); the sum of PSS over the Ray processes (shared file pages divided among the processes mapping
them, so the sum is what the processes hold together); the host's used memory (MemTotal - MemAvailable).
The run stops itself when MemAvailable falls under --min-available-gb (the host is shared).
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
EXPRESSION = "the person on the left"


def say(msg: str) -> None:
    print(msg, flush=True)


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- memory


def meminfo_gb() -> dict[str, float]:
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kb = {k: int(v.split()[0]) for k, v in fields.items() if k in ("MemTotal", "MemAvailable")}
    return {"total": kb["MemTotal"] * 1024 / GB, "available": kb["MemAvailable"] * 1024 / GB}


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process (GB); {} when it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[name] = int(rest.split()[0]) * 1024 / GB
    return out


def pss_gb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return 0.0


def role(cmdline: str) -> str:
    """Which part of the app a process is, from its command line (Ray titles its actors
    `ray::ServeReplica:<app>:<deployment>`, `ray::ServeController`, `ray::ProxyActor`)."""
    if "realsize_" in cmdline:
        return "benchmark"  # this process: the in-process Segmenter
    if "-m ppcr serve" in cmdline:
        return "ppcr serve"
    for r in ("MLLM", "SAM", "Ingress"):
        if f"ServeReplica:ppcr:{r}" in cmdline:
            return r
    for r in ("ServeController", "ProxyActor", "raylet", "gcs_server"):
        if r in cmdline:
            return r
    return "other"


class Monitor(threading.Thread):
    """Samples every `period` s: per process of the tree under `root` (by pid) its RSS, anonymous and
    file-backed parts; the sum of their PSS; the host's used memory. Sets `low` and calls `on_low` once
    when MemAvailable < min_available_gb."""

    def __init__(self, root: int, period: float, min_available_gb: float, on_low) -> None:
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.root, self.period, self.min_available, self.on_low = root, period, min_available_gb, on_low
        self.procs: dict[int, dict] = {}
        self.pss_peak_gb = 0.0
        self.host_used_peak_gb = 0.0
        self.low = False
        self._halt = threading.Event()

    def sample(self) -> None:
        try:
            tree = [self.psutil.Process(self.root), *self.psutil.Process(self.root).children(recursive=True)]
        except self.psutil.NoSuchProcess:
            tree = []
        tree.append(self.psutil.Process())  # this process: the in-process Segmenter
        pss = 0.0
        for p in tree:
            s = proc_status(p.pid)
            if not s:
                continue
            rec = self.procs.get(p.pid)
            if rec is None:
                try:
                    cmd = " ".join(p.cmdline())
                except self.psutil.Error:
                    continue
                rec = self.procs[p.pid] = {"pid": p.pid, "cmdline": cmd[:160], "rss_peak_gb": 0.0}
            if rec.get("role") in (None, "other"):  # Ray titles a worker once it becomes an actor
                try:
                    rec["cmdline"] = " ".join(p.cmdline())[:160]
                except self.psutil.Error:
                    pass
                rec["role"] = role(rec["cmdline"])
            if s["VmRSS"] > rec["rss_peak_gb"]:
                rec.update(rss_peak_gb=s["VmRSS"], anon_at_peak_gb=s["RssAnon"], file_at_peak_gb=s["RssFile"])
            rec["hwm_gb"] = max(rec.get("hwm_gb", 0.0), s["VmHWM"])
            pss += pss_gb(p.pid)
        self.pss_peak_gb = max(self.pss_peak_gb, pss)
        m = meminfo_gb()
        self.host_used_peak_gb = max(self.host_used_peak_gb, m["total"] - m["available"])
        if m["available"] < self.min_available and not self.low:
            self.low = True
            self.on_low(m["available"])

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()

    def snapshot(self) -> dict[str, dict]:
        """by_role() without the command lines (for the JSON)."""
        return {r: {k: v for k, v in rec.items() if k != "cmdline"} for r, rec in self.by_role().items()}

    def by_role(self) -> dict[str, dict]:
        """The largest process of each role (e.g. the MLLM replica), as sampled."""
        out: dict[str, dict] = {}
        for rec in self.procs.values():
            r = rec.get("role", "other")
            if r != "other" and rec["hwm_gb"] > out.get(r, {}).get("hwm_gb", -1):
                out[r] = rec
        return out


# ----------------------------------------------------------------------------- the app


def serve_config(path: Path, port: int, threads: int) -> None:
    """serve_configs/tiny_cpu.yaml with one replica of each deployment, `threads` torch threads per replica
    and deadlines of minutes (see the module docstring)."""
    import yaml

    cfg = yaml.safe_load((REPO / "serve_configs/tiny_cpu.yaml").read_text())
    cfg["http_options"].update(port=port, request_timeout_s=3600)
    app = cfg["applications"][0]
    app["args"].update(torch_threads=threads, request_timeout_s=3000)
    for d in app["deployments"]:
        d["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 1}
        if d["name"] in ("MLLM", "SAM"):
            d["health_check_period_s"] = 30
            d["health_check_timeout_s"] = 600  # a replica computing a request on the loop answers late
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def photo_bytes(i: int) -> bytes:
    """scikit-image's astronaut as PNG, with pixel (0, 0)'s red lowest bit set to i's (a new content hash
    per request: no cache hits)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    img = np.ascontiguousarray(data.astronaut()[..., :3])
    img[0, 0, 0] = (img[0, 0, 0] & 0xFE) | (i & 1)
    img[0, 1, 0] = (i >> 1) & 0xFF  # more than two distinct images
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def post(url: str, data: bytes, timeout: float) -> dict:
    import requests

    r = requests.post(
        f"{url}/v1/segment",
        json={"image": base64.b64encode(data).decode(), "expression": EXPRESSION},
        timeout=timeout,
    )
    r.raise_for_status()
    return r.json()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=None, help="stand-ins folder (realsize_standins.py --cache)")
    p.add_argument("--smoke", action="store_true", help="tiny stand-ins in a temporary folder, 1 pair")
    p.add_argument("--requests", type=int, default=2, help="requests over HTTP, then as many in-process")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    p.add_argument("--min-available-gb", type=float, default=3.0, help="stop when the host has less free")
    a = p.parse_args()
    if a.smoke:
        a.requests = 1
        if a.cache is None:
            with tempfile.TemporaryDirectory(prefix="ppcr-serve-smoke-") as tmp:
                a.cache = Path(tmp)
                run(a)
            return
    run(a)


def run(a: argparse.Namespace) -> None:
    standins = load_module("realsize_standins", REPO / "benchmarks/realsize_standins.py")
    capacity = load_module("capacity", REPO / "deploy/capacity.py")
    paths = standins.ensure_standins(a.cache, a.smoke)
    ckpt = paths["checkpoint"]
    threads = os.cpu_count() or 1
    t_load = os.getloadavg()
    say(f"checkpoint {ckpt}; {threads} cores; load average {t_load[0]:.1f}; host {meminfo_gb()}")

    from ppcr.serve import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    tmp = Path(tempfile.mkdtemp(prefix="ppcr-serve-cfg-"))
    config = tmp / "serve.yaml"
    serve_config(config, port, threads)
    cmd = [sys.executable, "-m", "ppcr", "serve", "--config", str(config), "--checkpoint", str(ckpt)]
    cmd += ["--num-cpus", "4"]
    say("$ " + " ".join(cmd))
    log = open(tmp / "serve.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    low_at: list[float] = []

    def on_low(available: float) -> None:
        low_at.append(available)
        say(f"STOP: the host has {available:.1f} GB available, under --min-available-gb")
        os.killpg(server.pid, signal.SIGTERM)

    monitor = Monitor(server.pid, 1.0, a.min_available_gb, on_low)
    monitor.start()
    result: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "checkpoint": str(ckpt)}
    result["load_average_start"] = t_load

    def stop_server() -> None:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)

    try:
        measure(a, url, ckpt, threads, monitor, result, stop_server)
    finally:
        result["load_average_end"] = os.getloadavg()
        stop_server()
        monitor.stop()
        log.close()
        result["serve_log_tail"] = (tmp / "serve.log").read_text()[-3000:]
        shutil.rmtree(tmp)
        report(a, result, monitor, capacity, low_at)


def measure(
    a: argparse.Namespace, url: str, ckpt: Path, threads: int, monitor: Monitor, result: dict, stop_server
) -> None:
    """The requests (see the module docstring); fills `result` as it goes."""
    import numpy as np
    import torch

    from ppcr.serve import wait_healthy

    t0 = time.perf_counter()
    health = wait_healthy(url, timeout_s=1800)
    result["serve_start_s"] = time.perf_counter() - t0
    say(f"served in {result['serve_start_s']:.0f} s: preset {health.get('preset')}")
    result["replicas_after_start"] = monitor.snapshot()
    served: list[dict] = []
    result["served"] = served  # filled as it goes: a stopped run still reports what it measured
    for i in range(a.requests):
        t = time.perf_counter()
        js = post(url, photo_bytes(i), 3000.0)
        seconds = time.perf_counter() - t
        tm = js["timings_ms"]
        served.append(
            {
                "seconds": seconds,
                "timings_ms": tm,
                "load_average": os.getloadavg(),
                # What is not the replicas' compute: HTTP, the ingress, Serve's routing and the hops.
                "outside_compute_s": seconds - (tm["mllm"] + tm["sam_decode"]) / 1000,
            }
        )
        say(f"  Serve request {i}: {seconds:.1f} s {tm}")
        if i == 0:
            result["first_answer"] = {k: js[k] for k in ("box", "score")} | {"mask_size": js["mask"]["size"]}
            result["replicas_after_first_request"] = monitor.snapshot()
    stop_server()
    result["app_processes"] = monitor.snapshot()

    from ppcr.predictor import Segmenter

    torch.set_num_threads(threads)
    driver_before = proc_status(os.getpid())
    t = time.perf_counter()
    seg = Segmenter.from_checkpoint(ckpt)
    result["in_process_load_s"] = time.perf_counter() - t
    direct: list[dict] = []
    result["in_process"] = direct
    for i in range(a.requests):
        data = photo_bytes(100 + i)
        t = time.perf_counter()
        r = seg.segment(data, EXPRESSION)
        direct.append({"seconds": time.perf_counter() - t, "load_average": os.getloadavg()})
        assert np.isfinite(r.box).all(), r.box
        say(f"  in-process request {i}: {direct[-1]['seconds']:.1f} s")
    result["driver"] = {"before_segmenter": driver_before, "end": proc_status(os.getpid())}
    s = [r["seconds"] for r in served]
    d = [r["seconds"] for r in direct]
    result["ratio_mean"] = (sum(s) / len(s)) / (sum(d) / len(d))
    result["ratio_warm"] = s[-1] / d[-1]
    say(
        f"Serve / in-process: mean {result['ratio_mean']:.3f}, last (warm) requests {result['ratio_warm']:.3f}"
    )


def report(a: argparse.Namespace, result: dict, monitor: Monitor, capacity, low_at: list[float]) -> None:
    result["stopped_for_memory"] = low_at
    roles = monitor.by_role()
    result["processes"] = {r: {k: v for k, v in rec.items()} for r, rec in roles.items()}
    result["ray_pss_sum_peak_gb"] = monitor.pss_peak_gb
    result["host_used_peak_gb"] = monitor.host_used_peak_gb
    say(f"{'process':<16} {'peak RSS':>9} {'anon':>6} {'file':>6}  (at the sampled peak)")
    for r, rec in roles.items():
        say(
            f"{r:<16} {rec['hwm_gb']:>8.2f}G {rec.get('anon_at_peak_gb', 0):>5.2f}G {rec.get('file_at_peak_gb', 0):>5.2f}G"
        )
    say(
        f"sum of PSS over the app's processes, peak {monitor.pss_peak_gb:.2f} GB; host used peak "
        f"{monitor.host_used_peak_gb:.2f} GB (this benchmark's in-process Segmenter and other users included)"
    )
    if not a.smoke and "served" in result:
        c = capacity.parameter_counts()
        host = capacity.host_ram_replica_gb(c)
        result["capacity"] = {
            "host_ram_replica_gb": host,
            "llava_weights_gb": capacity.llava_weights_gb(c),
            "sam_weights_gb": capacity.sam_weights_gb(c),
            "sam_attention_peak_gb": capacity.sam_attention_peak_gb(c),
            "sam_start_gb": c.sam * 4 / GB,
        }
        for r in ("MLLM", "SAM"):
            if r in roles:
                say(
                    f"{r} replica peak RSS {roles[r]['hwm_gb']:.2f} GB vs host_ram_replica_gb {host[r]:.2f} GB"
                )
    if a.json:  # also after a failure: what was measured until then
        a.json.write_text(json.dumps(result, indent=2))
        say(f"wrote {a.json}")
    if low_at:
        raise SystemExit("stopped: the host ran short of memory (see above)")


if __name__ == "__main__":
    main()
