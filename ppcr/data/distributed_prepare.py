"""Shards as a Ray Data job (`ppcr prepare --ray`, `ray_jobs/prepare_data.py`): REFER, and the custom
JSONL / COCO imports (`ppcr.data.custom.prepare_custom_ray`) through the same machinery.

The driver plans each split as fixed runs of `rows_per_file` image ids (sorted), one part file per run,
so the output is the same whatever the parallelism. An actor pool builds and writes the parts (`run_parts`:
each actor builds its row builder once — REFER loads the annotations, a custom import's tasks carry
their lines); a bad image or ref is skipped and reported, never fatal. Every finished part leaves
`<split>/_done/part-%05d.json` (its key, what it holds and what it skipped): a re-run skips finished parts
whose key is unchanged, so an interrupted job continues where it stopped.

Same schema and layout as `prepare_shards` (docs/shard_format.md); one difference: a part whose
images were skipped holds fewer than `rows_per_file` rows instead of borrowing from the next run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .refer import ReferDataError, ReferDataset
from .shards import (
    DONE_DIR,
    SHARD_FORMAT_VERSION,
    PrepareReport,
    _atomic_write_table,
    _atomic_write_text,
    _build_row,
    error_entry,
)


def _plan_key(split: str, part: int, image_ids: list[int], content: str = "") -> str:
    parts = [SHARD_FORMAT_VERSION, split, part, image_ids] + ([content] if content else [])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


class ReferParts:
    """Builds the rows of a REFER part: loads the annotations once (per actor)."""

    def __init__(self, refer_root: str, images_dir: str, dataset: str, split_by: str):
        self.refer = ReferDataset(refer_root, dataset, split_by)
        self.images_dir = images_dir
        self.by_image: dict[int, list] = {}
        for ref in self.refer.refs():
            self.by_image.setdefault(ref.image_id, []).append(ref)

    def __call__(self, task: dict[str, Any]) -> tuple[list[dict], list[dict]]:
        split, ids = task["split"], [int(i) for i in task["image_ids"]]
        errors: list[dict] = []

        def record(err: ReferDataError, image_id: int, ref_id: int | None) -> None:
            errors.append(error_entry(split, image_id, ref_id, err))

        rows = []
        for image_id in ids:
            refs = [r for r in self.by_image.get(image_id, []) if r.split == split]
            try:
                row = _build_row(
                    self.refer,
                    image_id,
                    self.images_dir,
                    refs,
                    lambda ref, e, i=image_id: record(e, i, ref.ref_id),
                )
            except ReferDataError as e:
                record(e, image_id, None)
                continue
            if row["refs"]:
                rows.append(row)
        return rows, errors


class PartWriter:
    """Ray Data actor: builds (with `builder(**builder_kwargs)`, called on the task) and writes one part
    file per input row (split, part, key, ...), then its `_done` marker."""

    def __init__(self, builder: type, builder_kwargs: dict, root: str):
        self.build = builder(**builder_kwargs)
        self.root = Path(root)

    def __call__(self, task: dict[str, Any]) -> dict[str, Any]:
        split, part = task["split"], int(task["part"])
        rows, errors = self.build(task)
        folder = self.root / split
        path = folder / f"part-{part:05d}.parquet"
        folder.mkdir(parents=True, exist_ok=True)
        if rows:
            _atomic_write_table(rows, path)
        else:
            path.unlink(missing_ok=True)
        done = {"key": task["key"], "rows": len(rows), "file": path.name if rows else None, "errors": errors}
        marker = folder / DONE_DIR / f"part-{part:05d}.json"
        marker.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(json.dumps(done), marker)  # written last: the part is finished
        return {"split": split, "part": part, "rows": len(rows), "errors": json.dumps(errors)}


def run_parts(
    root: Path, plan: dict[str, list[dict]], builder: type, builder_kwargs: dict, concurrency: int
) -> tuple[PrepareReport, dict]:
    """Build and write every unfinished part of ``plan`` (split -> its tasks, part 0, 1, ... each with a
    ``key`` that changes with its content) under ``root/<split>/`` with a pool of PartWriter actors.

    Parts whose marker holds the same key (and whose file exists) are skipped; part files beyond the plan
    are removed. Returns the report (rows, files, errors from the markers; errors.jsonl is the caller's)
    and {"written": parts done now, "skipped": parts already done}.
    """
    import ray.data

    todo, order = [], []
    for split, tasks in plan.items():
        folder = root / split
        for stale in folder.glob("part-*.parquet*"):  # parts beyond this plan (an earlier, larger run)
            if not stale.name.endswith(".parquet") or int(stale.name[5:10]) >= len(tasks):
                stale.unlink()
        for task in tasks:
            order.append((split, task["part"]))
            marker = folder / DONE_DIR / f"part-{task['part']:05d}.json"
            done = json.loads(marker.read_text()) if marker.is_file() else None
            if (
                done
                and done["key"] == task["key"]
                and (done["file"] is None or (folder / done["file"]).is_file())
            ):
                continue
            todo.append({"split": split, **task})
    if todo:
        ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map(
            PartWriter,
            fn_constructor_kwargs=dict(builder=builder, builder_kwargs=builder_kwargs, root=str(root)),
            concurrency=min(concurrency, len(todo)),
        )
        ds.materialize()  # a handful of tiny result rows; the part files are the output
    report = PrepareReport()
    for split, part in order:
        folder = root / split
        done = json.loads((folder / DONE_DIR / f"part-{part:05d}.json").read_text())
        report.written[split] = report.written.get(split, 0) + done["rows"]
        if done["file"]:
            report.files.append(str(folder / done["file"]))
        report.errors += done["errors"]
    for split in plan:
        report.written.setdefault(split, 0)
    return report, {"written": len(todo), "skipped": len(order) - len(todo)}


def prepare_shards_ray(
    refer_root: str | Path,
    images_dir: str | Path,
    dataset: str,
    split_by: str,
    out: str | Path,
    *,
    splits: list[str] | tuple[str, ...] | None = None,
    rows_per_file: int = 256,
    concurrency: int = 2,
) -> tuple[PrepareReport, dict]:
    """Convert a REFER dataset to shards with Ray Data. Returns the report (rows per split, files,
    skipped records, also in `<out>/<dataset>_<split_by>/errors.jsonl`) and counts of parts
    {"written": n, "skipped": m} (parts finished by an earlier run are skipped)."""
    if rows_per_file < 1:
        raise ValueError("rows_per_file must be >= 1")
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    refer = ReferDataset(refer_root, dataset, split_by)
    splits = list(refer.splits if splits is None else splits)
    ids_by_split = {
        s: sorted({r.image_id for r in refer.refs(s)}) for s in splits
    }  # ValueError on a bad split
    plan = {}
    for split, ids in ids_by_split.items():
        chunks = [ids[i : i + rows_per_file] for i in range(0, len(ids), rows_per_file)]
        plan[split] = [
            {"part": part, "image_ids": chunk, "key": _plan_key(split, part, chunk)}
            for part, chunk in enumerate(chunks)
        ]
    root = Path(out) / f"{dataset}_{split_by}"
    kwargs = dict(refer_root=str(refer_root), images_dir=str(images_dir), dataset=dataset, split_by=split_by)
    report, parts = run_parts(root, plan, ReferParts, kwargs, concurrency)
    _atomic_write_text("".join(json.dumps(e) + "\n" for e in report.errors), root / "errors.jsonl")
    return report, parts
