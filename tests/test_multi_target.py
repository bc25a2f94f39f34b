"""`model.targets`: the paper's single-target model unchanged, and the multi-target model (none, one or
several objects per expression): slot matching, kept slots, forward/backward, training on generalized
splits."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ppcr.config import ConfigError, InputError, load_config
from ppcr.data.shards import ImageCache, iter_expressions, prepare_shards, shard_dir, to_item
from ppcr.data.synth import SynthConfig, synthesize
from ppcr.inputs import Item, collate
from ppcr.losses import ppcr_loss
from ppcr.masks import decode_rle
from ppcr.model import PPCRModel
from ppcr.slots import kept_slots, match_slots


def pinned_batch(model: PPCRModel, instances: bool = False):
    """Two random images, two expressions each (one target each); with `instances`, also a no-target
    and a two-target expression per image."""
    rng = np.random.default_rng(0)
    items = []
    for k, (h, w) in enumerate([(96, 128), (120, 100)]):
        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        boxes, masks = [], []
        for e, text in enumerate(["the red circle", "the big blue square"]):
            m = np.zeros((h, w), bool)
            y0, x0 = 10 + 20 * e, 15 + 25 * e
            m[y0 : y0 + 40, x0 : x0 + 30] = True
            box = np.array([x0, y0, x0 + 30, y0 + 40], float)
            boxes.append(box)
            masks.append(m)
            inst = (box[None], m[None]) if instances else None
            items.append(Item(k, img, text, m, box, gt_instances=inst))
        if instances:
            none = (np.zeros((0, 4)), np.zeros((0, h, w), bool))
            items.append(
                Item(k, img, "the green triangle", np.zeros((h, w), bool), np.zeros(4), gt_instances=none)
            )
            union = masks[0] | masks[1]
            both = np.array([15.0, 10.0, 70.0, 70.0])
            items.append(
                Item(k, img, "both shapes", union, both, gt_instances=(np.stack(boxes), np.stack(masks)))
            )
    return collate(items, model.clip_size, model.sam_size, model.clip_mode)


# What main computed before `model.targets` existed (tiny preset, seed 0, `pinned_batch`, training mode,
# torch.manual_seed(1), template rng Random(0), gt_box_prob 0.5, jitter 0.1): the single-target model
# must give the same boxes, SAM inputs, scores, masks and loss terms.
MAIN_SINGLE = {
    "box": [
        [0.316352516412735, 0.11781235784292221, 0.7461017370223999, 0.8337130546569824],
        [0.3152667284011841, 0.1177389994263649, 0.7450771331787109, 0.8320161700248718],
        [0.27607041597366333, 0.21104957163333893, 0.7805764079093933, 0.7035256624221802],
        [0.26897159218788147, 0.23833578824996948, 0.762269914150238, 0.7269400954246521],
    ],
    "sam_box": [
        [0.316352516412735, 0.11781235784292221, 0.7461017370223999, 0.8337130546569824],
        [0.3101523220539093, 0.2871171236038208, 0.5239115953445435, 0.6621209979057312],
        [0.27607041597366333, 0.21104957163333893, 0.7805764079093933, 0.7035256624221802],
        [0.26897159218788147, 0.23833578824996948, 0.762269914150238, 0.7269400954246521],
    ],
    "iou_pred": [-0.0440201498568058, -0.016189314424991608, -0.012343864887952805, -0.0260043703019619],
    "mask_sum": [26.629247916294844, 152.01348840213905, 87.67403553491249, 79.88713223113314],
    "logs": {
        "bce": 0.6959908604621887,
        "iou": 0.01497730053961277,
        "dice": 0.8348402380943298,
        "ce": 6.6715593338012695,
        "l1": 0.16491252183914185,
        "giou": 0.8679850101470947,
        "box_heatmap": 0.49915656447410583,
        "semantic_grounding": 0.639415442943573,
        "loss": 7.4965410232543945,
        "heat_on_target": 0.0694507285952568,
        "sem_heat_on_target": 0.07468734681606293,
    },
}


@pytest.fixture(scope="module")
def multi_cfg():
    return load_config("tiny", {"model": {"targets": "multi", "max_targets": 3}})


def test_single_target_model_is_mains(one_thread):
    """`model.targets: single` (the default) is the paper's model as main had it: same parameters (the
    pinned initial-state hash lives in test_realsize), same forward and same loss on a fixed batch."""
    cfg = load_config("tiny")
    assert cfg.model.targets == "single"
    torch.manual_seed(0)
    model = PPCRModel(cfg.model).train()
    assert not any(
        ".slot_queries" in n or ".presence." in n or ".objectness." in n for n in model.state_dict()
    )
    batch = pinned_batch(model)
    torch.manual_seed(1)
    out = model(batch, rng=random.Random(0), gt_box_prob=0.5, gt_box_jitter=0.1)
    _, logs = ppcr_loss(out, batch, cfg.loss, model.patch_centers())
    tol = dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.box.detach().numpy(), MAIN_SINGLE["box"], **tol)
    np.testing.assert_allclose(out.sam_box.detach().numpy(), MAIN_SINGLE["sam_box"], **tol)
    np.testing.assert_allclose(out.iou_pred.detach().numpy(), MAIN_SINGLE["iou_pred"], **tol)
    np.testing.assert_allclose(
        [float(m.detach().double().sum()) for m in out.mask_logits], MAIN_SINGLE["mask_sum"], rtol=1e-4
    )
    assert logs.keys() == MAIN_SINGLE["logs"].keys()
    for k, v in MAIN_SINGLE["logs"].items():
        assert logs[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    assert out.slots is None and out.row_expression is None


def test_multi_adds_only_slot_parameters_to_the_same_draw():
    """The multi-target model is the single one plus the slot modules of the attention head, and every
    shared tensor has the same initial value (the slot modules are drawn after the others)."""
    torch.manual_seed(0)
    single = PPCRModel(load_config("tiny").model).state_dict()
    torch.manual_seed(0)
    multi = PPCRModel(load_config("tiny", {"model": {"targets": "multi"}}).model).state_dict()
    extra = sorted(set(multi) - set(single))
    assert not set(single) - set(multi)
    assert extra == [
        "spatial.head.objectness.bias",
        "spatial.head.objectness.weight",
        "spatial.head.presence.bias",
        "spatial.head.presence.weight",
        "spatial.head.slot_queries",
    ]
    assert multi["spatial.head.slot_queries"].shape == (5, 128)  # presence query + max_targets 4
    assert all(torch.equal(single[k], multi[k]) for k in single)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"targets": "several"}, "model.targets must be one of single, multi; got 'several'"),
        (
            {"targets": "multi", "box_head": "mlp", "semantic_grounding": False},
            "model.targets multi needs box_head: attention",
        ),
        (
            {"targets": "multi", "spatial_prompt": "none", "semantic_grounding": False},
            "model.targets multi needs",
        ),
        ({"max_targets": 0}, "model.max_targets must be >= 1; got 0"),
        ({"presence_threshold": 1.0}, r"model.presence_threshold must be in \(0, 1\); got 1.0"),
        ({"objectness_threshold": 0}, r"model.objectness_threshold must be in \(0, 1\); got 0"),
        ({"slot_nms_iou": 0}, r"model.slot_nms_iou must be in \(0, 1\]; got 0"),
        (
            {"targets": "multi", "presence_from": "semantic"},
            "model.presence_from must be one of query, query\\+semantic; got 'semantic'",
        ),
        (
            {"presence_from": "query+semantic"},
            "model.presence_from query\\+semantic needs targets multi and semantic_grounding true",
        ),
        (
            {"targets": "multi", "presence_from": "query+semantic", "semantic_grounding": False},
            "model.presence_from query\\+semantic needs targets multi and semantic_grounding true",
        ),
    ],
)
def test_multi_target_config_is_checked(model, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", {"model": model})


def test_match_slots_is_the_cheapest_one_to_one_assignment():
    boxes = torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9], [0.1, 0.6, 0.3, 0.9]])
    logits = torch.zeros(3)
    targets = torch.tensor([[0.52, 0.5, 0.88, 0.9], [0.0, 0.02, 0.2, 0.2]])
    slots, tgt = match_slots(boxes, logits, targets)
    assert slots.tolist() == [0, 1] and tgt.tolist() == [1, 0]
    # Greedy per target would give both targets slot 1 here; the assignment gives each its own.
    near = torch.tensor([[0.5, 0.5, 0.9, 0.9], [0.5, 0.5, 0.9, 0.9]])
    slots, tgt = match_slots(boxes, logits, near)
    assert sorted(slots.tolist()) != [1, 1] and len(set(slots.tolist())) == 2 and 1 in slots.tolist()
    # More targets than slots: every slot matched once.
    many = torch.rand(5, 2).sort(dim=1).values.repeat(1, 2)[:, [0, 2, 1, 3]]
    slots, tgt = match_slots(boxes, logits, many)
    assert sorted(slots.tolist()) == [0, 1, 2] and len(set(tgt.tolist())) == 3
    with pytest.raises(ValueError, match="objectness_logits must be"):
        match_slots(boxes, torch.zeros(2), targets)


def test_kept_slots_follow_presence_objectness_and_overlap():
    boxes = torch.tensor(
        [
            [[0.0, 0.0, 0.4, 0.4], [0.0, 0.0, 0.41, 0.4], [0.6, 0.6, 1.0, 1.0]],  # slot 1 ~ slot 0
            [[0.0, 0.0, 0.4, 0.4], [0.5, 0.5, 0.7, 0.7], [0.6, 0.6, 1.0, 1.0]],
            [[0.0, 0.0, 0.4, 0.4], [0.5, 0.5, 0.7, 0.7], [0.6, 0.6, 1.0, 1.0]],
        ]
    )
    presence = torch.tensor([0.9, 0.2, 0.7])
    objectness = torch.tensor([[0.8, 0.9, 0.6], [0.9, 0.9, 0.9], [0.1, 0.3, 0.2]])
    kept = kept_slots(presence, objectness, boxes, 0.5, 0.5, 0.7)
    # 1: the duplicate of slot 1 (slot 0) dropped, by falling objectness; 2: no target; 3: the best slot.
    assert kept == [[1, 2], [], [1]]
    assert kept_slots(presence, objectness, boxes, 0.5, 0.5, 1.0)[0] == [1, 0, 2]
    assert kept_slots(presence.numpy(), objectness.numpy(), boxes.numpy(), 0.5, 0.5, 0.7) == kept
    with pytest.raises(ValueError, match="presence \\(B,\\), objectness \\(B, K\\)"):
        kept_slots(presence, objectness[:, :2], boxes, 0.5, 0.5, 0.7)


def test_multi_forward_backward_on_the_tiny_preset(multi_cfg, one_thread):
    torch.manual_seed(0)
    model = PPCRModel(multi_cfg.model).train()
    batch = pinned_batch(model, instances=True)
    out = model(batch, rng=random.Random(0), gt_box_prob=0.5, gt_box_jitter=0.1)
    b = len(batch)
    assert out.slots.boxes.shape == (b, 3, 4) and out.slots.objectness.shape == (b, 3)
    assert out.slots.presence.shape == (b,) and out.box.shape == (b, 4)
    # Rows: one per target (1 + 1 + 0 + 2 per image), each matched once.
    assert out.row_expression.tolist() == [0, 1, 3, 3, 4, 5, 7, 7]
    assert sorted(out.row_target[out.row_expression == 3].tolist()) == [0, 1]
    assert len(out.mask_logits) == 8 and out.sam_box.shape == (8, 4)
    loss, logs = ppcr_loss(out, batch, multi_cfg.loss, model.patch_centers())
    assert {"presence", "objectness", "l1", "giou", "bce", "dice", "iou", "box_heatmap"} <= logs.keys()
    assert np.isfinite(list(logs.values())).all()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name in (
        "spatial.head.slot_queries",
        "spatial.head.presence.weight",
        "spatial.head.objectness.weight",
    ):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("segmentation."))


def test_no_target_expressions_train_presence_and_objectness_only(multi_cfg, one_thread):
    torch.manual_seed(0)
    model = PPCRModel(multi_cfg.model).train()
    full = pinned_batch(model, instances=True)
    items = [
        Item(
            0,
            np.zeros((64, 64, 3), np.uint8),
            "the red circle",
            np.zeros((64, 64), bool),
            np.zeros(4),
            gt_instances=(np.zeros((0, 4)), np.zeros((0, 64, 64), bool)),
        )
    ]
    batch = collate(items, model.clip_size, model.sam_size, model.clip_mode)
    out = model(batch, rng=random.Random(0))
    assert len(out.mask_logits) == 0
    loss, logs = ppcr_loss(out, batch, multi_cfg.loss, model.patch_centers())
    assert set(logs) == {"ce", "presence", "objectness", "loss"}
    # Every slot of an expression naming nothing is "not a target".
    want = torch.nn.functional.softplus(out.slots.objectness.detach().float()).mean()
    assert logs["objectness"] == pytest.approx(float(want), rel=1e-5)
    want_loss = (
        multi_cfg.loss.ce * logs["ce"] + logs["presence"] + multi_cfg.loss.objectness * logs["objectness"]
    )
    assert logs["loss"] == pytest.approx(want_loss, rel=1e-6)
    assert full.gt_instances[2][0].shape == (0, 4)
    with pytest.raises(ValueError, match="needs the targets in the batch"):
        model(pinned_batch(model), rng=random.Random(0))


def test_presence_pos_weight_and_empty_heatmap_weigh_the_no_target_expressions(multi_cfg, one_thread):
    """loss.presence_pos_weight is BCE's pos_weight on "has a target"; loss.empty_heatmap is BCE of the
    [SEG] heatmap's peak logit against 0 on the no-target expressions only."""
    cfg = replace(multi_cfg.model, presence_from="query+semantic")
    torch.manual_seed(0)
    model = PPCRModel(cfg).train()
    batch = pinned_batch(model, instances=True)
    out = model(batch, rng=random.Random(0), gt_box_prob=0.5, gt_box_jitter=0.1)
    has = torch.tensor([len(b) > 0 for b, _ in batch.gt_instances])
    assert has.any() and (~has).any()
    centers = model.patch_centers()
    _, plain = ppcr_loss(out, batch, multi_cfg.loss, centers)
    assert "empty_heatmap" not in plain
    weights = replace(multi_cfg.loss, presence_pos_weight=0.25, empty_heatmap=2.0)
    _, logs = ppcr_loss(out, batch, weights, centers)
    p, y = out.slots.presence.detach().float(), has.float()
    want = -(0.25 * y * torch.nn.functional.logsigmoid(p) + (1 - y) * torch.nn.functional.logsigmoid(-p))
    assert logs["presence"] == pytest.approx(float(want.mean()), rel=1e-5)
    assert logs["presence"] != pytest.approx(plain["presence"], rel=1e-3)
    peak = out.semantic_heatmap.detach().float()[~has].amax(dim=-1)
    assert logs["empty_heatmap"] == pytest.approx(float(torch.nn.functional.softplus(peak).mean()), rel=1e-5)
    assert logs["loss"] == pytest.approx(
        plain["loss"] - plain["presence"] + logs["presence"] + 2.0 * logs["empty_heatmap"], rel=1e-5
    )
    with pytest.raises(ConfigError, match="loss.presence_pos_weight must be > 0"):
        load_config("tiny", {"loss": {"presence_pos_weight": 0}})


