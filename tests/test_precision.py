"""The production precision path, reproduced on CPU: the dtype policy (ppcr/precision.py), bf16 inference
on a real photograph, bf16 training locally and under DeepSpeed's own cast, collectives that a GPU job's
NCCL group accepts, and a bound on the work of one model call."""

from __future__ import annotations

import ast
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import torch.distributed as dist
from PIL import Image
from safetensors import safe_open
from skimage import data as skdata

import ppcr.distributed_train as dt
from ppcr.checkpoint import WEIGHTS_FILE, load_checkpoint
from ppcr.cli import main
from ppcr.config import ConfigError, load_config
from ppcr.model import PPCRModel
from ppcr.precision import FLOAT32_PREFIXES, apply_dtype_policy, dtype_report
from ppcr.predictor import Segmenter

FOURIER = "segmentation.sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"


def _train_args(shards, out, *extra):
    return [
        "train",
        "--config",
        "tiny",
        "--out",
        str(out),
        "--set",
        f"data.shards_root={shards}",
        "--set",
        "train.steps=3",
        "--set",
        "train.log_every=1",
        *extra,
    ]


@pytest.fixture(scope="module")
def bf16_run(synth_data, tmp_path_factory, one_thread):
    """`ppcr train --local --set model.dtype=bfloat16`: 3 steps, checkpoint saved in bf16."""
    out = tmp_path_factory.mktemp("bf16_local") / "run"
    assert main(_train_args(synth_data[2], out, "--local", "--set", "model.dtype=bfloat16")) == 0
    return out


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "astronaut.png"
    Image.fromarray(skdata.astronaut()).save(path)
    return path


# ---- the policy -------------------------------------------------------------------------------------


def test_policy_puts_each_part_in_its_dtype():
    torch.manual_seed(0)
    model = PPCRModel(load_config("tiny", overrides={"model": {"dtype": "bfloat16"}}).model)
    for name, p in model.named_parameters():
        if name.startswith(FLOAT32_PREFIXES) or ".lora_" in name:
            assert p.dtype == torch.float32, name
        else:  # LLaVA (tower, projector, LM, embeddings, lm_head) and SAM's image encoder
            assert p.dtype == torch.bfloat16, name
            assert name.startswith(("mllm.", "segmentation.sam.image_encoder.")), name
    assert dict(model.named_buffers())[FOURIER].dtype == torch.float32
    counts = dtype_report(model)
    assert counts["bfloat16"] > counts["float32"] > 0
    assert set(dtype_report(PPCRModel(load_config("tiny").model))) == {"float32"}


def test_each_stage_runs_whole_model_in_bf16_as_deepspeed_casts_it(synth_data, val_dir):
    """DeepSpeed bf16 casts *every parameter* to bf16 and keeps the buffers (SAM's Fourier matrix)
    float32: the forward pass must still run (it raised a dtype mismatch at the mask decoder)."""
    from ppcr.data.shards import ImageCache, iter_expressions, to_item
    from ppcr.inputs import collate

    torch.manual_seed(0)
    model = PPCRModel(load_config("tiny").model)
    for p in model.parameters():  # what deepspeed 0.19 _cast_module_mixed_precision does
        p.data = p.data.to(torch.bfloat16)
    assert dict(model.named_buffers())[FOURIER].dtype == torch.float32
    samples = list(iter_expressions(val_dir))[:4]
    batch = collate([to_item(s, ImageCache()) for s in samples], model.clip_size, model.sam_size)
    out = model(batch, gt_box_prob=0.5, gt_box_jitter=0.1)
    assert out.low_res_masks.dtype == torch.bfloat16 and torch.isfinite(out.low_res_masks.float()).all()
    assert torch.isfinite(out.box.float()).all()


