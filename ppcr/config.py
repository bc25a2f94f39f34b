"""Typed configuration: plain dataclasses loaded from YAML and validated at load time.

Every config in ppcr is one of the dataclasses below. `load_config(path)` reads a YAML file, fills a
dataclass tree, and raises `ConfigError` naming the offending key ("model.box_head must be one of
mlp, attention; got 'mpl'"). Presets (`tiny`, `llava-1.5-7b`) are YAML files shipped in
`ppcr/configs/`; any key of a preset can be overridden from a user's YAML through `base: <preset>`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

PRESET_DIR = Path(__file__).parent / "configs"

SpatialPrompt = Literal["semantic", "expression+semantic", "expression", "none"]
BoxHead = Literal["mlp", "attention"]
SamSize = Literal["tiny", "vit_b", "vit_l", "vit_h"]


class ConfigError(ValueError):
    """A config file or value is invalid; the message names the key."""


class InputError(ValueError):
    """A user-supplied input is invalid (an expression, a manifest, a shard file, a combination of
    command-line flags); the message names it. The CLI reports it in one line with exit code 2."""


# ----------------------------------------------------------------------------- the validate convention
# Every config dataclass (here, in ppcr/batch/config.py, ppcr/serve/settings.py, ppcr/data/synth.py)
# checks what types alone cannot express in a method `validate(self, prefix: str)`, where `prefix` is
# its own full key ("model.sam", "batch.mllm"; "" at the top). `from_dict` calls it on every dataclass
# it builds, innermost first, so a message always names the full key: "batch.sam.concurrency must be
# >= 1; got 0". The helpers below raise ConfigError in the convention's words.


def key(prefix: str, name: str) -> str:
    """The full key of field `name` under `prefix`: key("model.sam", "size") == "model.sam.size"."""
    return f"{prefix}.{name}" if prefix else name


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless `condition` (message names the full key)."""
    if not condition:
        raise ConfigError(message)


def require_at_least(value: float, minimum: float, key: str) -> None:
    """`key` must be >= `minimum`."""
    if value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}; got {value}")


def require_above(value: float, bound: float, key: str) -> None:
    """`key` must be > `bound`."""
    if not value > bound:
        raise ConfigError(f"{key} must be > {bound}; got {value}")


@dataclass
class VisionConfig:
    """CLIP vision tower (LLaVA-1.5 uses ViT-L/14 at 336 px, 24 layers)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    feature_layer: int = -2  # LLaVA-1.5 reads the penultimate layer

    def validate(self, prefix: str) -> None:
        require_at_least(self.patch_size, 1, key(prefix, "patch_size"))
        require_at_least(self.num_heads, 1, key(prefix, "num_heads"))
        require(
            self.image_size % self.patch_size == 0,
            f"{key(prefix, 'image_size')} ({self.image_size}) must be a multiple of patch_size ({self.patch_size})",
        )
        require(
            self.hidden_size % self.num_heads == 0,
            f"{key(prefix, 'hidden_size')} must be divisible by num_heads",
        )


@dataclass
class LanguageConfig:
    """Llama-architecture language model (Vicuna-7B: 4096 hidden, 32 layers)."""

    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    max_position_embeddings: int = 4096
    # Embedding rows of a randomly initialised model (None: the tokenizer's size). A model loaded from
    # `mllm_path` keeps the folder's rows (llava-hf: 32064). Used by benchmarks/gpu_check.py.
    vocab_size: int | None = None
    # Std of the normal init of a randomly initialised language model's linear and embedding weights
    # (transformers' `initializer_range`; also the projector's). Llama's 0.02 is sized for 4096 wide
    # layers; the tiny preset sets its own (docs/learning.md, finding 16). Unused with `mllm_path`.
    initializer_range: float = 0.02

    def validate(self, prefix: str) -> None:
        require_at_least(self.num_heads, 1, key(prefix, "num_heads"))
        require(
            self.hidden_size % self.num_heads == 0,
            f"{key(prefix, 'hidden_size')} must be divisible by num_heads",
        )
        require(
            0 < self.initializer_range <= 1,
            f"{key(prefix, 'initializer_range')} must be in (0, 1]; got {self.initializer_range}",
        )


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class SamConfig:
    """SAM: `size` picks a builder of segment_anything's registry, or `tiny` (built from its modeling classes)."""

    size: SamSize = "vit_h"
    image_size: int = 1024  # the resized-and-padded square frame SAM works in
    checkpoint: str | None = None  # official SAM .pth, loaded with weights_only=True
    # Only for size == "tiny":
    patch_size: int = 16  # the registry sizes use 16; a smaller patch gives a finer mask grid
    encoder_embed_dim: int = 64
    encoder_depth: int = 2
    encoder_num_heads: int = 2
    encoder_window_size: int = 4
    decoder_mlp_dim: int = 512

    def validate(self, prefix: str) -> None:
        require(
            self.patch_size >= 1 and self.image_size % self.patch_size == 0,
            f"{key(prefix, 'image_size')} ({self.image_size}) must be a multiple of patch_size ({self.patch_size})",
        )
        require(
            self.size == "tiny" or (self.image_size, self.patch_size) == (1024, 16),
            f"{key(prefix, 'image_size')}/patch_size must be 1024/16 for the official SAM size {self.size!r}",
        )