def test_presence_from_query_and_semantic_adds_the_seg_heatmap_peak(multi_cfg, one_thread):
    """presence_from query+semantic: the presence logit is the presence query's plus the [SEG] query's
    peak heatmap logit, the same parameters as "query"; a no-target expression's presence loss then
    reaches the semantic pass."""
    cfg = replace(multi_cfg.model, presence_from="query+semantic")
    torch.manual_seed(0)
    query = PPCRModel(multi_cfg.model).train()
    torch.manual_seed(0)
    model = PPCRModel(cfg).train()
    assert query.state_dict().keys() == model.state_dict().keys()
    batch = pinned_batch(model, instances=True)
    torch.manual_seed(1)
    out = model(batch, rng=random.Random(0), gt_box_prob=0.5, gt_box_jitter=0.1)
    torch.manual_seed(1)
    ref = query(batch, rng=random.Random(0), gt_box_prob=0.5, gt_box_jitter=0.1)
    want = ref.slots.presence + ref.semantic_heatmap.amax(dim=-1)
    torch.testing.assert_close(out.slots.presence, want)
    torch.testing.assert_close(out.slots.objectness, ref.slots.objectness)
    assert batch.gt_instances[2][0].shape == (0, 4)  # expression 2 names nothing
    # heat_q makes heatmaps only: the presence query's logit does not depend on it, the [SEG] peak does.
    for m, o in ((model, out), (query, ref)):
        m.zero_grad()
        o.slots.presence[2].backward()
    assert model.spatial.head.heat_q.weight.grad.abs().sum() > 0
    grad = query.spatial.head.heat_q.weight.grad
    assert grad is None or grad.abs().sum() == 0


