"""The Ray Serve app over real HTTP: answers match the in-process API, bad input is a 4xx naming the
problem, overload is a 503 with Retry-After, concurrent requests are batched, the web page works in
headless Chromium, and a killed SAM replica is replaced. One app serves the whole module."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from ppcr.config import load_config  # noqa: E402
from ppcr.failures import ItemFailure  # noqa: E402
from ppcr.masks import decode_rle  # noqa: E402
from ppcr.mllm import PromptTokenizer  # noqa: E402
from ppcr.predictor import Segmenter  # noqa: E402
from ppcr.ray_cluster import init_ray  # noqa: E402
from ppcr.serve import HTTPError, Pipeline, free_port, make_app, resolve_settings, wait_healthy  # noqa: E402

APP = "ppcr-test"
LIMITS = {
    "max_pixels": 1_000_000,
    "max_body_bytes": 16 * 2**20,  # tiny_cpu.yaml's: a 15 MiB hostile upload must be under it
    "max_expression_chars": 200,
    "max_expressions": 4,
}
ONE = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
# Small ingress limits so overload is cheap to provoke: 4 in flight + 4 queued, the rest get 503.
OPTIONS = {"Ingress": {**ONE, "max_ongoing_requests": 4, "max_queued_requests": 4}, "MLLM": ONE, "SAM": ONE}


def _png(arr: np.ndarray | Image.Image, fmt: str = "PNG") -> bytes:
    im = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def _image(seed: int, h: int = 90, w: int = 120) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 110, np.uint8)
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    img[y : y + h // 3, x : x + w // 3] = rng.integers(0, 256, 3)
    return img


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def url(checkpoint):
    init_ray(num_cpus=4, object_store_mb=300)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        make_app({"checkpoint": str(checkpoint), "request_timeout_s": 20, **LIMITS}, OPTIONS),
        name=APP,
        route_prefix="/",
    )
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base)
    yield base
    serve.shutdown()
    ray.shutdown()


def _post(url: str, image: bytes, expression="the red block", timeout: float = 60) -> requests.Response:
    return requests.post(
        f"{url}/v1/segment", json={"image": _b64(image), "expression": expression}, timeout=timeout
    )


def test_answer_matches_in_process_api(url, checkpoint, one_thread):
    img = _image(1)
    r = _post(url, _png(img), "the red block")
    assert r.status_code == 200, r.text
    js = r.json()
    mask = decode_rle(js["mask"])
    assert mask.shape == img.shape[:2] == tuple(js["mask"]["size"])
    x1, y1, x2, y2 = js["box"]
    assert 0 <= x1 <= x2 <= img.shape[1] + 1e-3 and 0 <= y1 <= y2 <= img.shape[0] + 1e-3
    assert set(js["timings_ms"]) == {"decode_image", "mllm", "sam_encode", "sam_decode", "total"}
    # one_thread: the replicas' setting (ServeSettings.torch_threads), so the same kernels round alike.
    ref = Segmenter.from_checkpoint(checkpoint).segment(img, "the red block")
    assert (mask != ref.mask).mean() < 1e-3, "served mask differs from Segmenter's"
    np.testing.assert_allclose(js["box"], ref.box, atol=0.02)
    assert js["score"] == pytest.approx(ref.score, abs=1e-3)
    # The single-target model answers one instance: the union at the top is that instance.
    assert js["no_target"] is False and len(ref.instances) == 1
    assert js["instances"] == [{"box": js["box"], "mask": js["mask"], "score": js["score"]}]


def test_multipart_and_expression_list_give_the_single_answers(url):
    png = _png(_image(2))
    singles = [_post(url, png, e).json() for e in ("the red block", "the background")]
    r = requests.post(
        f"{url}/v1/segment",
        files={"image": ("a.png", png, "image/png")},
        data={"expression": ["the red block", "the background"]},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    listed = requests.post(
        f"{url}/v1/segment",
        json={"image": _b64(png), "expressions": ["the red block", "the background"]},
        timeout=60,
    ).json()
    for many in (r.json(), listed):
        assert len(many["results"]) == 2 and "box" not in many
        for got, single in zip(many["results"], singles):
            assert (decode_rle(got["mask"]) != decode_rle(single["mask"])).mean() < 1e-3
            np.testing.assert_allclose(got["box"], single["box"], atol=0.05)
    one = requests.post(
        f"{url}/v1/segment", files={"image": ("a.png", png)}, data={"expression": "the red block"}, timeout=60
    ).json()
    assert one["box"] == pytest.approx(singles[0]["box"], abs=0.05)


def test_sam_cache_hit_on_same_image(url):
    png = _png(_image(3))
    first, second = _post(url, png).json(), _post(url, png, "another object").json()
    assert first["sam_cache_hit"] is False and first["timings_ms"]["sam_encode"] > 0
    assert second["sam_cache_hit"] is True and second["timings_ms"]["sam_encode"] == 0


def _zero_width_png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def _gray16() -> bytes:
    return _png(Image.fromarray((np.arange(90 * 120).reshape(90, 120) * 6).astype(np.uint16)))


GOOD = _png(_image(4))
JSON = {"content-type": "application/json"}
# Texts that broke a batch or ran silently before (issues 16, 17.7, 17.8): (name, text, the 422's reason).
BAD_TEXTS = [
    ("surrogate", "the cup \udc00", "lone surrogate U+DC00"),  # sent as the JSON escape "\udc00"
    ("control", "the cup\x00", "control character U+0000"),
    ("eos", "the cup </s> on the left", "'</s>', a control token"),
    ("pad", "<pad> the cup", "'<pad>', a control token"),
    ("over-context", "\U0001f600" * 150, "context holds 512"),  # 150 characters, 600 byte tokens
]
# (id, request kwargs for requests.post, expected status, text the error must contain)
BAD = [
    ("not-json", {"data": b"{nope", "headers": JSON}, 400, "not valid JSON"),
    ("json-array", {"json": [1, 2]}, 400, "must be an object"),
    ("no-image", {"json": {"expression": "x"}}, 400, "'image'"),
    ("bad-base64", {"json": {"image": "@@not base64@@", "expression": "x"}}, 400, "not valid base64"),
    ("empty-image", {"json": {"image": "", "expression": "x"}}, 400, "'image'"),
    (
        "undecodable",
        {"json": {"image": _b64(b"hello, not an image" * 9), "expression": "x"}},
        422,
        "cannot decode",
    ),
    ("truncated", {"json": {"image": _b64(GOOD[: len(GOOD) // 2]), "expression": "x"}}, 422, "image"),
    ("zero-size", {"json": {"image": _b64(_zero_width_png()), "expression": "x"}}, 422, "image"),
    (
        "float-mode",
        {
            "json": {
                "image": _b64(_png(Image.fromarray(np.ones((9, 9), np.float32)), "TIFF")),
                "expression": "x",
            }
        },
        422,
        "unsupported image mode 'F'",
    ),  # fmt: skip
    (
        "over-pixels",
        {"json": {"image": _b64(_png(Image.new("1", (1001, 1000)))), "expression": "x"}},
        413,
        "1001x1000 exceeds 1000000 pixels",
    ),  # fmt: skip
    (
        "bomb",
        {"json": {"image": _b64(_png(Image.new("1", (15000, 15000)))), "expression": "x"}},
        413,
        "pixels",
    ),
    (
        "extreme-aspect",
        {"json": {"image": _b64(_png(np.zeros((1, 300, 3), np.uint8))), "expression": "x"}},
        422,
        "image: 300x1 has an aspect ratio of 300, over 20 (sizes are width x height",  # geometry's message
    ),  # fmt: skip
    (
        "body-too-big",
        {"data": b"x" * (16 * 2**20 + 1), "headers": JSON},
        413,
        "exceeds the limit of 16777216 bytes",
    ),
    (
        "empty-expression",
        {"json": {"image": _b64(GOOD), "expression": "  \n "}},
        422,
        "expression 0: expression is empty",
    ),  # fmt: skip
    (
        "long-expression",
        {"json": {"image": _b64(GOOD), "expression": "a" * 201}},
        422,
        "201 characters long; at most 200",
    ),  # fmt: skip
    ("reserved-token", {"json": {"image": _b64(GOOD), "expression": "the [SEG] dog"}}, 422, "reserved token"),
    *[
        (f"text-{name}", {"json": {"image": _b64(GOOD), "expression": text}}, 422, reason)
        for name, text, reason in BAD_TEXTS
    ],
    ("expression-not-str", {"json": {"image": _b64(GOOD), "expression": 7}}, 400, "must be a string"),
    (
        "both-fields",
        {"json": {"image": _b64(GOOD), "expression": "x", "expressions": ["y"]}},
        400,
        "exactly one",
    ),
    (
        "too-many",
        {"json": {"image": _b64(GOOD), "expressions": ["x"] * 5}},
        422,
        "5 expressions; send 1 to 4",
    ),
    ("no-expressions", {"json": {"image": _b64(GOOD), "expressions": []}}, 422, "0 expressions"),
    ("unknown-field", {"json": {"image": _b64(GOOD), "expression": "x", "mode": 1}}, 400, "unknown field"),
    ("text-plain", {"data": b"hello", "headers": {"content-type": "text/plain"}}, 415, "content type"),
    (
        "gzip-body",
        {"json": {"image": _b64(GOOD), "expression": "x"}, "headers": {"content-encoding": "gzip"}},
        415,
        "Content-Encoding 'gzip' is not accepted",
    ),
    ("nested-json", {"data": b"[" * 100_000 + b"]" * 100_000, "headers": JSON}, 400, "nested too deeply"),
    ("huge-int-json", {"data": b'{"image": 1' + b"0" * 5000 + b"}", "headers": JSON}, 400, "not valid JSON"),
    ("multipart-no-image", {"files": {"expression": (None, "x")}}, 400, "no 'image'"),
    ("multipart-no-expression", {"files": {"image": ("a.png", GOOD)}}, 400, "no 'expression'"),
    (
        "multipart-bad-boundary",
        {"data": b"--zz\r\nfoo", "headers": {"content-type": "multipart/form-data; boundary=qq"}},
        400,
        "multipart",
    ),  # fmt: skip
]


@pytest.mark.parametrize("kwargs,status,text", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_naming_the_problem(url, kwargs, status, text):
    r = requests.post(f"{url}/v1/segment", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    assert text in r.json()["error"]
    assert _post(url, GOOD).status_code == 200  # the app still answers


@pytest.mark.parametrize(
    "make",
    [
        lambda: _png(Image.fromarray(_image(5)).convert("L")),
        lambda: _png(Image.fromarray(_image(5)).convert("RGBA")),
        lambda: _png(Image.fromarray(_image(5)).convert("CMYK"), "JPEG"),
        _gray16,
    ],
    ids=["gray", "rgba", "cmyk", "16bit"],
)
def test_other_image_modes_are_converted(url, make):
    r = _post(url, make())
    assert r.status_code == 200, r.text
    assert r.json()["mask"]["size"] == [90, 120]


def test_wrong_method_and_path_are_4xx(url):
    assert requests.get(f"{url}/v1/segment", timeout=10).status_code == 405
    assert requests.get(f"{url}/nope", timeout=10).status_code == 404


def test_healthz_and_openapi(url, checkpoint):
    r = requests.get(f"{url}/healthz", timeout=10)
    health = r.json()
    assert r.status_code == 200 and health["status"] == "ok"
    assert health["checkpoint"] == str(checkpoint.resolve())
    model = health["model"]
    assert model["checkpoint"] == str(checkpoint.resolve()) and model["preset"] == "tiny"
    assert (
        model["random_weights"] is False and model["toy"] is True
    )  # the tiny preset has no pretrained LLaVA
    assert "toy model" in health["warning"]
    assert set(health["deployments"]) == {"Ingress", "MLLM", "SAM"}
    assert all(d["up"] and d["replicas"]["RUNNING"] >= 1 for d in health["deployments"].values())
    spec = requests.get(f"{url}/openapi.json", timeout=10).json()
    op = spec["paths"]["/v1/segment"]["post"]
    assert set(op["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert {"200", "413", "422", "503", "504"} <= set(op["responses"])
    # The answer's schema shows the instances and the no-target flag, at the top and in `results`.
    schemas = spec["components"]["schemas"]
    for name in ("SegmentResponse", "Found"):
        fields = schemas[name]["properties"]
        assert {"instances", "no_target", "box", "mask", "score"} <= set(fields), name
        assert "no target" in fields["no_target"]["description"]
    assert set(schemas["Instance"]["properties"]) == {"box", "mask", "score"}
    assert set(schemas["Found"]["required"]) >= {"mask", "no_target", "instances"}
    assert "swagger" in requests.get(f"{url}/docs", timeout=10).text.lower()


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_load_nothing_from_outside(url, page):
    """Before, /docs and /redoc took Swagger UI and ReDoc from a CDN: blank pages offline. Every script,
    style sheet and icon they load now comes from the app (the fastapi-offline package's assets)."""
    html = requests.get(f"{url}{page}", timeout=10).text
    assert not re.findall(r"https?://", html), re.findall(r"https?://[^\s\"']+", html)
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html) + re.findall(r"url: ?'([^']+)'", html)
    assets += re.findall(r"""spec-url=["']([^"']+)["']""", html)
    assert any(a.endswith(".js") for a in assets), html
    for asset in assets:
        r = requests.get(f"{url}{asset}", timeout=30)
        assert r.status_code == 200 and len(r.content) > 100, (asset, r.status_code)
        if asset.endswith((".js", ".css")):  # and they fetch nothing from elsewhere either
            assert not EXTERNAL_ASSET.findall(r.text), (asset, EXTERNAL_ASSET.findall(r.text))


