"""Real-size stand-ins of the production downloads, with random values, so the loading path a real user
takes (`load_checkpoint(parts=...)`, `Segmenter.from_checkpoint`, Serve replicas, batch actors) runs at
real size without any download:

    llava-1.5-7b-hf/          a llava-hf folder as the hub ships it: config.json (LLaVA-1.5-7B sizes, 32064
                              vocabulary rows), the safetensors under the hub's key names (language_model.model.*,
                              language_model.lm_head.*, vision_tower.vision_model.*, multi_modal_projector.*)
                              in three shards of at most 5 GB with model.safetensors.index.json, random bf16
                              values (norms 1, biases 0); a tokenizer (ppcr's offline BPE: no Llama tokenizer
                              is downloaded, so token ids differ from the real one's)
    sam_vit_h_4b8939.pth      a SAM ViT-H state dict as the official file holds it (torch.save, float32)
    checkpoint/               a ppcr inference checkpoint on top: config.yaml naming the two above, the
                              tensors a trained checkpoint holds (`checkpoint.saved_names`: LoRA, token rows,
                              heads, SAM mask decoder) with random values, tokenizer/

    nice python benchmarks/realsize_standins.py      # ~17 GB of disk, < 3 GB of RAM, minutes of one core
    flock /tmp/ppcr-heavy.lock python benchmarks/realsize_standins.py --load     # then load them (~15 GB)
    python benchmarks/realsize_standins.py --smoke   # the same at the tiny preset's sizes, loaded (seconds)

--load measures the loading paths, each in a fresh process: `load_checkpoint(parts=("sam",))` (a SAM
replica or batch actor), `load_checkpoint(parts=("mllm",))` (an MLLM replica), and
`Segmenter.from_checkpoint` (both parts; with --segment it also answers one photograph): seconds, peak
RSS (VmHWM) and, after loading, its anonymous and file-backed parts (safetensors are memory-mapped: file
pages count in RSS while mapped but are page cache the kernel can drop).

Written once into --cache (default $PPCR_REALSIZE_CACHE or ~/.cache/ppcr/realsize; never inside the
repository); a folder with its `complete.json` is reused as it is. Values come from fixed seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import time
from pathlib import Path

import torch

# transformers 5.x module names -> the names llava-hf/llava-1.5-7b-hf ships (transformers <= 4.51);
# ppcr.mllm.load_llava accepts these (transformers renames them at load).
HUB_NAMES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)
LLAVA_HF_VOCAB_ROWS = 32064  # llava-hf/llava-1.5-7b-hf: text_config.vocab_size
MAX_SHARD_BYTES = 5_000_000_000  # the hub folder: three shards of ~5 GB (14.1 GB in all)
DONE = "complete.json"


def default_cache() -> Path:
    return Path(os.environ.get("PPCR_REALSIZE_CACHE") or Path.home() / ".cache/ppcr/realsize")


def _preset(smoke: bool):
    from ppcr.config import load_config

    return load_config("tiny" if smoke else "llava-1.5-7b").model


def hub_name(key: str) -> str:
    for new, old in HUB_NAMES:
        if key.startswith(new):
            return old + key[len(new) :]
    raise ValueError(f"no llava-hf name for {key}")


def _random(name: str, shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Norm weights 1, biases 0, everything else N(0, 0.02) from a fixed seed (finite activations)."""
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name and leaf == "weight":
        return torch.ones(shape, dtype=dtype)
    if leaf == "bias":
        return torch.zeros(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float32) * 0.02).to(dtype)


