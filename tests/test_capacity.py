"""docs/capacity.md quotes what deploy/capacity.py computes from the code (parameter counts on the meta device)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs/capacity.md"


def load_capacity():
    spec = importlib.util.spec_from_file_location("capacity", REPO / "deploy/capacity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["capacity"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def capacity():
    return load_capacity()


@pytest.fixture(scope="module")
def plan(capacity):
    return capacity.plan()


def test_parameter_counts_come_from_the_meta_build(plan):
    c = plan["counts"]
    # LLaVA-1.5-7B (7.06 B) + SAM ViT-H (0.64 B) + our heads; trainables dominated by the two 32064-row matrices.
    assert 7.70e9 < c.total < 7.80e9
    assert c.embed_rows_built < 32064  # the meta build's offline tokenizer: corrected in the count
    lora = 2 * 2 * 32 * 8 * (4096 + 4096)  # 2 branches × (q, v) × 32 layers × r × (in + out)
    assert c.trainable > 2 * 32064 * 4096 + lora
    text = DOC.read_text()
    assert f"**{c.total / 1e6:,.0f} M**" in text
    assert f"**{c.trainable / 1e6:,.1f} M**" in text


def test_doc_quotes_the_computed_memory(plan):
    text = DOC.read_text()
    for mb, items in plan["train_gpu_gb"].items():
        for name, gb in items.items():
            assert f"{gb:.2f} GB" in text, f"micro-batch {mb}: {name} = {gb:.2f} GB"
        assert f"**{plan['train_gpu_total_gb'][mb]:.1f} GB**" in text
    assert f"**{plan['host_ram_per_worker_gb']:.1f} GB**" in text
    assert f"| {plan['mllm_replica_gb']:.1f} GB | **{plan['mllm_per_l20']}** |" in text
    assert f"| {plan['sam_replica_gb']:.1f} GB | **{plan['sam_per_l20']}** |" in text


def test_training_fits_an_l20(plan, capacity):
    assert plan["micro_batch"] == 1
    for total in plan["train_gpu_total_gb"].values():
        assert total < capacity.L20.memory_gb


def test_doc_quotes_the_computed_flops_and_bounds(plan):
    text = DOC.read_text()
    f = plan["tflop"]
    assert f"| LLM pass (×2 per expression) | {f['llm_pass']:.1f} |" in text
    assert f"| {f['clip']:.1f} |" in text and f"| {f['sam']:.1f} |" in text
    assert f"| **{f['request']:.1f}** |" in text
    r = plan["req_s"]
    assert f"**{r['L20']:.1f} req/s**" in text and f"**{r['H200']:.1f} req/s**" in text
    assert f"| {r['L20 MLLM only']:.1f} req/s |" in text
    assert (
        f"| {r['L20 SAM fp32']:.1f} images/s |" in text and f"| {r['H200 SAM fp32']:.1f} images/s |" in text
    )
    assert f"**{f['train_expression']:.1f} TFLOP**" in text
    assert (plan["steps"], plan["batch"], plan["gpus"]) == (2500, 8, 4)
    assert f"**{plan['train_hours']:.2f} h**" in text


def test_flops_arithmetic_on_known_numbers(capacity, plan):
    c = plan["counts"]
    # A language-model pass is ~2 FLOPs per matmul weight per token, attention a few percent on top.
    two_nt = 2 * c.llm_matmul * capacity.PROMPT_TOKENS
    assert 1.0 < capacity.llm_pass_flops(c) / two_nt < 1.05
    # The L20 bound is peak / request FLOPs, and the H200's is larger by the ratio of their peaks.
    ratio = plan["req_s"]["H200"] / plan["req_s"]["L20"]
    assert ratio == pytest.approx(989 / 119.5)
    hours = 2500 * 8 * capacity.train_expression_flops(c) / (4 * 119.5e12 * 0.4) / 3600
    assert plan["train_hours"] == pytest.approx(hours)


def test_bucket_memory_follows_the_deepspeed_config(capacity):
    zero = {"contiguous_gradients": True, "overlap_comm": True, "reduce_bucket_size": 5e8}
    assert capacity.deepspeed_buckets_gb(zero) == pytest.approx(2.0)
    assert capacity.deepspeed_buckets_gb({**zero, "overlap_comm": False}) == pytest.approx(1.0)
    assert capacity.deepspeed_buckets_gb({**zero, "contiguous_gradients": False}) == 0.0


def test_gpu_batch_config_loads_and_fits_four_l20s():
    from ppcr.batch_pipeline import load_batch_config

    cfg = load_batch_config(REPO / "configs/batch/llava7b_l20.yaml")
    assert cfg.mllm.device == "cuda" and cfg.sam.device == "cuda"
    assert cfg.demand()["GPU"] == 4  # the four L20s of the training cluster
