"""The inference runtime (ppcr/inference.py) and per-stage loading: a process builds only the part it
runs, and the parts together answer exactly as the whole model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything.modeling import Sam

from ppcr.checkpoint import load_checkpoint, save_checkpoint
from ppcr.cli import main
from ppcr.config import ConfigError, InputError, load_config
from ppcr.failures import ItemFailure, one_line, run_isolated
from ppcr.inference import (
    Instance,
    Segmentation,
    answers,
    binarize,
    encode_answer,
    predict_torch,
    reason_rows,
    segment_rows,
    segmentations,
)
from ppcr.inputs import Item, collate, ground_truth_boxes, group_images
from ppcr.masks import decode_rle
from ppcr.model import PPCRModel
from ppcr.segmentation_stage import MASK_THRESHOLD

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = PPCRModel(load_config("tiny").model)
    with torch.no_grad():  # away from init (lora_B starts at zero)
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return save_checkpoint(model, tmp_path_factory.mktemp("inference") / "ckpt")


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    items = []
    for key, (h, w), expr in [("a", (60, 90), "the red circle"), ("b", (100, 70), "the blue square")]:
        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        items.append(Item(key, img, expr, np.ones((h, w), bool), np.array([5.0, 10, 50, 40])))
    items.append(Item("a", items[0].image, "the thing on the right", items[0].gt_mask, items[0].gt_box))
    cfg = load_config("tiny").model
    return collate(items, cfg.vision.image_size, cfg.sam.image_size)


def test_group_images_keeps_first_seen_order():
    first, index = group_images(["x", "y", "x", "z", "y"])
    assert first == [0, 1, 3] and index.tolist() == [0, 1, 0, 2, 1]


def test_ground_truth_boxes_are_normalized_and_clamped():
    boxes = ground_truth_boxes(
        [np.array([10, 20, 50, 40]), np.array([-5, 0, 300, 10])], [(40, 100), (10, 200)]
    )
    torch.testing.assert_close(boxes, torch.tensor([[0.1, 0.5, 0.5, 1.0], [0.0, 0.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="2 boxes but 1 image sizes"):
        ground_truth_boxes([np.zeros(4), np.zeros(4)], [(1, 1)])


def test_masks_are_cut_at_sams_own_threshold():
    assert MASK_THRESHOLD == Sam.mask_threshold
    logits = torch.tensor([[MASK_THRESHOLD - 1e-3, MASK_THRESHOLD + 1e-3]])
    assert binarize(logits).tolist() == [[False, True]]
    segs = segmentations([torch.full((4, 6), 5.0)], torch.tensor([[0.0, 0.0, 0.5, 1.0]]), torch.tensor([0.7]))
    assert segs[0].mask.all() and segs[0].box.tolist() == [0.0, 0.0, 3.0, 4.0]
    assert segs[0].score == pytest.approx(0.7)


def _instance(h, w, y, x, score):
    mask = np.zeros((h, w), bool)
    mask[y : y + 2, x : x + 3] = True
    return Instance(mask, np.array([x, y, x + 3, y + 2], dtype=np.float64), score)


def test_an_answer_is_its_instances_and_their_union():
    a, b = _instance(6, 8, 0, 0, 0.9), _instance(6, 8, 3, 4, 0.5)
    none = Segmentation.of([], (6, 8))
    assert none.no_target and none.instances == () and none.box is None and none.score is None
    assert none.mask.shape == (6, 8) and not none.mask.any()
    one = Segmentation.of([a], (6, 8))
    assert not one.no_target and one.mask is a.mask and one.box is a.box and one.score == 0.9
    two = Segmentation.of([a, b], (6, 8))
    assert not two.no_target and len(two.instances) == 2
    np.testing.assert_array_equal(two.mask, a.mask | b.mask)
    assert two.box.tolist() == [0.0, 0.0, 7.0, 5.0] and two.box.dtype == np.float64  # encloses both
    assert two.score == pytest.approx(0.7)  # the mean
    mask, box, score, instances = two  # a 4-tuple
    assert instances == two.instances
    with pytest.raises(ValueError, match=r"instance 1: mask of shape \(6, 8\), the image is \(6, 9\)"):
        Segmentation.of([_instance(6, 9, 0, 0, 1.0), a], (6, 9))
    grouped = answers([a, a, b], [2, 0, 1], [(6, 8)] * 3)
    assert [len(g.instances) for g in grouped] == [2, 0, 1] and grouped[1].no_target
    with pytest.raises(ValueError, match="3 instances for counts"):
        answers([a, a, b], [1, 1], [(6, 8)] * 2)


def test_an_encoded_answer_keeps_every_instance_and_the_union():
    a, b = _instance(6, 8, 0, 0, 0.9), _instance(6, 8, 3, 4, 0.5)
    wire = encode_answer(Segmentation.of([a, b], (6, 8)))
    assert wire["no_target"] is False and [i["score"] for i in wire["instances"]] == [0.9, 0.5]
    np.testing.assert_array_equal(decode_rle(wire["mask"]), a.mask | b.mask)
    np.testing.assert_array_equal(decode_rle(wire["instances"][1]["mask"]), b.mask)
    none = encode_answer(Segmentation.of([], (6, 8)))
    assert none["no_target"] is True and none["instances"] == [] and none["box"] is None
    assert none["score"] is None and none["mask"]["size"] == [6, 8] and not decode_rle(none["mask"]).any()


def test_each_part_builds_only_its_modules(ckpt):
    mllm = load_checkpoint(ckpt, parts=("mllm",))
    sam = load_checkpoint(ckpt, parts=("sam",))
    assert mllm.segmentation is None and not any(k.startswith("segmentation.") for k in mllm.state_dict())
    assert sam.mllm is None and sam.semantic is None and sam.spatial is None
    assert all(k.startswith("segmentation.") for k in sam.state_dict())
    assert mllm.device == sam.device == torch.device("cpu")  # a half-built model still knows its device
    with pytest.raises(RuntimeError, match=r"reason \(stages 1 \+ 2\) needs the 'mllm' part"):
        sam.reason(
            torch.zeros(1, 3, 112, 112), torch.zeros(1, dtype=torch.long), ["x"], torch.tensor([[1, 1]])
        )
    with pytest.raises(ValueError, match="needs the whole model"):
        save_checkpoint(sam, ckpt.parent / "partial")
    with pytest.raises(ValueError, match="parts must be a non-empty subset"):
        load_checkpoint(ckpt, parts=("llava",))


def test_the_two_parts_together_answer_as_the_whole_model(ckpt, batch):
    whole = load_checkpoint(ckpt)
    mllm, sam = load_checkpoint(ckpt, parts=("mllm",)), load_checkpoint(ckpt, parts=("sam",))
    expected = predict_torch(whole, batch)
    with torch.no_grad():
        r = mllm.reason(batch.clip_pixels, batch.image_index, batch.expressions, batch.original_hw)
        emb = sam.segmentation.encode(batch.sam_pixels)
        _, iou, logits = sam.segment(
            emb, batch.image_index, r.semantic_prompt, r.box, batch.original_hw, batch.sam_input_hw
        )
    for want, got in zip(expected, segmentations(logits, r.box, iou)):
        np.testing.assert_array_equal(want.mask, got.mask)
        np.testing.assert_allclose(want.box, got.box, rtol=1e-6)
        assert want.score == pytest.approx(got.score, rel=1e-6)


def test_the_row_level_calls_of_the_ray_layers_answer_as_predict_torch(ckpt, batch):
    """reason_rows + segment_rows (what the Serve deployments and the batch actors call) on expressions
    given one by one, images asked once each, give predict_torch's answers, masks as COCO RLE."""
    whole = load_checkpoint(ckpt)
    mllm, sam = load_checkpoint(ckpt, parts=("mllm",)), load_checkpoint(ckpt, parts=("sam",))
    expected = predict_torch(whole, batch)
    index = batch.image_index.tolist()
    asked = []

    def clip(i):
        asked.append(i)
        return batch.clip_pixels[index[i]]

    keys = [f"image {k}" for k in index]
    sem, box = reason_rows(
        mllm, keys, batch.expressions, clip, lambda i: batch.original_hw[index[i]].tolist()
    )
    assert asked == [0, 1]  # the third expression shares the first one's image
    assert sem.dtype == np.float32 and sem.shape[0] == len(batch)
    assert len(box) == len(batch) and all(b.shape == (1, 4) and b.dtype == np.float32 for b in box)
    with torch.no_grad():
        emb = sam.segmentation.encode(batch.sam_pixels)
    images = (emb, batch.original_hw, batch.sam_input_hw)
    got = segment_rows(sam, images, (batch.image_index, torch.from_numpy(sem), box))
    for want, answer in zip(expected, got, strict=True):
        np.testing.assert_array_equal(want.mask, decode_rle(answer["mask"]))
        np.testing.assert_allclose(want.box, answer["box"], rtol=1e-5, atol=1e-4)
        assert want.score == pytest.approx(answer["score"], rel=1e-5)


