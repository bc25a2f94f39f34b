"""Annotation geometry -> RLE (ppcr/masks.py): pixel-exact where valid, refused with a reason where
not, and never handed to pycocotools with unbounded work (issue 17.3)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from ppcr import masks
from ppcr.data.refer import ReferDataError, ReferDataset
from ppcr.data.synth import SynthConfig, synthesize
from ppcr.masks import (
    MAX_BOUNDARY_POINTS,
    MaskError,
    bbox_xywh_to_xyxy,
    decode_rle,
    encode_mask,
    png_mask_rle,
    polygon_boundary_points,
    rle_bbox_xyxy,
    rle_string_counts,
    segmentation_rle,
)

H, W = 48, 64
#: The issue's polygon: coordinates up to 3.5e8 on a 512×512 image (~20 GiB inside pycocotools).
HUGE = [[0.0, 0.0, 3.5e8, 0.0, 3.5e8, 3.5e8, 0.0, 3.5e8]]


def _mask() -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[5:20, 10:40] = True
    m[30:47, 0:3] = True
    m[0, 63] = True
    return m


def _uncompressed(mask: np.ndarray) -> list[int]:
    flat = mask.flatten(order="F").astype(np.int8)  # COCO runs: column-major, starting with zeros
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], edges])).tolist()


def _forbid_pycocotools(monkeypatch) -> None:
    def boom(*a, **k):
        raise AssertionError("pycocotools was called with an unchecked annotation")

    for name in ("frPyObjects", "merge", "decode"):
        monkeypatch.setattr(masks.mask_utils, name, boom)


@pytest.fixture
def no_pycocotools(monkeypatch):
    """Fail the test if the rasteriser or the RLE readers of pycocotools are reached."""
    _forbid_pycocotools(monkeypatch)


# ----------------------------------------------------------------------------- exact where valid


def test_polygons_are_rasterised_exactly_as_pycocotools_does() -> None:
    polys = [[3.2, 4.7, 40.1, 2.0, 30.5, 30.5, 1.0, 25.0], [50, 40, 63.9, 40, 63.9, 47.9, 50, 47.9]]
    want = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, H, W))).astype(bool)
    rle = segmentation_rle(polys, H, W)
    assert rle["size"] == [H, W] and isinstance(rle["counts"], str)
    assert np.array_equal(decode_rle(rle), want) and want.sum() > 100
    # Points a little outside the image are legal: pycocotools clips them exactly.
    edge = [[-5.0, -5.0, W + 5.0, -5.0, W + 5.0, 10.0, -5.0, 10.0]]
    assert decode_rle(segmentation_rle(edge, H, W))[:10].all()


def test_rle_compressed_bytes_and_uncompressed_counts_decode_to_the_same_mask() -> None:
    m = _mask()
    compressed = encode_mask(m)
    for seg in (
        compressed,
        {"size": [H, W], "counts": compressed["counts"].encode()},
        {"size": [H, W], "counts": _uncompressed(m)},
    ):
        rle = segmentation_rle(seg, H, W)
        assert rle == compressed  # canonical compressed string, whatever came in
        assert np.array_equal(decode_rle(rle), m)


def test_rle_string_parser_matches_pycocotools() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = rng.random((H, W)) < rng.random()
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        assert rle_string_counts(rle["counts"]) == _uncompressed(m) or not m.any() or m.all()
        assert sum(rle_string_counts(rle["counts"])) == H * W


def test_png_masks_non_zero_is_the_object_in_every_mode() -> None:
    m = _mask()
    for mode, arr in [
        ("L", m.astype(np.uint8) * 255),
        ("L", m.astype(np.uint8)),  # 0/1 PNGs (label maps) are as common as 0/255
        ("RGB", np.stack([np.zeros_like(m), m, np.zeros_like(m)], -1).astype(np.uint8) * 7),
        ("1", m),
    ]:
        buf = io.BytesIO()
        Image.fromarray(arr).convert(mode).save(buf, format="PNG")
        assert np.array_equal(decode_rle(png_mask_rle(buf.getvalue(), H, W)), m), mode
    pal = Image.fromarray(m.astype(np.uint8) * 3, mode="L").convert("P")  # palette index 3 = object
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    assert np.array_equal(decode_rle(png_mask_rle(buf.getvalue(), H, W)), m)


def test_bbox_helpers() -> None:
    assert bbox_xywh_to_xyxy([1, 2, 3, 4]) == [1.0, 2.0, 4.0, 6.0]
    assert rle_bbox_xyxy(encode_mask(_mask())) == [0.0, 0.0, 64.0, 47.0]
    for bad in ([1, 2, 3], [1, 2, -3, 4], [1, 2, float("inf"), 4], "1,2,3,4", [1, 2, True, 4]):
        with pytest.raises(MaskError, match="bbox"):
            bbox_xywh_to_xyxy(bad)


# ----------------------------------------------------------------------------- refused where not


def test_boundary_points_counted_as_rle_fr_poly_counts_them() -> None:
    # A 10×10 square: 4 edges of 5*10 = 50 upsampled steps, + 1 point each.
    assert polygon_boundary_points(np.array([0, 0, 10, 0, 10, 10, 0, 10])) == 4 * 51
    # Truncation toward zero, as C's (int) cast: 5 * -0.3 + 0.5 = -1.0 -> -1; 5 * 0.05 + 0.5 -> 0.
    assert polygon_boundary_points(np.array([-0.3, 0, 0.05, 0, 0.05, 0])) == (1 + 1) + (0 + 1) + (1 + 1)


@pytest.mark.parametrize(
    "seg, needle",
    [
        (HUGE, "point 1 (3.5e+08, 0) is far outside the 64x48"),
        ([[0, 0, 10, 0, 10, float("nan")]], "non-finite"),
        ([[0, 0, 10, 0, 10]], "5 numbers (need an even count >= 6)"),
        ([[0, 0, 10, 10]], "4 numbers"),
        ([0, 0, 10, 0, 10, 10], "flat list of 6 numbers"),
        ([[0, 0, "10", 0, 10, 10]], "non-numeric"),
        ([], "empty polygon list"),
        ({"size": [H, W + 1], "counts": "abc"}, f"RLE size [{H}, {W + 1}] != image size [{H}, {W}]"),
        ({"size": [H, W], "counts": [H * W, 5]}, f"sum to {H * W + 5}, not height*width = {H * W}"),
        ({"size": [H, W], "counts": [10, -10, H * W]}, "negative"),
        ({"size": [H, W], "counts": "PPYo1"}, "not height*width"),  # a valid string of the wrong area
        ({"size": [H, W], "counts": "ab\x7f"}, "invalid character"),
        ({"size": [H, W], "counts": "o"}, "truncated"),
        ({"size": [H, W], "counts": 3}, "unsupported type int"),
        ({"size": [H, W], "counts": "0", "area": 1}, "unknown keys ['area']"),
        ({"counts": "0"}, "must have size and counts"),
        ("mask.png", "unsupported segmentation of type str"),
    ],
)
def test_bad_geometry_is_refused_before_pycocotools(seg, needle, no_pycocotools) -> None:
    with pytest.raises(MaskError) as e:
        segmentation_rle(seg, H, W)
    assert needle in str(e.value)


def test_polygon_work_is_bounded_even_inside_the_image(no_pycocotools) -> None:
    # A zigzag between the image's corners: every point is legal, the perimeter is absurd.
    n = MAX_BOUNDARY_POINTS // (5 * 512) + 10
    zigzag = np.tile([0.0, 0.0, 512.0, 512.0], n).tolist()
    with pytest.raises(MaskError, match=f"over the limit of {MAX_BOUNDARY_POINTS}"):
        segmentation_rle([zigzag], 512, 512)


def test_png_mask_errors() -> None:
    buf = io.BytesIO()
    Image.fromarray(_mask().astype(np.uint8)).save(buf, format="PNG")
    with pytest.raises(MaskError, match=f"mask PNG is {W}x{H}, image is {W + 1}x{H} "):
        png_mask_rle(buf.getvalue(), H, W + 1)
    jpg = io.BytesIO()
    Image.fromarray(_mask().astype(np.uint8)).save(jpg, format="JPEG")
    with pytest.raises(MaskError, match="JPEG, not PNG"):
        png_mask_rle(jpg.getvalue(), H, W)
    with pytest.raises(MaskError, match="does not decode"):
        png_mask_rle(b"not a png", H, W)
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_mask().astype(np.uint8)).save(rotated, format="PNG", exif=exif)
    with pytest.raises(MaskError, match="EXIF orientation 6"):
        png_mask_rle(rotated.getvalue(), H, W)


def test_refer_annotation_with_a_huge_polygon_names_the_annotation(tmp_path, monkeypatch) -> None:
    synth = synthesize(tmp_path, SynthConfig(num_images=4, seed=5))
    inst_path = Path(synth["refer_root"]) / "synthref" / "instances.json"
    inst = json.loads(inst_path.read_text())
    inst["annotations"][0]["segmentation"] = HUGE
    inst_path.write_text(json.dumps(inst))
    ann_id = inst["annotations"][0]["id"]
    _forbid_pycocotools(monkeypatch)
    with pytest.raises(ReferDataError, match=f"far outside.*ann_id={ann_id}"):
        ReferDataset(synth["refer_root"], "synthref", "unc").ann_rle(ann_id)


_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from ppcr.data.custom import prepare_custom, read_jsonl
    from ppcr.data.shards import prepare_shards
    import ppcr.geometry  # everything imported before the cap: the cap is on the work, not on imports

    def vm_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

    cap = vm_bytes() + 1536 * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    refer_root, images, manifest, out = sys.argv[1:]
    refer = prepare_shards(refer_root, images, "synthref", "unc", out, skip_bad=True, progress=False)
    custom = prepare_custom(read_jsonl(manifest, "mine"), out, skip_bad=True, progress=False)
    print(json.dumps({"refer": refer.errors, "custom": custom.errors, "written": custom.written}))
    """
)