# A URL in quotes (or CSS url()) naming a file a page would fetch: script, style, image or font.
EXTERNAL_ASSET = re.compile(r"""["'`(]https?://[^"'`) ]+\.(?:svg|png|jpe?g|gif|css|js|woff2?|ttf)["'`)]""")


def test_redoc_bundle_asks_no_cdn_for_its_logo():
    """fastapi-offline's ReDoc bundle loads its "powered by" logo from cdn.redoc.ly; the app's copy
    (what /redoc uses) has an inline blank image there, and no other external asset."""
    import fastapi_offline

    from ppcr.serve.app import offline_redoc_js

    vendored = (Path(fastapi_offline.__file__).parent / "static/redoc.standalone.js").read_text()
    served = offline_redoc_js().decode()
    assert EXTERNAL_ASSET.findall(vendored) == ['"https://cdn.redoc.ly/redoc/logo-mini.svg"']
    assert EXTERNAL_ASSET.findall(served) == [] and len(served) == pytest.approx(len(vendored), rel=0.01)


def test_random_init_is_announced_by_healthz(monkeypatch):
    monkeypatch.delenv("PPCR_CHECKPOINT", raising=False)
    status, health = Pipeline(None, None, asdict(resolve_settings({}))).health()
    assert status == 200 and health["checkpoint"] is None and "randomly initialised" in health["warning"]
    assert health["model"]["random_weights"] is True
    down = {"MLLM": {"up": False}, "SAM": {"up": True}}
    assert Pipeline(None, None, asdict(resolve_settings({}))).health(down)[0] == 503
    monkeypatch.setenv("PPCR_CHECKPOINT", "/models/ppcr")
    assert resolve_settings({}).checkpoint == "/models/ppcr"