def test_a_part_built_alone_has_the_whole_models_random_weights():
    cfg = load_config("tiny").model
    torch.manual_seed(0)
    whole = PPCRModel(cfg).state_dict()
    torch.manual_seed(0)
    sam = PPCRModel(cfg, parts=("sam",)).state_dict()
    torch.manual_seed(0)
    mllm = PPCRModel(cfg, parts=("mllm",)).state_dict()
    for part in (sam, mllm):
        for name, tensor in part.items():
            torch.testing.assert_close(tensor, whole[name], rtol=0, atol=0)


def test_overrides_are_validated_like_a_config_file(ckpt, capsys):
    with pytest.raises(ConfigError, match="model.spatial_prompt must be one of"):
        load_checkpoint(ckpt, overrides={"spatial_prompt": "foo"})
    with pytest.raises(ConfigError, match="unknown key model.box_hed"):
        load_checkpoint(ckpt, overrides={"box_hed": "mlp"})
    with pytest.raises(ConfigError, match="model.sam.checkpoint must be a string"):
        load_checkpoint(ckpt, overrides={"sam": {"checkpoint": 3}})
    # The CLI refuses it even earlier, with the same choices (argparse exits with code 2).
    args = ["evaluate", "--checkpoint", str(ckpt), "--shards", str(ckpt), "--spatial-prompt", "foo"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "invalid choice: 'foo' (choose from 'semantic', 'expression+semantic'" in capsys.readouterr().err


# --- failure isolation (run_isolated: every batched stage of serve and batch) ----------------------


def test_only_the_failing_items_of_a_batch_fail():
    calls, retried = [], []

    def stage(items):
        calls.append(list(items))
        if "input" in items:
            raise InputError("expression 0: holds '</s>'")
        if "fault" in items:
            raise RuntimeError(
                "\x1b[31mCUDA error: device-side assert\x1b[0m\nTraceback (most recent call last):"
            )
        return [x.upper() for x in items]

    out = run_isolated(stage, ["a", "input", "b", "fault", "c"], on_retry=lambda exc, n: retried.append(n))
    assert out[0::2] == ["A", "B", "C"]  # the good items get their normal answers
    assert out[1] == ItemFailure(True, "expression 0: holds '</s>'")
    assert out[3] == ItemFailure(False, "RuntimeError: CUDA error: device-side assert")  # one line, no ANSI
    assert retried == [5] and len(calls) == 1 + 5  # the batch, then each item alone
    assert run_isolated(stage, ["a", "b"]) == ["A", "B"] and len(calls) == 7  # no failure: one call
    assert run_isolated(stage, ["fault"])[0].input_error is False and len(calls) == 8  # alone: no retry
    assert run_isolated(stage, []) == []
    lost = run_isolated(lambda items: [], ["a", "b"])  # a stage that loses results is a fault
    assert lost == [ItemFailure(False, "ValueError: batch: 0 results for 1 items")] * 2


def test_one_line_drops_tracebacks_colours_and_length():
    exc = RuntimeError(
        "\x1b[36mray::ServeReplica:ppcr:MLLM.reason()\x1b[39m (pid=1)\n  File ...\n" + "x" * 999
    )
    assert one_line(exc) == "RuntimeError: ray::ServeReplica:ppcr:MLLM.reason() (pid=1)"
    assert len(one_line(ValueError("y" * 999))) == 300 and one_line(KeyError()) == "KeyError"
