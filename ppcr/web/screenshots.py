"""Screenshots of the web page's main states, for docs/images/ (regenerated, never drawn by hand).

    python -m ppcr.web.screenshots --checkpoint demo_out/checkpoint --out docs/images

Serves the checkpoint on a free local port (ppcr.serve.start), drives the page in headless Chromium
(Debian's `chromium` package, through Playwright, which the dev extra installs) and writes one PNG per
state: the start page, a synthetic scene with several phrases, a photograph under the toy-model
warning, an error, the random-weights banner, the phone layout, and an answer with no object beside
one with two. The error, random-weights and no-object/two-object states are produced by answering
the page's requests in the browser (Playwright routes), as the browser tests do: the last one
rewrites the server's two answers as a multi-target model answers (`none_and_two`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}


@contextlib.contextmanager
def chromium(viewport: dict | None = None) -> Iterator:
    """A Playwright page in headless Chromium (the system's `chromium`); FileNotFoundError without it."""
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise FileNotFoundError("needs Chromium: apt-get install -y chromium")
    with sync_playwright() as p:
        # Generous timeouts: on a small, busy machine Chromium takes tens of seconds to start.
        browser = p.chromium.launch(
            executable_path=exe, args=["--no-sandbox", "--disable-dev-shm-usage"], timeout=180_000
        )
        try:
            context = browser.new_context(viewport=viewport or DESKTOP, accept_downloads=True)
            context.set_default_timeout(60_000)
            yield context.new_page()
        finally:
            browser.close()


def wait_done(page, state: str = "done", timeout_ms: float = 120_000) -> None:
    page.wait_for_function(
        f"document.body.dataset.state === {json.dumps(state)}", timeout=timeout_ms, polling=100
    )


def pick_example(page, name: str) -> None:
    page.click(f'#gallery button[data-name="{name}"]')
    page.wait_for_function(
        f"document.getElementById('image-name').textContent.startsWith({json.dumps(name)})", timeout=60_000
    )


def small(path: Path, colours: int = 128) -> None:
    """Rewrite a screenshot as a palette PNG (a few hundred KB of true colour become ~100 KB): the
    committed images stay small, and text and flat colours survive the palette."""
    from PIL import Image

    with Image.open(path) as im:
        im.convert("RGB").quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            path, optimize=True
        )


def none_and_two(body: dict) -> dict:
    """A /v1/segment answer to two phrases rewritten as a multi-target model (`model.targets: multi`)
    answers: the first phrase with no object, the second with both answers' objects and their union
    (`inference.Segmentation.of`, the server's own wire form)."""
    import numpy as np

    from ..inference import Instance, Segmentation, encode_answer
    from ..masks import decode_rle
    from ..serve.app import _wire

    first, second = body["results"]
    hw = first["mask"]["size"]
    found = [
        Instance(decode_rle(i["mask"]), np.asarray(i["box"], float), i["score"])
        for answer in (first, second)
        for i in answer["instances"]
    ]
    results = [
        _wire(encode_answer(Segmentation.of([], hw))),
        _wire(encode_answer(Segmentation.of(found, hw))),
    ]
    return {**body, "results": results}


def shoot(url: str, out: Path) -> list[Path]:
    """Drive the page at `url` through its main states; one PNG per state in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(page, name: str) -> None:
        # The gallery's thumbnails load lazily, and the photographs are rendered on first request:
        # a full-page shot taken before they arrive shows empty tiles.
        page.evaluate("document.querySelectorAll('#gallery img').forEach((i) => { i.loading = 'eager'; })")
        page.wait_for_function(
            "[...document.querySelectorAll('#gallery img')].every((i) => i.complete && i.naturalWidth > 0)",
            timeout=120_000,
        )
        path = out / f"page_{name}.png"
        page.screenshot(path=str(path), full_page=True)
        small(path)
        written.append(path)

    with chromium() as page:
        page.goto(url)
        page.wait_for_selector("#gallery button")
        page.wait_for_function("!document.getElementById('banner').textContent.startsWith('Asking')")
        save(page, "1_start")
        pick_example(page, "scene-1")
        page.click("#go")
        wait_done(page)
        save(page, "2_synthetic_scene")
        page.route("**/v1/segment", lambda route: route.fulfill(json=none_and_two(route.fetch().json())))
        page.fill("#phrases", "the purple star\nall the circles")
        page.click("#go")
        wait_done(page)
        page.locator("#cards .card").nth(1).locator(".instance button").nth(1).hover()
        save(page, "7_no_match_and_two_objects")
        page.unroute("**/v1/segment")
        page.mouse.move(0, 0)
        if page.locator('#gallery button[data-name="astronaut"]').count():
            pick_example(page, "astronaut")
            page.click("#go")
            wait_done(page)
            save(page, "3_photo_toy_warning")
        page.route("**/v1/segment", lambda route: route.abort())
        page.click("#go")
        wait_done(page, "error")
        save(page, "4_server_gone")
        page.unroute("**/v1/segment")

    with chromium() as page:

        def random_health(route):
            body = route.fetch().json()
            body["model"] = {**body["model"], "random_weights": True, "checkpoint": None}
            route.fulfill(json=body)

        page.route("**/healthz", random_health)
        page.goto(url)
        page.wait_for_selector('#banner[data-kind="random"]')
        pick_example(page, "scene-2")
        page.click("#go")
        wait_done(page)
        save(page, "5_random_weights")

    with chromium(PHONE) as page:
        page.goto(url)
        page.wait_for_selector("#gallery button")
        pick_example(page, "scene-3")
        page.click("#go")
        wait_done(page)
        save(page, "6_phone")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ppcr.web.screenshots", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="inference checkpoint to serve (the demo's)")
    ap.add_argument("--out", default="docs/images", help="folder for the PNGs (default: docs/images)")
    ap.add_argument("--url", default=None, help="use this running server instead of starting one")
    a = ap.parse_args(argv)
    if a.url:
        paths = shoot(a.url.rstrip("/"), Path(a.out))
    else:
        import ray
        from ray import serve

        from ..serve import free_port, start, wait_healthy

        one = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
        url = start({"checkpoint": a.checkpoint}, port=free_port(), name="ppcr-screenshots", num_cpus=4,
                    options={"Ingress": one, "MLLM": one, "SAM": one})  # fmt: skip
        try:
            wait_healthy(url)
            paths = shoot(url, Path(a.out))
        finally:
            serve.shutdown()
            ray.shutdown()
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
