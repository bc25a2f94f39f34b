"""Ray Train + DeepSpeed ZeRO-2 on a local Ray cluster with 2 CPU workers (gloo), tiny preset.

One 30-step run (with a worker crash injected at step 15) serves most tests; a second run resumes it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from ppcr.checkpoint import load_checkpoint
from ppcr.config import ConfigError, load_config
from ppcr.data.streaming import RowsToBatch
from ppcr.distributed_train import (
    check_before_launch,
    deepspeed_config,
    export_inference,
    run_training,
    worker_config,
)
from ppcr.evaluate import evaluate_split
from ppcr.ray_cluster import ResourceError

STEPS, FAIL_AT, CKPT_EVERY = 30, 15, 10
REPO = Path(__file__).resolve().parents[1]


def _cfg(shards, storage, name="run", **dist):
    over = {
        "data": {"shards_root": str(shards)},
        "train": {"steps": STEPS, "batch_size": 8, "log_every": 5, "warmup_steps": 5},
        "distributed": {
            "num_workers": 2,
            "micro_batch_size": 4,
            "checkpoint_every": CKPT_EVERY,
            "keep_checkpoints": 2,
            "max_failures": 1,
            "storage_path": str(storage),
            "name": name,
            **dist,
        },
    }
    return load_config("tiny", overrides=over)


@pytest.fixture(scope="module")
def trained(synth_data, tmp_path_factory, ray_local):
    storage = tmp_path_factory.mktemp("ray_runs")
    cfg = _cfg(synth_data[2], storage, evaluate_split="val")
    result = run_training(cfg, _fail_at_step=FAIL_AT)
    log = [json.loads(x) for x in (storage / "run" / "train_log.jsonl").read_text().splitlines()]
    return cfg, result, log, storage


@pytest.mark.slow  # Ray Train + DeepSpeed runs (30 steps, a worker crash, a resume)
def test_zero2_training_lowers_the_loss_and_survives_a_worker_crash(trained):
    cfg, result, log, storage = trained
    assert result.steps == STEPS, log
    assert (storage / "run" / f".failed_once_at_{FAIL_AT}").exists()  # the crash really happened
    steps = [r["step"] for r in log]
    # Reports up to the crash, then the restart replays from the step-10 checkpoint to the end.
    assert steps == [5, 10, 15, 20, 25, 30]
    assert steps[-1] == STEPS and steps.count(10) == 1
    assert log[-1]["loss"] < 0.85 * log[0]["loss"], log
    assert 0 <= log[-1]["data_wait_fraction"] < 1 and log[-1]["samples_per_s"] > 0


@pytest.mark.slow  # Ray Train + DeepSpeed runs (30 steps, a worker crash, a resume)
def test_deepspeed_zero2_partitions_optimizer_state_across_ranks(trained):
    cfg, result, log, storage = trained
    assert log[-1]["zero_stage"] == 2
    ckpts = sorted((storage / "run").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_0000020", "step_0000030"]  # keep-last-2
    shards = sorted((ckpts[-1] / "deepspeed").glob("zero_pp_rank_*_optim_states.pt"))
    assert [s.name[:14] for s in shards] == ["zero_pp_rank_0", "zero_pp_rank_1"]
    sizes = []
    for s in shards:
        state = torch.load(s, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        sizes.append(sum(t.numel() for t in state["single_partition_of_fp32_groups"]))
    trainable = sum(p.numel() for p in load_checkpoint(result.checkpoint).parameters() if p.requires_grad)
    # Each rank holds about half of the fp32 master weights (ZeRO pads partitions to alignment).
    assert abs(sizes[0] - sizes[1]) <= 64 and trainable / 2 <= sizes[0] <= trainable / 2 + 64, (
        sizes,
        trainable,
    )


@pytest.mark.slow  # Ray Train + DeepSpeed runs (30 steps, a worker crash, a resume)
def test_exported_checkpoint_evaluates_like_the_model_in_memory(trained, val_dir):
    cfg, result, log, storage = trained
    model = load_checkpoint(result.checkpoint)
    metrics = evaluate_split(model, val_dir, progress=False)
    for k, v in metrics.items():
        assert log[-1][f"eval_{k}"] == pytest.approx(v, abs=1e-6), k
    meta = json.loads((result.checkpoint / "meta.json").read_text())
    assert meta["steps"] == STEPS and meta["trainer"] == "ray-train+deepspeed"


@pytest.mark.slow  # Ray Train + DeepSpeed runs (30 steps, a worker crash, a resume)
def test_resume_continues_a_finished_run(trained, tmp_path):
    cfg, result, log, storage = trained
    more = _cfg(cfg.data.shards_root, storage)
    more.train.steps = STEPS + 10
    with pytest.raises(ConfigError, match="already exists: pass --resume"):
        check_before_launch(more, resume=False)
    again = run_training(more, out=tmp_path / "export", resume=True)
    assert again.steps == STEPS + 10
    steps = [json.loads(x)["step"] for x in (storage / "run" / "train_log.jsonl").read_text().splitlines()]
    assert steps[-2:] == [STEPS + 5, STEPS + 10]
    assert (tmp_path / "export" / "model.safetensors").is_file()
    # On demand, from the run folder: the newest checkpoint's inference part.
    out = export_inference(storage / "run", tmp_path / "again")
    assert json.loads((out / "meta.json").read_text())["steps"] == STEPS + 10


# ----------------------------------------------------------------------------- errors before launch


def test_batch_not_divisible_is_a_config_error():
    with pytest.raises(
        ConfigError, match=r"train.batch_size \(8\) must be divisible by .*micro_batch_size \(3\)"
    ):
        load_config("tiny", overrides={"train": {"batch_size": 8}, "distributed": {"micro_batch_size": 3}})


def test_unknown_distributed_key_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown key distributed.num_worker "):
        load_config("tiny", overrides={"distributed": {"num_worker": 2}})


def test_missing_shard_folder_fails_before_ray_starts(tmp_path):
    cfg = _cfg(tmp_path / "absent", tmp_path / "runs")
    was = ray.is_initialized()
    with pytest.raises(ConfigError, match="shard folder not found: .*absent"):
        check_before_launch(cfg, resume=False)
    assert ray.is_initialized() == was


def test_deepspeed_overrides_and_autos(synth_data, tmp_path):
    cfg = _cfg(synth_data[2], tmp_path, deepspeed={"zero_optimization": {"overlap_comm": False}})
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"] == {**ds["zero_optimization"], "stage": 2, "overlap_comm": False}
    assert (
        ds["train_batch_size"],
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
    ) == (8, 4, 1)
    assert ds["optimizer"]["params"]["lr"] == cfg.train.lr and ds["bf16"]["enabled"] is False
    assert ds["scheduler"]["params"]["total_num_steps"] == STEPS
    with pytest.raises(ConfigError, match="stage 3 is not supported"):
        deepspeed_config(_cfg(synth_data[2], tmp_path, deepspeed={"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="do not satisfy"):
        deepspeed_config(_cfg(synth_data[2], tmp_path, deepspeed={"train_batch_size": 16}))


def test_request_larger_than_the_cluster_is_refused(synth_data, tmp_path, ray_local):
    cfg = _cfg(synth_data[2], tmp_path, num_workers=8, micro_batch_size=1)
    with pytest.raises(ResourceError, match=r"8 workers .*CPU: needs 9, cluster has 4"):
        check_before_launch(cfg, resume=False)


def test_resume_without_a_run_is_refused(synth_data, tmp_path):
    with pytest.raises(ConfigError, match="no run to continue"):
        check_before_launch(_cfg(synth_data[2], tmp_path), resume=True)


# ----------------------------------------------------------------------------- collate


def test_workers_get_absolute_local_folders(tmp_path, monkeypatch):
    """Rank 0 evaluates `distributed.evaluate_split` and workers load `model.init_weights` from a working
    folder that is not the driver's: relative folders must reach them absolute."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny", overrides={"data": {"shards_root": "shards"}, "model": {"init_weights": "w"}})
    sent = worker_config(cfg)
    assert sent["data"]["shards_root"] == str(tmp_path / "shards")
    assert sent["model"]["init_weights"] == str(tmp_path / "w")
    uri = load_config("tiny", overrides={"data": {"shards_root": "s3://bucket/shards"}})
    assert worker_config(uri)["data"]["shards_root"] == "s3://bucket/shards"
    assert worker_config(uri)["model"]["init_weights"] == uri.model.init_weights  # unset stays unset