TINY_PROMPTS = PromptTokenizer.from_config(load_config("tiny").model)  # the text rules without a checkpoint


class _Never:
    """A DeploymentResponse stand-in that never completes, or raises `exc`."""

    def __init__(self, exc: BaseException | None = None):
        self.exc, self.cancelled = exc, False

    def __await__(self):
        if self.exc is not None:
            raise self.exc
        yield from asyncio.sleep(3600).__await__()

    def cancel(self):
        self.cancelled = True


class _Handle:
    def __init__(self, exc=None):
        self.exc, self.calls = exc, []

    def __getattr__(self, name):
        handle = self

        class _Method:
            def remote(self, *args):
                handle.calls.append(_Never(handle.exc))
                return handle.calls[-1]

        return _Method()


@pytest.mark.parametrize(
    "exc,status",
    [
        (None, 504),
        (ray.serve.exceptions.BackPressureError(num_queued_requests=9, max_queued_requests=8), 503),
        (ray.exceptions.ActorDiedError(), 503),
    ],
    ids=["timeout", "backpressure", "replica-died"],
)
def test_slow_or_failing_stages_are_504_or_503_and_cancelled(exc, status):
    settings = asdict(resolve_settings({"checkpoint": "/x", "request_timeout_s": 0.3}))
    mllm, sam = _Handle(exc), _Handle(exc)
    with pytest.raises(HTTPError) as err:
        asyncio.run(Pipeline(mllm, sam, settings, TINY_PROMPTS, model={}).segment(GOOD, ["the dog"]))
    assert err.value.status == status
    if status == 503:
        assert err.value.headers == {"Retry-After": "1"}
    assert all(c.cancelled for c in mllm.calls + sam.calls)  # nothing left running on the replicas


