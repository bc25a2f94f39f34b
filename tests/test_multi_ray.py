"""A multi-target model on Ray: over real HTTP, a no-target answer and a two-object answer travel MLLM
replica -> SAM replica (none: no decoder work; two: both boxes) and reach the JSON, `ppcr segment
--server` and the web page as the in-process `Segmenter` gives them; `ppcr batch` writes them and
`evaluate --ray` scores a generalized split as `ppcr evaluate` does. Slow tier: one Ray cluster, one
served app of the tiny `multi_checkpoint` (conftest)."""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil

import numpy as np
import pytest
import requests
from conftest import multi_image_png

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from ppcr.masks import decode_rle  # noqa: E402
from ppcr.predictor import Segmenter  # noqa: E402
from ppcr.ray_cluster import init_ray  # noqa: E402
from ppcr.serve import free_port, make_app, wait_healthy  # noqa: E402

pytestmark = pytest.mark.slow
ONE = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}


@pytest.fixture(scope="module")
def url(multi_checkpoint):
    # 6 logical CPUs: the app's replicas hold 2, the batch job's two actor pools 2 and its decode tasks 1.
    init_ray(num_cpus=6, object_store_mb=300)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = make_app({"checkpoint": str(multi_checkpoint[0])}, {"Ingress": ONE, "MLLM": ONE, "SAM": ONE})
    serve.run(app, name="ppcr-multi-test", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base)
    yield base
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def expected(multi_checkpoint):
    roles = multi_checkpoint[1]
    texts = [roles["none"], roles["two"]]
    answers = Segmenter.from_checkpoint(multi_checkpoint[0]).segment_batch([multi_image_png()] * 2, texts)
    return dict(zip(texts, answers))


def _same(js: dict, want) -> None:
    assert js["no_target"] is want.no_target and len(js["instances"]) == len(want.instances)
    assert (decode_rle(js["mask"]) != want.mask).mean() < 1e-3
    if want.no_target:
        assert js["box"] is None and js["score"] is None and js["instances"] == []
        return
    np.testing.assert_allclose(js["box"], want.box, atol=0.05)
    for got, w in zip(js["instances"], want.instances):
        assert (decode_rle(got["mask"]) != w.mask).mean() < 1e-3
        np.testing.assert_allclose(got["box"], w.box, atol=0.05)
        assert got["score"] == pytest.approx(w.score, abs=1e-3)


def test_http_answers_none_and_two_as_the_segmenter(url, expected):
    png = base64.b64encode(multi_image_png()).decode()
    texts = list(expected)
    for text in texts:  # one expression: the answer at the top level
        r = requests.post(f"{url}/v1/segment", json={"image": png, "expression": text}, timeout=60)
        assert r.status_code == 200, r.text
        _same(r.json(), expected[text])
    r = requests.post(f"{url}/v1/segment", json={"image": png, "expressions": texts}, timeout=60)
    assert r.status_code == 200, r.text
    for js, text in zip(r.json()["results"], texts):
        _same(js, expected[text])
    # A request whose every expression has no target runs no mask decoder, and still answers in full.
    none = [t for t in texts if expected[t].no_target]
    r = requests.post(f"{url}/v1/segment", json={"image": png, "expressions": none * 2}, timeout=60).json()
    assert [a["no_target"] for a in r["results"]] == [True, True] and r["timings_ms"]["total"] > 0


def test_cli_segment_with_server_prints_the_instances(url, expected, tmp_path, capsys):
    from ppcr.cli import main

    (tmp_path / "a.png").write_bytes(multi_image_png())
    for text, want in expected.items():
        assert main(["segment", str(tmp_path / "a.png"), text, "--server", url]) == 0
        printed = json.loads(capsys.readouterr().out.splitlines()[0])
        assert printed["no_target"] is want.no_target and len(printed["instances"]) == len(want.instances)


@pytest.mark.skipif(
    shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
    reason="needs Debian's chromium package (apt-get install -y chromium)",
)
def test_the_page_shows_no_match_and_both_objects(url, expected):
    pytest.importorskip("playwright")
    from ppcr.web.screenshots import chromium

    texts = list(expected)
    with chromium() as page:
        page.goto(url)
        page.wait_for_selector("#gallery button")
        page.set_input_files(
            "#file", files=[{"name": "a.png", "mimeType": "image/png", "buffer": multi_image_png()}]
        )
        page.wait_for_function("document.getElementById('image-name').textContent.startsWith('a.png')")
        page.fill("#phrases", "\n".join(texts))
        page.click("#go")
        page.wait_for_function("document.body.dataset.state === 'done'", timeout=120_000)
        cards = page.locator("#cards .card")
        for i, text in enumerate(texts):
            want = expected[text]
            card = cards.nth(i)
            assert card.get_attribute("data-no-target") == str(want.no_target).lower()
            assert card.get_attribute("data-instances") == str(len(want.instances))
            assert abs(int(card.get_attribute("data-mask-pixels")) - int(want.mask.sum())) <= 5
            if want.no_target:
                assert "No match" in card.inner_text()
            else:
                assert card.locator(".instance").count() == len(want.instances) == 2


def test_the_batch_job_writes_none_and_two(url, multi_checkpoint, expected, tmp_path):
    """`ppcr batch` through Ray Data: each row's instances and no_target are the Segmenter's."""
    import pyarrow.parquet as pq

    from ppcr.batch import run_batch

    (tmp_path / "a.png").write_bytes(multi_image_png())
    lines = [{"id": f"e{i}", "image": "a.png", "expression": t} for i, t in enumerate(expected)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = run_batch(tmp_path / "m.jsonl", tmp_path / "out", multi_checkpoint[0], progress=False)
    assert (summary.done, summary.errors) == (2, 0)
    for row in pq.read_table(tmp_path / "out" / "results").to_pylist():
        want = expected[row["expression"]]
        assert row["no_target"] is want.no_target and len(row["instances"]) == len(want.instances)
        assert (decode_rle(row["mask"]) != want.mask).mean() < 1e-3
        for got, w in zip(row["instances"], want.instances):
            assert (decode_rle(got["mask"]) != w.mask).mean() < 1e-3


def test_distributed_evaluate_of_a_generalized_split_equals_single_process(url, multi_checkpoint, tmp_path):
    from ppcr.batch import evaluate_shards
    from ppcr.checkpoint import load_checkpoint
    from ppcr.data.shards import prepare_shards, shard_dir
    from ppcr.data.synth import SynthConfig, synthesize
    from ppcr.evaluate import evaluate_split

    synth = SynthConfig(num_images=6, seed=3, min_objects=3, max_objects=3, relations=False)
    synth = dataclasses.replace(synth, generalized=True, dataset="synthgref")
    summary = synthesize(tmp_path / "refer", synth)
    prepare_shards(
        tmp_path / "refer", summary["images_dir"], "synthgref", "unc", tmp_path / "s", progress=False
    )
    split = shard_dir(tmp_path / "s", "synthgref", "unc", "val")
    lines: list[dict] = []
    got = evaluate_shards(
        multi_checkpoint[0], [split], progress=False, generalized=["val"], on_prediction=lines.append
    )["val"]
    want = evaluate_split(load_checkpoint(multi_checkpoint[0]), split, progress=False)
    assert got["count"] == want["count"] > 0 and set(want) <= set(got)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-6), k
    assert len(lines) == got["count"]
    for r in lines:  # each line: the answer's instances and their union
        union = np.zeros(r["mask"]["size"], bool)
        for i in r["instances"]:
            union |= decode_rle(i["mask"])
        np.testing.assert_array_equal(decode_rle(r["mask"]), union)