def test_inference_segments_the_kept_slots(multi_cfg, one_thread):
    """In eval mode SAM segments exactly the slots `kept_slots` picks from the reasoning."""
    torch.manual_seed(0)
    model = PPCRModel(multi_cfg.model).eval()
    with torch.no_grad():
        head = model.spatial.head
        head.presence.bias.fill_(5.0)  # every expression names something
        head.objectness.bias.fill_(-5.0)  # no slot reaches the threshold: the best one is kept
        batch = pinned_batch(model)
        out = model(batch)
        kept = kept_slots(
            out.slots.presence.sigmoid(), out.slots.objectness.sigmoid(), out.slots.boxes, 0.5, 0.5, 0.7
        )
    assert out.row_expression.tolist() == [0, 1, 2, 3]
    assert out.row_slot.tolist() == [k[0] for k in kept]
    assert (out.row_target == -1).all() and len(out.mask_logits) == 4
    with torch.no_grad():
        head.presence.bias.fill_(-5.0)
        none = model(batch)
    assert len(none.mask_logits) == 0 and none.row_expression.tolist() == []


@pytest.fixture(scope="module")
def gref_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthgref")
    cfg = SynthConfig(
        num_images=12,
        seed=3,
        min_objects=3,
        max_objects=3,
        relations=False,
        generalized=True,
        dataset="synthgref",
    )
    summary = synthesize(root / "refer", cfg)
    prepare_shards(root / "refer", summary["images_dir"], "synthgref", "unc", root / "shards", progress=False)
    return root / "shards"