def test_concurrent_requests_are_batched_and_overload_is_503(url):
    images = [_png(_image(100 + i)) for i in range(40)]
    with ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(lambda b: _post(url, b, timeout=120), images))
    codes = [a.status_code for a in answers]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) > 0, "40 concurrent requests against 4 + 4 ingress slots must be refused in part"
    assert all(a.headers.get("retry-after") == "1" for a in answers if a.status_code == 503)
    ok = [a.json() for a in answers if a.status_code == 200]
    assert len(ok) >= 4
    seen = [max(a["batch_sizes"].values()) for a in ok]
    assert max(seen) > 1, f"no request was batched: {seen}"


def test_bad_requests_never_fail_the_good_ones_batched_with_them(url):
    """Issue 16: 8 good requests sent together with 8 bad ones all get 200 and the answer they get
    alone (they did share batches: a batch size > 1 is seen); each bad one gets its 422. Before, a
    lone surrogate reached the MLLM replica and failed its whole batch with a 500. The bad texts now
    stop at the ingress; the next test covers requests that fail inside a model batch."""
    goods = [(_png(_image(300 + i % 4)), ["the red block", "the background"][i % 2]) for i in range(8)]
    alone = [_post(url, png, text).json() for png, text in goods]
    bads = [(GOOD, text, reason) for _, text, reason in BAD_TEXTS * 2][:8]
    jobs = [("good", i, png, text) for i, (png, text) in enumerate(goods)]
    jobs += [("bad", i, png, text) for i, (png, text, _) in enumerate(bads)]
    jobs = [jobs[k] for k in np.random.default_rng(0).permutation(len(jobs))]
    mllm = serve.get_deployment_handle("MLLM", APP)
    # Whether requests share a batch depends on timing (batch_wait_timeout_s = 0): a replica busy with
    # a blocker gathers the burst, and a burst that still ran one by one (a loaded machine) is resent.
    # Every attempt's answers are checked; only the batching is retried.
    batched = 0
    for _burst in range(5):
        blocker = mllm.reason.remote("blocker", _image(499), ["the background"] * 4)
        with ThreadPoolExecutor(len(jobs)) as pool:  # the test app admits 4 + 4: the rest retry its 503s
            answers = list(pool.map(lambda j: (j, _post_retrying(url, j[2], j[3])), jobs))
        blocker.result(timeout_s=60)
        for (kind, i, _, _), r in answers:
            if kind == "bad":
                assert r.status_code == 422, r.text
                assert bads[i][2] in r.json()["error"]
                continue
            assert r.status_code == 200, r.text
            got, want = r.json(), alone[i]
            assert (decode_rle(got["mask"]) != decode_rle(want["mask"])).mean() < 1e-3
            np.testing.assert_allclose(got["box"], want["box"], atol=0.05)
            batched = max(batched, got["batch_sizes"]["mllm"])
        if batched > 1:
            break
    assert batched > 1, "no good request ran in an MLLM batch larger than one, in 5 bursts"


