"""The pipeline's stages: decode + preprocess (CPU tasks), MLLM and SAM (actor pools), overlays, metrics.

The model actors call the inference runtime (ppcr/inference.py: `reason_rows`, `segment_rows`, the code
the Serve deployments run) and keep only batching and Arrow <-> tensor moves; each actor builds only the
model part it runs (`load_checkpoint(parts=...)`)."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from ..storage import read_bytes
from .io import (
    DECODED_SCHEMA,
    ERRORS_DIR,
    EVAL_RESULT_SCHEMA,
    LIST_STR,
    OVERLAYS_DIR,
    PASSED_COLUMNS,
    REASONED_SCHEMA,
    RESULT_SCHEMA,
    RESULTS_DIR,
)

# ----------------------------------------------------------------------------- stages


def decode_f32(buf: bytes, shape: tuple[int, ...]):
    import torch

    # Object-store buffers are read-only; torch needs its own copy.
    return torch.from_numpy(np.frombuffer(buf, dtype=np.float32).reshape(shape).copy())


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@functools.lru_cache(maxsize=4)
def _prompt_tokenizer(checkpoint: str, overrides_json: str):
    """The checkpoint's text rules (`PromptTokenizer` from its config and tokenizer, no model), once
    per worker process."""
    from ..checkpoint import load_model_config
    from ..mllm import PromptTokenizer

    return PromptTokenizer.from_config(load_model_config(checkpoint, json.loads(overrides_json)))


def decode_stage(
    table: pa.Table,
    clip_size: int,
    sam_size: int,
    clip_mode: str = "pad",
    *,
    checkpoint: str,
    overrides: dict | None = None,
) -> pa.Table:
    """CPU task: validate expressions, read + decode each image once, preprocess for CLIP and SAM.

    Expressions get the text rules of every entry point (`PromptTokenizer.check_expression` with the
    checkpoint's tokenizer and context) before any model work; a bad one is that row's error
    ("bad expression: ..."), and an image whose expressions are all bad is not even read.
    """
    from ..geometry import decode_image, preprocess_image

    prompts = _prompt_tokenizer(str(checkpoint), json.dumps(overrides or {}, sort_keys=True))
    out = []
    for r in table.to_pylist():
        texts, errors = [], []
        for e in r["expressions"]:
            try:
                texts.append(prompts.check_expression(e))
                errors.append(None)
            except (TypeError, ValueError) as exc:
                texts.append(None)
                errors.append(f"bad expression: {exc}")
        clip = sam = b""
        hw = sam_hw = [0, 0]
        image_error = None
        if any(err is None for err in errors):
            try:
                data = r["image_bytes"] if r["image_bytes"] is not None else read_bytes(r["image"])
                expected = None if r["height"] is None else (r["height"], r["width"])
                img = decode_image(data, r["image"], expected_hw=expected)
                hw = list(img.shape[:2])
                clip_t, sam_t, in_hw = preprocess_image(img, clip_size, sam_size, clip_mode)
                sam_hw = list(in_hw)
                clip = clip_t.numpy().astype(np.float32).tobytes()
                sam = sam_t.numpy().astype(np.float32).tobytes()
            except Exception as exc:  # missing file, corrupt bytes, size mismatch, ...
                image_error = f"bad image: {_error_text(exc)}"
        if image_error is not None:
            errors = [err or image_error for err in errors]
            texts = [None] * len(texts)
        out.append(
            {**{k: r[k] for k in PASSED_COLUMNS}, "texts": texts, "errors": errors, "clip": clip, "sam": sam}
            | {"hw": hw, "sam_hw": sam_hw}
        )
    return pa.Table.from_pylist(out, schema=DECODED_SCHEMA)


def _load_model(checkpoint: str, overrides: dict | None, device: str, threads: int, part: str):
    """The one part ("mllm" or "sam") an actor runs: the other is never built (docs/architecture.md)."""
    import torch

    from ..checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    return load_checkpoint(checkpoint, overrides=overrides, device=device, parts=(part,))


class MLLMActor:
    """Actor: stages 1 + 2 (`PPCRModel.reason`) for every valid expression of a batch of image rows."""

    def __init__(self, checkpoint: str, overrides: dict | None, device: str, threads: int, max_expr: int):
        self.model = _load_model(checkpoint, overrides, device, threads, "mllm")
        self.max_expr = max_expr

    def _reason(self, rows: list[dict], pairs: list[tuple[int, int]]) -> list[tuple]:
        """pairs: (row, expression) -> one (prompt (D,), boxes (k, 4) or None) per pair, as numpy: the
        boxes stage 3 segments (`inference.reason_rows`: one, or the kept slots, none for no target)."""
        from ..inference import reason_rows

        m, c = self.model, self.model.clip_size
        prompts, box = reason_rows(
            m,
            [i for i, _ in pairs],
            [rows[i]["texts"][j] for i, j in pairs],
            lambda k: decode_f32(rows[pairs[k][0]]["clip"], (3, c, c)),
            lambda k: rows[pairs[k][0]]["hw"],
        )
        return [(prompts[k], None if box is None else box[k]) for k in range(len(pairs))]

    def __call__(self, table: pa.Table) -> pa.Table:
        from ..failures import ItemFailure, run_isolated

        rows = table.to_pylist()
        pairs = [(i, j) for i, r in enumerate(rows) for j, err in enumerate(r["errors"]) if err is None]
        prompts: dict[tuple[int, int], np.ndarray] = {}
        boxes: dict[tuple[int, int], np.ndarray | None] = {}
        for start in range(0, len(pairs), self.max_expr):
            chunk = pairs[start : start + self.max_expr]
            # A chunk that fails runs again one expression at a time: only the culprit(s) fail.
            for pair, got in zip(chunk, run_isolated(lambda ps: self._reason(rows, ps), chunk, "MLLM chunk")):
                if isinstance(got, ItemFailure):
                    kind = "bad expression" if got.input_error else "MLLM stage failed"
                    rows[pair[0]]["errors"][pair[1]] = f"{kind}: {got.message}"
                else:
                    prompts[pair], boxes[pair] = got
        for i, r in enumerate(rows):
            ok = [(i, j) for j, err in enumerate(r["errors"]) if err is None]
            r["prompts"] = np.stack([prompts[k] for k in ok]).astype(np.float32).tobytes() if ok else b""
            has_box = bool(ok) and boxes[ok[0]] is not None
            kept = [boxes[k] for k in ok] if has_box else []
            r["boxes"] = np.concatenate(kept).astype(np.float32).tobytes() if kept else b""
            r["box_counts"] = [len(b) for b in kept] if has_box else None
        return pa.Table.from_pylist(rows, schema=REASONED_SCHEMA)


@ray.remote(num_cpus=0)
class EncoderCounter:
    """How many images the SAM image encoder has embedded (summed over the SAM actors)."""

    def __init__(self) -> None:
        self.n = 0

    def add(self, n: int) -> None:
        self.n += n

    def total(self) -> int:
        return self.n


class SAMActor:
    """Actor: stage 3. Encodes each image of the batch once (`segmentation.encode`), then decodes every
    prompt of it (`PPCRModel.segment`); emits one RESULT row per expression, errors included."""

    def __init__(
        self,
        checkpoint: str,
        overrides: dict | None,
        device: str,
        threads: int,
        counter,
        oracle_box: bool = False,
        evaluation: bool = False,
    ):
        self.model = _load_model(checkpoint, overrides, device, threads, "sam")
        self.counter = counter
        self.oracle_box = oracle_box
        self.schema = EVAL_RESULT_SCHEMA if evaluation else RESULT_SCHEMA
        self.evaluation = evaluation

    def _segment(self, rows: list[dict]) -> list[list[dict]]:
        """For each row, the answer (`inference.encode_answer`) of each expression without error."""
        import torch

        from ..inference import segment_rows
        from ..inputs import ground_truth_boxes

        m = self.model
        s, d = m.sam_size, m.cfg.prompt_dim
        sam = torch.stack([decode_f32(r["sam"], (3, s, s)) for r in rows]).to(m.device)
        hw = torch.tensor([r["hw"] for r in rows], dtype=torch.long, device=m.device)
        sam_hw = torch.tensor([r["sam_hw"] for r in rows], dtype=torch.long, device=m.device)
        index, prompts, boxes = [], [], []
        for i, r in enumerate(rows):
            ok = [j for j, err in enumerate(r["errors"]) if err is None]
            index += [i] * len(ok)
            prompts.append(decode_f32(r["prompts"], (len(ok), d)))
            if self.oracle_box:
                gt = ground_truth_boxes([r["gt_boxes"][j] for j in ok], [r["hw"]] * len(ok))
                boxes += list(gt[:, None])
            elif r["box_counts"] is not None:
                kept = decode_f32(r["boxes"], (sum(r["box_counts"]), 4))
                boxes += list(kept.split(r["box_counts"]))
        index_t = torch.tensor(index, dtype=torch.long, device=m.device)
        prompt_t = torch.cat(prompts).to(m.device)
        box_t = boxes if boxes else None
        with torch.no_grad():
            emb = m.segmentation.encode(sam)
        if self.counter is not None:  # None when the actor is called in-process (benchmarks)
            ray.get(self.counter.add.remote(len(rows)))
        out: list[list[dict]] = [[] for _ in rows]
        for i, a in zip(index, segment_rows(m, (emb, hw, sam_hw), (index_t, prompt_t, box_t))):
            out[i].append(a)
        return out

    def __call__(self, table: pa.Table) -> pa.Table:
        from ..failures import ItemFailure, run_isolated

        rows = table.to_pylist()
        work = [r for r in rows if any(err is None for err in r["errors"])]
        segs: dict[int, list[dict]] = {}
        # A batch that fails runs again one image at a time: only the culprit(s) fail.
        for r, got in zip(work, run_isolated(self._segment, work, "SAM batch")):
            if isinstance(got, ItemFailure):
                kind = "bad input" if got.input_error else "SAM stage failed"
                r["errors"] = [err or f"{kind}: {got.message}" for err in r["errors"]]
            else:
                segs[id(r)] = got
        out = []
        for r in rows:
            done = iter(segs.get(id(r), []))
            for j, (rid, expr, err) in enumerate(zip(r["ids"], r["expressions"], r["errors"])):
                rec = {"id": rid, "image": r["image"], "expression": expr, "error": err}
                if err is None:
                    rec |= _answer_columns(next(done))
                rec["output"] = ERRORS_DIR if err else RESULTS_DIR
                if self.evaluation:
                    rec["split"] = r["split"]
                    rec["gt_box"] = r["gt_boxes"][j]
                    rec["gt_mask"] = r["gt_masks"][j]
                out.append(rec)
        return pa.Table.from_pylist(out, schema=self.schema)


def _answer_columns(answer: dict) -> dict:
    """An answer (`inference.encode_answer`) as RESULT_SCHEMA's columns: box, mask, score, no_target,
    instances."""

    def box(b) -> list[float] | None:
        return None if b is None else [float(v) for v in b]

    return {
        "box": box(answer["box"]),
        "mask": answer["mask"],
        "score": answer["score"],
        "no_target": answer["no_target"],
        "instances": [
            {"box": box(i["box"]), "mask": i["mask"], "score": i["score"]} for i in answer["instances"]
        ],
    }


def _safe_name(rid: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", rid)[:150] or "_"


def overlay_stage(table: pa.Table, out_dir: str) -> pa.Table:
    """CPU task: draw `<out>/overlays/<id>.png` for the result rows (each image decoded once per batch)."""
    from ..geometry import decode_image
    from ..masks import decode_rle
    from ..visualize import save_overlay

    cache: dict[str, np.ndarray] = {}
    for r in table.to_pylist():
        if r["error"] is not None:
            continue
        if r["image"] not in cache:
            cache[r["image"]] = decode_image(read_bytes(r["image"]), r["image"])
        save_overlay(
            Path(out_dir) / OVERLAYS_DIR / f"{_safe_name(r['id'])}.png",
            image=cache[r["image"]],
            mask=decode_rle(r["mask"]),
            box=r["box"],
            expression=r["expression"],
            score=r["score"],
            instance_boxes=[i["box"] for i in r["instances"]] if len(r["instances"]) > 1 else (),
            instance_masks=[decode_rle(i["mask"]) for i in r["instances"]] if len(r["instances"]) > 1 else (),
            no_target=r["no_target"],
        )
    return table


def metrics_stage(table: pa.Table, generalized: Sequence[str] = ()) -> pa.Table:
    """CPU task: RISMetrics of a batch of evaluation rows, one state per split (merged in the driver);
    GRESMetrics for the `generalized` splits, where an empty ground-truth mask means no target (a
    target's mask is never empty in their shards, docs/shard_format.md)."""
    from ..masks import decode_rle
    from ..metrics import GRESMetrics, RISMetrics, score_answer

    per: dict[str, RISMetrics | GRESMetrics] = {}
    errors: dict[str, list[str]] = {}
    for r in table.to_pylist():
        if r["error"] is not None:
            errors.setdefault(r["split"], []).append(f"{r['id']}: {r['error']}")
            continue
        mask, gt = decode_rle(r["mask"]), decode_rle(r["gt_mask"])
        if r["split"] in generalized:
            per.setdefault(r["split"], GRESMetrics()).update(mask, gt, not gt.any())
        else:
            per.setdefault(r["split"], RISMetrics()).add(score_answer(mask, gt, r["box"], r["gt_box"]))
    splits = sorted(set(per) | set(errors))
    return pa.table(
        {
            "split": splits,
            "state": [json.dumps(per[s].state_dict()) if s in per else None for s in splits],
            "errors": [errors.get(s, []) for s in splits],
        },
        schema=pa.schema([("split", pa.string()), ("state", pa.string()), ("errors", LIST_STR)]),
    )


def protocol_stage(table: pa.Table, protocol: str, seed: int) -> pa.Table:
    """CPU task: keep, in each image row (IMAGE_SCHEMA, shard input), the expressions `protocol` evaluates
    (``ppcr.metrics.protocol_indices``: the same selection as the in-process evaluator)."""
    from ..metrics import protocol_indices

    rows = table.to_pylist()
    for r in rows:
        keep = protocol_indices(protocol, r["image"], len(r["ids"]), seed)
        for key in ("ids", "expressions", "gt_boxes", "gt_masks"):
            if r[key] is not None:
                r[key] = [r[key][i] for i in keep]
    return pa.Table.from_pylist(rows, schema=table.schema)


def predictions_stage(table: pa.Table, generalized: Sequence[str] = ()) -> pa.Table:
    """CPU task: one prediction record (``ppcr.report.prediction_record``, as JSON; for the `generalized`
    splits ``generalized_prediction_record``) per evaluated expression, or its error; the driver sorts
    them and replays them into the metrics."""
    from ..masks import decode_rle
    from ..metrics import score_answer, score_generalized
    from ..report import generalized_prediction_record, prediction_record

    records, errors, splits = [], [], []
    for r in table.to_pylist():
        splits.append(r["split"])
        if r["error"] is not None:
            records.append(None)
            errors.append(f"{r['id']}: {r['error']}")
            continue
        if r["split"] in generalized:
            mask, gt = decode_rle(r["mask"]), decode_rle(r["gt_mask"])
            gres = score_generalized(mask, gt, not gt.any())
            instances = [(decode_rle(i["mask"]), i["box"], i["score"]) for i in r["instances"]]
            rec = generalized_prediction_record(
                r["split"], int(r["id"]), r["image"], r["expression"], instances, gres, mask.shape
            )
            records.append(json.dumps(rec))
            errors.append(None)
            continue
        score = score_answer(decode_rle(r["mask"]), decode_rle(r["gt_mask"]), r["box"], r["gt_box"])
        rec = prediction_record(
            r["split"], int(r["id"]), r["image"], r["expression"], r["box"], r["mask"], r["score"], score
        )
        records.append(json.dumps(rec))
        errors.append(None)
    return pa.table(
        {"split": splits, "record": records, "error": errors},
        schema=pa.schema([("split", pa.string()), ("record", pa.string()), ("error", pa.string())]),
    )
