"""What the Serve application builder takes (`args:` of a Serve config) and the model a replica loads."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

import torch
import yaml

from ..config import from_dict, key, require_above, require_at_least
from ..geometry import MAX_ASPECT_RATIO, ImageLimits

logger = logging.getLogger("ppcr.serve")

CHECKPOINT_ENV = "PPCR_CHECKPOINT"
RANDOM_INIT_WARNING = (
    "NO CHECKPOINT: serving the randomly initialised tiny preset, masks are meaningless. "
    f"Set {CHECKPOINT_ENV}=DIR (or args.checkpoint) to serve a trained model."
)
TOY_WARNING = (
    "a toy model: its language model was never pretrained (no mllm_path), so it knows only the words and "
    "scenes it was trained on; on anything else (a real photograph) its masks are noise"
)


@dataclass
class ServeSettings:
    """What the application builder takes (`args:` of a Serve config); every deployment gets a copy."""

    checkpoint: str | None = None  # inference checkpoint folder; None: $PPCR_CHECKPOINT, else random tiny
    mllm_path: str | None = None  # base LLaVA folder, if moved since training (else the checkpoint's)
    sam_checkpoint: str | None = None  # base SAM .pth, if moved since training (else the checkpoint's)
    preset: str = "tiny"  # used only without a checkpoint (random init, seed 0 in every replica)
    device: str = "cpu"  # "cuda" on GPU replicas
    torch_threads: int = 1  # intra-op threads per replica (replicas share the cores)
    max_batch_size: int = 8  # requests per @serve.batch call (each request may carry several expressions)
    batch_wait_timeout_s: float = 0.0  # see _BATCHING
    cache_images: int = 64  # SAM embeddings kept per SAM replica (LRU by image content hash)
    # Images whose language-model prompt prefixes (one per LoRA branch) an MLLM replica keeps (LRU by
    # image content hash): a later request on the same image runs only its expressions' suffixes.
    # Per image: 2 branches x layers x 2 x ~600 tokens x hidden; LLaVA-1.5-7B in bf16 ~0.6 GB, tiny
    # ~0.1 MB. 0: none kept (each call still shares an image's prefix among its expressions).
    prefix_cache_images: int = 4
    max_body_bytes: int = 16 * 2**20
    # Image shape limits (geometry.check_image_shape, from the header, before decoding: decompression bombs)
    max_pixels: int = 4096 * 4096
    max_aspect_ratio: float = MAX_ASPECT_RATIO  # long side / short side
    max_expression_chars: int = 256
    max_expressions: int = 16  # per request
    # Language-model sequences (expressions) per forward; a batch of max_batch_size x max_expressions
    # runs in chunks of this many. docs/serving.md has the arithmetic behind the shipped values.
    max_sequences_per_forward: int = 32
    request_timeout_s: float = 30.0  # ingress deadline for the model calls -> 504

    def validate(self, prefix: str) -> None:
        for name in (
            "torch_threads",
            "max_batch_size",
            "cache_images",
            "max_body_bytes",
            "max_pixels",
            "max_expression_chars",
            "max_expressions",
            "max_sequences_per_forward",
        ):
            require_at_least(getattr(self, name), 1, key(prefix, name))
        require_at_least(self.prefix_cache_images, 0, key(prefix, "prefix_cache_images"))
        require_at_least(self.max_aspect_ratio, 1, key(prefix, "max_aspect_ratio"))
        require_at_least(self.batch_wait_timeout_s, 0, key(prefix, "batch_wait_timeout_s"))
        require_above(self.request_timeout_s, 0, key(prefix, "request_timeout_s"))

    def image_limits(self) -> ImageLimits:
        """The image shape limits every request is checked against (ValueError on impossible values)."""
        return ImageLimits(max_pixels=self.max_pixels, max_aspect_ratio=self.max_aspect_ratio)


def command_line_args(args: dict) -> dict:
    """Builder args as Ray's `serve run ppcr.serve:build_app key=value ...` passes them (every value a
    string) with the values of non-string settings read as YAML scalars, as a Serve config's `args:` would
    give them: `max_pixels=0` -> 0, `batch_wait_timeout_s=0.5` -> 0.5. A value that is still of the wrong
    type (`max_pixels=big`) is left for `resolve_settings` to refuse by name."""
    hints = get_type_hints(ServeSettings)
    out = dict(args)
    for name, value in args.items():
        if isinstance(value, str) and name in hints and str not in _types(hints[name]):
            try:
                out[name] = yaml.safe_load(value)
            except yaml.YAMLError:
                pass  # not a scalar: left as the string, which resolve_settings names as the wrong type
    return out


def _types(hint: Any) -> tuple[type, ...]:
    return getattr(hint, "__args__", (hint,))


def resolve_settings(args: dict | None) -> ServeSettings:
    """Validate builder args (unknown keys, wrong types and bad values are ConfigErrors naming
    `args.<key>`) and resolve the checkpoint."""
    s = from_dict(ServeSettings, dict(args or {}), "args")
    if s.checkpoint is None and os.environ.get(CHECKPOINT_ENV):
        s.checkpoint = os.environ[CHECKPOINT_ENV]
    if s.checkpoint is not None:
        s.checkpoint = str(Path(s.checkpoint).expanduser().resolve())
    return s


def _overrides(s: ServeSettings) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if s.mllm_path is not None:
        overrides["mllm_path"] = s.mllm_path
    if s.sam_checkpoint is not None:
        overrides["sam"] = {"checkpoint": s.sam_checkpoint}
    return overrides


def prompt_tokenizer(s: ServeSettings):
    """The text rules of the served model (`ppcr.mllm.PromptTokenizer`: its tokenizer and context),
    built without the model: what the ingress checks expressions with before any model work. Reads
    the checkpoint's config.yaml and tokenizer/ (which must be readable where the ingress runs), or
    builds the random-init preset's."""
    from ..checkpoint import load_model_config
    from ..config import load_config
    from ..mllm import PromptTokenizer

    if s.checkpoint is not None:
        cfg = load_model_config(s.checkpoint, _overrides(s))
    else:
        cfg = load_config(s.preset).model
    return PromptTokenizer.from_config(cfg)