def test_training_takes_generalized_splits_only_with_multi(gref_shards: Path, tmp_path: Path, one_thread):
    from ppcr.train import load_training_samples, train

    split = shard_dir(gref_shards, "synthgref", "unc", "train")
    with pytest.raises(InputError, match="set model.targets: multi to train on them") as info:
        load_training_samples(split)
    assert "\n" not in str(info.value)
    samples = load_training_samples(split, targets="multi")
    assert any(s.no_target for s in samples) and any(len(s.targets) > 1 for s in samples)
    item = to_item(next(s for s in samples if len(s.targets) > 1), ImageCache(), instances=True)
    boxes, masks = item.gt_instances
    assert len(boxes) == len(masks) > 1 and (np.logical_or.reduce(masks) == item.gt_mask).all()
    cfg = load_config(
        "tiny",
        {
            "model": {"targets": "multi", "max_targets": 3},
            "data": {"shards_root": str(gref_shards), "dataset": "synthgref"},
            "train": {"steps": 2, "batch_size": 8, "log_every": 1},
            "distributed": {"micro_batch_size": 4},
        },
    )
    result = train(cfg, out_dir=tmp_path / "run", progress=False)
    assert result.steps == 2 and {"presence", "objectness", "dice"} <= result.history[-1].keys()
    single = load_config("tiny", {"data": {"shards_root": str(gref_shards), "dataset": "synthgref"}})
    with pytest.raises(InputError, match="model.targets: multi"):
        train(single, out_dir=tmp_path / "single", progress=False)
    assert list(iter_expressions(split))


