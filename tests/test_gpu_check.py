"""benchmarks/gpu_check.py cannot rot: its --tiny mode runs the same code (model build on the device,
bf16 training through DeepSpeed ZeRO-2, Segmenter latency, batched throughput) on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _run(tmp_path, *extra, timeout=240):
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--steps", "3", "--batches", "1", "4", "--repeats", "2"]
    proc = subprocess.run([*cmd, "--json", str(out), *extra], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_tiny_gpu_check_trains_and_measures_inference(tmp_path):
    result, printed = _run(tmp_path)
    assert result["preset"] == "tiny" and result["device"] == "cpu"
    assert set(result["params_by_dtype"]) == {"bfloat16", "float32"}  # the dtype policy
    tr = result["training"]
    assert tr["optimizer"] == "deepspeed ZeRO-2" and tr["loss_finite"] and len(tr["losses"]) == 3
    assert tr["trainable_params"] > 0 and tr["step_s_median"] > 0
    inf = result["inference"]
    assert inf["latency_ms_median"] > 0 and inf["llm_tokens_per_request"] > 0 and inf["tflop_per_request"] > 0
    assert set(inf["throughput"]) == {"1", "4"}
    assert all(r["requests_per_s"] > 0 for r in inf["throughput"].values())
    assert inf["peak_bf16_tflops"] is None  # no FLOP bound is claimed for a CPU
    assert "gpu_check: OK" in printed and "latency per request" in printed


@pytest.mark.slow  # a second run of the script
def test_tiny_gpu_check_without_deepspeed_uses_torch_adamw(tmp_path):
    result, _ = _run(tmp_path, "--no-deepspeed", "--batches", "2")
    assert result["training"]["optimizer"] == "torch AdamW" and result["training"]["loss_finite"]


@pytest.mark.slow
def test_tiny_gpu_check_runs_the_ray_train_job(tmp_path):
    result, _ = _run(tmp_path, "--ray-train", timeout=600)
    assert result["ray_train"]["steps"] == 3


def test_real_size_config_builds_on_the_meta_device():
    """The real-size model gpu_check builds on the GPU, built here without memory: llava-1.5-7b sizes,
    32064 embedding rows as llava-hf ships, bf16 LLaVA and SAM encoder, float32 heads."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    cfg = gpu_check.run_config(tiny=False, micro_batch=2)
    assert cfg.model.mllm_path is None and cfg.model.dtype == "bfloat16" and cfg.model.sam.size == "vit_h"
    model = gpu_check.build(cfg, torch.device("meta"))
    llava = model.mllm.llava
    assert llava.get_input_embeddings().weight.shape == (32064, 4096)
    assert llava.dtype == torch.bfloat16 and model.semantic.projection[0].weight.dtype == torch.float32
    assert model.segmentation.sam.image_encoder.patch_embed.proj.weight.dtype == torch.bfloat16
    total = sum(p.numel() for p in model.parameters())
    assert 7.70e9 < total < 7.80e9
