"""Sizing of the batch / evaluation pipeline: actor pools, batch sizes (YAML: configs/batch/*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, deep_merge, from_dict, key, read_yaml, require_at_least

# ----------------------------------------------------------------------------- config


@dataclass
class StageConfig:
    """One actor pool: `concurrency` actors of `num_cpus` / `num_gpus` each, `batch_size` images per call."""

    concurrency: int = 1
    batch_size: int = 8
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def validate(self, prefix: str) -> None:
        require_at_least(self.concurrency, 1, key(prefix, "concurrency"))
        require_at_least(self.batch_size, 1, key(prefix, "batch_size"))
        require_at_least(self.num_cpus, 0, key(prefix, "num_cpus"))
        require_at_least(self.num_gpus, 0, key(prefix, "num_gpus"))

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

    def validate(self, prefix: str) -> None:
        require_at_least(self.decode_num_cpus, 0, key(prefix, "decode_num_cpus"))
        for name in ("images_per_block", "max_expressions", "torch_threads"):
            require_at_least(getattr(self, name), 1, key(prefix, name))

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
    like every config: a ConfigError names the full key ("batch.sam.concurrency must be >= 1; got 0")
    and the file, if any."""
    data = deep_merge(read_yaml(path) if path else {}, overrides or {})
    try:
        return from_dict(BatchConfig, data, "batch")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
