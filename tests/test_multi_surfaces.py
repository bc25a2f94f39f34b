"""Every surface answers none, one or several objects the same way, on a tiny `model.targets: multi`
checkpoint tuned to answer no object for one text and two for another (conftest `multi_checkpoint`):
`Segmenter`, the row-level calls of the Serve replicas and batch actors, the batch job's rows,
`ppcr segment` and `evaluate --predictions`. The served app and the page: tests/test_web.py."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import multi_image_png

from ppcr.batch import MLLMActor, SAMActor, decode_stage, group_by_image, read_manifest
from ppcr.batch.io import RESULT_SCHEMA
from ppcr.checkpoint import load_checkpoint
from ppcr.cli import main
from ppcr.geometry import clip_preprocess, decode_image, preprocess_image
from ppcr.inference import reason_rows, segment_rows
from ppcr.masks import decode_rle
from ppcr.predictor import Segmenter

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def seg(multi_checkpoint):
    return Segmenter.from_checkpoint(multi_checkpoint[0])


@pytest.fixture(scope="module")
def expected(seg, multi_checkpoint):
    """{text: Segmentation} of the in-process API, the reference of every other surface."""
    texts = list(multi_checkpoint[1].values())
    image = multi_image_png()
    return dict(zip(texts, seg.segment_batch([image] * len(texts), texts)))


def test_segmenter_answers_none_and_two(expected, multi_checkpoint):
    roles = multi_checkpoint[1]
    none, two = expected[roles["none"]], expected[roles["two"]]
    assert none.no_target and none.instances == () and none.box is None and none.score is None
    assert none.mask.shape == (90, 120) and not none.mask.any()
    assert not two.no_target and len(two.instances) == 2
    np.testing.assert_array_equal(two.mask, two.instances[0].mask | two.instances[1].mask)
    boxes = np.stack([i.box for i in two.instances])
    np.testing.assert_allclose(two.box, [*boxes[:, :2].min(0), *boxes[:, 2:].max(0)])
    assert two.score == pytest.approx(np.mean([i.score for i in two.instances]))


def test_the_replicas_row_calls_answer_as_the_segmenter(seg, expected, multi_checkpoint):
    """reason_rows (the MLLM replica / actor) + segment_rows (the SAM ones) give Segmenter's answers:
    a no-target expression reaches SAM with no box, a two-target one with two."""
    texts = list(expected)
    sam, images, sem, boxes = _row_inputs(multi_checkpoint[0], texts)
    assert [len(b) for b in boxes] == [len(expected[t].instances) for t in texts]
    got = segment_rows(sam, images, (torch.zeros(len(texts), dtype=torch.long), torch.from_numpy(sem), boxes))
    for text, answer in zip(texts, got):
        want = expected[text]
        assert answer["no_target"] is want.no_target and len(answer["instances"]) == len(want.instances)
        np.testing.assert_array_equal(decode_rle(answer["mask"]), want.mask)
        for a, w in zip(answer["instances"], want.instances):
            np.testing.assert_array_equal(decode_rle(a["mask"]), w.mask)
            np.testing.assert_allclose(a["box"], w.box, rtol=1e-5, atol=1e-4)
            assert a["score"] == pytest.approx(w.score, rel=1e-5)
    # Only no-target expressions: the decoder is never called.
    only_none = [boxes[texts.index(multi_checkpoint[1]["none"])]]
    calls = []
    sam.segment = lambda *a: calls.append(a)
    (none,) = segment_rows(
        sam, images, (torch.zeros(1, dtype=torch.long), torch.from_numpy(sem[:1]), only_none)
    )
    assert calls == [] and none["no_target"] and none["mask"]["size"] == [90, 120]


def _row_inputs(ckpt, texts):
    """What the replicas hold for `texts` on `multi_image_png()`: the SAM-side model, the image's
    (embeddings, original_hw, sam_input_hw), and reason_rows' semantic prompts and kept boxes."""
    mllm, sam = load_checkpoint(ckpt, parts=("mllm",)), load_checkpoint(ckpt, parts=("sam",))
    image = decode_image(multi_image_png())
    sem, boxes = reason_rows(
        mllm,
        ["img"] * len(texts),
        texts,
        lambda i: clip_preprocess(image, mllm.clip_size, mllm.clip_mode),
        lambda i: image.shape[:2],
    )
    _, sam_pixels, sam_hw = preprocess_image(image, sam.clip_size, sam.sam_size, sam.clip_mode)
    with torch.no_grad():
        emb = sam.segmentation.encode(sam_pixels[None])
    return sam, (emb, torch.tensor([image.shape[:2]]), torch.tensor([sam_hw])), sem, boxes


