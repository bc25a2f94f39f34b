"""ppcr — Progressive Prompt-guided Cross-modal Reasoning for referring image segmentation.

The three PPCR stages, one file each:
    ppcr/semantic_stage.py      Semantic Understanding  (LoRA A, [SEG] -> Semantic Segmentation Prompt)
    ppcr/spatial_stage.py       Spatial Grounding       (LoRA B, <sem> -> [BOX] -> normalized box)
    ppcr/segmentation_stage.py  Instance Segmentation   (SAM with semantic + box prompts)
composed by ppcr/model.py and served to users by ppcr/predictor.py (`Segmenter`).
"""

__version__ = "0.1.0"

_LAZY = {
    "Segmenter": "ppcr.predictor",
    "Segmentation": "ppcr.inference",
    "Instance": "ppcr.inference",
    "PPCRModel": "ppcr.model",
    "load_config": "ppcr.config",
    "RISMetrics": "ppcr.metrics",
    "decode_rle": "ppcr.masks",
    "encode_mask": "ppcr.masks",
}


def __getattr__(name: str):
    # Lazy, so `import ppcr` (and the CLI's --help) does not pay for torch/transformers.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ppcr' has no attribute {name!r}")


__all__ = list(_LAZY)