def load_serving_model(s: ServeSettings, parts: tuple[str, ...]):
    """The part of the PPCRModel a replica serves ("mllm" or "sam": only that part is built and
    loaded), from the checkpoint, or the random-init preset (seeded, so every replica of every
    deployment holds the same weights) with a loud warning."""
    from ..checkpoint import load_checkpoint

    torch.set_num_threads(s.torch_threads)
    if s.checkpoint is not None:
        return load_checkpoint(s.checkpoint, overrides=_overrides(s), device=s.device, parts=parts)
    from ..config import load_config
    from ..model import PPCRModel

    logger.warning(RANDOM_INIT_WARNING)
    warnings.warn(RANDOM_INIT_WARNING, stacklevel=2)
    torch.manual_seed(0)
    return PPCRModel(load_config(s.preset).model, parts=parts).to(s.device).eval()


def check_checkpoint(s: ServeSettings) -> None:
    """Fail before any deployment starts when the served checkpoint cannot load, naming the cause in
    one line: the folder, its config.yaml (with the args' overrides), model.safetensors (its header is
    read, not its tensors), tokenizer/, and the base weights it names (`mllm_path`, `sam.checkpoint`).
    Raises FileNotFoundError, ConfigError or WeightsError. Cheap: no model is built, so a tensor of the
    wrong shape is still found only by the replica that loads it. Must run where the checkpoint is
    readable (the ingress needs it there too: `prompt_tokenizer`)."""
    from safetensors import safe_open

    from ..checkpoint import CONFIG_FILE, TOKENIZER_DIR, WEIGHTS_FILE, load_model_config
    from ..weights import WeightsError

    if s.checkpoint is None:
        return
    ckpt = Path(s.checkpoint)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint {ckpt}: no such folder (args.checkpoint / ${CHECKPOINT_ENV})")
    if not (ckpt / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} has no {CONFIG_FILE}: not a ppcr inference checkpoint")
    cfg = load_model_config(ckpt, _overrides(s))
    weights = ckpt / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} has no {WEIGHTS_FILE}: its weights are missing")
    try:
        with safe_open(str(weights), framework="pt") as f:
            if not list(f.keys()):
                raise WeightsError(f"{weights} holds no tensors")
    except WeightsError:
        raise
    except Exception as exc:  # safetensors' own errors: a truncated or foreign file
        raise WeightsError(f"{weights} is not a readable safetensors file ({one_line_error(exc)})") from None
    if not (ckpt / TOKENIZER_DIR).is_dir():
        raise FileNotFoundError(f"checkpoint {ckpt} has no {TOKENIZER_DIR}/ folder")
    if cfg.mllm_path is not None and not Path(cfg.mllm_path).is_dir():
        raise FileNotFoundError(
            f"base LLaVA folder {cfg.mllm_path} (the checkpoint's mllm_path) not found; "
            "set args.mllm_path to where it is now"
        )
    if cfg.sam.checkpoint is not None and not Path(cfg.sam.checkpoint).is_file():
        raise FileNotFoundError(
            f"base SAM weights {cfg.sam.checkpoint} (the checkpoint's sam.checkpoint) not found; "
            "set args.sam_checkpoint to where they are now"
        )


def one_line_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def describe_model(s: ServeSettings) -> dict[str, Any]:
    """What the app serves, for `/healthz` and the page's banner: preset, checkpoint, whether the
    weights are random, whether it is a toy (no pretrained language model), and, from the checkpoint's
    meta.json when present, what it was trained on and its evaluation numbers. Reads small files only."""
    import json

    from ..checkpoint import load_model_config
    from ..config import load_config

    if s.checkpoint is None:
        cfg = load_config(s.preset).model
        return {
            "preset": s.preset,
            "checkpoint": None,
            "random_weights": True,
            "toy": cfg.mllm_path is None,
            "trained_on": None,
            "evaluation": None,
            "warning": RANDOM_INIT_WARNING,
        }
    cfg = load_model_config(s.checkpoint, _overrides(s))
    meta_file = Path(s.checkpoint) / "meta.json"
    meta: dict[str, Any] = {}
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as exc:
            logger.warning("%s is unreadable (%s): served without its training record", meta_file, exc)
    run = meta.get("run_config") or {}
    data = run.get("data") or {}
    trained_on = meta.get("trained_on")
    if trained_on is None and data:
        trained_on = {k: data.get(k) for k in ("dataset", "split_by", "train_split") if k in data}
    if isinstance(trained_on, dict) and "steps" in meta:
        trained_on = {**trained_on, "steps": meta["steps"], "planned_steps": meta.get("planned_steps")}
    out: dict[str, Any] = {
        "preset": cfg.preset,
        "checkpoint": s.checkpoint,
        "random_weights": False,
        "toy": cfg.mllm_path is None,
        "trained_on": trained_on,
        "evaluation": meta.get("evaluation"),
    }
    if meta.get("stopped_by_time"):
        out["warning"] = "training was cut short by its time budget: the model is under-trained"
    elif out["toy"]:
        out["warning"] = TOY_WARNING
    return out