@dataclass
class ModelConfig:
    preset: str = "llava-1.5-7b"
    # Local paths (production). None -> build with random init from the sizes below (tiny preset).
    mllm_path: str | None = None  # a transformers LLaVA folder (config.json + safetensors)
    tokenizer_path: str | None = None  # a tokenizer folder; None -> build the offline BPE tokenizer
    vision: VisionConfig = field(default_factory=VisionConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    prompt_dim: int = 256  # SAM's prompt embedding width
    spatial_prompt: SpatialPrompt = "semantic"
    box_head: BoxHead = "mlp"
    attention_head_layers: int = 2
    # Auxiliary grounding of the semantic stage: the attention box head also reads the [SEG] state
    # against the semantic pass's image states (loss.semantic_grounding weighs it). See docs/learning.md.
    semantic_grounding: bool = False
    # LLaVA-1.5 puts the image before the question; "after" lets image tokens see the text (causal LM).
    image_position: Literal["before", "after"] = "before"
    # Inference runs each image's prompt prefix (BOS, system prompt, USER:, image tokens) once per
    # LoRA branch and every expression's suffix against its KV cache: same answers (float tolerance),
    # a fraction of the language-model work when an image has several expressions. Needs image_position
    # before; asked for with after, it is off and says so once (the tiny preset sets false).
    # docs/architecture.md, "Shared prompt prefix".
    share_prefix: bool = True
    system_prompt: str = (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    )
    # What receives gradients besides LoRA, new token rows, projection/box heads and the SAM mask decoder.
    # A random-init tiny model has nothing worth preserving, so it trains its whole base.
    train_base: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    # Warm start (training only): a ppcr checkpoint folder (e.g. from `ppcr convert-glamm`) loaded
    # strictly into the built model before the optimizer / DeepSpeed see it. Ignored by inference.
    init_weights: str | None = None
    # Base tensors (state-dict names under "mllm.") whose values differ from the `mllm_path` folder's and
    # therefore travel in every checkpoint (e.g. a converted GLaMM's changed base weights; docs/glamm.md).
    base_overrides: list[str] = field(default_factory=list)
    # Fidelity switches (docs/glamm.md), defaults = ppcr's own behaviour. semantic_state: the [SEG]
    # prompt is the last-layer state `at` [SEG], or the one `predicting` it (the token before, as
    # LISA/GLaMM read it). prompt_format "glamm": the image is wrapped as GLaMM trained it ("The
    # <im_start><image><im_end> provides an overview of the picture.\n" + question). clip_preprocess:
    # LLaVA-1.5's pad-to-square or CLIP's resize + centre-crop (GLaMM's).
    semantic_state: Literal["at", "predicting"] = "at"
    prompt_format: Literal["ppcr", "glamm"] = "ppcr"
    clip_preprocess: Literal["pad", "crop"] = "pad"
    # How many objects an expression may name. "single" is the paper's model (one box, one mask per
    # expression). "multi" answers none, one or several (gRefCOCO): the attention box head reads
    # `max_targets` box slots, each with an objectness score, plus a presence score for the expression;
    # the kept slots (`presence_threshold`, `objectness_threshold`, duplicates above `slot_nms_iou`
    # box IoU dropped) are each segmented by SAM with the semantic prompt (docs/learning.md, "No target
    # and several targets").
    targets: Literal["single", "multi"] = "single"
    max_targets: int = 4
    presence_threshold: float = 0.5
    objectness_threshold: float = 0.5
    slot_nms_iou: float = 0.7
    # model.targets multi: "query" reads the presence logit from the head's presence query alone;
    # "query+semantic" adds the peak logit of the [SEG] query's heatmap (model.semantic_grounding), where
    # the semantic pass already says whether anything in the image matches the expression.
    presence_from: Literal["query", "query+semantic"] = "query"

    def validate(self, prefix: str) -> None:
        require(
            self.targets == "single" or (self.box_head == "attention" and self.spatial_prompt != "none"),
            f"{key(prefix, 'targets')} multi needs box_head: attention and a spatial stage (its box slots "
            f"are queries of the attention head); got box_head {self.box_head!r}, spatial_prompt "
            f"{self.spatial_prompt!r}",
        )
        require_at_least(self.max_targets, 1, key(prefix, "max_targets"))
        require(
            self.presence_from in ("query", "query+semantic"),
            f"{key(prefix, 'presence_from')} must be one of query, query+semantic; got {self.presence_from!r}",
        )
        require(
            self.presence_from == "query" or (self.targets == "multi" and self.semantic_grounding),
            f"{key(prefix, 'presence_from')} query+semantic needs targets multi and semantic_grounding true",
        )
        for name in ("presence_threshold", "objectness_threshold"):
            value = getattr(self, name)
            require(0 < value < 1, f"{key(prefix, name)} must be in (0, 1); got {value}")
        require(
            0 < self.slot_nms_iou <= 1,
            f"{key(prefix, 'slot_nms_iou')} must be in (0, 1]; got {self.slot_nms_iou}",
        )
        require(
            not self.semantic_grounding or (self.box_head == "attention" and self.spatial_prompt != "none"),
            f"{key(prefix, 'semantic_grounding')} needs box_head: attention and a spatial stage",
        )
        require(
            self.sam.size == "tiny" or self.prompt_dim == 256,
            f"{key(prefix, 'prompt_dim')} must be 256 for SAM {self.sam.size}",
        )
        require(
            self.prompt_format != "glamm" or self.image_position == "before",
            f"{key(prefix, 'prompt_format')} glamm puts the image first: needs image_position before",
        )
        # The attention head's patch frame is the padded square (geometry.clip_square_to_normalized).
        require(
            not (
                self.clip_preprocess == "crop"
                and self.box_head == "attention"
                and self.spatial_prompt != "none"
            ),
            f"{key(prefix, 'clip_preprocess')} crop needs box_head mlp (or spatial_prompt none)",
        )
        bad = [n for n in self.base_overrides if not n.startswith("mllm.")]
        if bad:
            raise ConfigError(
                f"{key(prefix, 'base_overrides')} must name mllm.* base tensors; got {bad[0]!r}"
            )


@dataclass
class LossConfig:
    """Loss = bce·BCE + dice·Dice (masks) + l1·L1 (normalized box) + ce·CE (answer tokens) [+ aux]."""

    bce: float = 2.0
    dice: float = 0.5
    l1: float = 2.0
    ce: float = 0.5
    iou: float = 0.0  # MSE of SAM's predicted IoU (the inference score) to the mask's actual IoU
    giou: float = 0.0  # optional extra box term (not in the paper; 0 keeps the paper's loss)
    box_heatmap: float = 0.0  # attention head only: BCE of its heatmap against the ground-truth box
    semantic_grounding: float = 0.0  # model.semantic_grounding only: heatmap BCE + L1 of the [SEG] query
    # model.targets multi only: BCE of the expression's presence score (has it a target?) and of each
    # box slot's objectness (is it matched to a target?); the matched slots' boxes take l1 and giou,
    # and their SAM masks bce, dice and iou.
    presence: float = 1.0
    objectness: float = 1.0
    # BCE's pos_weight for presence: < 1 weighs the (rarer) no-target expressions up; about
    # (no-target / target expressions) balances the classes.
    presence_pos_weight: float = 1.0
    # model.semantic_grounding with targets multi: BCE of the [SEG] query's heatmap peak against 0 on the
    # no-target expressions, so the peak (model.presence_from query+semantic) learns to say "nothing".
    empty_heatmap: float = 0.0

    def validate(self, prefix: str) -> None:
        for f in dataclasses.fields(self):
            require_at_least(getattr(self, f.name), 0, key(prefix, f.name))
        require_above(self.presence_pos_weight, 0, key(prefix, "presence_pos_weight"))


@dataclass
class DataConfig:
    shards_root: str = "data/shards"
    dataset: str = "refcoco"
    split_by: str = "unc"
    train_split: str = "train"
    eval_splits: list[str] = field(default_factory=lambda: ["val", "testA", "testB"])
    max_expressions_per_image: int | None = None  # training only; evaluation uses every expression


@dataclass
class TrainConfig:
    steps: int = 2500
    batch_size: int = 8
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    head_lr_mult: float = 1.0  # LR multiplier for the heads (projection, box head, SAM mask decoder)
    # Curriculum: SAM sees the ground-truth box for the first N steps (linearly annealed to 0),
    # so the mask decoder learns to use a box before the box head can give a good one.
    gt_box_warmup_steps: int = 0
    # ...and keeps seeing it (jittered) with this probability afterwards, so it learns to *use* a box
    # prompt instead of learning to ignore the early, poor predicted boxes.
    gt_box_min_prob: float = 0.0
    gt_box_jitter: float = 0.0  # std of the GT-box corner noise, as a fraction of the box's width/height
    group_by_image: bool = False  # batches hold all expressions of their images (see train.batches_forever)
    seed: int = 0
    log_every: int = 25
    num_threads: int | None = None  # torch intra-op threads; None keeps torch's default
    out_dir: str = "runs/train"

    def validate(self, prefix: str) -> None:
        require_at_least(self.steps, 1, key(prefix, "steps"))
        require_at_least(self.batch_size, 1, key(prefix, "batch_size"))
        require_above(self.lr, 0, key(prefix, "lr"))


@dataclass
class MixEntry:
    """One shard split in the distributed job's training mix."""

    shards_root: str
    dataset: str
    split_by: str = "unc"
    split: str = "train"
    # Each epoch takes this many passes over the split: 2 = every expression twice, 0.5 = a random half.
    weight: float = 1.0

    def validate(self, prefix: str) -> None:
        require_above(self.weight, 0, key(prefix, "weight"))


@dataclass
class DistributedConfig:
    """Ray Train + DeepSpeed job (`ppcr train`). The global batch is `train.batch_size`
    = micro_batch_size × gradient accumulation × num_workers; accumulation is derived."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    accelerator_type: str | None = None  # e.g. "L20": schedule workers only on such GPUs
    micro_batch_size: int = 1  # expressions per worker per forward pass
    data_cpus: float = 1.0  # CPUs kept free for Ray Data's read/decode/preprocess tasks
    # Mixed training sets (e.g. refcoco + refcoco+ + refcocog); empty = `data`'s train split.
    datasets: list[MixEntry] = field(default_factory=list)
    local_shuffle_buffer: int = 0  # rows; 0 keeps each image's expressions together (group_by_image)
    # DeepSpeed config file (paths are relative to the working directory, then to the repo root);
    # "auto" values in it come from `train` (lr, betas, weight_decay, warmup_steps, grad_clip, steps,
    # batch sizes) and the device (bf16 on GPU, fp32 on CPU). `deepspeed` overrides any key.
    deepspeed_config: str = "configs/deepspeed/zero2.yaml"
    deepspeed: dict[str, Any] = field(default_factory=dict)
    checkpoint_every: int = 100  # optimizer steps
    keep_checkpoints: int = 2
    max_failures: int = 1  # automatic restarts from the latest checkpoint
    storage_path: str = "runs/ray"  # local folder or a URI pyarrow understands (s3://, gs://, ...)
    name: str = "ppcr-train"
    evaluate_split: str | None = None  # rank 0 evaluates the trained model in memory on this split

    def validate(self, prefix: str) -> None:
        for name in ("num_workers", "micro_batch_size", "checkpoint_every", "keep_checkpoints"):
            require_at_least(getattr(self, name), 1, key(prefix, name))
        require_above(self.cpus_per_worker, 0, key(prefix, "cpus_per_worker"))
        require_at_least(self.data_cpus, 0, key(prefix, "data_cpus"))
        require_at_least(self.local_shuffle_buffer, 0, key(prefix, "local_shuffle_buffer"))


@dataclass
class RunConfig:
    """Top-level config of a training/evaluation run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self, prefix: str) -> None:
        d, batch = self.distributed, self.train.batch_size
        require(
            batch % (d.micro_batch_size * d.num_workers) == 0,
            f"{key(prefix, 'train.batch_size')} ({batch}) must be divisible by "
            f"{key(prefix, 'distributed.micro_batch_size')} ({d.micro_batch_size}) x "
            f"{key(prefix, 'distributed.num_workers')} ({d.num_workers})",
        )


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one YAML value against a dataclass field type; raise ConfigError naming `key`."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping; got {type(value).__name__}")
        return _from_dict(tp, value, key)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key} must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {args}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list; got {type(value).__name__} {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key} must have {len(args)} items; got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping; got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number; got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number; got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer; got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false; got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string; got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]} (valid keys{' of ' + prefix if prefix else ''}: {', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)  # the convention above; a dataclass without checks has none
    if callable(check):
        check(prefix)
    return obj


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, validating every key (errors name `prefix.key`)."""
    return _from_dict(cls, data, prefix)


def to_dict(obj: Any) -> dict:
    """Dataclass tree -> plain dict (tuples become lists), the inverse of `from_dict`."""

    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(obj))


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _resolve_base(data: dict, source: str) -> dict:
    base = data.pop("base", None)
    if base is None:
        return data
    if base not in preset_names():
        raise ConfigError(f"{source}: base must be one of {', '.join(preset_names())}; got {base!r}")
    return deep_merge(_resolve_base(read_yaml(PRESET_DIR / f"{base}.yaml"), base), data)


def load_config(path_or_preset: str | Path, overrides: dict | None = None) -> RunConfig:
    """Load a RunConfig from a YAML path or a preset name (`tiny`, `llava-1.5-7b`)."""
    name = str(path_or_preset)
    if name in preset_names():
        data, source = {"base": name}, name
    else:
        data, source = read_yaml(name), name
    data = _resolve_base(data, source)
    if overrides:
        data = deep_merge(data, overrides)
    try:
        return from_dict(RunConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
