"""Parquet shards: exact schema, row contents, file layout, error handling, and the reader."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ppcr.batch import decode_stage, shard_rows_to_images
from ppcr.data.refer import ReferDataError, ReferDataset
from ppcr.data.shards import (
    SHARD_SCHEMA,
    ImageCache,
    build_image_row,
    iter_expressions,
    prepare_shards,
    read_image_rows,
    shard_dir,
    validate_shard_schema,
)
from ppcr.data.synth import SynthConfig, synthesize
from ppcr.geometry import decode_image
from ppcr.masks import decode_rle

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
ROWS_PER_FILE = 3


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return synthesize(tmp_path_factory.mktemp("synth"), SynthConfig(num_images=16, seed=4))


@pytest.fixture(scope="module")
def refer(synth: dict) -> ReferDataset:
    return ReferDataset(synth["refer_root"], "synthref", "unc")


@pytest.fixture(scope="module")
def shards(synth: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("shards")
    report = prepare_shards(
        synth["refer_root"],
        synth["images_dir"],
        "synthref",
        "unc",
        out,
        rows_per_file=ROWS_PER_FILE,
        progress=False,
    )
    return out, report


@pytest.fixture
def images_copy(synth: dict, tmp_path: Path) -> Path:
    dst = tmp_path / "images"
    shutil.copytree(synth["images_dir"], dst)
    return dst


def test_schema_exact(shards: tuple) -> None:
    out, report = shards
    assert report.ok and report.files
    for f in report.files:
        assert Path(f).is_file()
        assert pq.read_schema(f).equals(SHARD_SCHEMA, check_metadata=True)
        validate_shard_schema(f)
    assert SHARD_SCHEMA.names == ["image_id", "file_name", "height", "width", "image", "refs"]
    assert SHARD_SCHEMA.field("image").type == pa.binary()
    assert SHARD_SCHEMA.field("height").type == pa.int32()
    ref_type = SHARD_SCHEMA.field("refs").type.value_type
    assert [f.name for f in ref_type] == [
        "ref_id",
        "ann_id",
        "category_id",
        "bbox",
        "mask",
        "sentences",
        "no_target",
        "targets",
    ]
    assert ref_type.field("mask").type.field("counts").type == pa.string()
    target_type = ref_type.field("targets").type.value_type
    assert [f.name for f in target_type] == ["ann_id", "category_id", "bbox", "mask"]
    assert SHARD_SCHEMA.metadata[b"ppcr.shard_format_version"] == b"2"


def test_one_row_per_image_with_original_bytes(shards: tuple, refer: ReferDataset, synth: dict) -> None:
    out, report = shards
    for split in refer.splits:
        rows = list(read_image_rows(shard_dir(out, "synthref", "unc", split)))
        assert [r["image_id"] for r in rows] == refer.image_ids(split)
        assert report.written[split] == len(rows)
        for row in rows:
            info = refer.images[row["image_id"]]
            assert (row["height"], row["width"]) == (info["height"], info["width"])
            assert row["image"] == (Path(synth["images_dir"]) / row["file_name"]).read_bytes()
            expected_refs = sorted(r.ref_id for r in refer.refs(split) if r.image_id == row["image_id"])
            assert [r["ref_id"] for r in row["refs"]] == expected_refs
            for ref in row["refs"]:
                mask = decode_rle(ref["mask"])
                assert mask.shape == (row["height"], row["width"])
                assert np.array_equal(mask, decode_rle(refer.ann_rle(ref["ann_id"])))
                assert ref["bbox"] == refer.ann_bbox_xyxy(ref["ann_id"])
                # A classic ref is one target: the version-1 fields repeated as its only target.
                assert ref["no_target"] is False
                assert ref["targets"] == [{k: ref[k] for k in ("ann_id", "category_id", "bbox", "mask")}]
                ys, xs = np.nonzero(mask)
                assert abs(xs.min() - ref["bbox"][0]) <= 2 and abs(ys.max() + 1 - ref["bbox"][3]) <= 2


def test_rows_per_file_and_names(shards: tuple, refer: ReferDataset) -> None:
    out, report = shards
    for split in refer.splits:
        files = sorted(shard_dir(out, "synthref", "unc", split).glob("*.parquet"))
        n = len(refer.image_ids(split))
        assert [f.name for f in files] == [
            f"part-{i:05d}.parquet" for i in range(math.ceil(n / ROWS_PER_FILE))
        ]
        sizes = [pq.ParquetFile(f).metadata.num_rows for f in files]
        assert (
            sum(sizes) == n
            and all(s == ROWS_PER_FILE for s in sizes[:-1])
            and 1 <= sizes[-1] <= ROWS_PER_FILE
        )
        assert not list(shard_dir(out, "synthref", "unc", split).glob("*.tmp"))
    assert (out / "synthref_unc" / "errors.jsonl").read_text() == ""


def test_iter_expressions_every_sentence_once(shards: tuple, refer: ReferDataset) -> None:
    out, _ = shards
    for split in refer.splits:
        samples = list(iter_expressions(shard_dir(out, "synthref", "unc", split)))
        seen = Counter(s.sent_id for s in samples)
        assert all(c == 1 for c in seen.values())
        expected = {s.sent_id: (r, s.text) for r in refer.refs(split) for s in r.sentences}
        assert set(seen) == set(expected)
        for s in samples:
            ref, text = expected[s.sent_id]
            assert (s.text, s.ref_id, s.ann_id, s.image_id) == (text, ref.ref_id, ref.ann_id, ref.image_id)
            assert s.bbox_xyxy.shape == (4,) and s.bbox_xyxy.dtype == np.float64
            assert s.mask().shape == (s.height, s.width)
        first_image = samples[0].image_id
        limited = list(iter_expressions(shard_dir(out, "synthref", "unc", split), limit_images=1))
        assert limited and {s.image_id for s in limited} == {first_image}


def test_deterministic_and_stale_files_removed(shards: tuple, synth: dict, tmp_path: Path) -> None:
    out, report = shards
    again = tmp_path / "again"
    rep2 = prepare_shards(
        synth["refer_root"],
        synth["images_dir"],
        "synthref",
        "unc",
        again,
        rows_per_file=ROWS_PER_FILE,
        progress=False,
    )
    for a, b in zip(report.files, rep2.files, strict=True):
        assert Path(a).read_bytes() == Path(b).read_bytes()
    rep3 = prepare_shards(
        synth["refer_root"], synth["images_dir"], "synthref", "unc", again, splits=["train"], rows_per_file=1000,
        progress=False,
    )  # fmt: skip
    assert [Path(f).name for f in rep3.files] == ["part-00000.parquet"]
    assert sorted(p.name for p in shard_dir(again, "synthref", "unc", "train").iterdir()) == [
        "part-00000.parquet"
    ]


def test_reader_errors(tmp_path: Path, shards: tuple) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        list(read_image_rows(tmp_path))
    bad = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"image_id": pa.array([1], pa.int64()), "file_name": ["x"]}), bad)
    with pytest.raises(ValueError, match="part-00000.parquet: missing column 'height'"):
        validate_shard_schema(bad)
    out, report = shards
    table = pq.read_table(report.files[0]).cast(
        pa.schema([f.with_type(pa.int64()) if f.name == "height" else f for f in SHARD_SCHEMA])
    )
    bad2 = tmp_path / "wrong_type.parquet"
    pq.write_table(table, bad2)
    with pytest.raises(ValueError, match="wrong_type.parquet.*'height'"):
        validate_shard_schema(bad2)


def test_unknown_split_rejected(synth: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="testA"):
        prepare_shards(synth["refer_root"], synth["images_dir"], "synthref", "unc", tmp_path, splits=["test"])


def test_missing_image_raises(synth: dict, refer: ReferDataset, images_copy: Path, tmp_path: Path) -> None:
    image_id = refer.image_ids("train")[1]
    path = images_copy / refer.image_filename(image_id)
    path.unlink()
    with pytest.raises(ReferDataError) as e:
        prepare_shards(synth["refer_root"], images_copy, "synthref", "unc", tmp_path / "o", progress=False)
    assert str(path) in str(e.value) and f"image_id={image_id}" in str(e.value)
    with pytest.raises(ReferDataError, match="missing"):
        build_image_row(refer, image_id, images_copy, refer.refs("train"))


def test_corrupt_image_raises(synth: dict, refer: ReferDataset, images_copy: Path, tmp_path: Path) -> None:
    image_id = refer.image_ids("train")[0]
    path = images_copy / refer.image_filename(image_id)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated JPEG: the header still parses
    with pytest.raises(ReferDataError) as e:
        prepare_shards(synth["refer_root"], images_copy, "synthref", "unc", tmp_path / "o", progress=False)
    assert str(path) in str(e.value) and f"image_id={image_id}" in str(e.value)


def test_skip_bad_writes_the_rest(
    synth: dict, refer: ReferDataset, images_copy: Path, tmp_path: Path
) -> None:
    missing, corrupt = refer.image_ids("train")[:2]
    (images_copy / refer.image_filename(missing)).unlink()
    corrupt_path = images_copy / refer.image_filename(corrupt)
    corrupt_path.write_bytes(corrupt_path.read_bytes()[:300])
    # A malformed polygon on one ref of a multi-ref image drops only that ref.
    multi = next(i for i in refer.image_ids("val") if sum(r.image_id == i for r in refer.refs("val")) >= 2)
    bad_ref = next(r for r in refer.refs("val") if r.image_id == multi)
    refer_root = tmp_path / "refer"
    shutil.copytree(Path(synth["refer_root"]) / "synthref", refer_root / "synthref")
    inst_path = refer_root / "synthref" / "instances.json"
    inst = json.loads(inst_path.read_text())
    next(a for a in inst["annotations"] if a["id"] == bad_ref.ann_id)["segmentation"] = [[1, 2, 3, 4, 5]]
    inst_path.write_text(json.dumps(inst))

    with pytest.raises(ReferDataError, match=f"ann_id={bad_ref.ann_id}"):
        prepare_shards(
            refer_root, images_copy, "synthref", "unc", tmp_path / "strict", splits=["val"], progress=False
        )

    out = tmp_path / "out"
    report = prepare_shards(refer_root, images_copy, "synthref", "unc", out, skip_bad=True, progress=False)
    assert not report.ok
    by_image = {(e["image_id"], e.get("ref_id")): e for e in report.errors}
    assert set(by_image) == {(missing, None), (corrupt, None), (multi, bad_ref.ref_id)}
    assert by_image[(missing, None)]["file"] == str(images_copy / refer.image_filename(missing))
    assert by_image[(corrupt, None)]["file"] == str(corrupt_path)
    assert by_image[(multi, bad_ref.ref_id)]["file"] == str(inst_path)
    assert all(e["split"] in ("train", "val") and e["reason"] for e in report.errors)
    lines = (out / "synthref_unc" / "errors.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == report.errors

    train_ids = [r["image_id"] for r in read_image_rows(shard_dir(out, "synthref", "unc", "train"))]
    assert train_ids == [i for i in refer.image_ids("train") if i not in (missing, corrupt)]
    assert report.written["train"] == len(refer.image_ids("train")) - 2
    val_rows = {r["image_id"]: r for r in read_image_rows(shard_dir(out, "synthref", "unc", "val"))}
    assert set(val_rows) == set(refer.image_ids("val"))
    kept = [r["ref_id"] for r in val_rows[multi]["refs"]]
    assert bad_ref.ref_id not in kept
    assert len(kept) == sum(r.image_id == multi for r in refer.refs("val")) - 1


def tag_rotated(path: Path) -> None:
    """Re-save a JPEG as a phone stores a portrait photo: the pixels a quarter turn round, and EXIF
    orientation 6 telling viewers to turn them upright, so it *displays* exactly as before."""
    with Image.open(path) as im:
        upright = im.convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", quality=95, exif=exif)


def test_an_exif_rotated_image_is_stored_and_read_as_displayed(
    synth: dict, refer: ReferDataset, images_copy: Path, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    # Before: prepare compared the stored size with instances.json, which annotation tools write in the
    # displayed size, and refused the image ("image size 225x180 != instances.json 180x225").
    image_id = next(
        i for i in refer.image_ids("val") if refer.images[i]["width"] != refer.images[i]["height"]
    )
    info, path = refer.images[image_id], images_copy / refer.image_filename(image_id)
    upright = decode_image(path.read_bytes())
    tag_rotated(path)
    with Image.open(path) as im:
        assert im.size == (info["height"], info["width"])  # stored turned: W and H swapped
    out = tmp_path / "out"
    report = prepare_shards(
        synth["refer_root"], images_copy, "synthref", "unc", out, splits=["val"], progress=False
    )
    assert report.ok
    split = shard_dir(out, "synthref", "unc", "val")
    row = next(r for r in read_image_rows(split) if r["image_id"] == image_id)
    assert (row["height"], row["width"]) == (info["height"], info["width"]) == upright.shape[:2]
    assert row["image"] == path.read_bytes()  # the original bytes, tag included
    shown = decode_image(row["image"])
    assert np.abs(shown.astype(int) - upright).mean() < 2  # the same picture, up to JPEG re-encoding
    for ref in row["refs"]:  # each mask lies on the pixels of its object, not on the stored frame
        mask = decode_rle(ref["mask"])
        assert np.array_equal(mask, decode_rle(refer.ann_rle(ref["ann_id"])))
        # (within JPEG chroma subsampling at the object's edge; a misplaced mask lands on other colours)
        assert np.abs(shown[mask].mean(0) - upright[mask].mean(0)).max() < 8
    # The readers take the row as it is: evaluation's image cache and the batch decode stage.
    sample = next(s for s in iter_expressions(split) if s.image_id == image_id)
    np.testing.assert_array_equal(ImageCache().get(sample), shown)
    table = pa.concat_tables([pq.read_table(f) for f in sorted(split.glob("part-*.parquet"))])
    decoded = decode_stage(
        shard_rows_to_images(table, "val", True, None), 32, 64, checkpoint=str(tiny_checkpoint)
    ).to_pylist()
    assert all(err is None for r in decoded for err in r["errors"])
    assert [r["hw"] for r in decoded if r["image"] == row["file_name"]] == [[info["height"], info["width"]]]


def test_annotations_in_the_stored_frame_of_an_exif_rotated_image_are_refused(
    synth: dict, refer: ReferDataset, images_copy: Path, tmp_path: Path
) -> None:
    image_id = next(
        i for i in refer.image_ids("val") if refer.images[i]["width"] != refer.images[i]["height"]
    )
    w, h = refer.images[image_id]["width"], refer.images[image_id]["height"]
    path = images_copy / refer.image_filename(image_id)
    tag_rotated(path)
    refer_root = tmp_path / "refer"
    shutil.copytree(Path(synth["refer_root"]) / "synthref", refer_root / "synthref")
    inst_path = refer_root / "synthref" / "instances.json"
    inst = json.loads(inst_path.read_text())
    im = next(x for x in inst["images"] if x["id"] == image_id)
    im["width"], im["height"] = h, w  # the stored size, as a tool that ignores EXIF writes it
    inst_path.write_text(json.dumps(inst))
    with pytest.raises(ReferDataError) as e:
        prepare_shards(
            refer_root, images_copy, "synthref", "unc", tmp_path / "o", splits=["val"], progress=False
        )
    assert str(e.value) == (
        f"{path}: EXIF orientation 6 shows this {h}x{w} image as {w}x{h}, but instances.json gives the "
        f"stored size {h}x{w}: annotations made on the stored pixels would be misaligned, since every ppcr "
        "reader shows the image as displayed (docs/shard_format.md). Remove the orientation tag from the "
        f"file if the annotations are on the stored pixels, or annotate the displayed image (image_id={image_id})"
    )
    out = tmp_path / "skip"
    report = prepare_shards(
        refer_root, images_copy, "synthref", "unc", out, splits=["val"], skip_bad=True, progress=False
    )
    assert [(x["image_id"], x["file"]) for x in report.errors] == [(image_id, str(path))]
    assert report.written["val"] == len(refer.image_ids("val")) - 1


def test_prepare_refuses_what_the_readers_would_refuse(
    synth: dict, refer: ReferDataset, images_copy: Path, tmp_path: Path
) -> None:
    """The image shape limits and unsupported modes are checked at prepare time, as every reader checks them."""
    image_id = refer.image_ids("val")[0]
    path = images_copy / refer.image_filename(image_id)
    Image.new("L", (refer.images[image_id]["width"], 1)).save(path, "JPEG")  # a strip under the right name
    refer_root = tmp_path / "refer"
    shutil.copytree(Path(synth["refer_root"]) / "synthref", refer_root / "synthref")
    inst_path = refer_root / "synthref" / "instances.json"
    inst = json.loads(inst_path.read_text())
    next(x for x in inst["images"] if x["id"] == image_id)["height"] = 1
    inst_path.write_text(json.dumps(inst))
    report = prepare_shards(
        refer_root,
        images_copy,
        "synthref",
        "unc",
        tmp_path / "o",
        splits=["val"],
        skip_bad=True,
        progress=False,
    )
    assert [x["image_id"] for x in report.errors] == [image_id]
    assert "has an aspect ratio of" in report.errors[0]["reason"]
    assert "(sizes are width x height; images must have" in report.errors[0]["reason"]


def test_prepare_refuses_sentences_the_text_rules_refuse(
    synth: dict, refer: ReferDataset, tmp_path: Path
) -> None:
    """A sentence with a terminal escape (or a reserved token) never reaches a shard: training's prompt
    builder would refuse it mid-run. The ref is named; with --skip-bad only that ref is dropped."""
    import pickle

    refer_root = tmp_path / "refer"
    shutil.copytree(Path(synth["refer_root"]) / "synthref", refer_root / "synthref")
    refs_path = refer_root / "synthref" / "refs(unc).p"
    refs = pickle.loads(refs_path.read_bytes())
    bad = next(r for r in refs if r["split"] == "val")
    bad["sentences"][0]["sent"] = "the \x1b[31mred\x1b[0m square"
    refs_path.write_bytes(pickle.dumps(refs))
    with pytest.raises(ReferDataError, match=rf"sentence {bad['sentences'][0]['sent_id']}: .*U\+001B"):
        prepare_shards(
            refer_root,
            synth["images_dir"],
            "synthref",
            "unc",
            tmp_path / "strict",
            splits=["val"],
            progress=False,
        )
    out = tmp_path / "out"
    report = prepare_shards(
        refer_root, synth["images_dir"], "synthref", "unc", out, splits=["val"], skip_bad=True, progress=False
    )
    assert [e["ref_id"] for e in report.errors] == [bad["ref_id"]]
    kept = [
        ref["ref_id"]
        for row in read_image_rows(shard_dir(out, "synthref", "unc", "val"))
        for ref in row["refs"]
    ]
    assert bad["ref_id"] not in kept and len(kept) == len(refer.refs("val")) - 1
