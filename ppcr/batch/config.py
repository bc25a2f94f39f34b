"""Sizing of the batch / evaluation pipeline: actor pools, batch sizes (YAML: configs/batch/*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, deep_merge, from_dict, read_yaml

# ----------------------------------------------------------------------------- config


@dataclass
class StageConfig:
    """One actor pool: `concurrency` actors of `num_cpus` / `num_gpus` each, `batch_size` images per call."""

    concurrency: int = 1
    batch_size: int = 8
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.batch_size < 1:
            raise ConfigError("concurrency and batch_size must be >= 1")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("num_cpus and num_gpus must be >= 0")

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"


@dataclass
class BatchConfig:
    """Sizing of the batch / evaluation pipeline (YAML: `ppcr batch --config FILE`, or `--set key=value`)."""

    mllm: StageConfig = field(default_factory=StageConfig)
    sam: StageConfig = field(default_factory=StageConfig)
    decode_num_cpus: float = 1.0  # per decode + preprocess task
    images_per_block: int = 16  # images per input block: the unit of the read and decode tasks
    max_expressions: int = 64  # expressions per MLLM forward (an image's expressions may be split)
    torch_threads: int = 1  # intra-op threads per model actor (1 per core is fastest on CPU)
    overlays: bool = False  # also write <out>/overlays/<id>.png

    def __post_init__(self) -> None:
        if self.images_per_block < 1 or self.max_expressions < 1 or self.torch_threads < 1:
            raise ConfigError("images_per_block, max_expressions and torch_threads must be >= 1")

    def demand(self) -> dict[str, float]:
        """Ray resources the pipeline holds at once: both actor pools plus one decode task."""
        return {
            "CPU": self.mllm.concurrency * self.mllm.num_cpus
            + self.sam.concurrency * self.sam.num_cpus
            + self.decode_num_cpus,
            "GPU": self.mllm.concurrency * self.mllm.num_gpus + self.sam.concurrency * self.sam.num_gpus,
        }


def load_batch_config(path: str | Path | None = None, overrides: dict | None = None) -> BatchConfig:
    """BatchConfig from a YAML file (or the defaults) with nested `overrides` merged on top, validated
    like every config (ConfigError naming the key)."""
    data = deep_merge(read_yaml(path) if path else {}, overrides or {})
    try:
        return from_dict(BatchConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{path or 'batch config'}: {exc}") from None
