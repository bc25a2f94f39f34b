"""Bring your own data (issue 15): JSONL manifests and COCO + expressions -> shards that the training,
evaluation and batch readers take like any other; every mask encoding round-trips pixel-exactly, and every
bad line is reported by its line number."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from skimage import data as skdata

from ppcr.cli import main
from ppcr.data.custom import (
    MAX_EXPRESSIONS_PER_LINE,
    ManifestLineError,
    prepare_custom,
    read_coco,
    read_jsonl,
)
from ppcr.data.shards import iter_expressions, read_image_rows, shard_dir, validate_shard_schema
from ppcr.data.streaming import preprocess_images
from ppcr.masks import decode_rle, encode_mask

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _save(img: np.ndarray, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, **kw)
    return path


def _blob(h: int, w: int, seed: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    rng = np.random.default_rng(seed)
    cy, cx, r = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4), min(h, w) // 5
    return (yy - cy) ** 2 + ((xx - cx) / 1.5) ** 2 < r**2


def _uncompressed(mask: np.ndarray) -> list[int]:
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], edges])).tolist()


POLYS = [[10.5, 12.0, 90.0, 15.0, 70.0, 80.0, 5.0, 60.0], [100.0, 100.0, 127.9, 100.0, 127.9, 127.9]]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    """Real photographs (scikit-image), small: an astronaut (JPEG), coffee (JPEG), camera (gray PNG)."""
    root = tmp_path_factory.mktemp("byod")
    astro = np.asarray(Image.fromarray(skdata.astronaut()).resize((160, 120)))
    coffee = np.asarray(Image.fromarray(skdata.coffee()).resize((150, 100)))
    camera = np.asarray(Image.fromarray(skdata.camera()).resize((128, 128)))
    return {
        "root": root,
        "astronaut": _save(astro, root / "photos" / "astronaut.jpg", quality=90),
        "coffee": _save(coffee, root / "photos" / "coffee.jpg", quality=90),
        "camera": _save(camera, root / "photos" / "sub" / "camera.png"),
    }


@pytest.fixture(scope="module")
def manifest(photos) -> tuple[Path, dict[int, np.ndarray], list[dict]]:
    """A manifest using every mask encoding; returns (path, expected mask by sent_id, the lines)."""
    root = photos["root"]
    person = _blob(120, 160, 1)
    flag = _blob(120, 160, 2) & ~person
    _save(person.astype(np.uint8) * 255, root / "masks" / "person.png")
    pal = Image.fromarray(flag.astype(np.uint8) * 2).convert("P")  # palette index 2 = the object
    pal.save(root / "masks" / "flag.png")
    cup = _blob(100, 150, 3)
    saucer = _blob(100, 150, 4) & ~cup
    lens = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(POLYS, 128, 128))).astype(bool)
    lines = [
        {"image": "photos/astronaut.jpg", "expression": "the astronaut", "mask": "masks/person.png"},
        {
            "image": "photos/coffee.jpg",
            "expressions": ["the cup of coffee", "the cup"],
            "mask": encode_mask(cup),  # compressed RLE string
            "split": "val",
            "id": 42,
            "category": 7,
        },
        {
            "image": "./photos/astronaut.jpg",  # the same image, spelt differently: the same row
            "expressions": ["the flag", "flag behind him"],
            "mask": "masks/flag.png",
            "bbox": [1, 2, 30, 40],
        },
        {
            "image": "photos/coffee.jpg",
            "expression": "the saucer",
            "mask": {"size": [100, 150], "counts": _uncompressed(saucer)},
            "split": "val",
        },
        {"image": str(photos["camera"]), "expression": "the camera's lens", "mask": POLYS},
    ]
    path = root / "refs.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n")  # a trailing blank line
    expected = {
        1 * MAX_EXPRESSIONS_PER_LINE: person,
        42 * MAX_EXPRESSIONS_PER_LINE: cup,
        42 * MAX_EXPRESSIONS_PER_LINE + 1: cup,
        3 * MAX_EXPRESSIONS_PER_LINE: flag,
        3 * MAX_EXPRESSIONS_PER_LINE + 1: flag,
        4 * MAX_EXPRESSIONS_PER_LINE: saucer,
        5 * MAX_EXPRESSIONS_PER_LINE: lens,
    }
    return path, expected, lines


def _mask_box(m: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def test_every_mask_encoding_round_trips_through_prepare_and_the_readers(manifest, photos, tmp_path, cfg):
    path, expected, lines = manifest
    source = read_jsonl(path, "mine")
    assert source.errors == [] and source.splits == ["train", "val"]
    report = prepare_custom(source, tmp_path, rows_per_file=1, progress=False)
    assert report.ok and report.written == {"train": 2, "val": 1}
    assert (tmp_path / "mine_custom" / "errors.jsonl").read_text() == ""

    seen = {}
    for split in ("train", "val"):
        folder = shard_dir(tmp_path, "mine", "custom", split)
        for f in folder.glob("part-*.parquet"):
            validate_shard_schema(f)
        rows = list(read_image_rows(folder))
        assert [r["image_id"] for r in rows] == sorted(r["image_id"] for r in rows)
        for row in rows:
            assert [ref["ref_id"] for ref in row["refs"]] == sorted(ref["ref_id"] for ref in row["refs"])
        for s in iter_expressions(folder):  # the training / evaluation reader
            seen[s.sent_id] = s
            assert np.array_equal(s.mask(), expected[s.sent_id]), s.sent_id  # pixel-exact
            assert s.mask().shape == (s.height, s.width)
    assert sorted(seen) == sorted(expected)
    by_file = {s.file_name: s for s in seen.values()}
    assert set(by_file) == {"photos/astronaut.jpg", "photos/coffee.jpg", str(photos["camera"])}
    assert by_file["photos/astronaut.jpg"].image_bytes == photos["astronaut"].read_bytes()  # original bytes
    assert (by_file["photos/coffee.jpg"].height, by_file["photos/coffee.jpg"].width) == (100, 150)
    assert [seen[k].image_id for k in (1000, 42000, 5000)] == [1, 2, 3]  # order of first appearance
    assert seen[3000].bbox_xyxy.tolist() == [1.0, 2.0, 31.0, 42.0]  # the line's XYWH bbox, as XYXY
    assert seen[42000].bbox_xyxy.tolist() == _mask_box(expected[42000])  # else the mask's extent
    assert (seen[42001].text, seen[42001].ref_id, seen[42001].ann_id) == ("the cup", 42, 42)
    assert seen[4000].ref_id == 4  # no id: the line number

    # The Ray Data training reader (streaming.preprocess_images) decodes the same masks.
    table = pa.concat_tables(
        [pq.read_table(f) for f in sorted(shard_dir(tmp_path, "mine", "custom", "train").glob("*.parquet"))]
    )
    out = preprocess_images(table, cfg.model.vision.image_size, cfg.model.sam.image_size, "mine", "custom")
    for key, size, counts in zip(out["key"], out["mask_size"], out["mask_counts"]):
        sent_id = int(key.rsplit("/", 1)[1])
        assert key.startswith("mine/custom/")
        mask = decode_rle({"size": [int(v) for v in size], "counts": counts})
        assert np.array_equal(mask, expected[sent_id])

    # `ppcr batch` / `evaluate --ray` read a split folder as image rows whose ids are the sent ids.
    from ppcr.batch import shard_rows_to_images

    images = shard_rows_to_images(table, split="train", with_gt=True, done=None)
    assert sorted(int(i) for ids in images["ids"].to_pylist() for i in ids) == [1000, 3000, 3001, 5000]


def test_coco_instances_with_expressions(photos, tmp_path, capsys):
    """A labelling tool's COCO export (polygons, and crowd-style uncompressed RLE) plus an expressions
    file: masks equal pycocotools' own COCO.annToMask, boxes the annotation's."""
    cup = _blob(100, 150, 3)
    instances = {
        "images": [
            {"id": 7, "file_name": "coffee.jpg", "height": 100, "width": 150},
            {"id": 9, "file_name": "sub/camera.png", "height": 128, "width": 128},
        ],
        "annotations": [
            {
                "id": 70,
                "image_id": 7,
                "category_id": 3,
                "bbox": [1.5, 2, 50, 60],
                "segmentation": {"size": [100, 150], "counts": _uncompressed(cup)},
                "iscrowd": 1,
            },
            {
                "id": 90,
                "image_id": 9,
                "category_id": 4,
                "bbox": [5, 12, 123, 116],
                "segmentation": POLYS,
                "iscrowd": 0,
            },
            {"id": 91, "image_id": 9, "category_id": 4, "segmentation": [POLYS[0]], "iscrowd": 0},
        ],
        "categories": [{"id": 3, "name": "cup"}, {"id": 4, "name": "lens"}],
    }
    inst_path = tmp_path / "instances.json"
    inst_path.write_text(json.dumps(instances))
    refs = tmp_path / "refs.jsonl"
    refs.write_text(
        "\n".join(
            json.dumps(x)
            for x in [
                {"ann_id": 70, "expressions": ["the cup", "coffee"], "split": "val"},
                {"ann_id": 90, "expression": "the lens"},
                {"ann_id": 91, "expression": "the big part of the lens", "id": 5},
                {"ann_id": 12345, "expression": "nothing"},
            ]
        )
    )
    source = read_coco(inst_path, refs, photos["root"] / "photos", "tool")
    assert [(e["line"], e["reason"]) for e in source.errors] == [(4, f"ann_id 12345 is not in {inst_path}")]
    with pytest.raises(ManifestLineError, match=r"refs.jsonl, line 4: ann_id 12345 is not in"):
        prepare_custom(source, tmp_path / "strict", progress=False)
    argv = ["prepare", "--format", "coco", "--instances", str(inst_path), "--expressions", str(refs)]
    argv += ["--images", str(photos["root"] / "photos"), "--dataset", "tool", "--out", str(tmp_path / "out")]
    assert main([*argv, "--skip-bad"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == {"val": 1, "train": 1}
    coco = COCO(str(inst_path))
    samples = {
        s.sent_id: s
        for split in ("train", "val")
        for s in iter_expressions(shard_dir(tmp_path / "out", "tool", "custom", split))
    }
    assert sorted(samples) == [1000, 1001, 2000, 5000]
    for sent_id, ann_id in ((1000, 70), (1001, 70), (2000, 90), (5000, 91)):
        s = samples[sent_id]
        assert s.ann_id == ann_id
        assert np.array_equal(s.mask(), coco.annToMask(coco.anns[ann_id]).astype(bool)), ann_id
    assert samples[1000].image_id == 7 and samples[1000].file_name == "coffee.jpg"
    assert samples[1000].bbox_xyxy.tolist() == [1.5, 2.0, 51.5, 62.0]
    assert samples[5000].bbox_xyxy.tolist() == _mask_box(samples[5000].mask())  # no bbox: the extent


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


#: (line, what the reason must say): every kind of bad line.
BAD_LINES = [
    ("{not json", "invalid JSON"),
    ('["image", "expression"]', "a line must be a JSON object; got list"),
    (
        '{"image": "photos/coffee.jpg", "expression": "x", "mask": [[1, 1, 9, 1, 9, 9]], "maks": 1}',
        "unknown key(s) ['maks']",
    ),
    ('{"expression": "x", "mask": [[1, 1, 9, 1, 9, 9]]}', "image must be a non-empty path or URI; got None"),
    ('{"image": "photos/none.jpg", "expression": "x", "mask": [[1, 1, 9, 1, 9, 9]]}', "image file missing"),
    ('{"image": "broken.jpg", "expression": "x", "mask": [[1, 1, 9, 1, 9, 9]]}', "image does not decode"),
    (
        '{"image": "photos/coffee.jpg", "expression": "  ", "mask": [[1, 1, 9, 1, 9, 9]]}',
        "expression is empty",
    ),
    (
        '{"image": "photos/coffee.jpg", "expressions": [], "mask": [[1, 1, 9, 1, 9, 9]]}',
        "expressions must be a non-empty list",
    ),
    (
        '{"image": "photos/coffee.jpg", "expressions": ["a", ""], "mask": [[1, 1, 9, 1, 9, 9]]}',
        "expressions[1]: expression is empty",
    ),
    (
        '{"image": "photos/coffee.jpg", "expression": "a", "expressions": ["b"], "mask": [[1, 1, 9, 1, 9, 9]]}',
        "not both",
    ),
    ('{"image": "photos/coffee.jpg", "mask": [[1, 1, 9, 1, 9, 9]]}', "missing expression"),
    ('{"image": "photos/coffee.jpg", "expression": "x"}', "missing mask"),
    (
        '{"image": "photos/coffee.jpg", "expression": "x", "mask": "small.png"}',
        "mask PNG is 5x5, image is 150x100 (WxH)",
    ),
    ('{"image": "photos/coffee.jpg", "expression": "x", "mask": "nomask.png"}', "mask file missing"),
    (
        '{"image": "photos/coffee.jpg", "expression": "x", "mask": {"size": [128, 128], "counts": "PP"}}',
        "RLE size [128, 128] != image size [100, 150]",
    ),
    (
        '{"image": "photos/coffee.jpg", "expression": "x", "mask": {"size": [100, 150], "counts": [5, 5]}}',
        "RLE counts sum to 10, not height*width = 15000",
    ),
    (
        '{"image": "photos/coffee.jpg", "expression": "x", "mask": [[1, 1, 9, 1]]}',
        "malformed polygon 0: 4 numbers (need an even count >= 6)",
    ),
    (
        '{"image": "photos/coffee.jpg", "expression": "x", "mask": [[0, 0, 3.5e8, 0, 3.5e8, 3.5e8]]}',
        "is far outside the 150x100 (WxH) image",
    ),
    (
        '{"image": "photos/coffee.jpg", "expression": "x", "mask": [[-50, -50, -40, -50, -40, -40]]}',
        "mask is empty",
    ),
    ('{"image": "photos/coffee.jpg", "expression": "x", "mask": 5}', "mask must be a PNG path, a COCO RLE"),
    (
        '{"image": "photos/coffee.jpg", "expression": "x", "mask": [[1, 1, 9, 1, 9, 9]], "bbox": [1, 2, -3, 4]}',
        "invalid bbox",
    ),
    (
        '{"image": "photos/coffee.jpg", "expression": "x", "mask": [[1, 1, 9, 1, 9, 9]], "split": "../train"}',
        "split must be a name",
    ),
    (
        '{"image": "photos/coffee.jpg", "expression": "x", "mask": [[1, 1, 9, 1, 9, 9]], "category": "cup"}',
        "category must be an integer",
    ),
    (
        '{"image": "photos/coffee.jpg", "expression": "x", "mask": [[1, 1, 9, 1, 9, 9]], "id": 1}',
        "id 1 is already the id of line 1",
    ),
    (
        '{"image": "photos/coffee.jpg", "expression": "x", "mask": [[1, 1, 9, 1, 9, NaN]]}',
        "NaN is not valid JSON",
    ),
    (
        '{"image": "photos/coffee.jpg", "image": "photos/coffee.jpg", "expression": "x", "mask": [[1, 1, 9, 1, 9, 9]]}',
        "duplicate key 'image'",
    ),
    (
        b'{"image": "photos/coffee.jpg", "expression": "caf\xe9", "mask": [[1, 1, 9, 1, 9, 9]]}',
        "not UTF-8 text",
    ),
]


def test_every_bad_line_is_reported_by_its_line_number(photos, tmp_path):
    root = photos["root"]
    (root / "broken.jpg").write_bytes(photos["coffee"].read_bytes()[:200])
    (root / "small.png").write_bytes(_png(np.ones((5, 5), np.uint8)))
    good = '{"image": "photos/coffee.jpg", "expression": "the cup", "mask": [[10, 10, 60, 10, 60, 50]]}'
    body = [good.encode()]
    for line, _ in BAD_LINES:
        body += [line if isinstance(line, bytes) else line.encode(), good.encode()]
    path = root / "bad.jsonl"
    path.write_bytes(b"\n".join(body) + b"\n")
    # Line 1 is good; bad line i sits at 2 + 2i, each followed by a good one.
    want = {2 + 2 * i: needle for i, (_, needle) in enumerate(BAD_LINES)}

    with pytest.raises(ManifestLineError) as e:  # without --skip-bad: the first bad line, before writing
        prepare_custom(read_jsonl(path, "bad"), tmp_path / "strict", progress=False)
    assert str(e.value).startswith(f"{path}, line 2: invalid JSON") and e.value.line == 2
    assert not (tmp_path / "strict").exists()

    report = prepare_custom(read_jsonl(path, "bad"), tmp_path / "out", skip_bad=True, progress=False)
    got = {err["line"]: err["reason"] for err in report.errors}
    assert sorted(got) == sorted(want)  # each bad line once, by its number
    for line, needle in want.items():
        assert needle in got[line], (line, got[line])
    assert all(err["file"] == str(path) for err in report.errors)
    lines = (tmp_path / "out" / "bad_custom" / "errors.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == report.errors
    # Every good line is written: the first, one after each bad line; and the line id=1 refused above
    # means line 1 keeps its ref_id.
    written = list(iter_expressions(shard_dir(tmp_path / "out", "bad", "custom", "train")))
    assert sorted(s.ref_id for s in written) == [1] + [3 + 2 * i for i in range(len(BAD_LINES))]


def test_bad_arguments_fail_before_any_work(manifest, tmp_path, capsys):
    path = manifest[0]
    with pytest.raises(ValueError, match="dataset must be a name"):
        read_jsonl(path, "my/data")
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_jsonl(tmp_path / "none.jsonl", "x")
    with pytest.raises(ValueError, match=r"split\(s\) \['test'\] have no lines"):
        prepare_custom(read_jsonl(path, "x"), tmp_path, splits=["test"], progress=False)
    base = ["prepare", "--dataset", "x", "--out", str(tmp_path)]
    assert main([*base, "--format", "jsonl"]) == 2
    assert "prepare --format jsonl needs --manifest" in capsys.readouterr().err
    assert main([*base, "--format", "jsonl", "--manifest", str(path), "--split-by", "unc"]) == 2
    assert "--split-by is not an input of prepare --format jsonl" in capsys.readouterr().err
    assert main([*base, "--manifest", str(path)]) == 2  # the default format is refer
    assert "prepare --format refer needs --refer-root, --images, --split-by" in capsys.readouterr().err


def test_rewriting_a_data_set_keeps_exactly_the_manifests_splits(manifest, tmp_path):
    path, _, lines = manifest
    prepare_custom(read_jsonl(path, "mine"), tmp_path, progress=False)
    assert any(shard_dir(tmp_path, "mine", "custom", "val").glob("part-*.parquet"))
    only_train = tmp_path / "train_only.jsonl"
    base = path.parent
    only_train.write_text(
        "".join(
            json.dumps(
                {
                    **x,
                    "image": str(base / x["image"]),
                    **({"mask": str(base / x["mask"])} if isinstance(x["mask"], str) else {}),
                }
            )
            + "\n"
            for x in lines
            if x.get("split", "train") == "train"
        )
    )
    report = prepare_custom(read_jsonl(only_train, "mine"), tmp_path, progress=False)
    assert report.written == {"train": 2}
    assert not any(shard_dir(tmp_path, "mine", "custom", "val").glob("part-*.parquet"))  # no stale split


def test_cli_prepare_then_train_and_evaluate_with_split_by_custom(manifest, tmp_path, capsys):
    """The documented sequence (docs/custom_data.md) on the tiny preset: prepare, train a few steps,
    evaluate with predictions."""
    path = manifest[0]
    shards = tmp_path / "shards"
    assert (
        main(
            [
                "prepare",
                "--format",
                "jsonl",
                "--manifest",
                str(path),
                "--dataset",
                "mine",
                "--out",
                str(shards),
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert (
        summary["written"] == {"train": 2, "val": 1}
        and summary["dataset"] == "--dataset mine --split-by custom"
    )
    run = tmp_path / "run"
    sets = [
        f"data.shards_root={shards}",
        "data.dataset=mine",
        "data.split_by=custom",
        "train.steps=2",
    ]
    assert (
        main(
            ["train", "--local", "--config", "tiny", "--out", str(run)]
            + [x for s in sets for x in ("--set", s)]
        )
        == 0
    )
    assert (run / "checkpoint").is_dir()
    argv = ["evaluate", "--checkpoint", str(run / "checkpoint"), "--shards", str(shards), "--dataset", "mine"]
    argv += ["--split-by", "custom", "--splits", "val", "--out", str(tmp_path / "eval")]
    assert main([*argv, "--predictions", str(tmp_path / "pred.jsonl")]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["results"]["PPCR"]["mine/custom/val"]["count"] == 3
    assert [json.loads(x)["sent_id"] for x in (tmp_path / "pred.jsonl").read_text().splitlines()] == [
        4000,
        42000,
        42001,
    ]


def test_training_stream_keys_images_by_content_not_by_name(manifest, tmp_path, cfg):
    """Two custom data sets of one training mix may both have a `photos/1.jpg`: the trainer's batch
    collate shares pixels between rows of equal image_key, so the key must be the image, not its name."""
    prepare_custom(read_jsonl(manifest[0], "mine"), tmp_path, progress=False)
    folder = shard_dir(tmp_path, "mine", "custom", "train")
    table = pa.concat_tables([pq.read_table(f) for f in sorted(folder.glob("*.parquet"))])
    assert table.num_rows == 2
    same_name = table.set_column(1, "file_name", pa.array(["photos/1.jpg"] * 2))
    size = (cfg.model.vision.image_size, cfg.model.sam.image_size)
    out = preprocess_images(same_name, *size, "mine", "custom")
    first = {k: key for k, key in zip(out["key"], out["image_key"])}
    assert first["mine/custom/1000"] != first["mine/custom/5000"]  # different photos, same name
    assert first["mine/custom/1000"] == first["mine/custom/3000"]  # one photo, two refs
    again = preprocess_images(table, *size, "other", "custom")  # the same bytes in another data set
    assert set(again["image_key"]) == set(out["image_key"])


def test_manifest_given_as_a_uri(manifest, tmp_path):
    source = read_jsonl(f"file://{manifest[0]}", "mine")
    assert source.errors == []
    # Relative paths resolve against the manifest's URI; the camera's absolute path stays a path.
    assert [r.image.startswith("file://") for r in source.records] == [True, True, True, True, False]
    assert source.records[0].file_name == "photos/astronaut.jpg"
    report = prepare_custom(source, tmp_path, progress=False)
    assert report.ok and report.written == {"train": 2, "val": 1}


def test_exif_rotated_photo_rows_have_the_size_the_readers_decode(photos, tmp_path):
    """A camera JPEG stored 160x120 with EXIF orientation 6 (shown 120x160): the row's height/width and
    the mask's size are those of `geometry.decode_image`, which every reader uses."""
    from ppcr.data.shards import ImageCache
    from ppcr.geometry import decode_image

    raw = np.asarray(Image.open(photos["astronaut"]))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(raw).save(path, exif=exif)
    h, w = decode_image(path.read_bytes()).shape[:2]
    mask = np.zeros((h, w), bool)
    mask[10:50, 5:30] = True
    _save(mask.astype(np.uint8) * 255, tmp_path / "m.png")
    (tmp_path / "r.jsonl").write_text(
        json.dumps({"image": "rotated.jpg", "expression": "x", "mask": "m.png"})
    )
    assert prepare_custom(read_jsonl(tmp_path / "r.jsonl", "rot"), tmp_path / "out", progress=False).ok
    (sample,) = iter_expressions(shard_dir(tmp_path / "out", "rot", "custom", "train"))
    assert (sample.height, sample.width) == (h, w) and np.array_equal(sample.mask(), mask)
    assert ImageCache().get(sample).shape[:2] == (h, w)  # the training/evaluation decode agrees


