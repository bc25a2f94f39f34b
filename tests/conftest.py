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
