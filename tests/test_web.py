"""The web page as a person uses it, in headless Chromium (Debian's `chromium`, driven by Playwright):
drop and paste an image, several phrases at once, layer toggles, downloads checked against the API,
each error state, the model banners, the keyboard, and /docs offline. Slow tier: one served app."""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
import requests
from PIL import Image

pytest.importorskip("playwright")
ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from ppcr.masks import decode_rle  # noqa: E402
from ppcr.ray_cluster import init_ray  # noqa: E402
from ppcr.serve import free_port, make_app, wait_healthy  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
        reason="needs Debian's chromium package (apt-get install -y chromium)",
    ),
]
ONE = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
PHRASES = ["the red block", "the background", "the blue square"]


@pytest.fixture(scope="module")
def url(tiny_checkpoint):
    init_ray(num_cpus=4, object_store_mb=300)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        make_app({"checkpoint": str(tiny_checkpoint)}, {"Ingress": ONE, "MLLM": ONE, "SAM": ONE}),
        name="ppcr-web-test",
        route_prefix="/",
    )
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base)
    yield base
    serve.shutdown()
    ray.shutdown()


@pytest.fixture
def page(url):
    from ppcr.web.screenshots import chromium

    with chromium() as p:
        p.goto(url)
        p.wait_for_selector("#gallery button")
        p.wait_for_function("!document.getElementById('banner').textContent.startsWith('Asking')")
        yield p


def _png() -> bytes:
    img = np.full((90, 120, 3), 110, np.uint8)
    img[10:40, 15:60] = (220, 30, 30)
    img[50:85, 70:115] = (30, 60, 220)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def _drop(page, data: bytes, name: str = "dropped.png", event: str = "drop") -> None:
    """Drop (or paste) a file as the browser does: a DataTransfer holding it, in a drop / paste event."""
    page.evaluate(
        """([b64, name, event]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: "image/png"}));
            const ev = event === "drop"
                ? new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true})
                : new ClipboardEvent("paste", {clipboardData: dt, bubbles: true, cancelable: true});
            (event === "drop" ? document.getElementById("drop") : document).dispatchEvent(ev);
        }""",
        [base64.b64encode(data).decode(), name, event],
    )
    page.wait_for_function(
        f"document.getElementById('image-name').textContent.startsWith({json.dumps(name)})"
    )


def _segment(page, phrases: list[str], state: str = "done") -> None:
    page.fill("#phrases", "\n".join(phrases))
    page.click("#go")
    page.wait_for_function(f"document.body.dataset.state === '{state}'", timeout=120_000)


def _canvas_equals_plain_image(page) -> bool:
    """Whether the canvas shows the image alone (drawn at the page's scale), no overlay pixel."""
    return page.evaluate(
        """async () => {
            const c = document.getElementById("canvas");
            const plain = document.createElement("canvas");
            plain.width = c.width; plain.height = c.height;
            const ctx = plain.getContext("2d");
            const im = new Image();
            im.src = window.__imageUrl;
            await im.decode();
            ctx.drawImage(im, 0, 0, c.width, c.height);
            const a = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            const b = ctx.getImageData(0, 0, c.width, c.height).data;
            let diff = 0;
            for (let i = 0; i < a.length; i++) diff = Math.max(diff, Math.abs(a[i] - b[i]));
            return diff <= 2;
        }"""
    )


