"""`ppcr prepare --ray`: Ray Data conversion equals the single-process one, skips and reports bad
records, bounds rows per file, and a re-run only does the parts that are not finished."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from ppcr.data.custom import prepare_custom, prepare_custom_ray, read_jsonl
from ppcr.data.distributed_prepare import prepare_shards_ray
from ppcr.data.refer import ReferDataset
from ppcr.data.shards import (
    iter_expressions,
    prepare_shards,
    read_image_rows,
    shard_dir,
    validate_shard_schema,
)
from ppcr.data.synth import SynthConfig, synthesize
from ppcr.ray_cluster import init_ray
from tests.test_shards import tag_rotated

ROWS = 3


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    """16 synthetic images: one missing, one truncated, two stored turned with EXIF orientation 6, one
    of them with instances.json giving its stored size (refused) and one its displayed size (kept)."""
    root = tmp_path_factory.mktemp("prep")
    synth = synthesize(root / "synth", SynthConfig(num_images=16, seed=4))
    images = root / "images"
    shutil.copytree(synth["images_dir"], images)
    refer_root = root / "refer"
    shutil.copytree(synth["refer_root"], refer_root)
    refer = ReferDataset(refer_root, "synthref", "unc")
    missing, corrupt = refer.image_ids("train")[1:3]
    (images / refer.image_filename(missing)).unlink()
    path = images / refer.image_filename(corrupt)
    path.write_bytes(path.read_bytes()[:300])
    oblong = [
        i for i in refer.image_ids("train")[3:] if refer.images[i]["width"] != refer.images[i]["height"]
    ]
    shown, stored = oblong[:2]
    for image_id in (shown, stored):
        tag_rotated(images / refer.image_filename(image_id))
    inst_path = refer_root / "synthref" / "instances.json"
    inst = json.loads(inst_path.read_text())
    info = next(x for x in inst["images"] if x["id"] == stored)
    info["width"], info["height"] = info["height"], info["width"]
    inst_path.write_text(json.dumps(inst))
    init_ray(num_cpus=4, object_store_mb=300)
    yield refer_root, images, (missing, corrupt, stored, shown)
    ray.shutdown()


def test_same_rows_as_the_local_conversion_and_bad_records_reported(bad_data, tmp_path):
    refer_root, images, (missing, corrupt, stored, shown) = bad_data
    report, parts = prepare_shards_ray(
        refer_root, images, "synthref", "unc", tmp_path / "ray", rows_per_file=ROWS
    )
    local = prepare_shards(
        refer_root,
        images,
        "synthref",
        "unc",
        tmp_path / "local",
        rows_per_file=ROWS,
        skip_bad=True,
        progress=False,
    )
    assert report.written == local.written and parts["skipped"] == 0
    assert sorted(report.errors, key=json.dumps) == sorted(local.errors, key=json.dumps)
    assert {e["image_id"] for e in report.errors} == {missing, corrupt, stored}
    assert (
        "instances.json gives the stored size"
        in next(e for e in report.errors if e["image_id"] == stored)["reason"]
    )
    rows = list(read_image_rows(shard_dir(tmp_path / "ray", "synthref", "unc", "train")))
    kept = next(r for r in rows if r["image_id"] == shown)  # EXIF-rotated, annotated as displayed
    with Image.open(images / kept["file_name"]) as im:
        assert im.size == (kept["height"], kept["width"])  # stored turned; the row has the displayed size
    errors_file = tmp_path / "ray" / "synthref_unc" / "errors.jsonl"
    assert [json.loads(x) for x in errors_file.read_text().splitlines()] == report.errors
    for split in local.written:
        ray_dir = shard_dir(tmp_path / "ray", "synthref", "unc", split)
        assert list(read_image_rows(ray_dir)) == list(
            read_image_rows(shard_dir(tmp_path / "local", "synthref", "unc", split))
        )
        for f in ray_dir.glob("part-*.parquet"):
            validate_shard_schema(f)
            assert 1 <= pq.ParquetFile(f).metadata.num_rows <= ROWS


@pytest.mark.slow  # a second Ray Data job
def test_rerun_does_only_unfinished_parts(bad_data, tmp_path):
    refer_root, images, _ = bad_data
    out = tmp_path / "out"
    first, parts = prepare_shards_ray(refer_root, images, "synthref", "unc", out, rows_per_file=ROWS)
    files = sorted(Path(f) for f in first.files)
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    again, parts = prepare_shards_ray(refer_root, images, "synthref", "unc", out, rows_per_file=ROWS)
    assert parts["written"] == 0 and again.written == first.written and again.errors == first.errors
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes
    files[1].unlink()  # as if the job had died before this part
    _, parts = prepare_shards_ray(refer_root, images, "synthref", "unc", out, rows_per_file=ROWS)
    assert parts["written"] == 1 and files[1].is_file()
    # A different plan (rows per file) rewrites the parts it changes and leaves no stale parts behind
    # (small splits whose one part holds the same images are still done).
    bigger, parts = prepare_shards_ray(refer_root, images, "synthref", "unc", out, rows_per_file=100)
    assert parts["written"] >= 1 and bigger.written == first.written
    assert sorted(p.name for p in shard_dir(out, "synthref", "unc", "train").glob("part-*")) == [
        "part-00000.parquet"
    ]


def test_bad_arguments_fail_before_any_work(bad_data, tmp_path):
    refer_root, images, _ = bad_data
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        prepare_shards_ray(refer_root, images, "synthref", "unc", tmp_path, splits=["dev"])
    with pytest.raises(ValueError, match="rows_per_file"):
        prepare_shards_ray(refer_root, images, "synthref", "unc", tmp_path, rows_per_file=0)
    assert not any(tmp_path.iterdir())


def _manifest_of(refer_root, images, tmp_path) -> tuple[Path, list[dict], ReferDataset]:
    """The synthetic REFER data as a JSONL manifest (polygon/RLE masks inline), one bad line at line 4."""
    refer = ReferDataset(refer_root, "synthref", "unc")
    lines = []
    for ref in refer.refs():
        ann = refer.annotations[ref.ann_id]
        split = "val" if ref.split == "val" else "train"
        path = images / refer.image_filename(ref.image_id)
        texts = [s.text for s in ref.sentences]
        lines.append({"image": str(path), "expressions": texts, "mask": ann["segmentation"], "split": split})
    lines.insert(3, {"image": str(images / "x.jpg"), "expression": "", "mask": [[1, 1, 5, 1, 5, 5]]})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return manifest, lines, refer


def test_custom_manifest_with_ray_equals_the_local_import(bad_data, tmp_path):
    """`prepare --format jsonl --ray`: the same rows and bad lines as `--skip-bad` in one process."""
    refer_root, images, (missing, *_) = bad_data
    manifest, _, refer = _manifest_of(refer_root, images, tmp_path)
    source = read_jsonl(manifest, "mine")
    report, parts = prepare_custom_ray(source, tmp_path / "ray", rows_per_file=ROWS)
    local = prepare_custom(source, tmp_path / "local", rows_per_file=ROWS, skip_bad=True, progress=False)
    assert report.written == local.written and report.errors == local.errors
    assert 4 in {e["line"] for e in report.errors}  # the empty expression, by its line number
    missing_file = str(images / refer.image_filename(missing))
    assert any(missing_file in e["reason"] for e in report.errors)  # the missing image, per line
    for split in local.written:
        want = list(read_image_rows(shard_dir(tmp_path / "local", "mine", "custom", split)))
        assert list(read_image_rows(shard_dir(tmp_path / "ray", "mine", "custom", split))) == want
    errors_file = tmp_path / "ray" / "mine_custom" / "errors.jsonl"
    assert [json.loads(x) for x in errors_file.read_text().splitlines()] == report.errors
    # A one-process run over the Ray output drops the Ray markers: they describe parts it replaced.
    prepare_custom(source, tmp_path / "ray", rows_per_file=ROWS, skip_bad=True, progress=False)
    assert not list((tmp_path / "ray" / "mine_custom").glob("*/_done"))


@pytest.mark.slow  # two Ray Data jobs
def test_custom_rerun_redoes_only_the_parts_an_edit_changes(bad_data, tmp_path):
    refer_root, images, _ = bad_data
    manifest, lines, _ = _manifest_of(refer_root, images, tmp_path)
    first, parts = prepare_custom_ray(read_jsonl(manifest, "mine"), tmp_path / "ray", rows_per_file=ROWS)
    assert parts["skipped"] == 0 and parts["written"] > 2
    lines[-1]["expressions"] = ["an edited expression"]
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    again, parts = prepare_custom_ray(read_jsonl(manifest, "mine"), tmp_path / "ray", rows_per_file=ROWS)
    assert parts["written"] == 1 and again.written == first.written
    texts = [
        s.text for s in iter_expressions(shard_dir(tmp_path / "ray", "mine", "custom", lines[-1]["split"]))
    ]
    assert "an edited expression" in texts
