"""Strict loading of weights from disk: one error type and one report of what did not match.

`from_pretrained` and `load_state_dict(strict=False)` initialise whatever they do not find and carry
on; a base folder of the wrong kind (original LLaVA, GLaMM, another size) then "loads" as a random
model. Every loader in ppcr (LLaVA base, SAM .pth, inference checkpoints) goes through `check_keys`,
which raises `WeightsError` listing the first keys of each kind and their counts.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SHOWN = 10  # keys listed per kind in an error message


class WeightsError(ValueError):
    """Weights on disk do not fit the model being built: missing, unexpected or mis-shaped tensors,
    or a config whose sizes differ from the preset's. The message names the folder/file."""


def _listing(kind: str, keys: Iterable[str]) -> str | None:
    keys = sorted(keys)
    if not keys:
        return None
    more = f", ... ({len(keys)} in all)" if len(keys) > SHOWN else f" ({len(keys)})"
    return f"{kind}: {', '.join(keys[:SHOWN])}{more}"


def check_keys(
    source: str | Path,
    what: str,
    missing: Iterable[str] = (),
    unexpected: Iterable[str] = (),
    mismatched: Iterable[tuple[str, tuple, tuple]] = (),
    hint: str = "",
) -> None:
    """Raise WeightsError naming `source` if any key is missing, unexpected or of another shape.

    mismatched: (key, shape on disk, shape the model expects) triples.
    """
    parts = [
        _listing("missing tensors", missing),
        _listing("tensors not in this model", unexpected),
        _listing(
            "mis-shaped tensors", (f"{k} {tuple(disk)} != {tuple(model)}" for k, disk, model in mismatched)
        ),
    ]
    parts = [p for p in parts if p]
    if parts:
        raise WeightsError(f"{source}: not {what}: " + "; ".join(parts) + (f". {hint}" if hint else ""))