def test_a_kept_slot_without_pixels_is_no_object_on_every_surface(multi_checkpoint, monkeypatch):
    """When SAM finds no pixel in a kept box slot, that slot is not an object: `Segmenter` (and so
    `evaluate`, which scores the same answers) and the replicas' row calls (and so the batch rows and
    the Serve API) all leave it out, and an answer left without any says "no target". The paper's
    single-target model still answers its one instance, empty or not."""
    import ppcr.inference

    real = ppcr.inference.binarize
    monkeypatch.setattr(ppcr.inference, "binarize", lambda logits: np.zeros_like(real(logits)))
    ckpt, roles = multi_checkpoint
    two = Segmenter.from_checkpoint(ckpt).segment(multi_image_png(), roles["two"])
    assert two.no_target and two.instances == () and two.box is None and two.score is None
    sam, images, sem, boxes = _row_inputs(ckpt, [roles["two"]])
    assert len(boxes[0]) == 2  # both slots kept, as before: only their masks are empty
    (row,) = segment_rows(sam, images, (torch.zeros(1, dtype=torch.long), torch.from_numpy(sem), boxes))
    assert row["no_target"] is True and row["instances"] == [] and row["box"] is None
    single = Segmenter.from_preset("tiny").segment(multi_image_png(), roles["two"])
    assert len(single.instances) == 1 and not single.mask.any() and not single.no_target