def _post_retrying(url: str, image: bytes, expression: str, tries: int = 60) -> requests.Response:
    """POST, retrying the ingress's overload 503 (the test app admits 4 + 4 requests at a time)."""
    for _ in range(tries):
        r = _post(url, image, expression)
        if r.status_code != 503:
            return r
        time.sleep(0.2)
    return r


def test_a_failing_request_fails_alone_inside_a_model_batch(url):
    """The replica's safety net, below the ingress's checks: requests that fail inside the MLLM's
    batch (an image array the model cannot take, sent straight to the deployment) are split out
    of it and fail alone; the good requests of that batch get the answer they get alone."""
    handle = serve.get_deployment_handle("MLLM", APP)
    good = [(f"k{i}", _image(400 + i), ["the red block"]) for i in range(5)]
    bad = ("bad", np.zeros((20, 20, 3), np.float64), ["the red block"])  # float64: not an image
    alone = [handle.reason.remote(*g).result(timeout_s=60) for g in good]
    before = handle.stats.remote().result(timeout_s=30)["split_sizes"].get("reason", [])
    for _ in range(5):  # a busy replica forms the burst into one batch; retried if it did not
        blocker = handle.reason.remote("blocker", _image(499), ["the background"] * 3)
        calls = [handle.reason.remote(*args) for args in [good[0], good[1], bad, *good[2:]]]
        blocker.result(timeout_s=60)
        got = [c.result(timeout_s=60) for c in calls]
        after = handle.stats.remote().result(timeout_s=30)["split_sizes"].get("reason", [])
        batched = [r for r in got[:2] + got[3:] if isinstance(r, dict) and r["batch"] > 1]
        if any(n > 1 for n in after[len(before) :]) and batched:
            break
    assert any(n > 1 for n in after[len(before) :]), f"no batch with the bad request was split: {after}"
    # Under load some good requests may be dispatched alone; at least one shared a batch.
    assert batched, "no good request ran in a batch larger than one"
    failure = got[2]
    assert isinstance(failure, ItemFailure) and not failure.input_error  # a fault, not the client's input
    assert failure.message.startswith("TypeError: ") and "\n" not in failure.message
    for r, want in zip(got[:2] + got[3:], alone):
        assert isinstance(r, dict)
        np.testing.assert_allclose(r["semantic"], want["semantic"], atol=1e-4)
        np.testing.assert_allclose(r["box"], want["box"], atol=1e-4)
    # The replica's own text rules: a bad text fails its request before the batch runs (no split).
    text = handle.reason.remote("t", _image(401), ["the cup \udc00"]).result(timeout_s=60)
    assert text == ItemFailure(
        True, "expression 0: expression is not valid Unicode text: lone surrogate U+DC00 at character 8"
    )