def test_rows_to_batch_shares_images_and_skips_rows_already_trained_on():
    rows = {
        "key": np.array(["d/u/1", "d/u/2", "d/u/3"], dtype=object),
        "image_key": np.array(["a.jpg", "a.jpg", "b.jpg"], dtype=object),
        "clip_pixels": np.stack([np.full((3, 4, 4), i, np.float32) for i in range(3)]),
        "sam_pixels": np.zeros((3, 3, 8, 8), np.float32),
        "original_hw": np.array([[2, 3]] * 3),
        "sam_input_hw": np.array([[5, 8]] * 3),
        "expression": np.array(["x", "y", "z"], dtype=object),
        "gt_box": np.array([[0, 0, 1, 1]] * 3, np.float32),
        "mask_size": np.array([[2, 3]] * 3),
        "mask_counts": np.array(["06"] * 3, dtype=object),  # 2x3, all ones
    }
    for v in rows.values():
        v.setflags(write=False)  # as Ray's object store hands them out
    batch, keys = RowsToBatch()(rows)
    assert keys == ["d/u/1", "d/u/2", "d/u/3"] and batch.image_index.tolist() == [0, 0, 1]
    assert batch.clip_pixels[:, 0, 0, 0].tolist() == [0.0, 2.0] and batch.gt_masks[0].all()
    collate = RowsToBatch(skip=Counter({"d/u/1": 2}))  # trained on twice this epoch (weight 2)
    batch, keys = collate(rows)
    assert keys == ["d/u/2", "d/u/3"] and batch.expressions == ["y", "z"]
    assert collate(rows)[1] == ["d/u/2", "d/u/3"]  # the second occurrence is skipped too...
    assert collate(rows)[1] == ["d/u/1", "d/u/2", "d/u/3"]  # ...the third is new
    assert RowsToBatch(skip=Counter(["d/u/1", "d/u/2", "d/u/3"]))(rows) is None


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_training_config_loads_with_its_deepspeed_config(path):
    cfg = load_config(path)
    ds = deepspeed_config(cfg)
    d = cfg.distributed
    assert ds["zero_optimization"]["stage"] == 2 and ds["optimizer"]["type"] == "AdamW"
    assert ds["scheduler"]["type"] == "WarmupDecayLR" and ds["bf16"]["enabled"] is d.use_gpu
    assert ds["train_batch_size"] == d.micro_batch_size * ds["gradient_accumulation_steps"] * d.num_workers


@pytest.mark.slow  # a Ray Data stream over two shard sets
def test_training_stream_mixes_data_sets_by_weight(synth_data, ray_local, tmp_path):
    from ppcr.data.shards import iter_expressions, shard_dir
    from ppcr.data.streaming import ROW_COLUMNS, training_dataset

    shards = synth_data[2]
    n = sum(1 for _ in iter_expressions(shard_dir(shards, "synthref", "unc", "train")))
    entry = {"shards_root": str(shards), "dataset": "synthref", "split_by": "unc"}
    cfg = _cfg(
        shards, tmp_path, datasets=[{**entry, "weight": 2.0}, {**entry, "split": "val", "weight": 1.0}]
    )
    ds = training_dataset(cfg, cfg.model.vision.image_size, cfg.model.sam.image_size)
    n_val = sum(1 for _ in iter_expressions(shard_dir(shards, "synthref", "unc", "val")))
    rows = ds.select_columns(["key", "expression"]).take_all()
    assert len(rows) == 2 * n + n_val
    assert set(ds.columns()) == set(ROW_COLUMNS)
    keys = [r["key"] for r in rows]
    assert len(set(keys)) == n + n_val and all(k.startswith("synthref/unc/") for k in keys)
