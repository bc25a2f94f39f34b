"""The production geometry's build and memory rules, checked cheaply: real widths with few layers, the
tiny preset, and deploy/capacity.py's formulas (the full-size runs are benchmarks/realsize_cpu.py)."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ppcr import mllm as mllm_module
from ppcr.config import load_config
from ppcr.model import PPCRModel
from ppcr.precision import _keeps_float32
from ppcr.predictor import Segmenter

REPO = Path(__file__).resolve().parents[1]

# sha256 of the tiny preset's initial state dict (names, dtypes, shapes, bytes) after torch.manual_seed(0),
# computed before LLaVA was built through `_from_config(config, dtype=...)`: the float32 path must stay
# bit-identical (same modules, same order, same random draws).
TINY_STATE_SHA256 = "251fd461c0c01b39812af0f0bcf3a70f256822e1d735d1421c0d91321203f642"


def state_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_tiny_initial_weights_are_unchanged():
    torch.manual_seed(0)
    model = PPCRModel(load_config("tiny").model)
    assert len(model.state_dict()) == 342
    assert state_sha256(model) == TINY_STATE_SHA256


def real_width(language_layers: int = 1, vision_layers: int = 1):
    """The llava-1.5-7b preset's widths (LLaVA-7B, CLIP-L/336) with few layers."""
    return load_config(
        "llava-1.5-7b",
        overrides={
            "model": {"language": {"num_layers": language_layers}, "vision": {"num_layers": vision_layers}}
        },
    ).model


def test_real_width_llava_is_built_in_bf16_without_a_float32_copy(monkeypatch):
    """Every parameter LLaVA registers while it is built is already bf16 (a float32 build cast afterwards
    would register ~4 bytes per parameter first: ~30 GB at 7B), and the finished model follows the
    dtype policy: LLaVA bf16, LoRA and heads float32."""
    registered: list[torch.dtype] = []
    build = mllm_module.build_llava

    def watched(*args, **kwargs):
        hook = nn.modules.module.register_module_parameter_registration_hook(
            lambda module, name, param: registered.append(param.dtype) if param is not None else None
        )
        try:
            return build(*args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(mllm_module, "build_llava", watched)
    model = PPCRModel(real_width(), parts=("mllm",))
    assert len(registered) > 20 and set(registered) == {torch.bfloat16}
    llava = model.mllm.llava
    assert llava.config.text_config.hidden_size == 4096 and llava.config.vision_config.hidden_size == 1024
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if _keeps_float32(name) else torch.bfloat16), name


def test_language_pass_builds_no_kv_cache(monkeypatch):
    """A teacher-forced pass reads no past keys/values: transformers' DynamicCache must not be made."""
    from transformers.models.llama import modeling_llama

    class NoCache:
        def __init__(self, *args, **kwargs):
            raise AssertionError("the language model built a KV cache")

    monkeypatch.setattr(modeling_llama, "DynamicCache", NoCache)
    torch.manual_seed(0)
    model = PPCRModel(load_config("tiny").model, parts=("mllm",)).eval()
    m = model.mllm
    feats = torch.randn(2, m.num_image_tokens, m.hidden_size)
    with torch.no_grad():
        out = m.run_stage(
            "semantic", ["segment the red circle", "the left one"], "It is [SEG].", "[SEG]", feats
        )
    assert out.token.shape == (2, m.hidden_size) and torch.isfinite(out.ce)


