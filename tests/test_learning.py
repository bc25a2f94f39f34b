"""The tiny preset learns to *ground*: after a few minutes of CPU training on an easy synthetic set its
boxes pick the referent far more often than the trivial baselines can.

The thresholds are the core issue's bar for CI; the demo-scale results are in docs/learning.md."""

from __future__ import annotations

import pytest
import torch

from ppcr.checkpoint import load_checkpoint
from ppcr.config import load_config
from ppcr.data.shards import prepare_shards, shard_dir
from ppcr.data.synth import SynthConfig, synthesize
from ppcr.evaluate import evaluate_baselines, evaluate_split
from ppcr.model import PPCRModel
from ppcr.train import train

pytestmark = pytest.mark.slow  # trains the tiny preset for minutes

STEPS = 400
# The bar. Measured with the 3-layer language model (2 cores, 163 s of training): BoxAcc 0.453,
# mIoU 0.562 vs all-objects 0.402; the 2-layer preset's step is ~25% cheaper (docs/learning.md, finding 14).
BOX_ACC_MIN = 0.3
MIOU_OVER_ALL_OBJECTS = 0.1


@pytest.fixture(scope="module")
def easy_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("easy")
    easy = SynthConfig(
        num_images=300,
        seed=7,
        min_objects=2,
        max_objects=3,
        relations=False,
        shapes=("square",),  # masks are easy; which square is the question
        small_size=(0.2, 0.25),
        big_size=(0.32, 0.4),
    )
    summary = synthesize(root / "refer", easy)
    prepare_shards(
        summary["refer_root"], summary["images_dir"], "synthref", "unc", root / "shards", progress=False
    )
    return root / "shards"


@pytest.fixture(scope="module")
def learned(easy_shards, tmp_path_factory):
    cfg = _cfg(easy_shards)
    torch.manual_seed(0)
    return train(cfg, out_dir=tmp_path_factory.mktemp("learned") / "run", progress=False)


def _cfg(shards):
    return load_config("tiny", overrides={"data": {"shards_root": str(shards)}, "train": {"steps": STEPS}})


def test_tiny_preset_learns_to_ground(easy_shards, learned):
    cfg = _cfg(easy_shards)
    val = shard_dir(easy_shards, "synthref", "unc", "val")
    torch.manual_seed(0)
    before = evaluate_split(PPCRModel(cfg.model), val, progress=False)
    result = learned
    after = evaluate_split(result.model, val, progress=False)
    baselines = evaluate_baselines(shard_dir(easy_shards, "synthref", "unc", "train"), val)
    mean_box, all_objects = baselines["baseline: mean box"], baselines["baseline: all objects"]
    print({"before": before, "after": after, **baselines, "seconds": result.seconds})
    history = result.history
    assert history[-1]["l1"] < 0.8 * history[0]["l1"]
    assert after["BoxAcc@0.5"] >= BOX_ACC_MIN
    assert (
        after["BoxAcc@0.5"] >= mean_box["BoxAcc@0.5"] + 0.1
        and after["BoxAcc@0.5"] >= all_objects["BoxAcc@0.5"] + 0.1
    )
    assert after["mIoU"] >= MIOU_OVER_ALL_OBJECTS + all_objects["mIoU"]
    assert after["mIoU"] > before["mIoU"] + 0.2


def test_bf16_inference_agrees_with_fp32(learned, easy_shards):
    """The dtype policy (docs/precision.md) on a trained checkpoint: LLaVA and SAM's encoder in bf16,
    heads and SAM's decoder in fp32, give the fp32 numbers on the synthetic val split."""
    val = shard_dir(easy_shards, "synthref", "unc", "val")
    fp32 = evaluate_split(load_checkpoint(learned.checkpoint), val, progress=False)
    bf16_model = load_checkpoint(learned.checkpoint, overrides={"dtype": "bfloat16"})
    assert bf16_model.mllm.llava.dtype == torch.bfloat16
    bf16 = evaluate_split(bf16_model, val, progress=False)
    print({"fp32": fp32, "bf16": bf16})
    assert fp32["mIoU"] > 0.4  # a model that segments, or the comparison says nothing
    assert abs(bf16["mIoU"] - fp32["mIoU"]) < 0.02
    assert abs(bf16["oIoU"] - fp32["oIoU"]) < 0.02
    assert abs(bf16["BoxAcc@0.5"] - fp32["BoxAcc@0.5"]) < 0.05