def test_batch_rows_answer_as_the_segmenter(expected, multi_checkpoint, tmp_path):
    """The batch actors (in-process, as the actor pools run them) write each answer's instances."""
    ckpt = str(multi_checkpoint[0])
    (tmp_path / "a.png").write_bytes(multi_image_png())
    texts = list(expected)
    lines = [{"id": f"e{i}", "image": "a.png", "expression": t} for i, t in enumerate(texts)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    cfg = load_checkpoint(ckpt, parts=("sam",))
    decoded = decode_stage(
        group_by_image(read_manifest(tmp_path / "m.jsonl")), cfg.clip_size, cfg.sam_size, checkpoint=ckpt
    )
    reasoned = MLLMActor(ckpt, None, "cpu", 1, max_expr=8)(decoded)
    assert reasoned["box_counts"].to_pylist() == [[len(expected[t].instances) for t in texts]]
    table = SAMActor(ckpt, None, "cpu", 1, None)(reasoned)
    assert table.schema == RESULT_SCHEMA
    for row in table.to_pylist():
        want = expected[row["expression"]]
        assert row["no_target"] is want.no_target and row["error"] is None
        assert len(row["instances"]) == len(want.instances)
        np.testing.assert_array_equal(decode_rle(row["mask"]), want.mask)
        if want.no_target:
            assert row["box"] is None and row["score"] is None
        else:
            np.testing.assert_allclose(row["box"], want.box, atol=1e-3)
            for got, w in zip(row["instances"], want.instances):
                np.testing.assert_array_equal(decode_rle(got["mask"]), w.mask)


def test_ppcr_segment_prints_none_and_two(expected, multi_checkpoint, tmp_path, capsys):
    ckpt, roles = multi_checkpoint
    (tmp_path / "a.png").write_bytes(multi_image_png())
    for role, n in (("none", 0), ("two", 2)):
        out = tmp_path / f"{role}.png"
        argv = ["segment", str(tmp_path / "a.png"), roles[role], "--checkpoint", str(ckpt), "--out", str(out)]
        assert main(argv) == 0
        printed = json.loads(capsys.readouterr().out.splitlines()[0])
        assert printed["no_target"] is (n == 0) and len(printed["instances"]) == n
        assert printed["mask_pixels"] == int(expected[roles[role]].mask.sum())
        assert out.stat().st_size > 0


def test_evaluate_predictions_carry_the_instances(multi_checkpoint, tmp_path):
    """`ppcr evaluate --predictions` on a generalized split: each line's `instances` are the answer's,
    its `mask` their union, as `Segmenter` answers; replaying the lines gives
    the report's metrics."""
    from ppcr.data.shards import iter_expressions, prepare_shards, shard_dir
    from ppcr.data.synth import SynthConfig, synthesize
    from ppcr.evaluate import evaluate_split
    from ppcr.report import metrics_from_predictions, write_predictions

    synth = SynthConfig(num_images=4, seed=3, min_objects=3, max_objects=3, relations=False)
    synth = dataclasses.replace(synth, generalized=True, dataset="synthgref")
    summary = synthesize(tmp_path / "refer", synth)
    prepare_shards(
        tmp_path / "refer", summary["images_dir"], "synthgref", "unc", tmp_path / "s", progress=False
    )
    split = shard_dir(tmp_path / "s", "synthgref", "unc", "val")
    model = load_checkpoint(multi_checkpoint[0])
    records: list[dict] = []
    metrics = evaluate_split(model, split, progress=False, on_prediction=records.append)
    assert metrics["count"] == len(records) > 0 and "N-acc" in metrics
    seg = Segmenter(model)
    samples = {s.sent_id: s for s in iter_expressions(split)}
    for r in records:
        sample = samples[r["sent_id"]]
        want = seg.segment(sample.image_bytes, sample.text)
        assert len(r["instances"]) == len(want.instances), r["sent_id"]
        np.testing.assert_array_equal(decode_rle(r["mask"]), want.mask)
        for got, w in zip(r["instances"], want.instances):
            np.testing.assert_array_equal(decode_rle(got["mask"]), w.mask)
    replay = metrics_from_predictions(write_predictions(tmp_path / "p.jsonl", records))
    assert list(replay.values()) == [metrics]


def test_a_classic_split_scores_no_target_answers(multi_checkpoint, val_dir, tmp_path):
    """On a split where every expression has one target (RefCOCO's kind), a multi-target model that
    answers "no target" scores IoU 0 and box IoU 0 there, in process and through the batch stages
    alike; its prediction lines hold an empty mask and null box and score."""
    import pyarrow.parquet as pq

    from ppcr.batch import metrics_stage, shard_rows_to_images
    from ppcr.batch.stages import predictions_stage
    from ppcr.checkpoint import save_checkpoint
    from ppcr.evaluate import evaluate_split
    from ppcr.metrics import RISMetrics
    from ppcr.report import metrics_from_predictions, write_predictions

    model = load_checkpoint(multi_checkpoint[0])
    with torch.no_grad():
        model.spatial.head.presence.weight.zero_()  # names nothing, whatever the expression
        model.spatial.head.presence.bias.fill_(-10.0)
    ckpt = str(save_checkpoint(model, tmp_path / "none"))
    records: list[dict] = []
    metrics = evaluate_split(model, val_dir, progress=False, limit_images=3, on_prediction=records.append)
    assert metrics["count"] == len(records) > 0
    assert metrics["mIoU"] == metrics["oIoU"] == metrics["BoxAcc@0.5"] == 0.0
    assert all(r["box"] is None and r["score"] is None and r["box_iou"] == 0.0 for r in records)
    assert list(metrics_from_predictions(write_predictions(tmp_path / "p.jsonl", records)).values()) == [
        metrics
    ]

    shard = pa.concat_tables([pq.read_table(f) for f in sorted(val_dir.glob("part-*.parquet"))]).slice(0, 3)
    images = shard_rows_to_images(shard, split="val", with_gt=True, done=None)
    decoded = decode_stage(images, model.clip_size, model.sam_size, checkpoint=ckpt)
    rows = SAMActor(ckpt, None, "cpu", 1, None, evaluation=True)(MLLMActor(ckpt, None, "cpu", 1, 16)(decoded))
    assert all(rows["no_target"].to_pylist())
    state = metrics_stage(rows).to_pylist()[0]["state"]
    ray_metrics = RISMetrics.from_state_dict(json.loads(state)).compute()
    assert ray_metrics["BoxAcc@0.5"] == ray_metrics["mIoU"] == 0.0
    lines = [json.loads(r) for r in predictions_stage(rows)["record"].to_pylist()]
    assert all(r["box"] is None and r["box_iou"] == 0.0 for r in lines)
