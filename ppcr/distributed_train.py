"""Distributed training: a Ray Train TorchTrainer whose workers run DeepSpeed ZeRO-2 on Ray Data streams.

    driver  check_before_launch  config, DeepSpeed dict, shard folders, cluster resources: fail here,
                                 before any worker starts, never hang
            run_training         TorchTrainer(train_loop_per_worker, datasets={"train": streamed shards})
    worker  train_loop_per_worker deepspeed.initialize(ZeRO-2) -> compute_loss (ppcr.train) per micro-batch
                                 -> every `checkpoint_every` steps: DeepSpeed's sharded checkpoint from
                                 every rank + rank 0's inference checkpoint, through ray.train.report

Resume: Ray Train restores the latest checkpoint after a worker failure (FailureConfig) or when a run
of the same name is started again (`--resume`). DeepSpeed restores weights, optimizer shards, step
and LR schedule. The data position is how often each expression key was trained on, by any rank, in
the current epoch; when the epoch is replayed those occurrences are skipped, so only the rows after
the last checkpoint are seen twice.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, RunConfig, deep_merge, from_dict, read_yaml, to_dict
from .storage import is_uri

REPO_ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED_TAG = "deepspeed"
INFERENCE_DIR = "inference"


# ----------------------------------------------------------------------------- driver side


def _resolve(path: str) -> Path:
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def deepspeed_config(cfg: RunConfig) -> dict:
    """The DeepSpeed config of a run: the file of `distributed.deepspeed_config`, overridden by
    `distributed.deepspeed`, with every "auto" filled from the run config (see the file's header)."""
    d, t = cfg.distributed, cfg.train
    path = _resolve(d.deepspeed_config)
    ds = deep_merge(read_yaml(path), d.deepspeed)
    accum = t.batch_size // (d.micro_batch_size * d.num_workers)
    max_lr: float | list[float] = t.lr if t.head_lr_mult == 1.0 else [t.lr, t.lr * t.head_lr_mult]
    auto = {
        ("train_batch_size",): t.batch_size,
        ("train_micro_batch_size_per_gpu",): d.micro_batch_size,
        ("gradient_accumulation_steps",): accum,
        ("gradient_clipping",): t.grad_clip,
        ("optimizer", "params", "lr"): t.lr,
        ("optimizer", "params", "betas"): list(t.betas),
        ("optimizer", "params", "weight_decay"): t.weight_decay,
        ("scheduler", "params", "warmup_max_lr"): max_lr,
        ("scheduler", "params", "warmup_num_steps"): t.warmup_steps,
        ("scheduler", "params", "total_num_steps"): t.steps,
        # One source of truth for precision: model.dtype (ppcr/precision.py), on CPU and GPU alike.
        ("bf16", "enabled"): cfg.model.dtype == "bfloat16",
    }
    for keys, value in auto.items():
        node = ds
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(keys[-1]) == "auto":
            node[keys[-1]] = value

    def leftover(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from leftover(v, f"{prefix}{k}.")
        elif node == "auto":
            yield prefix.rstrip(".")

    left = list(leftover(ds))
    if left:
        raise ConfigError(f"{path}: no run-config value fills 'auto' for {', '.join(left)}; set them")
    got = (
        ds.get("train_batch_size"),
        ds.get("train_micro_batch_size_per_gpu"),
        ds.get("gradient_accumulation_steps"),
    )
    if None in got or got[0] != got[1] * got[2] * d.num_workers:
        raise ConfigError(
            f"DeepSpeed batch sizes {got} (train_batch_size, micro, accumulation) do not satisfy "
            f"train_batch_size = micro x accumulation x distributed.num_workers ({d.num_workers})"
        )
    bf16 = bool(ds.get("bf16", {}).get("enabled", False))
    if cfg.model.dtype == "float16" or ds.get("fp16", {}).get("enabled", False):
        raise ConfigError("fp16 is not supported by the distributed job (no loss scaling); use bfloat16")
    if cfg.model.dtype == "bfloat16" and not bf16:
        raise ConfigError(
            f"model.dtype bfloat16 needs DeepSpeed bf16.enabled: true (it is false in {path} or "
            "distributed.deepspeed): ZeRO flattens parameters of one dtype and keeps their fp32 masters"
        )
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(
            f"zero_optimization.stage {stage} is not supported: the inference export reads full weights "
            "on rank 0, which ZeRO-3 partitions"
        )
    return ds


def storage_root(cfg: RunConfig) -> str:
    """`distributed.storage_path` as Ray Train takes it: a URI as given, a local folder made absolute."""
    root = cfg.distributed.storage_path
    return root.rstrip("/") if is_uri(root) else str(Path(root).resolve())


def run_dir(cfg: RunConfig) -> str:
    return f"{storage_root(cfg)}/{cfg.distributed.name}"


def worker_config(cfg: RunConfig) -> dict:
    """`cfg` as the workers receive it: the local folders they open themselves (`data.shards_root`, for
    rank 0's `distributed.evaluate_split`; `model.init_weights`) made absolute, since a Ray worker's
    working folder is not the driver's. URIs and absolute paths are kept as given."""
    out = to_dict(cfg)
    for section, key in (("data", "shards_root"), ("model", "init_weights")):
        value = out[section].get(key)
        if value and not is_uri(value):
            out[section][key] = str(Path(value).resolve())
    return out


def check_before_launch(cfg: RunConfig, resume: bool) -> dict:
    """Everything that can be checked on the driver: returns the DeepSpeed config or raises
    ConfigError / ResourceError naming the problem. Starts or connects to Ray (sized for the job)."""
    from .data.streaming import check_mix_single_target
    from .ray_cluster import init_ray, require_resources

    d = cfg.distributed
    ds = deepspeed_config(cfg)
    check_mix_single_target(cfg)  # every split exists (and, for model.targets single, has one target each)
    if d.evaluate_split:
        from .data.shards import shard_dir

        split = shard_dir(cfg.data.shards_root, cfg.data.dataset, cfg.data.split_by, d.evaluate_split)
        if not split.is_dir():
            raise ConfigError(f"distributed.evaluate_split: shard folder not found: {split}")
    if cfg.model.init_weights and not (Path(cfg.model.init_weights) / "config.yaml").is_file():
        # Workers read it from this path: fail here, before any worker starts.
        raise ConfigError(f"model.init_weights: not a ppcr checkpoint folder: {cfg.model.init_weights}")
    if not is_uri(d.storage_path):
        run = Path(run_dir(cfg))
        exists = (run / "checkpoint_manager_snapshot.json").exists() or any(run.glob("step_*"))
        if exists and not resume:
            raise ConfigError(
                f"run {run} already exists: pass --resume to continue it, or choose another "
                "--name / distributed.name (nothing was changed)"
            )
        if resume and not exists:
            raise ConfigError(f"--resume: no run to continue at {run}")
    need_cpu = d.num_workers * d.cpus_per_worker + d.data_cpus
    init_ray(quiet=False)  # workers' progress lines reach the driver
    require_resources(
        {"CPU": need_cpu, "GPU": d.num_workers if d.use_gpu else 0},
        f"training with {d.num_workers} workers x {d.cpus_per_worker:g} CPUs + {d.data_cpus:g} data CPUs",
    )
    return ds


@dataclass
class DistributedResult:
    steps: int
    metrics: dict  # the last report of rank 0 (averaged over ranks)
    checkpoint: Path | None  # exported inference checkpoint
    run_dir: str


def run_training(
    cfg: RunConfig,
    out: str | Path | None = None,
    resume: bool = False,
    dataset=None,
    *,
    _fail_at_step: int | None = None,
) -> DistributedResult:
    """Train `cfg` with Ray Train + DeepSpeed; export the final inference checkpoint to `out`
    (default `<run dir>/export`, local runs) and return the last metrics. `dataset`: a Ray Dataset of
    training rows (ppcr.data.streaming.ROW_COLUMNS) instead of streaming `cfg`'s shards.
    `_fail_at_step`: a test hook, not user config: one worker crashes once at this step (`_maybe_fail`)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from .data.streaming import training_dataset

    ds_cfg = check_before_launch(cfg, resume)
    d = cfg.distributed
    clip_size = cfg.model.vision.image_size
    sam_size = cfg.model.sam.image_size
    if dataset is None:
        dataset = training_dataset(cfg, clip_size, sam_size)
    resources = {"CPU": d.cpus_per_worker}
    if d.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "run_config": worker_config(cfg),
            "deepspeed": ds_cfg,
            "run_dir": run_dir(cfg),
            "fail_at_step": _fail_at_step,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=d.num_workers,
            use_gpu=d.use_gpu,
            resources_per_worker=resources,
            accelerator_type=d.accelerator_type,
        ),
        torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=d.name,
            storage_path=storage_root(cfg),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=d.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=d.max_failures),
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    exported = None
    if result.checkpoint is not None:
        target = Path(out) if out else (Path(run_dir(cfg)) / "export" if not is_uri(d.storage_path) else None)
        if target is not None:
            exported = export_inference(result.checkpoint, target)
    return DistributedResult(
        steps=int(result.metrics.get("step", 0)),
        metrics=dict(result.metrics),
        checkpoint=exported,
        run_dir=run_dir(cfg),
    )


def latest_checkpoint(run: str | Path):
    """The newest `step_*` checkpoint of a run folder or URI (a ray.train.Checkpoint)."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    from .storage import filesystem_for

    fs, path = filesystem_for(run)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"no training run at {run}") from None
    steps = sorted(
        i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("step_")
    )
    if not steps:
        raise FileNotFoundError(f"no step_* checkpoints in {run}")
    return Checkpoint(path=steps[-1], filesystem=fs)


def export_inference(checkpoint, out: str | Path) -> Path:
    """Copy the inference checkpoint (LoRA, token rows, heads, SAM decoder, config, tokenizer) out of a
    training checkpoint (a ray.train.Checkpoint or a run folder/URI, whose newest checkpoint is used)."""
    if isinstance(checkpoint, (str, Path)):
        if not is_uri(checkpoint) and (Path(checkpoint) / INFERENCE_DIR).is_dir():
            from ray.train import Checkpoint

            checkpoint = Checkpoint.from_directory(str(checkpoint))  # one step_* folder
        else:
            checkpoint = latest_checkpoint(checkpoint)
    out = Path(out)
    with checkpoint.as_directory() as d:
        src = Path(d) / INFERENCE_DIR
        if not (src / "model.safetensors").is_file():
            raise FileNotFoundError(f"{checkpoint.path} has no {INFERENCE_DIR}/ inference checkpoint")
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    return out


# ----------------------------------------------------------------------------- worker side


# Every tensor handed to torch.distributed is built on the engine's device by these two helpers and
# nowhere else: NCCL covers CUDA only, so a CPU tensor in a GPU job raises "No backend type associated
# with device type cpu" (tests/test_precision.py reproduces that group on CPU and checks this rule).


def all_ranks_min(value: int, device: torch.device) -> int:
    """The minimum of `value` over all ranks (one 1-element all-reduce on `device`)."""
    import torch.distributed as dist

    flag = torch.tensor([value], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return int(flag.item())


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums of `values` over all ranks (one all-reduce on `device`)."""
    import torch.distributed as dist

    vec = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(vec)
    return vec.tolist()


def _epochs_agree(batches, device: torch.device):
    """Yield micro-batches while every rank has one: ranks agree on each step with one tiny
    all-reduce (0 = this rank's epoch ended, 1 = all rows of this batch were already trained on
    before a restart, 2 = a batch), so no rank waits in a collective another never reaches."""
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        item = next(it, StopIteration)
        wait = time.perf_counter() - t0
        code = all_ranks_min(0 if item is StopIteration else (1 if item is None else 2), device)
        if code == 0:
            return
        if code == 2:
            yield item, wait


def _restore(engine, rank: int) -> tuple[int, Counter]:
    """Load the latest Ray Train checkpoint into `engine`; returns (epoch, how often each key was
    already trained on in that epoch by any rank)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0, Counter()
    with ckpt.as_directory() as d:
        path, _ = engine.load_checkpoint(d, tag=DEEPSPEED_TAG)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {d}/{DEEPSPEED_TAG}")
        states = [json.loads(p.read_text()) for p in sorted(Path(d).glob("data_state_rank*.json"))]
    epoch = max((s["epoch"] for s in states), default=0)
    seen: Counter = Counter()
    for s in states:
        if s["epoch"] == epoch:
            seen.update(s["seen"])
    if rank == 0:
        print(f"[ppcr train] resumed at step {engine.global_steps}, epoch {epoch}, {seen.total()} rows done")
    return epoch, seen


def _save(engine, cfg: RunConfig, rank: int, epoch: int, seen: Counter, metrics: dict) -> None:
    import ray.train
    from ray.train import Checkpoint

    from .checkpoint import save_checkpoint

    step = engine.global_steps
    with tempfile.TemporaryDirectory(prefix="ppcr-ckpt-") as d:
        engine.save_checkpoint(d, tag=DEEPSPEED_TAG)  # collective: every rank writes its optimizer shard
        (Path(d) / f"data_state_rank{rank}.json").write_text(
            json.dumps({"epoch": epoch, "seen": dict(sorted(seen.items()))})
        )
        if rank == 0:
            save_checkpoint(
                engine.module,
                Path(d) / INFERENCE_DIR,
                extra={"steps": step, "run_config": to_dict(cfg), "trainer": "ray-train+deepspeed"},
            )
        ray.train.report(
            metrics, checkpoint=Checkpoint.from_directory(d), checkpoint_dir_name=f"step_{step:07d}"
        )


def _maybe_fail(cfg: RunConfig, rank: int, step: int, run: str, fail_at_step: int | None) -> None:
    """Testing hook: rank 1 (or 0 alone) dies once at `fail_at_step` (`run_training(_fail_at_step=)`), after Ray Train has
    registered the last checkpoint (its controller picks reports up asynchronously; a crash right
    after a report would, correctly but not reproducibly, restart from the checkpoint before)."""
    d = cfg.distributed
    if fail_at_step is None or step != fail_at_step or rank != min(1, d.num_workers - 1):
        return
    marker = Path(run) / f".failed_once_at_{step}"
    if is_uri(run) or marker.exists():
        return
    last = (step - 1) // d.checkpoint_every * d.checkpoint_every
    snapshot = Path(run) / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 120
    while last and time.monotonic() < deadline:
        if snapshot.is_file() and f"step_{last:07d}" in snapshot.read_text():
            break
        time.sleep(0.2)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("injected failure (run_training's _fail_at_step)\n")
    print(f"[ppcr train] rank {rank}: injected failure at step {step}", flush=True)
    os._exit(1)  # a hard crash, as a killed worker: no cleanup, no exception handling


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker (torch.distributed already initialised by Ray Train)."""
    cfg: RunConfig = from_dict(RunConfig, config["run_config"])
    d, t = cfg.distributed, cfg.train
    if not d.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    import deepspeed
    import ray.train

    from .data.streaming import RowsToBatch
    from .model import PPCRModel
    from .precision import configure_device
    from .train import compute_loss, trainable_groups

    deepspeed.init_distributed(dist_backend="nccl" if d.use_gpu else "gloo")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not d.use_gpu:
        torch.set_num_threads(max(1, int(d.cpus_per_worker)))
    torch.manual_seed(t.seed)  # same init on every rank (DeepSpeed also broadcasts rank 0's weights)
    model = PPCRModel(cfg.model)
    if cfg.model.init_weights:
        from .checkpoint import load_init_weights

        # Strict warm start on every rank before DeepSpeed wraps the model (a resume then overwrites it).
        load_init_weights(model, cfg.model.init_weights)
    # Two groups as in the local loop; the heads' LR multiplier is the scheduler's per-group max LR.
    groups = [{"params": g} for g in trainable_groups(model)]
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=groups, config=config["deepspeed"]
    )
    device = configure_device(engine.device)
    epoch, seen = _restore(engine, rank)
    rng = random.Random(t.seed * 1000 + rank + 7919 * engine.global_steps)
    shard = ray.train.get_dataset_shard("train")
    sums: dict[str, float] = defaultdict(float)
    n_micro, n_samples, wait_s = 0, 0, 0.0
    t_interval = time.perf_counter()
    while engine.global_steps < t.steps:
        batches = shard.iter_torch_batches(
            batch_size=d.micro_batch_size,
            collate_fn=RowsToBatch(seen, instances=cfg.model.targets == "multi"),
            drop_last=True,
            local_shuffle_buffer_size=d.local_shuffle_buffer or None,
            prefetch_batches=2,
        )
        trained_this_epoch = 0
        for (batch, keys), wait in _epochs_agree(batches, device):
            trained_this_epoch += 1
            wait_s += wait
            step = engine.global_steps
            loss, logs = compute_loss(model, batch.to(device), cfg, rng, step, forward=engine)
            engine.backward(loss)
            engine.step()
            seen.update(keys)
            for k, v in logs.items():
                sums[k] += v
            n_micro += 1
            n_samples += len(batch)
            if engine.global_steps == step:
                continue  # inside a gradient-accumulation window
            step = engine.global_steps
            _maybe_fail(cfg, rank, step, config["run_dir"], config.get("fail_at_step"))
            last = step >= t.steps
            if step % t.log_every and step % d.checkpoint_every and not last:
                continue
            elapsed = time.perf_counter() - t_interval
            vec = sum_over_ranks(
                [*(sums[k] for k in sorted(sums)), n_micro, n_samples, wait_s, elapsed], device
            )
            n = vec[-4]
            metrics = {k: vec[i] / n for i, k in enumerate(sorted(sums))}
            metrics.update(
                step=step,
                epoch=epoch,
                zero_stage=engine.zero_optimization_stage(),
                lr=scheduler.get_last_lr()[0],
                samples_per_s=vec[-3] / (vec[-1] / world),
                data_wait_fraction=vec[-2] / vec[-1],
            )
            if last and d.evaluate_split and rank == 0:
                metrics.update(_evaluate_in_memory(model, cfg))
            if rank == 0:
                _append_log(config["run_dir"], metrics)
                shown = " ".join(
                    f"{k} {metrics[k]:.4g}" for k in ("loss", "bce", "dice", "l1", "ce") if k in metrics
                )
                print(
                    f"[ppcr train] step {step}/{t.steps} {shown} lr {metrics['lr']:.3g} "
                    f"{metrics['samples_per_s']:.1f} samples/s data-wait {100 * metrics['data_wait_fraction']:.1f}%",
                    flush=True,
                )
            if step % d.checkpoint_every == 0 or last:
                _save(engine, cfg, rank, epoch, seen, metrics)
            else:
                ray.train.report(metrics)
            sums.clear()
            n_micro, n_samples, wait_s = 0, 0, 0.0
            t_interval = time.perf_counter()
            if last:
                break
        else:
            if trained_this_epoch == 0 and not seen:
                raise RuntimeError(
                    f"epoch {epoch} gave rank {rank} no micro-batch of {d.micro_batch_size} rows: the training "
                    "set is smaller than distributed.micro_batch_size x num_workers"
                )
            epoch += 1
            seen = Counter()


def _append_log(run: str, metrics: dict) -> None:
    """Rank 0 keeps `<run>/train_log.jsonl` (local storage), one line per report, across restarts."""
    if is_uri(run):
        return
    Path(run).mkdir(parents=True, exist_ok=True)
    with open(Path(run) / "train_log.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")


def _evaluate_in_memory(model, cfg: RunConfig) -> dict:
    """Rank 0's evaluation of the trained model as it is in memory (prefixed `eval_`)."""
    from .data.shards import shard_dir
    from .evaluate import evaluate_split

    split = shard_dir(
        cfg.data.shards_root, cfg.data.dataset, cfg.data.split_by, cfg.distributed.evaluate_split
    )
    m = evaluate_split(model, split, progress=False)
    model.train()
    return {f"eval_{k}": v for k, v in m.items()}