def _multipart(image: bytes, expression: str = "the red block") -> tuple[bytes, dict]:
    boundary = "ppcr-test-boundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
    tail = f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="expression"\r\n\r\n{expression}'
    body = head.encode() + image + (tail + f"\r\n--{boundary}--\r\n").encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


def _latencies_during(url: str, upload: bytes | None, headers: dict | None = None) -> tuple[list[float], int]:
    """/healthz latencies (s), polled every 20 ms while `upload` is POSTed (or for 1 s without one),
    and the upload's status."""
    done, latencies, status = threading.Event(), [], 0

    def poll() -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            assert requests.get(f"{url}/healthz", timeout=60).status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        if upload is None:
            time.sleep(1.0)
        else:
            status = requests.post(f"{url}/v1/segment", data=upload, headers=headers, timeout=120).status_code
    finally:
        done.set()
        poller.join()
    return latencies, status


def test_a_hostile_upload_does_not_stall_the_ingress(url):
    """Issue 17.6: 15 MiB of line breaks as a multipart image made a concurrent /healthz wait 13 s, the
    time the stdlib email parser took on the ingress's event loop. Parsing and decoding now run off
    the loop (and python-multipart takes milliseconds): health checks during the hostile upload are as
    fast as during a benign upload of the same size, measured in this test (generous bounds)."""
    size = 15 * 2**20
    hostile, headers = _multipart(b"\r\n" * (size // 2))
    benign, _ = _multipart(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    idle, _ = _latencies_during(url, None)
    during_benign, status_benign = _latencies_during(url, benign, headers)
    during_hostile, status_hostile = _latencies_during(url, hostile, headers)
    assert status_benign == status_hostile == 422  # neither is an image
    assert during_hostile, "no health check completed during the hostile upload"
    baseline = max(max(idle), max(during_benign, default=0.0))
    print(
        f"\nhealthz max: idle {max(idle):.3f} s, benign upload {baseline:.3f} s, hostile {max(during_hostile):.3f} s"
    )
    assert max(during_hostile) < 1.0 + 3 * baseline, (max(during_hostile), baseline, max(idle))
    r = requests.post(f"{url}/v1/segment", data=_multipart(GOOD)[0], headers=headers, timeout=60)
    assert r.status_code == 200, r.text


def test_multipart_parser_answers_every_malformed_body_with_a_400():
    """parse_multipart over 2,000 seeded mutations of a good body, and bodies python-multipart refuses
    with its own error types (a 5,000-character boundary raised FormParserError, a 500, in the fuzz)."""
    from ppcr.serve.schema import parse_multipart

    body, headers = _multipart(GOOD[:200], "the cup")
    ctype = headers["content-type"]
    assert parse_multipart(body, ctype) == (GOOD[:200], ["the cup"], False)
    rng = np.random.default_rng(17)
    for _ in range(2000):
        x = bytearray(body)
        for _ in range(int(rng.integers(1, 8))):
            at = int(rng.integers(len(x)))
            op = rng.random()
            if op < 0.4:
                x[at] = int(rng.integers(256))
            elif op < 0.7:
                del x[at : at + int(rng.integers(1, 20))]
            else:
                x[at:at] = rng.bytes(int(rng.integers(1, 10)))
        try:
            parse_multipart(bytes(x), ctype)
        except HTTPError as exc:
            assert exc.status == 400 and exc.message
    for bad_ctype, message in [
        ("multipart/form-data; boundary=" + "b" * 5000, "Boundary length 5000"),
        ("multipart/form-data", "no boundary"),
    ]:
        with pytest.raises(HTTPError, match=message) as err:
            parse_multipart(body, bad_ctype)
        assert err.value.status == 400
    boundary = ctype.split("boundary=")[1]
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="expression"\r\n\r\nx\r\n'.encode()
    with pytest.raises(HTTPError, match="more than 64 parts"):
        parse_multipart(part * 70 + f"--{boundary}--\r\n".encode(), ctype)
    with pytest.raises(HTTPError, match="Content-Transfer-Encoding 'base64'"):
        parse_multipart(
            body.replace(
                b"Content-Disposition", b"Content-Transfer-Encoding: base64\r\nContent-Disposition", 1
            ),
            ctype,
        )


class _Answers:
    """A stand-in handle whose calls all answer `value` (a model stage's per-request answer)."""

    def __init__(self, value):
        self.value = value

    def __getattr__(self, name):
        value = self.value

        class _Method:
            def remote(self, *args):
                async def answer():
                    return value

                return _Awaitable(answer())

        return _Method()


class _Awaitable:
    def __init__(self, coro):
        self.coro = coro

    def __await__(self):
        return self.coro.__await__()

    def cancel(self):
        pass


@pytest.mark.parametrize(
    "failure,status,body",
    [
        (ItemFailure(True, "expression 0: no"), 422, "expression 0: no"),
        (
            ItemFailure(False, "RuntimeError: CUDA error"),
            500,
            "internal error in the MLLM stage: RuntimeError: CUDA error",
        ),
    ],
    ids=["input", "fault"],
)
def test_a_stage_failure_is_a_422_or_a_500(failure, status, body):
    settings = asdict(resolve_settings({"checkpoint": "/x"}))
    with pytest.raises(HTTPError) as err:
        asyncio.run(
            Pipeline(_Answers(failure), _Answers({}), settings, TINY_PROMPTS, model={}).segment(
                GOOD, ["the dog"]
            )
        )
    assert (err.value.status, err.value.message) == (status, body)


def _wire_answer(boxes: list[tuple[int, int, int, int]], scores: list[float], hw=(90, 120)) -> dict:
    """A SAM replica's answer (`inference.encode_answer`) with one instance per box (none: no target)."""
    from ppcr.inference import Instance, Segmentation, encode_answer

    instances = []
    for (x1, y1, x2, y2), score in zip(boxes, scores):
        mask = np.zeros(hw, bool)
        mask[y1:y2, x1:x2] = True
        instances.append(Instance(mask, np.array([x1, y1, x2, y2], float), score))
    return encode_answer(Segmentation.of(instances, hw))


def test_no_target_and_several_instances_reach_the_http_json():
    """Whatever the model answers (here stand-in replicas: none, two, one), the JSON says so: `instances`
    with each mask, box and score, `no_target`, and the union at the top; null box and score for none."""
    from ppcr.serve.schema import SegmentResponse

    settings = asdict(resolve_settings({"checkpoint": "/x"}))
    reasoned = {"semantic": np.zeros((3, 8), np.float32), "box": None, "ms": 1.0, "batch": 1}
    answers = [
        _wire_answer([], []),
        _wire_answer([(10, 10, 30, 40), (60, 50, 100, 80)], [0.9, 0.6]),
        _wire_answer([(5, 6, 20, 30)], [0.75]),
    ]
    decoded = {"results": answers, "cache_hit": False, "encode_ms": 2.0, "decode_ms": 3.0}
    decoded["batch"] = {"sam_encode": 1, "sam_decode": 1}
    pipeline = Pipeline(_Answers(reasoned), _Answers(decoded), settings, TINY_PROMPTS, model={})
    out = asyncio.run(pipeline.segment(GOOD, ["the cat", "both squares", "the circle"]))
    # What the route sends: its response model, unset fields left out (`response_model_exclude_unset`).
    body = json.loads(SegmentResponse.model_validate(out).model_dump_json(exclude_unset=True))
    none, two, one = body["results"]
    assert none["no_target"] is True and none["instances"] == []
    assert none["box"] is None and none["score"] is None  # said, as null, not left out
    assert none["mask"]["size"] == [90, 120] and not decode_rle(none["mask"]).any()
    assert two["no_target"] is False and [i["score"] for i in two["instances"]] == [0.9, 0.6]
    assert [i["box"] for i in two["instances"]] == [[10, 10, 30, 40], [60, 50, 100, 80]]
    assert two["box"] == [10, 10, 100, 80] and two["score"] == pytest.approx(0.75)
    union = decode_rle(two["instances"][0]["mask"]) | decode_rle(two["instances"][1]["mask"])
    np.testing.assert_array_equal(decode_rle(two["mask"]), union)
    assert one["instances"] == [{"box": one["box"], "mask": one["mask"], "score": one["score"]}]
    # One expression: the answer at the top level, no results list.
    single = Pipeline(
        _Answers(reasoned), _Answers({**decoded, "results": answers[:1]}), settings, TINY_PROMPTS, model={}
    )
    out = asyncio.run(single.segment(GOOD, ["the cat"]))
    out.update(out.pop("results")[0])  # as the route does for one expression
    body = json.loads(SegmentResponse.model_validate(out).model_dump_json(exclude_unset=True))
    assert "results" not in body and body["no_target"] is True and body["box"] is None


def test_an_unexpected_replica_error_answers_one_line_without_traceback():
    """A RayTaskError's text is the replica's traceback in terminal colours: the 500 names its cause only."""
    from starlette.requests import Request

    from ppcr.serve.app import _internal_error

    cause = ValueError("shapes (3,) and (4,) differ")
    remote = ray.exceptions.RayTaskError(
        "MLLM.reason",
        "\x1b[36mTraceback (most recent call last):\x1b[0m\n  File x.py\nValueError: ...",
        cause,
    )
    request = Request({"type": "http", "method": "POST", "path": "/v1/segment", "headers": []})
    response = asyncio.run(_internal_error(request, remote))
    body = json.loads(response.body)
    assert response.status_code == 500
    assert body == {"error": "internal error: ValueError: shapes (3,) and (4,) differ"}


@pytest.mark.slow  # starts a headless Chromium
def test_web_page_in_headless_chromium(url, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("needs Debian's chromium package (apt-get install -y chromium)")
    page = f"{url}/?example=1&expression=the+red+circle"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=30000", "--dump-dom", page]  # fmt: skip
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert 'data-state="done"' in dom, dom[-2000:]
    api = requests.post(
        f"{url}/v1/segment",
        files={"image": ("e.png", requests.get(f"{url}/example.png", timeout=10).content)},
        data={"expression": "the red circle"},
        timeout=60,
    ).json()
    # The page decoded the RLE itself: its pixel count must be pycocotools' count.
    assert f'data-mask-pixels="{int(decode_rle(api["mask"]).sum())}"' in dom


def test_cli_segment_with_server(url, tmp_path, capsys):
    from ppcr.cli import main

    path = tmp_path / "in.png"
    path.write_bytes(_png(_image(7)))
    assert (
        main(["segment", str(path), "the red block", "--server", url, "--out", str(tmp_path / "o.png")]) == 0
    )
    printed = json.loads(capsys.readouterr().out.splitlines()[0])
    api = _post(url, path.read_bytes()).json()
    assert printed["box"] == pytest.approx(api["box"], abs=0.01)
    assert printed["mask_pixels"] == int(decode_rle(api["mask"]).sum())
    assert printed["no_target"] is False
    assert printed["instances"] == [{k: printed[k] for k in ("box", "score", "mask_pixels")}]
    assert Image.open(tmp_path / "o.png").size[0] > 0
    assert main(["segment", str(path), "   ", "--server", url]) == 2
    err = capsys.readouterr().err
    assert "server answered 422" in err and "expression is empty" in err


@pytest.mark.slow  # kills a replica and waits for Serve to replace it
def test_killed_sam_replica_is_replaced(url):
    """Last in the module: kills the SAM replica's process under load."""
    handle = serve.get_deployment_handle("SAM", APP)
    pid = handle.pid.remote().result(timeout_s=30)
    stop = threading.Event()
    log = []  # (start, end, status)
    bodies = {}  # status -> a response body, so a failure says what the server answered

    def client(i: int) -> None:
        png = _png(_image(1000 + i))
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                response = _post(url, png, timeout=40)
                status = response.status_code
                if status != 200:
                    bodies.setdefault(status, response.text[:500])
            except requests.Timeout:
                status = "hang"
            log.append((t0, time.monotonic(), status))

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client, i) for i in range(3)]
        time.sleep(2)
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        while time.monotonic() - t_kill < 35 and not any(s == 200 and t0 > t_kill for t0, _, s in log):
            time.sleep(0.2)
        time.sleep(1)
        stop.set()
        for f in futures:
            f.result(timeout=60)
    statuses = {s for _, _, s in log}
    assert statuses <= {200, 503, 504}, (statuses, bodies)  # never a 500, never a hang
    assert all(end - start < 35 for start, end, _ in log)
    recovered = [end for start, end, s in log if s == 200 and start > t_kill]
    assert recovered and min(recovered) - t_kill < 30, log
    assert handle.pid.remote().result(timeout_s=30) != pid
