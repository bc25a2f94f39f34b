"""REFER loader: API, split handling, RLE helpers, and error reporting on bad files."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from ppcr.data.refer import (
    ReferDataError,
    ReferDataset,
    ReferRef,
    Sentence,
    coco_image_filename,
)
from ppcr.data.synth import SynthConfig, synthesize
from ppcr.masks import decode_rle, encode_mask

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return synthesize(tmp_path_factory.mktemp("synth"), SynthConfig(num_images=12, seed=2))


@pytest.fixture
def refer_copy(synth: dict, tmp_path: Path) -> Path:
    """A private, editable copy of the annotation files (images are not needed by the loader)."""
    dst = tmp_path / "refer"
    shutil.copytree(Path(synth["refer_root"]) / "synthref", dst / "synthref")
    return dst


def _edit_instances(root: Path, edit) -> None:
    path = root / "synthref" / "instances.json"
    inst = json.loads(path.read_text())
    edit(inst)
    path.write_text(json.dumps(inst))


def test_coco_image_filename() -> None:
    assert coco_image_filename(581857) == "COCO_train2014_000000581857.jpg"
    assert coco_image_filename(7) == "COCO_train2014_000000000007.jpg"


def test_loads_synthetic(synth: dict) -> None:
    ds = ReferDataset(synth["refer_root"], "synthref", "unc")
    assert ds.splits == ("train", "val", "testA", "testB")
    refs = ds.refs()
    assert len(refs) == synth["refs"]
    assert all(isinstance(r, ReferRef) and isinstance(r.sentences[0], Sentence) for r in refs)
    raw = pickle.loads((Path(synth["refer_root"]) / "synthref" / "refs(unc).p").read_bytes())
    assert [r.ref_id for r in refs] == [r["ref_id"] for r in raw]
    assert [s.text for s in refs[0].sentences] == [s["sent"] for s in raw[0]["sentences"]]
    total = 0
    for split in ds.splits:
        split_refs = ds.refs(split)
        assert split_refs and all(r.split == split for r in split_refs)
        ids = ds.image_ids(split)
        assert ids == sorted(set(ids)) == sorted({r.image_id for r in split_refs})
        total += len(split_refs)
    assert total == len(refs)
    assert set(ds.images) == set(range(1, 13))
    assert all(r.ann_id in ds.annotations and r.image_id in ds.images for r in refs)


def test_unknown_split_and_dataset(synth: dict) -> None:
    ds = ReferDataset(synth["refer_root"], "synthref", "unc")
    with pytest.raises(ValueError, match="testA") as e:
        ds.refs("test")
    assert "valid splits" in str(e.value)
    with pytest.raises(ValueError, match="testB"):
        ds.image_ids("bogus")
    with pytest.raises(ValueError, match="refcocog/umd"):
        ReferDataset(synth["refer_root"], "refcocox", "unc")
    with pytest.raises(ValueError, match="refcoco/unc"):
        ReferDataset(synth["refer_root"], "refcocog", "unc")  # refcocog has no unc split


def test_missing_files_named(tmp_path: Path, refer_copy: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        ReferDataset(tmp_path, "refcoco", "unc")
    assert str(tmp_path / "refcoco" / "refs(unc).p") in str(e.value)
    (refer_copy / "synthref" / "instances.json").unlink()
    with pytest.raises(FileNotFoundError) as e:
        ReferDataset(refer_copy, "synthref", "unc")
    assert str(refer_copy / "synthref" / "instances.json") in str(e.value)


@pytest.mark.parametrize(
    "polygon",
    [[[10, 10, 20, 10, 20]], [[10, 10, 20, 20]], [[10, 10, 20, 10, float("nan"), 20]], []],
    ids=["odd-length", "too-short", "non-finite", "empty"],
)
def test_malformed_polygon_names_ann(refer_copy: Path, polygon: list) -> None:
    bad_ann = 3

    def edit(inst: dict) -> None:
        for a in inst["annotations"]:
            if a["id"] == bad_ann:
                a["segmentation"] = polygon

    _edit_instances(refer_copy, edit)
    ds = ReferDataset(refer_copy, "synthref", "unc")
    with pytest.raises(ReferDataError) as e:
        ds.ann_rle(bad_ann)
    msg = str(e.value)
    assert f"ann_id={bad_ann}" in msg
    assert str(refer_copy / "synthref" / "instances.json") in msg
    assert isinstance(e.value, ValueError)
    ds.ann_rle(bad_ann + 1)  # the other annotations stay usable


def test_bad_ref_split_names_ref(refer_copy: Path) -> None:
    path = refer_copy / "synthref" / "refs(unc).p"
    refs = pickle.loads(path.read_bytes())
    refs[1]["split"] = "test"
    path.write_bytes(pickle.dumps(refs))
    with pytest.raises(ReferDataError) as e:
        ReferDataset(refer_copy, "synthref", "unc")
    assert f"ref_id={refs[1]['ref_id']}" in str(e.value) and "refs(unc).p" in str(e.value)


def py2_pickle(obj) -> bytes:
    """What Python 2's pickle.dumps(obj, protocol=2) writes: every ``str`` (keys included) is a byte
    string (SHORT_BINSTRING / BINSTRING opcodes), here holding UTF-8; ``bytes`` values go in as they are."""
    out = bytearray(b"\x80\x02")  # PROTO 2

    def emit(o) -> None:
        if isinstance(o, dict):
            out.extend(b"}")  # EMPTY_DICT
            for k, v in o.items():
                emit(k)
                emit(v)
                out.extend(b"s")  # SETITEM
        elif isinstance(o, list):
            out.extend(b"]")  # EMPTY_LIST
            for v in o:
                emit(v)
                out.extend(b"a")  # APPEND
        elif isinstance(o, int):
            out.extend(b"J" + struct.pack("<i", o))  # BININT
        else:
            raw = o.encode("utf-8") if isinstance(o, str) else o
            out.extend(
                (b"U" + bytes([len(raw)]) if len(raw) < 256 else b"T" + struct.pack("<I", len(raw))) + raw
            )

    emit(obj)
    return bytes(out + b".")


def test_python2_pickle_text_is_decoded_as_utf8_never_altered(refer_copy: Path) -> None:
    path = refer_copy / "synthref" / "refs(unc).p"
    refs = pickle.loads(path.read_bytes())
    text = "the cat on the café table — naïve 猫"
    refs[2]["sentences"][0]["sent"] = text
    path.write_bytes(py2_pickle(refs))
    # The input really is the Python 2 kind: the old latin1 fallback turns it into mojibake.
    assert pickle.loads(path.read_bytes(), encoding="latin1")[2]["sentences"][0][
        "sent"
    ] == text.encode().decode("latin1")
    ds = ReferDataset(refer_copy, "synthref", "unc")
    assert ds.refs()[2].sentences[0].text == text
    assert [r.ref_id for r in ds.refs()] == [r["ref_id"] for r in refs]


def test_text_that_is_not_utf8_is_refused_naming_the_ref(refer_copy: Path) -> None:
    path = refer_copy / "synthref" / "refs(unc).p"
    refs = pickle.loads(path.read_bytes())
    k = len(refs[3]["sentences"]) - 1  # the last sentence of ref #3
    refs[3]["sentences"][k]["sent"] = "the café table".encode("latin1")
    path.write_bytes(py2_pickle(refs))
    with pytest.raises(ReferDataError) as e:
        ReferDataset(refer_copy, "synthref", "unc")
    assert str(e.value) == (
        f"{path}: ref #3: sentences[{k}].sent is not UTF-8 text: b'the caf\\xe9 table'; REFER text must be "
        f"UTF-8 (ref_id={refs[3]['ref_id']})"
    )
    # A Python 3 pickle holding bytes is refused too, where str() would have stored "b'the cat'".
    refs[3]["sentences"][k]["sent"] = b"the cat"
    path.write_bytes(pickle.dumps(refs))
    with pytest.raises(
        ReferDataError, match=rf"malformed ref #3.*sentences\[{k}\]\.sent is bytes b'the cat', not text"
    ):
        ReferDataset(refer_copy, "synthref", "unc")


def test_an_instances_file_that_is_not_utf8_json_is_named(refer_copy: Path) -> None:
    path = refer_copy / "synthref" / "instances.json"
    text = json.dumps(json.loads(path.read_text()), indent=1)
    line = next(i for i, x in enumerate(text.splitlines()) if '"file_name"' in x)
    data = text.encode().replace(b'"file_name": "', b'"file_name": "caf\xe9_', 1)  # Latin-1 "é"
    path.write_bytes(data)
    with pytest.raises(
        ReferDataError, match=rf"instances.json: line {line + 1} is not UTF-8 text \(byte 0xe9"
    ):
        ReferDataset(refer_copy, "synthref", "unc")
    path.write_text(text[:-10])
    with pytest.raises(ReferDataError, match=r"instances.json: not valid JSON \(.*line \d+ column"):
        ReferDataset(refer_copy, "synthref", "unc")


def test_ann_rle_polygon_rle_and_uncompressed(refer_copy: Path) -> None:
    ds = ReferDataset(refer_copy, "synthref", "unc")
    polys = [a for a in ds.annotations.values() if isinstance(a["segmentation"], list)]
    rles = [a for a in ds.annotations.values() if isinstance(a["segmentation"], dict)]
    assert polys and rles
    for a in (polys[0], rles[0]):
        im = ds.images[a["image_id"]]
        rle = ds.ann_rle(a["id"])
        assert rle["size"] == [im["height"], im["width"]] and isinstance(rle["counts"], str)
        mask = decode_rle(rle)
        assert mask.dtype == bool and mask.shape == (im["height"], im["width"])
        assert mask.sum() == pytest.approx(a["area"], abs=0.5)

    # Uncompressed RLE (list counts, as in crowd annotations) of the same mask must decode identically.
    ann = polys[0]
    mask = decode_rle(ds.ann_rle(ann["id"]))
    flat = mask.flatten(order="F").astype(np.int8)  # COCO runs are column-major, starting with zeros
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], edges])).tolist()

    def edit(inst: dict) -> None:
        for a in inst["annotations"]:
            if a["id"] == ann["id"]:
                a["segmentation"] = {"size": list(mask.shape), "counts": counts}

    _edit_instances(refer_copy, edit)
    ds2 = ReferDataset(refer_copy, "synthref", "unc")
    assert np.array_equal(decode_rle(ds2.ann_rle(ann["id"])), mask)


def test_rle_size_mismatch_is_reported(refer_copy: Path) -> None:
    ds = ReferDataset(refer_copy, "synthref", "unc")
    ann = next(a for a in ds.annotations.values() if isinstance(a["segmentation"], dict))

    def edit(inst: dict) -> None:
        for a in inst["annotations"]:
            if a["id"] == ann["id"]:
                a["segmentation"]["size"] = [1, 1]

    _edit_instances(refer_copy, edit)
    with pytest.raises(ReferDataError, match=f"ann_id={ann['id']}"):
        ReferDataset(refer_copy, "synthref", "unc").ann_rle(ann["id"])


def test_bbox_xyxy(synth: dict) -> None:
    ds = ReferDataset(synth["refer_root"], "synthref", "unc")
    for ann_id, a in ds.annotations.items():
        x, y, w, h = a["bbox"]
        assert ds.ann_bbox_xyxy(ann_id) == [x, y, x + w, y + h]
    with pytest.raises(ReferDataError, match="ann_id=999999"):
        ds.ann_bbox_xyxy(999999)


def test_encode_decode_roundtrip_non_square() -> None:
    mask = np.zeros((5, 7), dtype=bool)
    mask[1:3, 2:6] = True
    mask[4, 0] = True
    rle = encode_mask(mask)
    assert rle["size"] == [5, 7] and isinstance(rle["counts"], str)
    assert np.array_equal(decode_rle(rle), mask)
    assert np.array_equal(decode_rle({"size": rle["size"], "counts": rle["counts"].encode()}), mask)
    with pytest.raises(ValueError):
        encode_mask(np.zeros((2, 2, 2), dtype=bool))
