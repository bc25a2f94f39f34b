"""Evaluation covers every expression of a split; baselines behave as defined."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ppcr.cli import main
from ppcr.data.shards import iter_expressions, read_image_rows
from ppcr.evaluate import evaluate_baselines, evaluate_split, mean_training_box, protocol_samples
from ppcr.masks import decode_rle
from ppcr.metrics import GLAMM_EXPRESSIONS_PER_IMAGE, protocol_indices
from ppcr.report import metrics_from_predictions, write_predictions


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


def test_every_expression_is_evaluated(model, val_dir):
    n = sum(1 for _ in iter_expressions(val_dir))
    m = evaluate_split(model, val_dir, batch_size=5, progress=False)
    assert m["count"] == n
    assert 0 <= m["mIoU"] <= 1 and 0 <= m["oIoU"] <= 1 and "BoxAcc@0.5" in m


def test_evaluation_is_deterministic_and_batch_size_free(model, val_dir):
    a = evaluate_split(model, val_dir, batch_size=3, progress=False)
    b = evaluate_split(model, val_dir, batch_size=16, progress=False)
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-6), k


def test_oracle_box_gives_perfect_box_accuracy(model, val_dir):
    m = evaluate_split(model, val_dir, oracle_box=True, progress=False)
    assert m["BoxAcc@0.5"] == 1.0


def test_baselines(train_dir, val_dir):
    mean_box = mean_training_box(train_dir)
    assert mean_box.shape == (4,) and np.all((mean_box >= 0) & (mean_box <= 1))
    assert mean_box[0] < mean_box[2] and mean_box[1] < mean_box[3]
    b = evaluate_baselines(train_dir, val_dir)
    allobj = b["baseline: all objects"]
    n = sum(1 for _ in iter_expressions(val_dir))
    assert allobj["count"] == n == b["baseline: mean box"]["count"]
    # The union of all objects contains every referent, so its IoU is the referent's share of the union:
    # above 0, below 1 whenever an image has more than one object.
    multi = any(len(r["refs"]) > 1 for r in read_image_rows(val_dir))
    assert 0 < allobj["mIoU"] < 1 if multi else allobj["mIoU"] == 1


def test_an_expression_breaking_the_text_rules_is_left_out_and_counted(model, val_dir, tmp_path):
    """As `ppcr evaluate --ray` does: the sentence is named in a warning, counted under `errors`, and
    the metrics are those of the other expressions (before, `</s>` became an EOS id in the prompt)."""
    files = sorted(val_dir.glob("part-*.parquet"))
    first = pq.read_table(files[0])
    rows = first.to_pylist()
    sentence = rows[0]["refs"][0]["sentences"][0]
    sentence["text"] = "the one </s> on the left"
    (tmp_path / "val").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=first.schema), tmp_path / "val" / files[0].name)
    for f in files[1:]:
        shutil.copy(f, tmp_path / "val" / f.name)
    n = sum(1 for _ in iter_expressions(val_dir))
    with pytest.warns(
        UserWarning,
        match=rf"1 expression\(s\) break the text rules.*sentence {sentence['sent_id']}: .*'</s>'",
    ):
        m = evaluate_split(model, tmp_path / "val", batch_size=5, progress=False)
    assert m["count"] == n - 1 and m["errors"] == 1
    assert "errors" not in evaluate_split(model, val_dir, batch_size=5, progress=False)


def test_predictions_recompute_the_metrics_exactly(model, val_dir, tmp_path):
    records = []
    want = evaluate_split(model, val_dir, batch_size=4, progress=False, on_prediction=records.append)
    sent_ids = [s.sent_id for s in iter_expressions(val_dir)]
    assert [r["sent_id"] for r in records] == sent_ids  # every expression, in evaluation order
    for r in records:
        assert set(r) == {"split", "sent_id", "file_name", "expression", "iou", "intersection", "union"} | {
            "box_iou",
            "box",
            "score",
            "mask",
        }
        assert r["split"] == "val" and len(r["box"]) == 4
        assert r["iou"] == (r["intersection"] / r["union"] if r["union"] else 1.0)
        assert decode_rle(r["mask"]).sum() <= r["union"]
    path = write_predictions(tmp_path / "p.jsonl", records)
    assert metrics_from_predictions(path) == {"val": want}  # bit for bit, every metric
    # The order of the lines does not matter (the IoU sum is kept exactly): a sorted file gives the same.
    shuffled = sorted(records, key=lambda r: -r["sent_id"])
    assert metrics_from_predictions(write_predictions(tmp_path / "s.jsonl", shuffled)) == {"val": want}
    # A prediction that changes changes the numbers: the file is what the report was computed from.
    records[0] = {**records[0], "intersection": records[0]["union"], "iou": 1.0}
    assert metrics_from_predictions(write_predictions(tmp_path / "x.jsonl", records)) != {"val": want}
    (tmp_path / "bad.jsonl").write_text('{"split": "val"}\n')
    with pytest.raises(ValueError, match="bad.jsonl, line 1: not a prediction record"):
        metrics_from_predictions(tmp_path / "bad.jsonl")


def test_glamm_protocol_draws_three_expressions_per_image_reproducibly(model, val_dir):
    per_image = Counter(s.image_id for s in iter_expressions(val_dir))
    assert max(per_image.values()) > GLAMM_EXPRESSIONS_PER_IMAGE  # the draw has something to choose
    picked = [s.sent_id for s in protocol_samples(iter_expressions(val_dir), "glamm", seed=0)]
    assert len(picked) == sum(min(n, GLAMM_EXPRESSIONS_PER_IMAGE) for n in per_image.values())
    assert picked == [s.sent_id for s in protocol_samples(iter_expressions(val_dir), "glamm", seed=0)]
    assert picked != [s.sent_id for s in protocol_samples(iter_expressions(val_dir), "glamm", seed=1)]
    records = []
    m = evaluate_split(
        model, val_dir, batch_size=5, progress=False, protocol="glamm", on_prediction=records.append
    )
    assert m["count"] == len(picked) and [r["sent_id"] for r in records] == picked
    every = evaluate_split(model, val_dir, progress=False)
    assert every["count"] == sum(per_image.values())  # the default stays every expression


def test_protocol_indices() -> None:
    assert protocol_indices("all", "a.jpg", 5) == [0, 1, 2, 3, 4]
    assert protocol_indices("glamm", "a.jpg", 3) == [0, 1, 2]  # fewer than 4: all of them, as GLaMM
    assert protocol_indices("glamm", "a.jpg", 2) == [0, 1]
    draws = {tuple(protocol_indices("glamm", f"{i}.jpg", 12, seed=0)) for i in range(20)}
    assert all(len(d) == 3 and list(d) == sorted(set(d)) and max(d) < 12 for d in draws)
    assert len(draws) > 10  # keyed by the image, not one draw for all
    assert protocol_indices("glamm", "a.jpg", 12, seed=0) == protocol_indices("glamm", "a.jpg", 12, seed=0)
    with pytest.raises(ValueError, match="protocol must be one of all, glamm"):
        protocol_indices("lisa", "a.jpg", 3)


def test_cli_writes_predictions_the_report_is_computed_from(tiny_checkpoint, synth_data, tmp_path, capsys):
    shards = synth_data[2]
    argv = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--shards", str(shards)]
    argv += ["--dataset", "synthref", "--splits", "testA", "val", "--out", str(tmp_path / "eval")]
    pred = tmp_path / "pred.jsonl"
    assert main([*argv, "--protocol", "glamm", "--protocol-seed", "3", "--predictions", str(pred)]) == 0
    md = capsys.readouterr().out
    assert "oIoU (= cIoU" in md and "mIoU (= gIoU" in md  # both conventions named
    assert "glamm: 3 expressions per image (all if fewer), drawn without replacement with seed 3" in md
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["metric_names"] == {"oIoU": "cIoU", "mIoU": "gIoU"}
    results = report["results"]["PPCR [glamm protocol, seed 3]"]
    lines = [json.loads(x) for x in pred.read_text().splitlines()]
    assert [(r["split"], r["sent_id"]) for r in lines] == sorted(
        ((r["split"], r["sent_id"]) for r in lines), key=lambda k: (["testA", "val"].index(k[0]), k[1])
    )  # sorted by split (as given) and sent_id: two runs diff line by line
    for split, metrics in metrics_from_predictions(pred).items():
        assert metrics == results[f"synthref/unc/{split}"]  # exactly, every metric
    assert main([*argv, "--protocol-seed", "3"]) == 2
    assert "--protocol-seed draws the expressions of --protocol glamm" in capsys.readouterr().err
