"""docs/capacity.md quotes what deploy/capacity.py computes from the code (parameter counts on the meta device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs/capacity.md"


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


def test_doc_quotes_the_computed_memory(plan, capacity):
    text = DOC.read_text()
    for mb, items in plan["train_gpu_gb"].items():
        for name, gb in items.items():
            assert f"{gb:.2f} GB" in text, f"micro-batch {mb}: {name} = {gb:.2f} GB"
        assert f"**{plan['train_gpu_total_gb'][mb]:.1f} GB**" in text
    assert f"**{plan['host_ram_per_worker_gb']:.1f} GB**" in text
    replica = plan["host_ram_replica_gb"]
    assert f"**{replica['MLLM']:.1f} GB**" in text and f"**{replica['SAM']:.1f} GB**" in text
    # A training worker holds both parts at once in one process: LLaVA's and SAM's float32 start-up add up.
    c = plan["counts"]
    assert replica["MLLM"] + c.sam * 4 / 1e9 == pytest.approx(plan["host_ram_per_worker_gb"])
    # A SAM replica peaks while it answers (weights + one image's attention), above its float32 start-up.
    answering = capacity.sam_weights_gb(c) + capacity.sam_attention_peak_gb(c)
    assert answering > c.sam * 4 / 1e9 and replica["SAM"] == pytest.approx(answering + 3.0)
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
        f"| {r['L20 SAM bf16']:.1f} images/s |" in text and f"| {r['H200 SAM bf16']:.1f} images/s |" in text
    )
    assert f"| {r['H200 SAM fp32 (not served)']:.1f} images/s |" in text  # the contrast
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
    from ppcr.batch import load_batch_config

    cfg = load_batch_config(REPO / "configs/batch/llava7b_l20.yaml")
    assert cfg.mllm.device == "cuda" and cfg.sam.device == "cuda"
    assert cfg.demand()["GPU"] == 4  # the four L20s of the training cluster


# ----------------------------------------------------------------------------- serving


def test_sam_memory_and_bound_follow_the_dtype_policy(capacity, plan):
    from ppcr.config import load_config
    from ppcr.precision import _keeps_float32

    # The production preset runs SAM's encoder in bf16; only the prompt encoder and mask decoder stay fp32.
    assert load_config("llava-1.5-7b").model.dtype == "bfloat16"
    assert not _keeps_float32("segmentation.sam.image_encoder.blocks.0.attn.qkv.weight")
    assert _keeps_float32("segmentation.sam.mask_decoder.iou_token.weight")
    c = plan["counts"]
    assert c.fp32 > c.sam - c.sam_encoder  # LoRA and heads are float32 too
    assert (
        capacity.sam_embedding_bytes() == 256 * 64 * 64 * 2
    )  # SAMDeployment caches the encoder's bf16 output
    assert plan["req_s"]["H200 SAM bf16"] / plan["req_s"]["L20 SAM bf16"] == pytest.approx(989 / 119.5)
    assert plan["req_s"]["H200 SAM bf16"] > 10 * plan["req_s"]["H200 SAM fp32 (not served)"]


def test_replica_memory_follows_the_serve_limits(capacity, plan):
    c, serve = plan["counts"], plan["serve"]
    # Activations are per forward (max_sequences_per_forward), the SAM attention peak per encode call.
    # Shared prompt prefixes: both branches of the kept images, one branch of a chunk's distinct images
    # (at most one per request of the batch).
    chunk_images = min(serve["max_sequences_per_forward"], serve["max_batch_size"])
    args = (serve["max_sequences_per_forward"], serve["prefix_cache_images"], chunk_images)
    assert plan["mllm_replica_gb"] == pytest.approx(capacity.mllm_replica_gb(c, *args))
    kept = capacity.mllm_replica_gb(c, *args) - capacity.mllm_replica_gb(c, args[0], 0, chunk_images)
    assert kept == pytest.approx(serve["prefix_cache_images"] * 2 * plan["prefix_gb"])
    assert capacity.mllm_replica_gb(c, 64, *args[1:]) > plan["mllm_replica_gb"] + 5
    assert capacity.sam_replica_gb(c, 2 * serve["cache_images"]) > plan["sam_replica_gb"]
    assert (
        plan["mllm_replica_gb"] < capacity.L20.memory_gb and plan["sam_replica_gb"] < capacity.L20.memory_gb
    )


def test_shipped_limits_keep_the_worst_case_under_the_request_timeout(capacity, plan):
    c = plan["counts"]
    kuberay = yaml.safe_load((REPO / "deploy/kuberay/rayservice.yaml").read_text())["spec"]["serveConfigV2"]
    for source in (capacity.SERVE_CONFIG, kuberay):
        raw = yaml.safe_load(source.read_text()) if isinstance(source, Path) else yaml.safe_load(source)
        app = raw["applications"][0]
        args, deployments = app["args"], {d["name"]: d for d in app["deployments"]}
        assert args["max_sequences_per_forward"] < args["max_batch_size"] * args["max_expressions"]
        assert raw["http_options"]["request_timeout_s"] >= args["request_timeout_s"]
        for gpu in (capacity.L20, capacity.H200):
            call = capacity.serve_call(c, args, deployments, gpu)
            assert call["worst_case_s"] <= args["request_timeout_s"], (gpu.name, call)


def test_worst_case_check_catches_the_old_limits(capacity, plan):
    c = plan["counts"]
    args, deployments = capacity.load_serve_config()
    old = {**args, "max_batch_size": 16, "max_expressions": 16, "max_sequences_per_forward": None}
    assert capacity.serve_call(c, old, deployments)["worst_case_s"] > args["request_timeout_s"]
    # Each limit counts: more ongoing requests per replica, or longer requests, break the bound too.
    crowded = {**deployments, "MLLM": {**deployments["MLLM"], "max_ongoing_requests": 32}}
    assert capacity.serve_call(c, args, crowded)["worst_case_s"] > args["request_timeout_s"]
    longer = {**args, "max_expressions": 16}
    assert capacity.serve_call(c, longer, deployments)["worst_case_s"] > args["request_timeout_s"]
    # Chunking bounds one forward, not the batch: the batch's FLOPs do not depend on it.
    whole = capacity.serve_call(c, {**args, "max_sequences_per_forward": None}, deployments)
    assert whole["batch_pflop"] == pytest.approx(plan["serve_call"]["L20"]["batch_pflop"])
    assert whole["forward_pflop"] == pytest.approx(4 * plan["serve_call"]["L20"]["forward_pflop"])


def test_doc_quotes_the_serve_call_arithmetic(plan):
    text = DOC.read_text()
    l20, h200 = plan["serve_call"]["L20"], plan["serve_call"]["H200"]
    assert (
        f"one forward of 16 sequences ({l20['forward_pflop']:.2f} PFLOP) | {l20['forward_s']:.1f} s | {h200['forward_s']:.1f} s |"
        in text
    )
    assert f"({l20['batch_pflop']:.2f} PFLOP) | {l20['batch_s']:.1f} s | {h200['batch_s']:.1f} s |" in text
    assert (
        f"{l20['batches_waited']} batches | **{l20['worst_case_s']:.1f} s** | **{h200['worst_case_s']:.1f} s** |"
        in text
    )
    assert f"{l20['sam_batch_s']:.2f} s on an L20" in text and f"{l20['sam_worst_case_s']:.1f} s)" in text
    before = plan["serve_call_before"]
    assert f"**{before['batch_pflop']:.2f} PFLOP**, **{before['batch_s']:.1f} s**" in text
    assert f"({plan['serve_call_before_mfu50']['batch_s']:.1f} s at 50 %)" in text
    assert f"{before['worst_case_s']:.1f} s for a request" in text
    s = plan["serve"]
    assert (
        f"({s['max_batch_size']} × {s['max_expressions']} sequences per batch, {s['max_sequences_per_forward']} per forward"
        in text
    )
    assert f"{plan['sam_embedding_mb']:.1f} MB each" in text


def test_serving_doc_quotes_the_same_arithmetic(plan):
    text = (REPO / "docs/serving.md").read_text()
    l20, h200 = plan["serve_call"]["L20"], plan["serve_call"]["H200"]
    before = plan["serve_call_before"]
    s = plan["serve"]
    for quoted in (
        f"{l20['forward_pflop']:.2f} PFLOP, {l20['forward_s']:.1f} s on an L20, {h200['forward_s']:.1f} s on an H200",
        f"{l20['batch_pflop']:.2f} PFLOP, {l20['batch_s']:.1f} s on an",
        f"({h200['batch_s']:.1f} s on an H200)",
        f"2 × {l20['batch_s']:.1f} ≈ {l20['worst_case_s']:.1f} s on an L20, under `request_timeout_s: {s['request_timeout_s']}`",
        f"{l20['sam_batch_s']:.2f} s per call",
        f"{before['batch_pflop']:.2f} PFLOP, {before['batch_s']:.1f} s on an L20",
        f"({plan['serve_call_before_mfu50']['batch_s']:.1f} s at 50 %)",
        "| `max_sequences_per_forward` |",
        f"{plan['sam_embedding_mb']:.1f} MB each",
    ):
        assert quoted in text, quoted
    assert l20["batches_waited"] == 2 and l20["forwards_per_batch"] == 4


def test_doc_quotes_the_cost_of_several_expressions_per_image(plan, capacity):
    """FLOPs per request depend on the expressions per image (the shared prompt prefix): the doc's table
    is what the script computes, sharing never costs more, and a lone expression costs the same."""
    text = DOC.read_text()
    one = plan["per_expression"][1][False]
    for k, cost in plan["per_expression"].items():
        row = f"| {cost[False]:.1f} | {cost[True]:.1f} | {cost[True] / one:.2f}× |"
        assert any(line.startswith(f"| {k}") and line.endswith(row) for line in text.splitlines()), (k, row)
        assert row in text, row
        assert cost[True] <= cost[False]
    assert plan["per_expression"][1][True] == plan["per_expression"][1][False]
    tf = plan["tflop"]
    assert f"a prefix pass is {tf['prefix_pass']:.1f} TFLOP" in text
    assert f"a suffix pass {tf['suffix_pass']:.1f} TFLOP" in text
    assert f"{plan['prefix_gb']:.2f} GB" in text
    c = plan["counts"]
    # Whole prompts = prefix + suffix pass, to within the attention term counted once causally.
    assert capacity.llm_pass_flops(c) == pytest.approx(
        tf["prefix_pass"] * 1e12 + tf["suffix_pass"] * 1e12, rel=0.05
    )


def test_doc_quotes_the_grefcoco_recipe(plan, capacity):
    """The gRefCOCO recipe's section is what capacity.py computes from that recipe's own model section."""
    g = plan["grefcoco"]
    assert g["counts"].trainable != plan["counts"].trainable  # its attention head, not the preset's MLP head
    text = DOC.read_text()
    section = text[text.index("## The gRefCOCO recipe") : text.index("## Measured on CPU")]
    assert f"**{g['counts'].trainable / 1e6:,.1f} M**" in section
    for name, gb in g["train_gpu_gb"].items():
        assert f"{gb:.2f} GB" in section, name
    assert f"**{g['train_gpu_total_gb']:.1f} GB**" in section and f"**{g['train_hours']:.2f} h**" in section
    assert g["train_gpu_total_gb"] < capacity.L20.memory_gb