def test_prepare_with_a_huge_polygon_stays_in_memory_and_keeps_good_records(tmp_path) -> None:
    """The issue's case end to end, REFER and JSONL: `prepare --skip-bad` under a 1.5 GiB address-space
    cap above its start-up size. pycocotools would ask for ~20 GiB (killed, or a segfault under the cap);
    now the annotation is reported and every other record is written."""
    synth = synthesize(tmp_path / "synth", SynthConfig(num_images=6, seed=3))
    refer_root = tmp_path / "refer"
    shutil.copytree(Path(synth["refer_root"]) / "synthref", refer_root / "synthref")
    inst_path = refer_root / "synthref" / "instances.json"
    inst = json.loads(inst_path.read_text())
    bad = inst["annotations"][0]
    bad["segmentation"] = HUGE
    inst_path.write_text(json.dumps(inst))
    refer = ReferDataset(refer_root, "synthref", "unc")
    bad_refs = [r for r in refer.refs() if r.ann_id == bad["id"]]
    assert bad_refs
    image = sorted(Path(synth["images_dir"]).glob("*.jpg"))[0]
    w, h = Image.open(image).size
    good = {"image": str(image), "expression": "the thing", "mask": [[1, 1, w - 1, 1, w - 1, h - 1]]}
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in [good, {**good, "mask": HUGE}, good]))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    argv = [str(refer_root), synth["images_dir"], str(manifest), str(tmp_path / "out")]
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert [(e["ref_id"], e["image_id"]) for e in result["refer"]] == [
        (r.ref_id, r.image_id) for r in bad_refs
    ]
    assert "far outside" in result["refer"][0]["reason"]
    assert [e["line"] for e in result["custom"]] == [2] and "far outside" in result["custom"][0]["reason"]
    from ppcr.data.shards import iter_expressions, read_image_rows, shard_dir

    got_refs = sum(
        len(row["refs"])
        for split in refer.splits
        if any(shard_dir(tmp_path / "out", "synthref", "unc", split).glob("part-*.parquet"))
        for row in read_image_rows(shard_dir(tmp_path / "out", "synthref", "unc", split))
    )
    assert got_refs == len(refer.refs()) - len(bad_refs)
    custom = list(iter_expressions(shard_dir(tmp_path / "out", "mine", "custom", "train")))
    assert sorted(s.ref_id for s in custom) == [1, 3]