def test_drop_several_phrases_toggle_and_download_match_the_api(page, url, tmp_path):
    png = _png()
    _drop(page, png)
    _segment(page, PHRASES)
    cards = page.locator("#cards .card")
    assert cards.count() == 3
    assert [cards.nth(i).get_attribute("data-phrase") for i in range(3)] == PHRASES
    colours = [cards.nth(i).evaluate("e => e.style.getPropertyValue('--c')") for i in range(3)]
    assert colours == ["#E69F00", "#56B4E9", "#009E73"]  # Okabe-Ito, one per phrase
    api = requests.post(
        f"{url}/v1/segment",
        json={"image": base64.b64encode(png).decode(), "expressions": PHRASES},
        timeout=60,
    ).json()["results"]
    for i, answer in enumerate(api):
        assert int(cards.nth(i).get_attribute("data-mask-pixels")) == int(decode_rle(answer["mask"]).sum())

    # The mask PNG of the second answer: its pixels are the API's RLE, exactly.
    with page.expect_download() as download:
        cards.nth(1).locator("button.mask-png").click()
    path = tmp_path / download.value.suggested_filename
    download.value.save_as(path)
    assert path.name == "mask-2-the-background.png"
    got = np.asarray(Image.open(path).convert("L")) > 127
    np.testing.assert_array_equal(got, decode_rle(api[1]["mask"]).astype(bool))
    # The answer JSON keeps the RLE.
    with page.expect_download() as download:
        cards.nth(2).locator("button.json").click()
    saved = json.loads(open(download.value.path()).read())
    assert saved["mask"] == api[2]["mask"] and saved["phrase"] == PHRASES[2]
    assert saved["box"] == pytest.approx(api[2]["box"], abs=0.05)
    with page.expect_download() as download:
        page.click("#download-overlay")
    overlay = Image.open(download.value.path())
    assert overlay.size[0] >= 120 and overlay.size[0] / overlay.size[1] == pytest.approx(120 / 90, rel=0.02)

    # Layers: every overlay off (or masks at opacity 0) shows the image alone; any layer on changes it.
    page.evaluate(
        "b64 => { window.__imageUrl = URL.createObjectURL("
        "new Blob([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))])); }",
        base64.b64encode(png).decode(),
    )
    assert not _canvas_equals_plain_image(page)
    for box in ("#show-outline", "#show-box", "#show-label"):
        page.uncheck(box)
    assert not _canvas_equals_plain_image(page)  # masks still drawn
    page.fill("#opacity", "0")
    page.dispatch_event("#opacity", "input")
    assert _canvas_equals_plain_image(page)
    page.fill("#opacity", "60")
    page.dispatch_event("#opacity", "input")
    page.uncheck("#show-mask")
    assert _canvas_equals_plain_image(page)
    page.check("#show-box")
    assert not _canvas_equals_plain_image(page)

    # The image stays for the next phrases; the history keeps both answers and restores the first.
    _segment(page, ["the red block"])
    assert page.locator("#cards .card").count() == 1
    assert page.locator("#history button").count() == 2
    page.click("#history-box summary")
    page.locator("#history button").nth(1).click()
    assert page.locator("#cards .card").count() == 3


def _injected(boxes_per_phrase: list[list[tuple[int, int, int, int]]]) -> dict:
    """A /v1/segment answer as the app sends it (`encode_answer` then the ingress's `_wire`), one
    entry per phrase with one object per box (none: no target), on `_png()`'s 120×90 image."""
    from ppcr.inference import Instance, Segmentation, encode_answer
    from ppcr.serve.app import _wire

    results = []
    for boxes in boxes_per_phrase:
        found = []
        for k, (x1, y1, x2, y2) in enumerate(boxes):
            mask = np.zeros((90, 120), bool)
            mask[y1:y2, x1:x2] = True
            found.append(Instance(mask, np.array([x1, y1, x2, y2], float), 0.9 - 0.2 * k))
        results.append(_wire(encode_answer(Segmentation.of(found, (90, 120)))))
    timings = {"decode_image": 1.0, "mllm": 2.0, "sam_encode": 3.0, "sam_decode": 4.0, "total": 10.0}
    return {"results": results, "timings_ms": timings, "sam_cache_hit": False, "batch_sizes": {"mllm": 1}}


