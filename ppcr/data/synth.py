"""Synthetic RefCOCO-like data set written in the official REFER layout, or gRefCOCO's.

``synthesize(out, SynthConfig(...))`` writes::

    <out>/<dataset>/refs(unc).p              REFER refs pickle (official keys)
    <out>/<dataset>/instances.json           COCO instances (polygons, ~1 in 5 as compressed RLE)
    <out>/images/train2014/COCO_train2014_%012d.jpg

With ``generalized=True`` (dataset ``synthgref``, ``ppcr synth --grefcoco``) the refs are gRefCOCO's
``<out>/synthgref/grefs(unc).json`` (``ann_id`` / ``category_id`` lists, ``no_target``): the same images
and single-target refs, plus per image one expression naming no object (an attribute combination absent
from the image, worded as the single-target expressions are: "the green circle", "the triangle") and,
when a description matches two objects or more, one naming them all ("both red circles", "all the
squares").

Scenes are plain noisy backgrounds with 2-4 non-overlapping filled shapes (circle / square / triangle)
in a few colours and two clearly distinct sizes. Every sentence refers *uniquely* to its object in its
scene: attribute expressions ("the small blue square") and, with ``relations=True``, relational ones
("the circle above the green square", "the leftmost circle", "the triangle on the right").
Everything is derived from ``config.seed``: the same config gives byte-identical files.

Geometry conventions: boxes are in continuous pixel coordinates (image spans ``[0, W] x [0, H]``);
the relation "A left of B" means A's box ends before B's box starts (``A.x2 <= B.x1``), likewise for
right of / above / below; "leftmost X" means the X with the smallest box centre x.
"""

from __future__ import annotations

import itertools
import json
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from ..config import key, require, require_at_least
from .refer import DATASET_SPLITS, GENERALIZED_DATASETS, NO_TARGET, coco_image_filename

__all__ = ["COLORS", "SHAPES", "SynthConfig", "synthesize"]

