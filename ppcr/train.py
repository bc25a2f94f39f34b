"""Single-process training over the Parquet shards (the Ray Train job wraps `train_step` and friends)."""

from __future__ import annotations

import json
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import load_init_weights, save_checkpoint
from .config import RunConfig, TrainConfig, to_dict
from .data.shards import (
    ExpressionSample,
    ImageCache,
    check_single_target,
    iter_expressions,
    shard_dir,
    to_item,
)
from .inputs import Batch, Item, collate, group_images
from .losses import ppcr_loss
from .model import PPCRModel
from .storage import parquet_files

HEAD_PREFIXES = ("semantic.", "spatial.", "segmentation.")


def warmup_decay(step: int, warmup: int, total: int) -> float:
    """LR factor of DeepSpeed's WarmupDecayLR (linear warm-up to 1, then linear decay to 0 at `total`)."""
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    return max(0.0, (total - step) / max(total - warmup, 1))


def trainable_groups(model: PPCRModel) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Trainable parameters as (base: LoRA, token rows, ...; heads: projection, box head, SAM decoder):
    the two optimizer groups, the heads' LR scaled by `train.head_lr_mult`."""
    heads, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (heads if name.startswith(HEAD_PREFIXES) else rest).append(p)
    return rest, heads


def build_optimizer(
    model: PPCRModel, tcfg: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over trainable parameters; the heads (projection, box head, SAM decoder) may get a larger LR."""
    rest, heads = trainable_groups(model)
    groups = [{"params": rest, "lr": tcfg.lr}, {"params": heads, "lr": tcfg.lr * tcfg.head_lr_mult}]
    # fused: one kernel over all tensors instead of a Python loop per parameter — the same update,
    # ~3x cheaper on CPU for the tiny preset's 305 small tensors (docs/learning.md, "Cost of a step").
    opt = torch.optim.AdamW(groups, betas=tuple(tcfg.betas), weight_decay=tcfg.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_decay(s, tcfg.warmup_steps, tcfg.steps))
    return opt, sched


def gt_box_probability(step: int, tcfg: TrainConfig) -> float:
    """Curriculum: SAM sees the ground-truth box with probability 1 → 0 over `gt_box_warmup_steps`."""
    if tcfg.gt_box_warmup_steps <= 0:
        return tcfg.gt_box_min_prob
    return max(tcfg.gt_box_min_prob, 1.0 - step / tcfg.gt_box_warmup_steps)


class SamEmbeddingCache:
    """SAM image embeddings by image id across training steps.

    SAM's image encoder is frozen (paper §3.4) and runs without dropout or augmentation, so an image's
    embedding is the same at every step: computing it once per image, instead of once per step it
    appears in, changes no number. Refuses a model whose encoder has a trainable parameter.
    """

    def __init__(self, model: PPCRModel):
        encoder = model.segmentation.sam.image_encoder
        trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(
                f"SAM's image encoder must be frozen to cache its embeddings; trainable: {trainable[:3]}"
            )
        self.model = model
        self._data: dict = {}

    def __len__(self) -> int:
        return len(self._data)

    def get(self, batch: Batch, keys: Sequence) -> torch.Tensor:
        """(N, C, h, w) embeddings of the batch's images; keys: (N,) image keys in the batch's row order.
        Encodes only the images not seen before (in one call)."""
        missing = [i for i, k in enumerate(keys) if k not in self._data]
        if missing:
            emb = self.model.segmentation.encode(batch.sam_pixels[missing])
            for i, e in zip(missing, emb):
                self._data[keys[i]] = e.clone()
        return torch.stack([self._data[k] for k in keys])


def batch_image_keys(items: Sequence[Item]) -> list:
    """Image keys in `collate`'s row order, for `SamEmbeddingCache.get` (the same grouping collate uses)."""
    first, _ = group_images([it.key for it in items])
    return [items[i].key for i in first]


def load_training_samples(
    split_dir: Path, max_per_image: int | None = None, targets: str = "single"
) -> list[ExpressionSample]:
    """Every expression of a training split. targets: the model's `model.targets`; for "single",
    InputError (one line) when the split holds expressions without a target or with several (the
    paper's model learns exactly one target per expression; "multi" learns them all)."""
    if targets == "single":
        check_single_target(parquet_files(split_dir, "part-"), str(split_dir))
    samples = list(iter_expressions(split_dir))
    if max_per_image is not None:
        per: dict[int, int] = defaultdict(int)
        kept = []
        for s in samples:
            if per[s.image_id] < max_per_image:
                per[s.image_id] += 1
                kept.append(s)
        samples = kept
    if not samples:
        raise ValueError(f"no training expressions in {split_dir}")
    return samples


def batches_forever(
    samples: Sequence[ExpressionSample], batch_size: int, seed: int, group_by_image: bool = False
) -> Iterator[list[ExpressionSample]]:
    """Shuffled epochs of samples, cut into batches (the last partial batch of an epoch is dropped).

    group_by_image: shuffle images instead of expressions and keep each image's expressions together,
    so a batch shows the same scene with different referents — the contrast that teaches *which*
    object an expression names (docs/learning.md) — and encodes fewer distinct images.
    """
    rng = random.Random(seed)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        groups[s.image_id if group_by_image else i].append(i)
    keys = list(groups)
    while True:
        rng.shuffle(keys)
        order = [j for k in keys for j in groups[k]]
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [samples[j] for j in order[i : i + batch_size]]
        if len(order) < batch_size:
            yield [samples[j] for j in order]


def compute_loss(
    model: PPCRModel,
    batch: Batch,
    cfg: RunConfig,
    rng: random.Random,
    step: int,
    forward=None,
    image_embeddings: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Forward all three stages and the joint loss; `forward` is the callable to run (default `model`,
    a DeepSpeed engine wrapping it in the distributed job); image_embeddings: the batch's SAM
    embeddings (N, C, h, w) if already known (`SamEmbeddingCache`). Raises on a non-finite loss."""
    model.train()
    extra = {} if image_embeddings is None else {"image_embeddings": image_embeddings}
    out = (forward or model)(
        batch,
        rng=rng,
        gt_box_prob=gt_box_probability(step, cfg.train),
        gt_box_jitter=cfg.train.gt_box_jitter,
        **extra,
    )
    loss, logs = ppcr_loss(out, batch, cfg.loss, model.patch_centers())
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss at step {step}: {logs}")
    return loss, logs


def train_step(
    model: PPCRModel,
    batch: Batch,
    cfg: RunConfig,
    optimizer: torch.optim.Optimizer,
    rng: random.Random,
    step: int,
    image_embeddings: torch.Tensor | None = None,
) -> dict:
    """One optimisation step: forward all three stages, joint loss, clip, step. Returns the loss terms."""
    loss, logs = compute_loss(model, batch, cfg, rng, step, image_embeddings=image_embeddings)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.train.grad_clip > 0:
        logs["grad_norm"] = float(
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], cfg.train.grad_clip, foreach=True
            )
        )
    optimizer.step()
    return logs


@dataclass
class TrainResult:
    model: PPCRModel
    checkpoint: Path | None
    steps: int  # optimizer steps done
    seconds: float
    history: list[dict] = field(default_factory=list)
    planned_steps: int = 0  # cfg.train.steps
    stopped_by_time: bool = False  # the time budget ended training before planned_steps

    @property
    def complete(self) -> bool:
        return self.steps >= self.planned_steps


def train(
    cfg: RunConfig,
    out_dir: str | Path | None = None,
    model: PPCRModel | None = None,
    progress: bool = True,
    time_budget_s: float | None = None,
    on_log: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train on `cfg.data`'s train split for `cfg.train.steps` steps; save an inference checkpoint.

    Writes `<out_dir>/train_log.jsonl` (one line per logged step) and `<out_dir>/checkpoint/`.
    `time_budget_s` is a safety net: if wall time runs out it stops early (still saving) and the result
    says so (`stopped_by_time`, `steps` < `planned_steps`); the amount of training is otherwise the
    step count alone, whatever the machine's speed. `on_log` receives each logged record (with
    `eta_s`, the seconds the remaining steps take at the average speed so far).
    """
    tcfg = cfg.train
    out = Path(out_dir or tcfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    torch.manual_seed(tcfg.seed)
    split = shard_dir(cfg.data.shards_root, cfg.data.dataset, cfg.data.split_by, cfg.data.train_split)
    samples = load_training_samples(split, cfg.data.max_expressions_per_image, cfg.model.targets)
    if model is None:
        model = PPCRModel(cfg.model)
        if cfg.model.init_weights:
            load_init_weights(model, cfg.model.init_weights)  # strict; before the optimizer sees it
    optimizer, scheduler = build_optimizer(model, tcfg)
    multi = cfg.model.targets == "multi"  # each target's box and mask, for the slot matching
    rng = random.Random(tcfg.seed)
    cache = ImageCache()
    sam_cache = SamEmbeddingCache(model)
    history: list[dict] = []
    running: dict[str, float] = defaultdict(float)
    n_running = 0
    t0 = time.perf_counter()
    step = 0
    stopped_by_time = False
    bar = tqdm(total=tcfg.steps, desc="train", disable=not progress, dynamic_ncols=True)
    with (out / "train_log.jsonl").open("w") as log_file:
        for step, chunk in enumerate(
            batches_forever(samples, tcfg.batch_size, tcfg.seed, tcfg.group_by_image)
        ):
            if step >= tcfg.steps:
                break
            if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
                stopped_by_time = True
                break
            items = [to_item(s, cache, instances=multi) for s in chunk]
            batch = collate(items, model.clip_size, model.sam_size, model.clip_mode)
            embeddings = sam_cache.get(batch, batch_image_keys(items))
            logs = train_step(model, batch, cfg, optimizer, rng, step, image_embeddings=embeddings)
            scheduler.step()
            for k, v in logs.items():
                running[k] += v
            n_running += 1
            bar.update(1)
            if (step + 1) % tcfg.log_every == 0 or step + 1 == tcfg.steps:
                avg = {k: v / n_running for k, v in running.items()}
                elapsed = time.perf_counter() - t0
                record = {
                    "step": step + 1,
                    "lr": scheduler.get_last_lr()[0],
                    "elapsed_s": elapsed,
                    "samples_per_s": (step + 1) * tcfg.batch_size / elapsed,
                    "eta_s": elapsed / (step + 1) * (tcfg.steps - step - 1),
                    **avg,
                }
                history.append(record)
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                if on_log is not None:
                    on_log(record)
                bar.set_postfix({k: f"{avg[k]:.3f}" for k in ("loss", "l1", "dice") if k in avg})
                running.clear()
                n_running = 0
        else:
            step = tcfg.steps
    bar.close()
    steps_done = min(step, tcfg.steps)
    seconds = time.perf_counter() - t0
    model.eval()
    meta = {"steps": steps_done, "planned_steps": tcfg.steps, "stopped_by_time": stopped_by_time}
    ckpt = save_checkpoint(
        model, out / "checkpoint", extra={**meta, "seconds": seconds, "run_config": to_dict(cfg)}
    )
    if not all(math.isfinite(v) for r in history[-1:] for v in r.values() if isinstance(v, float)):
        raise FloatingPointError("training ended with non-finite metrics")
    return TrainResult(
        model=model,
        checkpoint=ckpt,
        steps=steps_done,
        seconds=seconds,
        history=history,
        planned_steps=tcfg.steps,
        stopped_by_time=stopped_by_time,
    )