def test_no_match_and_several_objects_are_shown_and_picked_out(page, tmp_path):
    """An answer with no object says "No match" (card, canvas label, announcement); one with two lists
    each object with its own colour and score, highlights it on hover, focus or click, and its mask
    PNG is the union; one with one object looks as it always did. (The server here answers through a
    stand-in, so the page is tested on every shape of answer; tests/test_serve_multi.py serves a real
    multi-target model.)"""
    phrases = ["the cat", "both blocks", "the red block"]
    answer = _injected([[], [(15, 10, 60, 40), (70, 50, 115, 85)], [(15, 10, 60, 40)]])
    page.route("**/v1/segment", lambda route: route.fulfill(json=answer))
    _drop(page, _png())
    _segment(page, phrases)
    cards = page.locator("#cards .card")
    assert cards.count() == 3
    none, two, one = (cards.nth(i) for i in range(3))
    assert none.get_attribute("data-no-target") == "true" and "no-match" in none.get_attribute("class")
    assert "No match" in none.inner_text() and none.get_attribute("data-mask-pixels") == "0"
    assert two.get_attribute("data-no-target") == "false" and two.get_attribute("data-instances") == "2"
    assert "2 objects" in two.inner_text()
    objects = two.locator(".instance")
    assert objects.count() == 2 and one.locator(".instance").count() == 0
    colours = [objects.nth(k).evaluate("e => e.style.getPropertyValue('--c').trim()") for k in range(2)]
    assert colours == ["#E69F00", "#56B4E9"]  # each object its own Okabe-Ito colour
    assert one.evaluate("e => e.style.getPropertyValue('--c')") == "#009E73"  # the next one
    wire = answer["results"][1]
    for k in range(2):
        assert int(objects.nth(k).get_attribute("data-mask-pixels")) == int(
            decode_rle(wire["instances"][k]["mask"]).sum()
        )
        assert float(objects.nth(k).get_attribute("data-score")) == wire["instances"][k]["score"]
    status = page.inner_text("#status")
    assert "the cat: no match" in status and "both blocks: 2 objects (scores 0.90, 0.70)" in status
    assert "the cat: no match" in page.get_attribute("#canvas", "aria-label")

    # Hover, focus and click pick one object out; the canvas changes and says which.
    plain = page.evaluate("document.getElementById('canvas').toDataURL()")
    objects.nth(1).locator("button").hover()
    assert page.get_attribute("#canvas", "data-highlight") == "1-1"
    assert page.evaluate("document.getElementById('canvas').toDataURL()") != plain
    page.mouse.move(0, 0)
    assert page.get_attribute("#canvas", "data-highlight") is None
    assert page.evaluate("document.getElementById('canvas').toDataURL()") == plain
    objects.nth(0).locator("button").focus()
    assert page.get_attribute("#canvas", "data-highlight") == "1-0"
    objects.nth(0).locator("button").click()
    assert objects.nth(0).locator("button").get_attribute("aria-pressed") == "true"
    page.mouse.move(0, 0)
    page.focus("#phrases")
    assert page.get_attribute("#canvas", "data-highlight") == "1-0"  # pinned
    assert "Highlighted both blocks #1" in page.inner_text("#status")
    objects.nth(0).locator("button").click()
    page.focus("#phrases")
    assert page.get_attribute("#canvas", "data-highlight") is None
    assert objects.nth(0).locator("button").get_attribute("aria-pressed") == "false"

    # Downloads: the mask PNG of several objects is their union; the JSON keeps every object.
    with page.expect_download() as download:
        two.locator("button.mask-png").click()
    got = np.asarray(Image.open(download.value.path()).convert("L")) > 127
    np.testing.assert_array_equal(got, decode_rle(wire["mask"]))
    with page.expect_download() as download:
        two.locator("button.json").click()
    saved = json.loads(open(download.value.path()).read())
    assert saved["no_target"] is False and [o["mask"] for o in saved["instances"]] == [
        o["mask"] for o in wire["instances"]
    ]
    with page.expect_download() as download:
        none.locator("button.json").click()
    saved = json.loads(open(download.value.path()).read())
    assert saved["no_target"] is True and saved["instances"] == [] and saved["box"] is None


def test_file_picker_paste_and_keyboard(page):
    page.set_input_files("#file", files=[{"name": "picked.png", "mimeType": "image/png", "buffer": _png()}])
    page.wait_for_function("document.getElementById('image-name').textContent.startsWith('picked.png')")
    _drop(page, _png(), name="pasted image", event="paste")
    page.fill("#phrases", "the red block")
    page.focus("#phrases")
    page.keyboard.press("Control+Enter")
    page.wait_for_function("document.body.dataset.state === 'done'", timeout=120_000)
    assert "1 answer" in page.inner_text("#status")  # the aria-live region announces it
    assert page.get_attribute("#status", "aria-live") == "polite"
    # A gallery example by keyboard alone: focus, Enter.
    page.focus('#gallery button[data-name="scene-2"]')
    page.keyboard.press("Enter")
    page.wait_for_function("document.getElementById('image-name').textContent.startsWith('scene-2')")
    assert page.input_value("#phrases").strip(), "the example fills in its phrases"


def test_a_dropped_file_that_is_not_an_image_is_an_input_error(page):
    page.evaluate(
        """() => {
            const dt = new DataTransfer();
            dt.items.add(new File(["just text"], "notes.txt", {type: "text/plain"}));
            document.getElementById("drop").dispatchEvent(
                new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
        }"""
    )
    page.wait_for_function("document.body.dataset.state === 'error'")
    error = page.locator("#error")
    assert error.get_attribute("data-kind") == "input" and error.get_attribute("role") == "alert"
    assert "notes.txt is not an image this browser can show (text/plain)" in error.inner_text()
    _drop(page, _png())  # an image after it clears the error
    assert page.locator("#error").is_hidden()


def test_busy_state_while_the_server_works(page):
    """While a request is out: a spinner, the button disabled, the stage aria-busy; then all undone."""
    _drop(page, _png())
    # Hold the page's requests 1.5 s in the browser, so the busy state is there to be seen.
    page.evaluate(
        "() => { const f = window.fetch; window.fetch = (u, o) => "
        "new Promise((r) => setTimeout(r, 1500)).then(() => f(u, o)); }"
    )
    page.fill("#phrases", "the red block")
    page.click("#go")
    assert page.evaluate("document.body.dataset.state") == "busy"
    assert page.is_disabled("#go") and page.locator("#spinner").is_visible()
    assert page.get_attribute("#stage", "aria-busy") == "true"
    page.wait_for_function("document.body.dataset.state === 'done'", timeout=120_000)
    assert page.is_enabled("#go") and page.locator("#spinner").is_hidden()
    assert page.get_attribute("#stage", "aria-busy") is None