#: RGB fill colours; chosen far apart so the colour of an object is unambiguous after JPEG.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 45),
    "green": (45, 165, 65),
    "blue": (45, 80, 215),
    "yellow": (235, 205, 45),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
    "cyan": (40, 190, 200),
    "black": (30, 30, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

_SIZES = ("small", "big")  # their ranges are SynthConfig.small_size / big_size
_BOX_GAP = 4.0  # px between object boxes: shapes never overlap
_REL_MARGIN = 3.0  # px: relations must hold (or fail) by this much, robust to +-1 px rasterisation
_EXTREME_MARGIN = 0.10  # of the short side: "leftmost X" must lead the other X's by this much
_CIRCLE_SIDES = 32

_Desc = tuple  # (size | None, color | None, shape | None)


@dataclass
class SynthConfig:
    """Knobs of the synthetic generator (all randomness derives from ``seed``)."""

    num_images: int = 200
    seed: int = 0
    min_objects: int = 2
    max_objects: int = 4
    relations: bool = True
    min_size: int = 160
    max_size: int = 256
    # Object side (diameter) as a fraction of the image's short side; validate() keeps the ranges apart
    # so "small" and "big" stay unambiguous. Small objects near one patch of the tiny preset's 7x7 CLIP
    # grid are the hardest to ground (docs/learning.md).
    small_size: tuple[float, float] = (0.12, 0.18)
    big_size: tuple[float, float] = (0.25, 0.35)
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow")
    split_fractions: tuple[tuple[str, float], ...] = (
        ("train", 0.7),
        ("val", 0.1),
        ("testA", 0.1),
        ("testB", 0.1),
    )
    dataset: str = "synthref"
    # gRefCOCO layout (`synthgref`): each image also gets an expression naming no object (an attribute
    # combination absent from it) and, when two objects or more share a description, one naming them all.
    generalized: bool = False

    def validate(self, prefix: str) -> None:
        """Raise ConfigError (a ValueError) naming the key of an inconsistent value."""
        require(
            self.generalized == (self.dataset in GENERALIZED_DATASETS),
            f"{key(prefix, 'dataset')} {self.dataset!r} with {key(prefix, 'generalized')} {self.generalized}: "
            f"the gRefCOCO layout is written as one of {GENERALIZED_DATASETS} (generalized true), the "
            "classic one as synthref",
        )
        require_at_least(self.num_images, 1, key(prefix, "num_images"))
        require(
            1 <= self.min_objects <= self.max_objects,
            f"{key(prefix, 'min_objects')} must be in [1, max_objects]; got {self.min_objects} "
            f"(max_objects {self.max_objects})",
        )
        require(
            32 <= self.min_size <= self.max_size,
            f"{key(prefix, 'min_size')} must be in [32, max_size]; got {self.min_size} (max_size {self.max_size})",
        )
        (slo, shi), (blo, bhi) = self.small_size, self.big_size
        require(
            0.05 <= slo <= shi < blo <= bhi <= 0.45,
            f"{key(prefix, 'small_size')} and {key(prefix, 'big_size')} need 0.05 <= small <= big <= 0.45 "
            f"with small below big (fractions of the short side); got small_size={self.small_size}, "
            f"big_size={self.big_size}",
        )
        bad_shapes = [s for s in self.shapes if s not in SHAPES]
        require(
            not bad_shapes and bool(self.shapes),
            f"{key(prefix, 'shapes')}: unknown shapes {bad_shapes}; supported: {SHAPES}",
        )
        bad_colors = [c for c in self.colors if c not in COLORS]
        require(
            not bad_colors and bool(self.colors),
            f"{key(prefix, 'colors')}: unknown colours {bad_colors}; supported: {tuple(COLORS)}",
        )
        split_key = (self.dataset, "unc")
        known = sorted(d for d, s in DATASET_SPLITS if s == "unc")
        require(
            split_key in DATASET_SPLITS,
            f"{key(prefix, 'dataset')} {self.dataset!r} has no known 'unc' split; choose one of {known}",
        )
        names = [n for n, _ in self.split_fractions]
        require(
            not set(names) - set(DATASET_SPLITS[split_key]) and len(set(names)) == len(names),
            f"{key(prefix, 'split_fractions')}: split names {names} must be distinct and among "
            f"{DATASET_SPLITS[split_key]}",
        )
        fr = [f for _, f in self.split_fractions]
        require(
            all(f >= 0 for f in fr) and math.isclose(sum(fr), 1.0, abs_tol=1e-6),
            f"{key(prefix, 'split_fractions')}: fractions must be >= 0 and sum to 1; got {fr}",
        )
        combos = len(self.shapes) * len(self.colors) * len(_SIZES)
        require(
            self.relations or combos >= self.max_objects,
            f"{key(prefix, 'relations')} false needs at least max_objects distinct (shape, colour, size)",
        )


@dataclass
class _Obj:
    shape: str
    color: str
    size: str
    poly: list[float]  # flat [x1, y1, x2, y2, ...]
    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def cx(self) -> float:
        return (self.x1 + self.x2) / 2

    @property
    def cy(self) -> float:
        return (self.y1 + self.y2) / 2


# ----------------------------------------------------------------------------- geometry


def _polygon(shape: str, cx: float, cy: float, s: float) -> list[float]:
    r = s / 2
    if shape == "circle":
        pts = [
            (
                cx + r * math.cos(2 * math.pi * k / _CIRCLE_SIDES),
                cy + r * math.sin(2 * math.pi * k / _CIRCLE_SIDES),
            )
            for k in range(_CIRCLE_SIDES)
        ]
    elif shape == "square":
        pts = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    elif shape == "triangle":
        pts = [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    else:  # guarded by SynthConfig.validate
        raise ValueError(shape)
    return [round(v, 2) for p in pts for v in p]


def _boxes_apart(a: _Obj, b: _Obj, gap: float) -> bool:
    return a.x2 + gap <= b.x1 or b.x2 + gap <= a.x1 or a.y2 + gap <= b.y1 or b.y2 + gap <= a.y1


def _sample_attributes(rng: np.random.Generator, cfg: SynthConfig, n: int) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    while len(out) < n:
        if cfg.relations and out and rng.random() < 0.3:
            # Re-use a previous object's shape+colour so relations are actually needed to disambiguate.
            shape, color, _ = out[int(rng.integers(len(out)))]
        else:
            shape = cfg.shapes[int(rng.integers(len(cfg.shapes)))]
            color = cfg.colors[int(rng.integers(len(cfg.colors)))]
        attrs = (shape, color, _SIZES[int(rng.integers(len(_SIZES)))])
        if not cfg.relations and attrs in out:
            continue  # attribute expressions must be able to single out every object
        out.append(attrs)
    return out


def _sample_scene(rng: np.random.Generator, cfg: SynthConfig, w: int, h: int) -> list[_Obj] | None:
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    short = min(w, h)
    objs: list[_Obj] = []
    for shape, color, size in _sample_attributes(rng, cfg, n):
        lo, hi = cfg.small_size if size == "small" else cfg.big_size
        s = float(rng.uniform(lo, hi)) * short
        for _ in range(200):
            cx = float(rng.uniform(s / 2 + 2, w - s / 2 - 2))
            cy = float(rng.uniform(s / 2 + 2, h - s / 2 - 2))
            poly = _polygon(shape, cx, cy, s)
            xs, ys = poly[0::2], poly[1::2]
            cand = _Obj(shape, color, size, poly, min(xs), min(ys), max(xs), max(ys))
            if all(_boxes_apart(cand, o, _BOX_GAP) for o in objs):
                objs.append(cand)
                break
        else:
            return None  # crowded; caller re-samples the whole scene
    return objs


# ----------------------------------------------------------------------------- expressions


def _attrs_of(o: _Obj, keep: tuple[str, ...]) -> _Desc:
    return (
        o.size if "size" in keep else None,
        o.color if "color" in keep else None,
        o.shape if "shape" in keep else None,
    )


def _matches(o: _Obj, d: _Desc) -> bool:
    size, color, shape = d
    return (
        (size is None or o.size == size)
        and (color is None or o.color == color)
        and (shape is None or o.shape == shape)
    )


def _phrase(d: _Desc) -> str:
    size, color, shape = d
    return " ".join(w for w in (size, color, shape or "one") if w)


_ATTR_SUBSETS: tuple[tuple[str, ...], ...] = tuple(
    c for r in (1, 2, 3) for c in itertools.combinations(("size", "color", "shape"), r)
)
# Landmarks are named by the first uniquely-identifying descriptor in this order (shortest / most natural).
_LANDMARK_ORDER = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"), ("color",))
_EXTREME_SUBSETS = ((), ("shape",), ("color",), ("color", "shape"), ("size", "shape"))
_REL_TARGET_SUBSETS = ((), ("shape",), ("color", "shape"))

# Relations return +1 (clearly holds), -1 (clearly does not) or 0 (too close to call): only
# expressions whose target clearly holds and whose distractors clearly do not are emitted.


def _sep(d: float) -> int:
    return 1 if d >= _REL_MARGIN else (-1 if d <= -_REL_MARGIN else 0)


_RELATIONS = {
    "left of": lambda a, b: _sep(b.x1 - a.x2),
    "right of": lambda a, b: _sep(a.x1 - b.x2),
    "above": lambda a, b: _sep(b.y1 - a.y2),
    "below": lambda a, b: _sep(a.y1 - b.y2),
}
_EXTREMES = {  # name -> (key to minimise, phrase used when exactly two objects match)
    "leftmost": (lambda o: o.cx, "on the left"),
    "rightmost": (lambda o: -o.cx, "on the right"),
    "topmost": (lambda o: o.cy, "at the top"),
    "bottommost": (lambda o: -o.cy, "at the bottom"),
}


def _unique(objs: list[_Obj], t: _Obj, d: _Desc) -> bool:
    return [o for o in objs if _matches(o, d)] == [t]


def _candidates(objs: list[_Obj], t: _Obj, relations: bool, short: float) -> list[list[str]]:
    """Uniquely-referring expressions for ``t``, grouped as [attribute, extreme, relational]."""
    attr = [f"the {_phrase(_attrs_of(t, k))}" for k in _ATTR_SUBSETS if _unique(objs, t, _attrs_of(t, k))]
    if not relations:
        return [attr, [], []]
    extreme: list[str] = []
    for keep in _EXTREME_SUBSETS:
        d = _attrs_of(t, keep)
        group = [o for o in objs if _matches(o, d)]
        if len(group) < 2:
            continue
        for name, (coord, side) in _EXTREMES.items():
            if all(coord(t) + _EXTREME_MARGIN * short <= coord(o) for o in group if o is not t):
                extreme.append(f"the {name} {_phrase(d)}")
                if len(group) == 2:
                    extreme.append(f"the {_phrase(d)} {side}")
    relational: list[str] = []
    for lm in objs:
        if lm is t:
            continue
        lm_desc = next(
            (_attrs_of(lm, k) for k in _LANDMARK_ORDER if _unique(objs, lm, _attrs_of(lm, k))), None
        )
        if lm_desc is None:
            continue
        for rel, test in _RELATIONS.items():
            if test(t, lm) != 1:
                continue
            for keep in _REL_TARGET_SUBSETS:
                d = _attrs_of(t, keep)
                others = [o for o in objs if o is not t and o is not lm and _matches(o, d)]
                if all(test(o, lm) == -1 for o in others):
                    relational.append(f"the {_phrase(d)} {rel} the {_phrase(lm_desc)}")
    return [list(dict.fromkeys(g)) for g in (attr, extreme, relational)]


def _pick_sentences(rng: np.random.Generator, groups: list[list[str]]) -> list[str]:
    """1-3 distinct sentences, alternating randomly between the expression kinds."""
    pools = [list(g) for g in groups if g]
    k = int(rng.integers(1, 4))
    out: list[str] = []
    while pools and len(out) < k:
        pool = pools[int(rng.integers(len(pools)))]
        out.append(pool.pop(int(rng.integers(len(pool)))))
        pools = [p for p in pools if p]
    return out


def _plural(d: _Desc) -> str:
    words = _phrase(d).split()
    return " ".join([*words[:-1], words[-1] + "s"])


def _multi_target_groups(objs: list[_Obj]) -> dict[tuple[int, ...], list[str]]:
    """Expressions naming two objects or more: (indices of exactly the objects an attribute description
    matches) -> its expressions ("both red circles", "the two squares", "all the big ones")."""
    out: dict[tuple[int, ...], list[str]] = {}
    for t in objs:
        for keep in _ATTR_SUBSETS:
            d = _attrs_of(t, keep)
            idx = tuple(i for i, o in enumerate(objs) if _matches(o, d))
            if len(idx) < 2:
                continue
            texts = (
                [f"both {_plural(d)}", f"the two {_plural(d)}"]
                if len(idx) == 2
                else [f"all the {_plural(d)}"]
            )
            out.setdefault(idx, [])
            out[idx] += [x for x in texts if x not in out[idx]]
    return out


def _no_target_expressions(cfg: SynthConfig, objs: list[_Obj]) -> list[list[str]]:
    """Expressions naming nothing in the image, grouped by the attributes they name: an object's
    description with one attribute changed so that no object matches ("the green circle" beside a red
    circle and a green square, "the triangle" where there is none, "the small one" among big ones).

    They are worded as the single-target expressions are (every attribute subset, "one" for no shape):
    if only some wordings could name nothing, the wording alone would tell a model the answer."""
    values = {"size": _SIZES, "color": cfg.colors, "shape": cfg.shapes}
    groups: dict[tuple[str, ...], list[str]] = {keep: [] for keep in _ATTR_SUBSETS}
    for o in objs:
        for attr, choices in values.items():
            for v in choices:
                if v == getattr(o, attr):
                    continue
                full = {"size": o.size, "color": o.color, "shape": o.shape, attr: v}
                for keep in _ATTR_SUBSETS:
                    if attr not in keep:
                        continue
                    d = tuple(full[k] if k in keep else None for k in ("size", "color", "shape"))
                    text = f"the {_phrase(d)}"
                    if not any(_matches(x, d) for x in objs) and text not in groups[keep]:
                        groups[keep].append(text)
    return [g for g in groups.values() if g]


def _generalized_refs(cfg: SynthConfig, image_id: int, objs: list[_Obj]) -> list[tuple[list[int], list[str]]]:
    """(indices of the target objects, sentences) of an image's extra gRefCOCO refs: one naming several
    objects when some description matches two or more, and one naming none. Drawn from their own random
    stream, so the image and its single-target refs are those of the classic data set."""
    rng = np.random.default_rng([cfg.seed, 2, image_id])
    refs: list[tuple[list[int], list[str]]] = []
    groups = _multi_target_groups(objs)
    if groups:
        idx = list(groups)[int(rng.integers(len(groups)))]
        texts = list(groups[idx])
        k = min(len(texts), int(rng.integers(1, 3)))
        refs.append((list(idx), [texts.pop(int(rng.integers(len(texts)))) for _ in range(k)]))
    # A wording first, then a sentence of it: colour changes outnumber the others several times over,
    # and a uniform draw over sentences would make "names a colour" a hint of "names nothing".
    pools = _no_target_expressions(cfg, objs)
    absent: list[str] = []
    for _ in range(int(rng.integers(1, 3))):
        if not pools:
            break
        pool = pools[int(rng.integers(len(pools)))]
        absent.append(pool.pop(int(rng.integers(len(pool)))))
        pools = [p for p in pools if p]
    if absent:
        refs.append(([], absent))
    return refs


# ----------------------------------------------------------------------------- rendering


def _render(rng: np.random.Generator, w: int, h: int, objs: list[_Obj]) -> Image.Image:
    base = rng.integers(195, 236)
    tint = rng.integers(-8, 9, size=3)
    img = Image.fromarray(np.full((h, w, 3), np.clip(base + tint, 0, 255), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    for o in objs:
        draw.polygon(list(zip(o.poly[0::2], o.poly[1::2], strict=True)), fill=COLORS[o.color])
    noise = rng.normal(0.0, 4.0, size=(h, w, 3))
    arr = np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _assign_splits(cfg: SynthConfig, n: int) -> list[str]:
    """Random image -> split assignment; every split gets >= 1 image once n >= number of splits."""
    names = [s for s, _ in cfg.split_fractions]
    fracs = [f for _, f in cfg.split_fractions]
    counts = [round(f * n) for f in fracs]
    if n >= len(names):
        counts = [max(1, c) if f > 0 else 0 for c, f in zip(counts, fracs, strict=True)]
    # The largest split absorbs rounding so the counts sum to n.
    big = int(np.argmax(fracs))
    counts[big] = n - sum(c for i, c in enumerate(counts) if i != big)
    labels = [name for name, c in zip(names, counts, strict=True) for _ in range(c)]
    order = np.random.default_rng([cfg.seed, 1]).permutation(n)
    out = [""] * n
    for label, idx in zip(labels, order, strict=True):
        out[int(idx)] = label
    return out


# ----------------------------------------------------------------------------- driver


def demo_config(num_images: int) -> SynthConfig:
    """The scenes `ppcr demo` trains on (and the serving page's examples): objects at least ~1.5 CLIP
    patches wide: "small" at the generator's default is under one patch of the tiny preset's 7x7
    grid, and its shape is then hardly visible (docs/learning.md)."""
    return SynthConfig(
        num_images=num_images,
        seed=0,
        min_objects=2,
        max_objects=3,
        relations=False,
        small_size=(0.18, 0.25),
        big_size=(0.3, 0.4),
    )


def _scene(cfg: SynthConfig, image_id: int):
    """(rng, width, height, objects, expression groups per object) of image `image_id`; the rng is left
    where `_render` continues, so the pixels are the data set's own."""
    # Per-image stream: an image's content does not depend on how many images come before it.
    rng = np.random.default_rng([cfg.seed, 0, image_id])
    for _attempt in range(1000):
        w = int(rng.integers(cfg.min_size, cfg.max_size + 1))
        h = int(rng.integers(cfg.min_size, cfg.max_size + 1))
        objs = _sample_scene(rng, cfg, w, h)
        if objs is None:
            continue
        groups = [_candidates(objs, o, cfg.relations, min(w, h)) for o in objs]
        if any(any(g) for g in groups):  # an image without any ref would belong to no split
            return rng, w, h, objs, groups
    raise RuntimeError(f"could not place objects for image {image_id}; lower max_objects")


def render_scene(cfg: SynthConfig, image_id: int) -> tuple[Image.Image, list[str]]:
    """Image `image_id` (1-based) of the data set `cfg` describes, the same pixels `synthesize` writes
    (before its JPEG encoding), and the shortest uniquely-referring expression of each object that
    has one."""
    rng, w, h, objs, groups = _scene(cfg, image_id)
    phrases = [min((e for g in gs for e in g), key=len) for gs in groups if any(gs)]
    return _render(rng, w, h, objs), phrases


def synthesize(out_dir: str | Path, config: SynthConfig | None = None) -> dict:
    """Generate the synthetic data set under ``out_dir`` (see module docstring for the layout).

    Returns a summary: ``{"dataset", "split_by", "images", "refs", "sentences", "annotations",
    "splits": {split: {"images", "refs", "sentences"}}, "refer_root", "images_dir"}``.
    """
    cfg = config or SynthConfig()
    cfg.validate("synth")
    out = Path(out_dir)
    ann_dir = out / cfg.dataset
    images_dir = out / "images" / "train2014"
    ann_dir.mkdir(parents=True, exist_ok=True)
    images_dir.mkdir(parents=True, exist_ok=True)

    splits = _assign_splits(cfg, cfg.num_images)
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(cfg.shapes)]
    cat_id = {c["name"]: c["id"] for c in categories}
    images: list[dict] = []
    annotations: list[dict] = []
    refs: list[dict] = []
    next_ann, next_ref, next_sent = 1, 0, 0
    counts = ("images", "refs", "sentences") + (
        ("multi_target_refs", "no_target_refs") if cfg.generalized else ()
    )
    per_split = {s: dict.fromkeys(counts, 0) for s, _ in cfg.split_fractions}

    for index in range(cfg.num_images):
        image_id = index + 1
        rng, w, h, objs, groups = _scene(cfg, image_id)
        file_name = coco_image_filename(image_id)
        _render(rng, w, h, objs).save(images_dir / file_name, format="JPEG", quality=95)
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        split = splits[index]
        per_split[split]["images"] += 1

        first_ann = next_ann
        for o, g in zip(objs, groups, strict=True):
            ann_id = next_ann
            next_ann += 1
            poly_rle = mask_utils.merge(mask_utils.frPyObjects([o.poly], h, w))
            if ann_id % 5 == 0:  # ~1 in 5 as compressed RLE so loaders see both formats
                seg: list | dict = {"size": [h, w], "counts": poly_rle["counts"].decode("ascii")}
            else:
                seg = [o.poly]
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": cat_id[o.shape],
                    "segmentation": seg,
                    "area": float(mask_utils.area(poly_rle)),
                    "bbox": [o.x1, o.y1, round(o.x2 - o.x1, 2), round(o.y2 - o.y1, 2)],
                    "iscrowd": 0,
                }
            )
            texts = _pick_sentences(rng, g)
            if not texts:
                continue  # no uniquely-referring expression for this object -> no ref
            sentences = []
            for t in texts:
                sentences.append({"sent_id": next_sent, "sent": t, "raw": t, "tokens": t.split()})
                next_sent += 1
            ref = {
                "ref_id": next_ref,
                "ann_id": ann_id,
                "image_id": image_id,
                "split": split,
                "sentences": sentences,
                "sent_ids": [s["sent_id"] for s in sentences],
                "category_id": cat_id[o.shape],
                # Official quirk: the ref's file_name carries an "_<ann_id>" suffix.
                "file_name": file_name[: -len(".jpg")] + f"_{ann_id}.jpg",
            }
            if cfg.generalized:  # gRefCOCO's keys: id lists and the no_target flag
                ref.update(ann_id=[ann_id], category_id=[cat_id[o.shape]], no_target=False)
            refs.append(ref)
            next_ref += 1
            per_split[split]["refs"] += 1
            per_split[split]["sentences"] += len(sentences)

        for idx, texts in _generalized_refs(cfg, image_id, objs) if cfg.generalized else []:
            sentences = []
            for t in texts:
                sentences.append({"sent_id": next_sent, "sent": t, "raw": t, "tokens": t.split()})
                next_sent += 1
            ann_ids = [first_ann + i for i in idx] or [NO_TARGET]
            refs.append(
                {
                    "ref_id": next_ref,
                    "ann_id": ann_ids,
                    "image_id": image_id,
                    "split": split,
                    "sentences": sentences,
                    "sent_ids": [s["sent_id"] for s in sentences],
                    "category_id": [cat_id[objs[i].shape] for i in idx] or [NO_TARGET],
                    "no_target": not idx,
                    "file_name": file_name[: -len(".jpg")] + f"_{ann_ids[0]}.jpg",
                }
            )
            next_ref += 1
            kind = "multi_target_refs" if idx else "no_target_refs"
            per_split[split][kind] += 1
            per_split[split]["refs"] += 1
            per_split[split]["sentences"] += len(sentences)

    instances = {
        "info": {"description": f"synthetic RefCOCO-like data ({cfg.dataset}), seed {cfg.seed}"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    (ann_dir / "instances.json").write_text(json.dumps(instances, separators=(",", ":")), encoding="utf-8")
    if cfg.generalized:  # gRefCOCO ships its refs as JSON
        (ann_dir / "grefs(unc).json").write_text(json.dumps(refs, separators=(",", ":")), encoding="utf-8")
    else:
        with (ann_dir / "refs(unc).p").open("wb") as f:
            pickle.dump(refs, f, protocol=2)  # protocol of the official (Python 2) pickles

    return {
        "dataset": cfg.dataset,
        "split_by": "unc",
        "images": len(images),
        "annotations": len(annotations),
        "refs": len(refs),
        "sentences": sum(len(r["sentences"]) for r in refs),
        "splits": per_split,
        "refer_root": str(out),
        "images_dir": str(images_dir),
    }