def save_streamed(path: Path, tensors: list[tuple[str, torch.Size]], metadata: dict[str, str]) -> int:
    """A bf16 safetensors file written tensor by tensor (`_random` values), so at most one tensor is in
    memory (7B of values never are): 8-byte little-endian header length, the JSON header, the data.
    Returns the data's bytes."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, shape in tensors:
        size = shape.numel() * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in tensors:
            f.write(_random(name, shape, torch.bfloat16, hash_seed(name)).view(torch.uint8).numpy().tobytes())
    return offset


def write_llava_folder(folder: Path, smoke: bool) -> dict:
    """The llava-hf folder at the preset's sizes, one tensor in memory at a time."""
    from transformers import LlavaForConditionalGeneration

    from ppcr.mllm import _build_offline_bpe, llava_config

    cfg = _preset(smoke)
    tok = _build_offline_bpe()
    config = llava_config(cfg, tok, vocab_rows=None if smoke else LLAVA_HF_VOCAB_ROWS)
    with torch.device("meta"):
        meta = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    config.dtype = torch.bfloat16
    config.save_pretrained(folder)
    tok.save_pretrained(folder)
    tensors = [(hub_name(k), t.shape) for k, t in meta.state_dict().items()]
    shards: list[list[tuple[str, torch.Size]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = shape.numel() * 2
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += save_streamed(folder / file, shard, {"format": "pt"})
        weight_map.update(dict.fromkeys((n for n, _ in shard), file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"tensors": len(tensors), "shards": len(shards), "bytes": total}


def hash_seed(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode())


def write_sam(path: Path, smoke: bool) -> dict:
    """A SAM state dict as the official .pth holds it (float32, torch.save)."""
    from ppcr.segmentation_stage import _make_sam

    cfg = _preset(smoke)
    torch.manual_seed(0)
    state = _make_sam(cfg.sam, cfg.prompt_dim).state_dict()
    torch.save(state, path)
    return {"tensors": len(state), "bytes": sum(t.numel() * t.element_size() for t in state.values())}


def write_checkpoint_on_top(out: Path, llava: Path, sam: Path, smoke: bool) -> dict:
    """An inference checkpoint naming the two base files, with the tensors a trained one holds."""
    import dataclasses

    from ppcr.checkpoint import saved_names, write_checkpoint
    from ppcr.mllm import build_tokenizer
    from ppcr.model import PPCRModel

    base = _preset(smoke)
    rows = None if smoke else LLAVA_HF_VOCAB_ROWS
    language = dataclasses.replace(base.language, vocab_size=rows)
    # The names and dtypes come from the model built on the meta device (no weights): random init
    # from the same sizes gives the module tree load_checkpoint builds from the two files.
    with torch.device("meta"):
        model = PPCRModel(dataclasses.replace(base, language=language))
    cfg = dataclasses.replace(
        base, mllm_path=str(llava), sam=dataclasses.replace(base.sam, checkpoint=str(sam))
    )
    model.cfg = cfg  # what the checkpoint says: saved_names keeps only what the base files lack
    state = model.state_dict()
    tensors = {n: _random(n, state[n].shape, state[n].dtype, hash_seed(n)) for n in saved_names(model)}
    write_checkpoint(out, tensors, cfg, build_tokenizer(cfg), extra={"stand_in": "random values"})
    return {"tensors": len(tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}


def ensure_standins(cache: Path | None = None, smoke: bool = False) -> dict[str, Path]:
    """The three stand-ins under `cache` (written once), as {"llava": folder, "sam": .pth, "checkpoint": folder}."""
    root = (cache or default_cache()) / ("tiny" if smoke else "llava-1.5-7b")
    paths = {
        "llava": root / "llava-1.5-7b-hf",
        "sam": root / ("sam_tiny.pth" if smoke else "sam_vit_h_4b8939.pth"),
        "checkpoint": root / "checkpoint",
    }
    if (root / DONE).is_file():
        return paths
    repo = Path(__file__).resolve().parents[1]
    if root.resolve().is_relative_to(repo):
        raise ValueError(f"--cache {root} is inside the repository; stand-ins are never committed")
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report = {"llava": write_llava_folder(paths["llava"], smoke)}
    report["sam"] = write_sam(paths["sam"], smoke)
    report["checkpoint"] = write_checkpoint_on_top(paths["checkpoint"], paths["llava"], paths["sam"], smoke)
    report["seconds"] = time.perf_counter() - t0
    (root / DONE).write_text(json.dumps(report, indent=2))
    return paths


LOAD = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
from pathlib import Path
def status():
    f = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines() if ":" in l)
    return {k: int(f[k].split()[0]) * 1024 / 1e9 for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}
start = status()
import torch
from ppcr.checkpoint import load_checkpoint
from ppcr.predictor import Segmenter
ckpt, what = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if what == "segmenter" or what == "segment":
    seg = Segmenter.from_checkpoint(ckpt)
    model = seg.model
else:
    model = load_checkpoint(ckpt, parts=(what,))
out = {"what": what, "seconds": time.perf_counter() - t0, "start": start, "loaded": status()}
out["params"] = sum(p.numel() for p in model.parameters())
if what == "segment":
    from skimage import data
    t0 = time.perf_counter()
    r = seg.segment(data.astronaut(), "the person on the left")
    out["segment_seconds"] = time.perf_counter() - t0
    out["answer_ok"] = bool(r.mask.shape == (512, 512) and all(map(float.__eq__, r.box, r.box)))
out["end"] = status()
print(json.dumps(out))
"""


def measure_loading(checkpoint: Path, segment: bool) -> list[dict]:
    """Each loading path in a fresh process (see the module docstring); one dict per path."""
    import subprocess
    import sys

    rows = []
    for what in ("sam", "mllm", "segment" if segment else "segmenter"):
        done = subprocess.run(
            [sys.executable, "-c", LOAD, str(checkpoint), what], capture_output=True, text=True, check=True
        )
        row = json.loads(done.stdout.strip().splitlines()[-1])
        s, e = row["loaded"], row["end"]
        extra = (
            f"; segment {row['segment_seconds']:.0f} s, answer ok {row['answer_ok']}"
            if segment and what == "segment"
            else ""
        )
        print(
            f"{what:>9}: {row['seconds']:.0f} s, {row['params'] / 1e9:.2f} B parameters, peak RSS {e['VmHWM']:.2f} GB; "
            f"after loading RSS {s['VmRSS']:.2f} GB = anonymous {s['RssAnon']:.2f} + file-backed {s['RssFile']:.2f}{extra}",
            flush=True,
        )
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=None, help="folder to write into (default: %(default)s)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="the tiny preset's sizes, then --load --segment (seconds; a temporary folder unless --cache)",
    )
    p.add_argument("--load", action="store_true", help="then measure the loading paths (see above)")
    p.add_argument("--segment", action="store_true", help="with --load: also answer one photograph")
    p.add_argument("--json", type=Path, default=None, help="with --load: write the measurements here")
    a = p.parse_args()
    if a.smoke:
        a.load = a.segment = True
        if a.cache is None:
            import tempfile

            with tempfile.TemporaryDirectory(prefix="ppcr-standins-") as tmp:
                a.cache = Path(tmp)
                run(a)
            return
    run(a)


def run(a: argparse.Namespace) -> None:
    paths = ensure_standins(a.cache, a.smoke)
    report = json.loads((paths["checkpoint"].parent / DONE).read_text())
    for key, path in paths.items():
        print(f"{key}: {path} ({report[key]['bytes'] / 1e9:.2f} GB, {report[key]['tensors']} tensors)")
    print(f"written in {report['seconds']:.0f} s")
    if a.load:
        rows = measure_loading(paths["checkpoint"], a.segment)
        if a.json:
            a.json.write_text(json.dumps({"standins": report, "loading": rows}, indent=2))


if __name__ == "__main__":
    main()