@pytest.mark.parametrize(
    "kind, route, expected",
    [
        ("network", lambda r: r.abort(), "Cannot reach the server"),
        (
            "server-text",
            lambda r: r.fulfill(status=503, body="no healthy replicas", content_type="text/plain"),
            "overloaded or starting (503): no healthy replicas",
        ),
        ("server-json", None, "could not use this request (422): expression 0:"),
    ],
)
def test_error_states_have_a_human_message_and_no_stale_overlay(page, kind, route, expected):
    _drop(page, _png())
    _segment(page, ["the red block"])
    assert page.locator("#cards .card").count() == 1
    if route is not None:
        page.route("**/v1/segment", route)
        _segment(page, ["the red block"], state="error")
    else:  # the real server's 422 for a reserved token
        _segment(page, ["the [SEG] block"], state="error")
    error = page.locator("#error")
    assert error.get_attribute("data-kind") == kind and error.get_attribute("role") == "alert"
    assert expected in error.inner_text()
    assert "Failed to fetch" not in error.inner_text() and "JSON" not in error.inner_text()
    assert page.locator("#cards .card").count() == 0  # no stale answer under the error
    assert page.get_attribute("#canvas", "data-mask-pixels") is None
    page.unroute("**/v1/segment")
    _segment(page, ["the red block"])  # and the page recovers
    assert page.locator("#error").is_hidden()


def test_banners_say_which_model_answers(url, tiny_checkpoint):
    from ppcr.web.screenshots import chromium

    with chromium() as page:
        page.goto(url)
        page.wait_for_selector('#banner[data-kind="toy"]')
        assert str(tiny_checkpoint.resolve()) in page.inner_text("#banner")
        assert "no training record or evaluation numbers" in page.inner_text("#banner")  # no meta.json
        _drop(page, _png(), name="photo.png")  # an upload: not one of the synthetic scenes
        assert page.locator("#toy-banner").is_visible()
        assert "toy model" in page.inner_text("#toy-banner")
        page.click('#gallery button[data-name="scene-1"]')
        page.wait_for_function("document.getElementById('image-name').textContent.startsWith('scene-1')")
        assert page.locator("#toy-banner").is_hidden()

    def random_health(route):
        body = route.fetch().json()
        body["model"] = {**body["model"], "random_weights": True, "checkpoint": None}
        route.fulfill(json=body)

    with chromium() as page:
        page.route("**/healthz", random_health)
        page.goto(url)
        page.wait_for_selector('#banner[data-kind="random"]')
        assert "RANDOM WEIGHTS" in page.inner_text("#banner")
        assert "loud" in page.get_attribute("#banner", "class")


def test_gallery_lists_scenes_and_photos(url):
    cat = requests.get(f"{url}/examples", timeout=30).json()
    kinds = [e["kind"] for e in cat["examples"]]
    assert kinds.count("synthetic") >= 3 and all(e["phrases"] for e in cat["examples"])
    if cat["photos"] == "available":
        assert "photo" in kinds
    else:
        assert "scikit-image" in cat["photos"]
    for e in cat["examples"][:5]:
        r = requests.get(url + e["url"], timeout=30)
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size[0] > 0
    assert requests.get(f"{url}/examples/nope.png", timeout=30).status_code == 404


@pytest.mark.parametrize("path, ready", [("/docs", ".swagger-ui .info .title"), ("/redoc", ".api-info h1")])
def test_api_docs_render_with_the_internet_cut_off(url, path, ready):
    from ppcr.web.screenshots import chromium

    with chromium() as page:
        outside = []

        def local_only(route):
            if route.request.url.startswith(url):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        page.route("**/*", local_only)
        page.goto(url + path)
        page.wait_for_selector(ready, timeout=60_000)
        assert "ppcr referring image segmentation" in page.inner_text(ready)
        # Nothing goes out (ReDoc's own bundle asked its CDN for a logo; the app's copy does not).
        assert outside == []


def test_phone_layout_fits_the_screen(url):
    from ppcr.web.screenshots import PHONE, chromium

    with chromium(PHONE) as page:
        page.goto(url)
        page.wait_for_selector("#gallery button")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], f"the page is {width} px wide on a {PHONE['width']} px phone"


def test_screenshots_script_shoots_each_main_state(url, tmp_path):
    """docs/images/page_*.png are the script's output (python -m ppcr.web.screenshots), not drawn by
    hand: it writes the same set of states, each a real page of the served app."""
    from pathlib import Path

    from ppcr.web.screenshots import shoot

    written = shoot(url, tmp_path)
    committed = sorted(p.name for p in (Path(__file__).parent.parent / "docs/images").glob("page_*.png"))
    assert sorted(p.name for p in written) == committed
    for p in written:
        with Image.open(p) as im:
            assert im.size[0] in (390, 1280) and im.size[1] >= 600, (p.name, im.size)