def test_policy_is_idempotent_and_restores_float32_heads():
    torch.manual_seed(0)
    model = PPCRModel(load_config("tiny", overrides={"model": {"dtype": "bfloat16"}}).model)
    model.to(torch.bfloat16)  # everything low, as after a careless .to()
    apply_dtype_policy(model, "bfloat16")
    assert model.semantic.projection[0].weight.dtype == torch.float32
    assert dict(model.named_buffers())[FOURIER].dtype == torch.float32
    with pytest.raises(ValueError, match="model.dtype must be one of"):
        apply_dtype_policy(model, "bf16")


# ---- bf16 end to end on CPU ---------------------------------------------------------------------------


def test_local_bf16_training_has_finite_loss_and_saves_a_bf16_checkpoint(bf16_run):
    lines = [json.loads(x) for x in (bf16_run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in lines)
    ckpt = bf16_run / "checkpoint"
    assert "dtype: bfloat16" in (ckpt / "config.yaml").read_text()
    with safe_open(str(ckpt / WEIGHTS_FILE), framework="pt") as f:
        assert f.get_tensor("semantic.projection.0.weight").dtype == torch.float32
        llm = next(k for k in f.keys() if "embed_tokens" in k)
        assert f.get_tensor(llm).dtype == torch.bfloat16


def test_bf16_checkpoint_segments_a_real_photograph(bf16_run, photo):
    seg = Segmenter.from_checkpoint(bf16_run / "checkpoint")
    assert seg.model.mllm.llava.dtype == torch.bfloat16
    image = skdata.astronaut()
    mask, box, score, _ = seg.segment(image, "the woman in the white suit")
    assert mask.shape == image.shape[:2] and mask.dtype == bool
    assert np.isfinite(box).all() and np.isfinite(score)
    seg.set_image(image)  # the SamPredictor-style path: bf16 embedding reused by the fp32 decoder
    again = seg.predict("the woman in the white suit")
    np.testing.assert_array_equal(again.mask, mask)


def test_ppcr_segment_runs_a_bf16_checkpoint_and_casts_on_request(bf16_run, photo, tmp_path, capsys):
    ckpt = str(bf16_run / "checkpoint")
    capsys.readouterr()
    assert (
        main(["segment", str(photo), "the flag", "--checkpoint", ckpt, "--out", str(tmp_path / "o.png")]) == 0
    )
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    assert len(result["box"]) == 4 and np.isfinite(result["score"])
    assert (tmp_path / "o.png").stat().st_size > 0
    assert main(["segment", str(photo), "the flag", "--checkpoint", ckpt, "--dtype", "float32"]) == 0
    with pytest.raises(SystemExit):  # argparse: invalid choice 'bf16'
        main(["segment", str(photo), "the flag", "--checkpoint", ckpt, "--dtype", "bf16"])


# ---- DeepSpeed's own bf16 cast under Ray Train --------------------------------------------------------


@pytest.mark.slow  # a Ray Train + DeepSpeed job
def test_deepspeed_bf16_trains_and_exports(synth_data, tmp_path, one_thread):
    """`ppcr train --num-workers 1 --set distributed.deepspeed.bf16.enabled=true` over the float32
    tiny preset: DeepSpeed casts the parameters itself; the exported heads show it did."""
    out = tmp_path / "export"
    args = _train_args(
        synth_data[2],
        out,
        "--num-workers",
        "1",
        "--storage",
        str(tmp_path / "runs"),
        "--set",
        "distributed.deepspeed.bf16.enabled=true",
        "--set",
        "train.batch_size=8",
        "--set",
        "distributed.micro_batch_size=8",
        "--set",
        "distributed.checkpoint_every=3",
    )
    try:
        assert main(args) == 0
    finally:
        ray.shutdown()
    log = [json.loads(x) for x in (tmp_path / "runs" / "tiny" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3 and all(np.isfinite(r["loss"]) for r in log)
    with safe_open(str(out / WEIGHTS_FILE), framework="pt") as f:
        assert f.get_tensor("semantic.projection.0.weight").dtype == torch.bfloat16  # DeepSpeed's cast
        assert f.get_tensor(FOURIER).dtype == torch.float32  # buffers are not cast
    model = load_checkpoint(out)  # loads into the policy's dtypes (config says float32)
    assert model.semantic.projection[0].weight.dtype == torch.float32


def test_deepspeed_precision_follows_model_dtype(synth_data):
    over = {"data": {"shards_root": str(synth_data[2])}}
    assert dt.deepspeed_config(load_config("tiny", overrides=over))["bf16"]["enabled"] is False
    bf16 = {**over, "model": {"dtype": "bfloat16"}}
    assert dt.deepspeed_config(load_config("tiny", overrides=bf16))["bf16"]["enabled"] is True
    off = {**bf16, "distributed": {"deepspeed": {"bf16": {"enabled": False}}}}
    with pytest.raises(ConfigError, match="model.dtype bfloat16 needs DeepSpeed bf16.enabled"):
        dt.deepspeed_config(load_config("tiny", overrides=off))
    with pytest.raises(ConfigError, match="fp16 is not supported"):
        dt.deepspeed_config(load_config("tiny", overrides={**over, "model": {"dtype": "float16"}}))


# ---- collectives: every tensor on the engine's device -------------------------------------------------


@pytest.fixture
def group():
    """Open a world-size-1 process group with a device-type -> backend map, close it after."""
    opened = []

    def open_group(backend: str):
        store = tempfile.mktemp(prefix="ppcr-pg-")
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
        opened.append(store)

    yield open_group
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_group_without_cpu_support_refuses_cpu_tensors(group):
    """What NCCL does in a GPU job ("nccl" covers CUDA only), built on CPU: the bug's condition."""
    group("cuda:gloo")
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        dt.sum_over_ranks([1.0, 2.0], torch.device("cpu"))


def test_collective_helpers_build_their_tensors_on_the_given_device(group):
    """With the default device set to one that cannot be used here, a helper that builds its tensor
    without `device=` fails; the helpers put everything on the device they are given."""
    group("cpu:gloo")
    with torch.device("cuda"):
        assert dt.sum_over_ranks([1.0, 2.5], torch.device("cpu")) == [1.0, 2.5]
        assert dt.all_ranks_min(2, torch.device("cpu")) == 2
        assert [b for b, _ in dt._epochs_agree(iter(["a", "b"]), torch.device("cpu"))] == ["a", "b"]


def test_training_loop_calls_collectives_only_through_the_device_helpers():
    tree = ast.parse(Path(dt.__file__).read_text())
    helpers = {"all_ranks_min", "sum_over_ranks"}
    offenders = []
    for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name not in helpers):
        for call in (n for n in ast.walk(fn) if isinstance(n, ast.Call)):
            f = call.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "dist":
                offenders.append(f"{fn.name}: dist.{f.attr}")
    assert not offenders, offenders


# ---- bounded work per model call ----------------------------------------------------------------------


def test_reason_in_chunks_gives_the_same_answers(synth_data, val_dir, monkeypatch):
    from ppcr.data.shards import ImageCache, iter_expressions, to_item
    from ppcr.inputs import collate

    torch.manual_seed(0)
    model = PPCRModel(load_config("tiny").model).eval()
    samples = list(iter_expressions(val_dir))[:7]
    batch = collate([to_item(s, ImageCache()) for s in samples], model.clip_size, model.sam_size)
    args = (batch.clip_pixels, batch.image_index, batch.expressions, batch.original_hw)
    with torch.no_grad():
        whole = model.reason(*args)
        sizes = []
        language = model.mllm.language
        monkeypatch.setattr(
            model.mllm, "language", lambda b, *a, **k: sizes.append(len(b.input_ids)) or language(b, *a, **k)
        )
        chunked = model.reason(*args, max_sequences=3)
    assert sizes == [3, 3, 3, 3, 1, 1]  # two stages per chunk, never more than 3 sequences
    torch.testing.assert_close(chunked.semantic_prompt, whole.semantic_prompt, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(chunked.box, whole.box, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="max_sequences must be >= 1"):
        model.reason(*args, max_sequences=0)