def test_the_training_stream_carries_each_target_as_the_local_loop_does(gref_shards: Path):
    """Ray Train's stream (preprocess_images -> RowsToBatch) hands the multi-target loss the same
    per-target boxes and masks as the local loop's to_item + collate: none, one or several."""
    import pyarrow.parquet as pq

    from ppcr.data.streaming import TARGETS_COLUMN, RowsToBatch, preprocess_images
    from ppcr.train import load_training_samples

    split = shard_dir(gref_shards, "synthgref", "unc", "train")
    table = pq.read_table(sorted(split.glob("part-*.parquet"))[0])
    rows = preprocess_images(table, 32, 64, "synthgref", "unc", instances=True)
    assert TARGETS_COLUMN not in preprocess_images(table, 32, 64, "synthgref", "unc")  # single: as before
    streamed, keys = RowsToBatch(instances=True)(rows)
    samples = {f"synthgref/unc/{s.sent_id}": s for s in load_training_samples(split, targets="multi")}
    local = collate([to_item(samples[k], ImageCache(), instances=True) for k in keys], 32, 64)
    counts = [len(b) for b, _ in streamed.gt_instances]
    assert 0 in counts and 1 in counts and max(counts) > 1, counts
    for (b, m), (lb, lm) in zip(streamed.gt_instances, local.gt_instances, strict=True):
        assert torch.equal(m, lm) and torch.allclose(b, lb)
    with pytest.raises(ValueError, match="stream them with model.targets multi"):
        RowsToBatch(instances=True)(preprocess_images(table, 32, 64, "synthgref", "unc"))