def test_jsonl_and_coco_take_several_targets_and_no_target(photos, tmp_path):
    """`masks` (several objects) and `no_target: true` (none) in a JSONL manifest, an `ann_id` list and
    `no_target` with `image_id` in COCO expressions: the shards hold each target and their union."""
    cup, saucer = _blob(100, 150, 3), _blob(100, 150, 4) & ~_blob(100, 150, 3)
    lines = [
        {
            "image": "photos/coffee.jpg",
            "expression": "the cup and the saucer",
            "masks": [encode_mask(cup), encode_mask(saucer)],
        },
        {"image": "photos/coffee.jpg", "expression": "the spoon", "no_target": True},
        {"image": "photos/coffee.jpg", "expression": "the cup", "mask": encode_mask(cup), "no_target": False},
    ]
    manifest = photos["root"] / "multi.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    prepare_custom(read_jsonl(manifest, "multi"), tmp_path / "j", progress=False)
    got = list(iter_expressions(shard_dir(tmp_path / "j", "multi", "custom", "train")))
    both, none, one = got
    assert [t["ann_id"] for t in both.targets] == [1000, 1001] and both.ann_id == 1000
    assert np.array_equal(decode_rle(both.targets[1]["mask"]), saucer)
    assert np.array_equal(both.mask(), cup | saucer)
    assert both.bbox_xyxy.tolist() == _mask_box(cup | saucer)
    assert none.no_target and none.targets == [] and not none.mask().any() and none.ann_id == -1
    assert not one.no_target and len(one.targets) == 1 and one.ann_id == 3

    instances = {
        "images": [{"id": 7, "file_name": "coffee.jpg", "height": 100, "width": 150}],
        "annotations": [
            {"id": 70, "image_id": 7, "category_id": 3, "segmentation": encode_mask(cup)},
            {"id": 71, "image_id": 7, "category_id": 4, "segmentation": encode_mask(saucer)},
        ],
    }
    inst_path = tmp_path / "instances.json"
    inst_path.write_text(json.dumps(instances))
    refs = tmp_path / "refs.jsonl"
    refs.write_text(
        "\n".join(
            json.dumps(x)
            for x in [
                {"ann_id": [70, 71], "expression": "cup and saucer"},
                {"image_id": 7, "no_target": True, "expression": "the spoon"},
            ]
        )
    )
    prepare_custom(
        read_coco(inst_path, refs, photos["root"] / "photos", "tool"), tmp_path / "c", progress=False
    )
    pair, spoon = iter_expressions(shard_dir(tmp_path / "c", "tool", "custom", "train"))
    assert [(t["ann_id"], t["category_id"]) for t in pair.targets] == [(70, 3), (71, 4)]
    assert np.array_equal(pair.mask(), cup | saucer)
    assert spoon.no_target and spoon.image_id == 7 and not spoon.mask().any()


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (
            {"mask": [[1, 1, 9, 1, 9, 9]], "masks": [[[1, 1, 9, 1, 9, 9]]]},
            "give either mask (one object) or masks",
        ),
        ({"masks": []}, "masks must be a non-empty list of masks"),
        ({"masks": [5]}, "masks[0] must be a PNG path"),
        ({"masks": [[[1, 1, 9, 1, 9, 9]]], "bbox": [1, 1, 2, 2]}, "bbox goes with mask"),
        ({"no_target": True, "mask": [[1, 1, 9, 1, 9, 9]]}, "names no object: drop mask"),
        ({"no_target": "yes"}, "no_target must be true or false"),
        ({}, "missing mask (a PNG path"),
        ({"masks": [[[1, 1, 9, 1, 9, 9]], []]}, "masks[1]: "),
    ],
)
def test_bad_target_lines_are_named(photos, tmp_path, line, reason):
    path = photos["root"] / f"bad-{abs(hash(json.dumps(line)))}.jsonl"
    path.write_text(json.dumps({"image": "photos/coffee.jpg", "expression": "x", **line}) + "\n")
    source = read_jsonl(path, "bad")
    if source.errors:
        errors = source.errors
    else:
        errors = prepare_custom(source, tmp_path / "out", skip_bad=True, progress=False).errors
    assert len(errors) == 1 and reason in errors[0]["reason"], errors
