"""The failure policy of every batched stage: one bad item fails alone, and says why in one line.

The Serve deployments and the batch job's actors run each batch through `run_isolated`: when the batch
raises, its items run again one by one, and only an item that fails alone gets an `ItemFailure`
(an input error -> 422 over HTTP / "bad ..." in a batch row; anything else -> a service fault).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from .config import InputError

logger = logging.getLogger("ppcr.failures")


class ItemFailure(NamedTuple):
    """What a batched stage gives for an item it could not process, in place of that item's result."""

    input_error: bool  # True: the item's own input (InputError) -> 422 over HTTP; False: a service fault
    message: str  # one line: the InputError's text, or "<ExceptionType>: <first line>" for a fault


# Terminal colour and cursor codes (ECMA-48 CSI sequences), which Ray puts in its error texts.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def one_line(exc: BaseException, limit: int = 300) -> str:
    """`exc` as "<ExceptionType>: <first line of its message>", without terminal codes, at most `limit`
    characters: what an error answer may carry (never a traceback)."""
    text = _ANSI.sub("", str(exc)).strip()
    first = text.splitlines()[0].strip() if text else ""
    out = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return out if len(out) <= limit else out[: limit - 1] + "…"


def item_failure(exc: BaseException) -> ItemFailure:
    """An InputError is the item's input error (its message as is); anything else is a service fault."""
    if isinstance(exc, InputError):
        return ItemFailure(True, _ANSI.sub("", str(exc)))
    return ItemFailure(False, one_line(exc))


def run_isolated(
    fn: Callable[[list[Any]], Sequence[Any]],
    items: Sequence[Any],
    what: str = "batch",
    on_retry: Callable[[BaseException, int], None] | None = None,
) -> list[Any]:
    """Run a batched stage so that one bad item fails alone (the rule of every batched stage).

    fn: items -> one result per item, in order. When it raises on a batch of several items, each item
    is run again alone: those that fail get an `ItemFailure` (`item_failure` of their exception) in
    place of a result, the others their normal result. `on_retry(exc, n)` is told each time a batch
    of n items failed and was split (a counter, a log). A single item that fails gets its failure
    directly. `fn` returning a result count other than its item count is a fault (ValueError).
    Only `Exception`s are caught: KeyboardInterrupt and SystemExit still stop the process.
    """
    items = list(items)
    if not items:
        return []

    def call(part: list[Any]) -> list[Any]:
        out = list(fn(part))
        if len(out) != len(part):
            raise ValueError(f"{what}: {len(out)} results for {len(part)} items")
        return out

    try:
        return call(items)
    except Exception as exc:
        if len(items) == 1:
            return [item_failure(exc)]
        logger.warning(
            "%s of %d items failed (%s); running its items one by one", what, len(items), one_line(exc)
        )
        if on_retry is not None:
            on_retry(exc, len(items))
    results: list[Any] = []
    for item in items:
        try:
            results += call([item])
        except Exception as exc:
            results.append(item_failure(exc))
    return results
