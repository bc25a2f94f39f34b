"""Synthetic REFER generator: layout, official keys, determinism, splits, and unique referring expressions."""

from __future__ import annotations

import json
import pickle
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ppcr.data.refer import ReferDataset, coco_image_filename
from ppcr.data.synth import SynthConfig, synthesize
from ppcr.masks import decode_rle

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
SPLITS = ("train", "val", "testA", "testB")
REF_KEYS = {"ref_id", "ann_id", "image_id", "split", "sentences", "sent_ids", "category_id", "file_name"}
SENT_KEYS = {"sent_id", "sent", "raw", "tokens"}
# Nominal colours, deliberately not imported from the generator: the checks below must be independent.
NOMINAL_RGB = {"red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255), "yellow": (255, 220, 0)}


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return synthesize(tmp_path_factory.mktemp("synth"), SynthConfig(num_images=30, seed=7))


def _load(summary: dict) -> tuple[list[dict], dict]:
    root = Path(summary["refer_root"]) / "synthref"
    refs = pickle.loads((root / "refs(unc).p").read_bytes())
    inst = json.loads((root / "instances.json").read_text())
    return refs, inst


def test_layout_and_official_keys(synth: dict) -> None:
    root = Path(synth["refer_root"])
    assert (root / "synthref" / "refs(unc).p").is_file()
    assert (root / "synthref" / "instances.json").is_file()
    assert Path(synth["images_dir"]) == root / "images" / "train2014"
    refs, inst = _load(synth)
    assert {"images", "annotations", "categories"} <= inst.keys()
    assert len(refs) == synth["refs"] > 0
    for r in refs:
        assert set(r) == REF_KEYS
        assert 1 <= len(r["sentences"]) <= 3
        assert r["sent_ids"] == [s["sent_id"] for s in r["sentences"]]
        for s in r["sentences"]:
            assert set(s) == SENT_KEYS
            assert s["tokens"] == s["sent"].split()
        # The official quirk: ref file_name = image file name + "_<ann_id>".
        assert r["file_name"] == f"COCO_train2014_{r['image_id']:012d}_{r['ann_id']}.jpg"
    for im in inst["images"]:
        assert {"id", "file_name", "height", "width"} <= im.keys()
        assert re.fullmatch(r"COCO_train2014_\d{12}\.jpg", im["file_name"])
        assert im["file_name"] == coco_image_filename(im["id"])
        with Image.open(Path(synth["images_dir"]) / im["file_name"]) as f:
            assert f.format == "JPEG"
            assert f.size == (im["width"], im["height"])
    for a in inst["annotations"]:
        assert {"id", "image_id", "category_id", "segmentation", "bbox", "area", "iscrowd"} <= a.keys()
    assert {c["name"]: c["id"] for c in inst["categories"]} == {"circle": 1, "square": 2, "triangle": 3}
    # Non-square images on purpose.
    assert any(im["width"] != im["height"] for im in inst["images"])
    all_sent_ids = [s["sent_id"] for r in refs for s in r["sentences"]]
    assert len(all_sent_ids) == len(set(all_sent_ids)) == synth["sentences"]


def test_deterministic(synth: dict, tmp_path: Path) -> None:
    again = synthesize(tmp_path / "again", SynthConfig(num_images=30, seed=7))
    a, b = Path(synth["refer_root"]), Path(again["refer_root"])
    for rel in ("synthref/refs(unc).p", "synthref/instances.json"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    images_a = sorted(p.name for p in Path(synth["images_dir"]).iterdir())
    assert images_a == sorted(p.name for p in Path(again["images_dir"]).iterdir())
    for name in images_a:
        assert (Path(synth["images_dir"]) / name).read_bytes() == (
            Path(again["images_dir"]) / name
        ).read_bytes()
    other = synthesize(tmp_path / "other", SynthConfig(num_images=30, seed=8))
    assert (Path(other["refer_root"]) / "synthref/refs(unc).p").read_bytes() != (
        a / "synthref/refs(unc).p"
    ).read_bytes()


def test_splits_disjoint_and_nonempty(synth: dict) -> None:
    refs, inst = _load(synth)
    splits_of_image: dict[int, set[str]] = {}
    for r in refs:
        splits_of_image.setdefault(r["image_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits_of_image.values())
    counts = Counter(next(iter(s)) for s in splits_of_image.values())
    assert set(counts) == set(SPLITS)
    assert counts["train"] > counts["val"]
    assert {s: c["images"] for s, c in synth["splits"].items()} == dict(counts)
    assert len(splits_of_image) == len(inst["images"])  # every image has at least one ref


def test_both_segmentation_formats(synth: dict) -> None:
    _, inst = _load(synth)
    kinds = Counter(type(a["segmentation"]).__name__ for a in inst["annotations"])
    assert kinds["list"] > 0 and kinds["dict"] > 0
    assert kinds["dict"] < kinds["list"]  # RLE is the minority format (~1 in 5)
    for a in inst["annotations"]:
        if isinstance(a["segmentation"], dict):
            assert isinstance(a["segmentation"]["counts"], str)
        else:
            assert all(len(p) >= 6 and len(p) % 2 == 0 for p in a["segmentation"])


# ----------------------------------------------------------------------------- independent scene model


def _scene(refer: ReferDataset, images_dir: Path, image_id: int) -> dict[int, dict]:
    """Objects of an image as seen in the data: shape from the category, box and size from the mask,
    colour from the JPEG pixels under the mask."""
    im = refer.images[image_id]
    pixels = np.asarray(Image.open(images_dir / im["file_name"]).convert("RGB"), dtype=np.float64)
    short = min(im["height"], im["width"])
    objs = {}
    for ann_id, ann in refer.annotations.items():
        if ann["image_id"] != image_id:
            continue
        mask = decode_rle(refer.ann_rle(ann_id))
        ys, xs = np.nonzero(mask)
        box = (xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0)
        mean = pixels[mask].mean(axis=0)
        color = min(NOMINAL_RGB, key=lambda c: float(np.sum((np.array(NOMINAL_RGB[c]) - mean) ** 2)))
        objs[ann_id] = {
            "shape": refer.categories[ann["category_id"]]["name"],
            "color": color,
            "size": "small" if (box[2] - box[0]) / short < 0.215 else "big",
            "box": box,
        }
    return objs


_ATTR = r"(?:(small|big) )?(?:(red|green|blue|yellow) )?(circle|square|triangle|one)"


def _select(objs: dict[int, dict], size: str | None, color: str | None, shape: str) -> list[int]:
    return [
        k
        for k, o in objs.items()
        if (size is None or o["size"] == size)
        and (color is None or o["color"] == color)
        and (shape == "one" or o["shape"] == shape)
    ]


def _resolve(sentence: str, objs: dict[int, dict]) -> list[int]:
    """The ann ids a sentence describes in the scene (a tiny grammar for the synthetic language)."""
    cx = {k: (o["box"][0] + o["box"][2]) / 2 for k, o in objs.items()}
    cy = {k: (o["box"][1] + o["box"][3]) / 2 for k, o in objs.items()}
    extreme_keys = {
        "leftmost": lambda k: cx[k],
        "on the left": lambda k: cx[k],
        "rightmost": lambda k: -cx[k],
        "on the right": lambda k: -cx[k],
        "topmost": lambda k: cy[k],
        "at the top": lambda k: cy[k],
        "bottommost": lambda k: -cy[k],
        "at the bottom": lambda k: -cy[k],
    }

    def extreme(group: list[int], word: str) -> list[int]:
        key = extreme_keys[word]
        best = min(key(k) for k in group)
        return [k for k in group if key(k) == best] if len(group) >= 2 else []

    if m := re.fullmatch(rf"the (leftmost|rightmost|topmost|bottommost) {_ATTR}", sentence):
        return extreme(_select(objs, *m.groups()[1:]), m.group(1))
    if m := re.fullmatch(rf"the {_ATTR} (on the left|on the right|at the top|at the bottom)", sentence):
        return extreme(_select(objs, *m.groups()[:3]), m.group(4))
    if m := re.fullmatch(rf"the {_ATTR} (left of|right of|above|below) the {_ATTR}", sentence):
        landmarks = _select(objs, *m.groups()[4:])
        if len(landmarks) != 1:
            return []
        lm = objs[landmarks[0]]["box"]
        rel = {
            "left of": lambda b: b[2] <= lm[0],
            "right of": lambda b: b[0] >= lm[2],
            "above": lambda b: b[3] <= lm[1],
            "below": lambda b: b[1] >= lm[3],
        }[m.group(4)]
        return [k for k in _select(objs, *m.groups()[:3]) if k != landmarks[0] and rel(objs[k]["box"])]
    if m := re.fullmatch(rf"the {_ATTR}", sentence):
        return _select(objs, *m.groups())
    raise AssertionError(f"sentence outside the synthetic grammar: {sentence!r}")


def test_every_expression_unique_to_its_referent(synth: dict) -> None:
    refer = ReferDataset(synth["refer_root"], "synthref", "unc")
    images_dir = Path(synth["images_dir"])
    scenes: dict[int, dict] = {}
    kinds: Counter = Counter()
    for ref in refer.refs():
        objs = scenes.setdefault(ref.image_id, _scene(refer, images_dir, ref.image_id))
        assert objs[ref.ann_id]["shape"] == refer.categories[ref.category_id]["name"]
        texts = [s.text for s in ref.sentences]
        assert len(set(texts)) == len(texts)
        for text in texts:
            assert _resolve(text, objs) == [ref.ann_id], (ref.image_id, text, objs)
            kinds[
                "relation"
                if re.search(r" (left of|right of|above|below) ", text)
                else "extreme"
                if re.search(r"most|on the|at the", text)
                else "attribute"
            ] += 1
    assert kinds["attribute"] > 0 and kinds["relation"] > 0 and kinds["extreme"] > 0


def test_no_relations_mode(tmp_path: Path) -> None:
    summary = synthesize(tmp_path, SynthConfig(num_images=12, seed=1, relations=False))
    refer = ReferDataset(summary["refer_root"], "synthref", "unc")
    images_dir = Path(summary["images_dir"])
    for image_id in refer.images:
        objs = _scene(refer, images_dir, image_id)
        triples = [(o["shape"], o["color"], o["size"]) for o in objs.values()]
        assert len(set(triples)) == len(triples), triples
    # With distinct attribute triples every object is referable.
    assert {r.ann_id for r in refer.refs()} == set(refer.annotations)
    for ref in refer.refs():
        objs = _scene(refer, images_dir, ref.image_id)
        for s in ref.sentences:
            assert re.fullmatch(rf"the {_ATTR}", s.text), s.text
            assert _resolve(s.text, objs) == [ref.ann_id]


def test_masks_match_drawn_shapes(synth: dict) -> None:
    refer = ReferDataset(synth["refer_root"], "synthref", "unc")
    images_dir = Path(synth["images_dir"])
    pixels_cache: dict[int, np.ndarray] = {}
    for ann_id, ann in refer.annotations.items():
        im = refer.images[ann["image_id"]]
        mask = decode_rle(refer.ann_rle(ann_id))
        assert mask.shape == (im["height"], im["width"])
        assert mask.sum() > 0
        assert mask.sum() == pytest.approx(ann["area"], abs=0.5)
        ys, xs = np.nonzero(mask)
        x1, y1, x2, y2 = refer.ann_bbox_xyxy(ann_id)
        assert abs(xs.min() - x1) <= 2 and abs(xs.max() + 1 - x2) <= 2
        assert abs(ys.min() - y1) <= 2 and abs(ys.max() + 1 - y2) <= 2
        # The drawn pixels under the mask carry a saturated shape colour, not the grey background.
        pixels = pixels_cache.setdefault(
            ann["image_id"],
            np.asarray(Image.open(images_dir / im["file_name"]).convert("RGB"), dtype=np.float64),
        )
        inside = pixels[mask].mean(axis=0)
        outside = pixels[~mask].mean(axis=0)
        assert inside.max() - inside.min() > 100  # saturated
        assert np.abs(inside - outside).max() > 60


def test_every_split_nonempty_at_ten_images(tmp_path: Path) -> None:
    summary = synthesize(tmp_path, SynthConfig(num_images=10, seed=5))
    assert all(c["images"] >= 1 and c["refs"] >= 1 for c in summary["splits"].values())
    assert sum(c["images"] for c in summary["splits"].values()) == 10


def test_bad_config_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown shapes"):
        synthesize(tmp_path, SynthConfig(num_images=2, shapes=("hexagon",)))
    with pytest.raises(ValueError, match="sum to 1"):
        synthesize(tmp_path, SynthConfig(num_images=2, split_fractions=(("train", 0.5), ("val", 0.1))))
    with pytest.raises(ValueError, match="small_size"):
        synthesize(tmp_path, SynthConfig(num_images=2, small_size=(0.2, 0.3), big_size=(0.25, 0.35)))


def test_object_sizes_follow_config(tmp_path: Path) -> None:
    cfg = SynthConfig(num_images=8, seed=3, small_size=(0.2, 0.22), big_size=(0.36, 0.4))
    summary = synthesize(tmp_path, cfg)
    inst = json.loads((Path(summary["refer_root"]) / "synthref" / "instances.json").read_text())
    short = {im["id"]: min(im["width"], im["height"]) for im in inst["images"]}
    for ann in inst["annotations"]:
        side = max(ann["bbox"][2], ann["bbox"][3]) / short[ann["image_id"]]
        assert 0.19 <= side <= 0.23 or 0.35 <= side <= 0.41, side


def test_grefcoco_layout_expressions_mean_what_their_targets_say(tmp_path: Path) -> None:
    """synthgref, read from the pixels: a no-target expression fits no object of its image, a multi-target
    one ("both red circles", "the two squares", "all the big ones") exactly its targets, a single one its
    one object."""
    cfg = SynthConfig(
        num_images=12, seed=3, min_objects=3, relations=False, generalized=True, dataset="synthgref"
    )
    summary = synthesize(tmp_path, cfg)
    refer = ReferDataset(summary["refer_root"], "synthgref", "unc")
    images_dir = Path(summary["images_dir"])
    kinds: Counter = Counter()
    wordings: dict[str, set] = {"none": set(), "single": set()}
    for ref in refer.refs():
        objs = _scene(refer, images_dir, ref.image_id)
        for s in ref.sentences:
            if m := re.fullmatch(rf"(?:both|the two|all the) {_ATTR}s", s.text):
                assert len(ref.ann_ids) >= 2 and sorted(_select(objs, *m.groups())) == sorted(ref.ann_ids)
                kinds["multi"] += 1
            else:
                assert _resolve(s.text, objs) == list(ref.ann_ids), (ref.image_id, s.text, objs)
                kind = "none" if ref.no_target else "single"
                kinds[kind] += 1
                # Which attributes it names: (size?, colour?, shape?).
                m = re.fullmatch(rf"the {_ATTR}", s.text)
                wordings[kind].add((m[1] is not None, m[2] is not None, m[3] != "one"))
    assert kinds["multi"] and kinds["none"] >= summary["images"] and kinds["single"]
    # Expressions naming nothing are worded as the others are, or the wording alone would give the answer
    # away (a colour and a shape named, in every one of them, once taught the demo's model "nothing").
    # Twelve images draw five of the seven wordings (the old generator's two: colour and shape, with or
    # without a size).
    assert wordings["none"] <= wordings["single"] and len(wordings["none"]) >= 5, wordings
    with pytest.raises(ValueError, match="the gRefCOCO layout is written as one of"):
        SynthConfig(generalized=True).validate("synth")