def test_sam_encode_runs_one_image_per_call_with_the_stacked_answer(monkeypatch):
    torch.manual_seed(0)
    model = PPCRModel(load_config("tiny").model, parts=("sam",)).eval()
    stage = model.segmentation
    pixels = torch.randn(3, 3, stage.image_size, stage.image_size)
    with torch.no_grad():
        stacked = stage.sam.image_encoder(pixels)
    batch_sizes = []
    forward = type(stage.sam.image_encoder).forward

    def counting(self, x):
        batch_sizes.append(x.shape[0])
        return forward(self, x)

    monkeypatch.setattr(type(stage.sam.image_encoder), "forward", counting)
    out = stage.encode(pixels)
    assert batch_sizes == [1, 1, 1]
    assert out.shape == stacked.shape
    torch.testing.assert_close(out, stacked, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- capacity formulas


@pytest.fixture(scope="module")
def counts(capacity):
    return capacity.parameter_counts()


def test_sam_attention_peak_is_three_score_tensors_of_one_image(capacity, counts):
    assert (counts.sam_heads, counts.sam_tokens) == (16, 4096)
    assert capacity.sam_attention_peak_gb(counts) == pytest.approx(3 * 16 * 4096**2 * 2 / 1e9)  # 1.61 GB
    # The batch does not enter: the SAM replica is weights + cache + one image's peak + context.
    replica = capacity.sam_replica_gb(counts, 256)
    parts = capacity.sam_weights_gb(counts) + 256 * 256 * 64 * 64 * 2 / 1e9 + 1.61 + capacity.CUDA_CONTEXT_GB
    assert replica == pytest.approx(parts, abs=0.01)
    assert 4.5 < replica < 5.2
    items = capacity.train_gpu_gb(counts, 4, 1, {})
    assert (
        items["SAM-H encoder peak (no grad)"]
        == capacity.train_gpu_gb(counts, 4, 2, {})["SAM-H encoder peak (no grad)"]
    )


def test_random_init_peak_fits_the_host(capacity, counts):
    full = capacity.host_ram_random_init_gb(counts)
    offline = capacity.host_ram_random_init_gb(counts, vocab_rows=counts.embed_rows_built)
    # The two vocabularies differ by 2 matrices x (32064 - rows) x 4096 bf16 values.
    assert full - offline == pytest.approx(2 * (32064 - counts.embed_rows_built) * 4096 * 2 / 1e9)
    assert 16.0 < offline < full < 17.5  # bf16 LLaVA + float32 SAM; a float32 LLaVA would be ~30 GB


def test_segment_chunk_peak_is_one_mlp_of_the_chunk_and_not_the_depth(capacity, counts):
    # 16 prompts of 705 tokens (whole prompts: no shared prefix): 3 x 11008 + 6 x 4096 bf16 values a token.
    chunk = capacity.segment_chunk_peak_gb(counts, 16, 705)
    assert chunk == pytest.approx(16 * 705 * (3 * 11008 + 6 * 4096) * 2 / 1e9)  # 1.30 GB
    shallow = capacity.parameter_counts(language_layers=2)
    assert capacity.segment_chunk_peak_gb(shallow, 16, 705) == chunk
    assert capacity.segment_chunk_peak_gb(counts, 8, 705) == pytest.approx(chunk / 2)
    # One chunk's peak is its language pass or one image's SAM encode, whichever is larger.
    sam_side = capacity.sam_input_bytes(counts)
    assert sam_side == 3 * 1024 * 1024 * 4
    held = capacity.llava_weights_gb(counts) + capacity.sam_weights_gb(counts)
    one = capacity.segment_batch_peak_gb(counts, 1, 705)
    assert one == pytest.approx(held + sam_side / 1e9 + capacity.sam_attention_peak_gb(counts))
    big = capacity.segment_batch_peak_gb(counts, 64, 705)
    assert big == pytest.approx(held + 64 * sam_side / 1e9 + 4 * chunk)


def test_segmenter_default_chunk_fits_a_24gb_host(capacity, counts):
    """`Segmenter`'s default expressions per forward, llava-hf's vocabulary, distinct images and the CPU
    process (~1 GB, measured): within the 20 GB a 24 GB host gives one real-size process."""
    default = inspect.signature(Segmenter.__init__).parameters["batch_size"].default
    assert default == 16
    peak = capacity.segment_batch_peak_gb(counts, default, 705) + 1.0  # 705: the prompts measured
    assert peak <= 20.0


def test_sam_from_a_pth_takes_the_files_tensors_without_a_random_copy(tmp_path):
    """build_sam with a checkpoint makes its modules on the meta device (no random SAM beside the file's
    tensors: at ViT-H that is 2.5 GB of float32 more at the start-up peak) and ends with every tensor on
    the CPU, equal to the file's, and the pixel mean/std (in no state dict) equal to a built SAM's."""
    import dataclasses

    from ppcr.segmentation_stage import build_sam

    cfg = load_config("tiny").model
    torch.manual_seed(0)
    ref = build_sam(cfg.sam, cfg.prompt_dim).eval()
    torch.save(ref.state_dict(), tmp_path / "sam.pth")
    devices: list[str] = []
    hook = nn.modules.module.register_module_parameter_registration_hook(
        lambda module, name, param: devices.append(param.device.type) if param is not None else None
    )
    try:
        sam = build_sam(dataclasses.replace(cfg.sam, checkpoint=str(tmp_path / "sam.pth")), cfg.prompt_dim)
    finally:
        hook.remove()
    # Every parameter is made on meta; the CPU ones registered after them are the file's (assign=True).
    n = len(dict(ref.named_parameters()))
    assert devices[:n] == ["meta"] * n and set(devices[n:]) <= {"cpu"}
    tensors = dict(sam.named_parameters()) | dict(sam.named_buffers())
    assert len(tensors) == len(dict(ref.named_parameters()) | dict(ref.named_buffers()))
    for name, t in (dict(ref.named_parameters()) | dict(ref.named_buffers())).items():
        assert tensors[name].device.type == "cpu", name
        torch.testing.assert_close(tensors[name], t, rtol=0, atol=0)
    x = torch.rand(1, 3, 40, 60) * 255
    torch.testing.assert_close(sam.eval().preprocess(x), ref.preprocess(x), rtol=0, atol=0)


def test_standins_have_the_hub_layout_and_load_through_the_checkpoint_path(tmp_path):
    """benchmarks/realsize_standins.py at the tiny preset's sizes: the llava-hf folder under the hub's key
    names with a shard index, the SAM .pth and a checkpoint naming both, loaded the way a user loads one."""
    import json
    import warnings

    spec = importlib.util.spec_from_file_location(
        "realsize_standins", REPO / "benchmarks/realsize_standins.py"
    )
    standins = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(standins)
    paths = standins.ensure_standins(tmp_path, smoke=True)
    index = json.loads((paths["llava"] / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    assert "language_model.lm_head.weight" in keys and "multi_modal_projector.linear_1.weight" in keys
    assert any(k.startswith("language_model.model.layers.0.") for k in keys)
    assert any(k.startswith("vision_tower.vision_model.") for k in keys)
    assert all((paths["llava"] / f).is_file() for f in set(index["weight_map"].values()))
    from ppcr.checkpoint import load_checkpoint, load_model_config

    cfg = load_model_config(paths["checkpoint"])
    assert cfg.mllm_path == str(paths["llava"]) and cfg.sam.checkpoint == str(paths["sam"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sam = load_checkpoint(paths["checkpoint"], parts=("sam",))
        whole = load_checkpoint(paths["checkpoint"])
    assert sam.parts == ("sam",) and whole.mllm.llava.config.text_config.vocab_size >= len(
        whole.mllm.tokenizer
    )
    # Written once: a second call reuses the folder.
    stamp = (paths["checkpoint"] / "model.safetensors").stat().st_mtime_ns
    assert standins.ensure_standins(tmp_path, smoke=True) == paths
    assert (paths["checkpoint"] / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_real_width_model_trains_segments_and_serves(tmp_path):
    """LLaVA-7B widths (2 language layers), CLIP-L/336 whole, SAM ViT-H whole, bf16, random weights: one
    training step (the local loop's `train_step`, gradient checkpointing on), one photograph through
    `Segmenter`, then the same weights served (`ppcr.serve.start`: an MLLM and a SAM replica, each its own
    Ray process) answering the same photograph over HTTP like the in-process call. ~5.6 GB of RAM in this
    process, ~4 GB more while serving; ~3 SAM-H encodes (5.7 TFLOP each) dominate: ~3 min on 2 AVX-512
    BF16 cores (docs/benchmarks.md); an AVX2-only CPU is several times slower."""
    import io
    import random
    import warnings

    import ray
    from PIL import Image
    from ray import serve
    from skimage import data

    from ppcr.checkpoint import save_checkpoint
    from ppcr.inputs import Item, collate
    from ppcr.predictor import Segmenter
    from ppcr.serve import free_port, segment_remote, start, wait_healthy
    from ppcr.train import build_optimizer, train_step

    cfg = load_config("llava-1.5-7b", overrides={"model": {"language": {"num_layers": 2}}})
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PPCRModel(cfg.model)
    assert model.mllm.llava.config.vision_config.num_hidden_layers == 24
    assert model.segmentation.sam.image_encoder.patch_embed.proj.out_channels == 1280  # ViT-H
    assert cfg.model.gradient_checkpointing
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if _keeps_float32(name) else torch.bfloat16), name

    # One step of the local training loop at real width.
    image = np.ascontiguousarray(data.coffee())
    mask = np.zeros(image.shape[:2], bool)
    mask[80:260, 170:420] = True
    item = Item(0, image, "the cup of coffee", gt_mask=mask, gt_box=np.array([170.0, 80.0, 420.0, 260.0]))
    batch = collate([item], cfg.model.vision.image_size, model.sam_size, model.clip_mode)
    optimizer, _ = build_optimizer(model, cfg.train)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n or "box_head" in n}
    logs = train_step(model, batch, cfg, optimizer, random.Random(0), 0)
    assert np.isfinite(logs["loss"]) and logs["loss"] > 0, logs
    changed = [n for n, p in model.named_parameters() if n in trained and not torch.equal(p, trained[n])]
    assert len(changed) == len(trained) > 0  # every LoRA B and box-head tensor took the step
    del optimizer, trained

    # The trained weights answer in-process.
    seg = Segmenter(model)
    answer = seg.segment(image, "the cup of coffee")
    assert answer.mask.shape == image.shape[:2] and answer.mask.dtype == bool
    assert np.isfinite(answer.box).all() and np.isfinite(answer.score)

    # ... and served: the replicas load the checkpoint of the same weights.
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    del seg, model
    ray_was_up = ray.is_initialized()
    one = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
    args = {"checkpoint": str(ckpt), "request_timeout_s": 600, "torch_threads": 1}
    url = start(
        args,
        port=free_port(),
        name="realwidth",
        num_cpus=4,
        options=dict.fromkeys(["Ingress", "MLLM", "SAM"], one),
    )
    try:
        wait_healthy(url, timeout_s=600)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "PNG")
        served = segment_remote(url, buf.getvalue(), "the cup of coffee", timeout_s=600)
    finally:
        serve.shutdown()
        if not ray_was_up:
            ray.shutdown()
    assert served["mask"]["size"] == list(image.shape[:2])
    np.testing.assert_allclose(served["box"], answer.box, atol=2.0)  # same weights, same answer