@pytest.mark.slow  # a Ray Train + DeepSpeed run
def test_ray_train_job_trains_the_multi_target_model_on_a_generalized_split(
    gref_shards: Path, tmp_path: Path, ray_local
):
    from ppcr.distributed_train import run_training

    cfg = load_config(
        "tiny",
        {
            "model": {"targets": "multi", "max_targets": 3},
            "data": {"shards_root": str(gref_shards), "dataset": "synthgref"},
            "train": {"steps": 3, "batch_size": 4, "log_every": 1},
            "distributed": {
                "num_workers": 1,
                "micro_batch_size": 4,
                "storage_path": str(tmp_path / "runs"),
                "name": "multi",
            },
        },
    )
    result = run_training(cfg)
    assert result.steps == 3
    log = [json.loads(x) for x in (tmp_path / "runs" / "multi" / "train_log.jsonl").read_text().splitlines()]
    assert {"presence", "objectness"} <= log[-1].keys() and all(math.isfinite(r["loss"]) for r in log), log


def _biased(model: PPCRModel, presence: float, objectness: float) -> PPCRModel:
    """Force the multi-target head's answers: presence / objectness logits pushed by these biases."""
    with torch.no_grad():
        model.spatial.head.presence.bias.fill_(presence)
        model.spatial.head.objectness.bias.fill_(objectness)
    return model


