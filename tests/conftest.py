"""Shared fixtures: a small synthetic data set in the REFER layout, converted to shards once per session."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ppcr.config import load_config
from ppcr.data.shards import prepare_shards, shard_dir
from ppcr.data.synth import SynthConfig, synthesize

# pycocotools calls a NumPy API that NumPy 2 deprecates; not ours to fix.
warnings.filterwarnings("ignore", category=DeprecationWarning, module="pycocotools")


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """(refer_root, images_dir, shards_root) of a 40-image synthetic data set."""
    root = tmp_path_factory.mktemp("synth")
    summary = synthesize(root / "refer", SynthConfig(num_images=40, seed=1, min_objects=2, max_objects=3))
    shards = root / "shards"
    prepare_shards(summary["refer_root"], summary["images_dir"], "synthref", "unc", shards, progress=False)
    return summary["refer_root"], summary["images_dir"], shards


@pytest.fixture(scope="session")
def val_dir(synth_data):
    return shard_dir(synth_data[2], "synthref", "unc", "val")


@pytest.fixture(scope="session")
def train_dir(synth_data):
    return shard_dir(synth_data[2], "synthref", "unc", "train")


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model is far faster on one intra-op thread on a small, shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cfg():
    """The tiny preset's RunConfig."""
    return load_config("tiny")


@pytest.fixture(scope="module")
def tiny_model(cfg):
    """The tiny preset, random init (seed 0), in eval mode: one per test module (tests may train it)."""
    from ppcr.model import PPCRModel

    torch.manual_seed(0)
    return PPCRModel(cfg.model).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """An inference checkpoint of the random tiny preset (seed 0), shared read-only by the session."""
    from ppcr.checkpoint import save_checkpoint
    from ppcr.model import PPCRModel

    torch.manual_seed(0)
    return save_checkpoint(
        PPCRModel(load_config("tiny").model).eval(), tmp_path_factory.mktemp("tiny") / "ckpt"
    )


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray cluster of 4 logical CPUs for the module (reused if one is running), shut down after."""
    import ray

    from ppcr.ray_cluster import init_ray

    was = ray.is_initialized()
    total = init_ray(num_cpus=4, object_store_mb=400, quiet=False)
    yield total
    if not was:
        ray.shutdown()


@pytest.fixture(scope="session")
def capacity():
    """deploy/capacity.py as a module (it is a script beside the package, not part of it)."""
    spec = importlib.util.spec_from_file_location(
        "capacity", Path(__file__).resolve().parents[1] / "deploy/capacity.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["capacity"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def multi_image_png() -> bytes:
    """A 120×90 PNG: grey, a red block and a blue one (what `multi_checkpoint` is tuned on)."""
    import io

    import numpy as np
    from PIL import Image

    img = np.full((90, 120, 3), 110, np.uint8)
    img[10:40, 15:60] = (220, 30, 30)
    img[50:85, 70:115] = (30, 60, 220)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def multi_checkpoint(tmp_path_factory):
    """(checkpoint, {"none": text, "two": text}): a random tiny `model.targets: multi` checkpoint (two box
    slots, seed 0) whose answer on `multi_image_png()` is no object for `none` and two objects for
    `two`, in any process. Its objectness head keeps every slot (weight 0, bias +10; slot_nms_iou 1);
    its presence head is rescaled so the two texts' presence logits are +5 and -5 (which text gets
    which is the random head's choice), so their answers differ by a margin no batch or thread count
    moves."""
    import numpy as np

    from ppcr.checkpoint import save_checkpoint
    from ppcr.geometry import decode_image
    from ppcr.inputs import Item, collate
    from ppcr.model import PPCRModel

    cfg = load_config("tiny", {"model": {"targets": "multi", "max_targets": 2, "slot_nms_iou": 1.0}})
    torch.manual_seed(0)
    model = PPCRModel(cfg.model).eval()
    texts = ["the green triangle", "all the squares"]
    image = decode_image(multi_image_png())
    batch = collate([Item(0, image, t) for t in texts], model.clip_size, model.sam_size, model.clip_mode)
    head = model.spatial.head
    with torch.no_grad():
        head.objectness.weight.zero_()
        head.objectness.bias.fill_(10.0)
        logits = model.reason(batch.clip_pixels, batch.image_index, texts, batch.original_hw).presence_logits
        low, high = (float(v) for v in logits)
        scale, middle = 10.0 / abs(high - low), (high + low) / 2
        head.presence.weight.mul_(scale)
        head.presence.bias.sub_(middle).mul_(scale)
    roles = {"two": texts[int(np.argmax([low, high]))], "none": texts[int(np.argmin([low, high]))]}
    return save_checkpoint(model, tmp_path_factory.mktemp("multi") / "ckpt"), roles
