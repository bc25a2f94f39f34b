"""Peak resident memory of a process that serves one PPCR stage: the whole model loaded (what Serve
replicas and batch actors did before per-stage loading) vs only the part it runs.

    python benchmarks/stage_memory.py [--checkpoint DIR]   # default: a random tiny checkpoint
    python benchmarks/stage_memory.py --sam-size vit_b     # tiny LLaVA + a real-size SAM ViT-B
    python benchmarks/stage_memory.py --smoke              # < 1 min: the random tiny checkpoint only

Each variant loads the checkpoint in a fresh process (torch and transformers imported in all of them,
so the differences are the model's) and reports ru_maxrss. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = """
import json, resource, sys
import torch
from ppcr.checkpoint import load_checkpoint
parts = tuple(sys.argv[2].split(","))
model = load_checkpoint(sys.argv[1], parts=parts)
params = sum(p.numel() for p in model.parameters())
print(json.dumps({"parts": parts, "params": params, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(checkpoint: str, parts: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, checkpoint, parts], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument(
        "--sam-size", default="tiny", choices=["tiny", "vit_b"], help="SAM of the generated checkpoint"
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="check that it runs (< 1 min on 2 cores): the random tiny checkpoint (the default run)",
    )
    a = p.parse_args()
    if a.smoke and (a.checkpoint is not None or a.sam_size != "tiny"):
        p.error("--smoke measures the random tiny checkpoint: leave out --checkpoint and --sam-size")
    with tempfile.TemporaryDirectory() as d:
        ckpt = a.checkpoint
        if ckpt is None:
            import torch

            from ppcr.checkpoint import save_checkpoint
            from ppcr.config import load_config
            from ppcr.model import PPCRModel

            over = {}
            if a.sam_size != "tiny":  # SAM's registry sizes take 1024 px, patch 16, 256-d prompts
                over = {
                    "model": {
                        "sam": {"size": a.sam_size, "image_size": 1024, "patch_size": 16},
                        "prompt_dim": 256,
                    }
                }
            torch.manual_seed(0)
            ckpt = str(save_checkpoint(PPCRModel(load_config("tiny", overrides=over).model), f"{d}/ckpt"))
        rows = {
            name: measure(ckpt, parts)
            for name, parts in (("whole", "mllm,sam"), ("mllm", "mllm"), ("sam", "sam"))
        }
    whole = rows["whole"]["peak_rss_mb"]
    print(f"{'process loads':<14} {'parameters':>12} {'peak RSS MB':>12}")
    for name, r in rows.items():
        print(
            f"{name:<14} {r['params']:>12,} {r['peak_rss_mb']:>12.0f}  ({r['peak_rss_mb'] - whole:+.0f} vs whole)"
        )


if __name__ == "__main__":
    main()