@pytest.mark.parametrize(
    ("presence", "objectness", "nms", "want"), [(-9, 0, 0.7, 0), (9, -9, 0.7, 1), (9, 9, 1.0, 3)]
)
def test_evaluate_and_segmenter_answer_none_one_or_several(
    gref_shards: Path, tmp_path: Path, multi_cfg, one_thread, presence, objectness, nms, want
):
    """`ppcr evaluate` on a synthgref split with a multi-target model: every expression answered with
    `want` instances (none, one, or all K = 3 slots), GRES metrics consistent with those answers and with
    the predictions file; `Segmenter` answers the same."""
    from dataclasses import replace

    from ppcr.evaluate import evaluate_split
    from ppcr.predictor import Segmenter
    from ppcr.report import metrics_from_predictions, write_predictions

    torch.manual_seed(0)
    model = _biased(PPCRModel(replace(multi_cfg.model, slot_nms_iou=nms)).eval(), presence, objectness)
    split = shard_dir(gref_shards, "synthgref", "unc", "val")
    records: list[dict] = []
    got = evaluate_split(model, split, batch_size=4, progress=False, on_prediction=records.append)
    samples = list(iter_expressions(split))
    assert len(records) == len(samples) and any(s.no_target for s in samples)
    assert {len(r["instances"]) for r in records} == {want}
    answered = [bool(decode_rle(r["mask"]).any()) for r in records]
    if want == 0:
        assert got["N-acc"] == 1.0 and got["T-acc"] == 0.0 and not any(answered)
    none = [a for a, r in zip(answered, records) if r["no_target"]]
    targets = [a for a, r in zip(answered, records) if not r["no_target"]]
    assert got["N-acc"] == pytest.approx(1 - sum(none) / len(none))
    assert got["T-acc"] == pytest.approx(sum(targets) / len(targets))
    write_predictions(tmp_path / "p.jsonl", records)
    assert metrics_from_predictions(tmp_path / "p.jsonl")["val"] == got
    seg = Segmenter(model).segment(samples[0].image_bytes, samples[0].text)
    assert len(seg.instances) == want and seg.no_target == (want == 0)
    union = np.zeros_like(seg.mask)
    for inst in seg.instances:
        union |= inst.mask
    np.testing.assert_array_equal(seg.mask, union)


@pytest.mark.parametrize(("presence", "objectness", "nms"), [(-9, 0, 0.7), (9, -9, 0.7), (9, 9, 1.0)])
def test_evaluate_ray_stages_score_generalized_splits_as_in_process(
    gref_shards: Path, tmp_path: Path, multi_cfg, one_thread, presence, objectness, nms
):
    """`ppcr evaluate --ray`'s stages (decode -> MLLM actor -> SAM actor -> metrics) on a synthgref split
    with a multi-target model answering none, one or several: the same GRES metrics as in process."""
    import json
    from dataclasses import replace

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ppcr.batch import MLLMActor, SAMActor, decode_stage, metrics_stage, shard_rows_to_images
    from ppcr.checkpoint import save_checkpoint
    from ppcr.evaluate import evaluate_split
    from ppcr.metrics import GRESMetrics

    torch.manual_seed(0)
    model = _biased(PPCRModel(replace(multi_cfg.model, slot_nms_iou=nms)).eval(), presence, objectness)
    ckpt = str(save_checkpoint(model, tmp_path / "ckpt"))
    split = shard_dir(gref_shards, "synthgref", "unc", "val")
    want = evaluate_split(model, split, progress=False)
    shard = pa.concat_tables([pq.read_table(f) for f in sorted(split.glob("part-*.parquet"))])
    images = shard_rows_to_images(shard, split="val", with_gt=True, done=None)
    decoded = decode_stage(images, model.clip_size, model.sam_size, checkpoint=ckpt)
    rows = SAMActor(ckpt, None, "cpu", 1, None, evaluation=True)(MLLMActor(ckpt, None, "cpu", 1, 16)(decoded))
    (state,) = metrics_stage(rows, generalized=["val"]).to_pylist()
    got = GRESMetrics.from_state_dict(json.loads(state["state"])).compute()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k
    counts = {len(i) for i in rows["instances"].to_pylist()}
    assert counts == {0} if presence < 0 else max(counts) >= 1
