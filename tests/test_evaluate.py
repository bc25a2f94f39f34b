"""Evaluation covers every expression of a split; baselines behave as defined."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ppcr.data.shards import iter_expressions, read_image_rows
from ppcr.evaluate import evaluate_baselines, evaluate_split, mean_training_box


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
