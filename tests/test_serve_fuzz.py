"""Issue 16.4: a few hundred generated malformed requests against the served app (loopback only).

Seeded generation, bounded in count and time: mutated and truncated images of six formats, weird
texts, wrong JSON types, wrong methods and paths, hostile headers and bodies (some sent as raw bytes,
which no HTTP client library would send). Eight clients send them at once while a poller checks
/healthz. Nothing may answer >= 500 other than a 503 for overload, the health checks stay fast, and
a real photograph segmented afterwards gets the answer it got before. docs/serving.md records the
counts of a run.
"""

from __future__ import annotations

import base64
import io
import json
import random
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pytest
import requests
from PIL import Image

ray = pytest.importorskip("ray")
skimage_data = pytest.importorskip("skimage.data")
from ray import serve  # noqa: E402

from ppcr.masks import decode_rle  # noqa: E402
from ppcr.ray_cluster import init_ray  # noqa: E402
from ppcr.serve import free_port, make_app, wait_healthy  # noqa: E402

pytestmark = pytest.mark.slow  # its own app, and ~300 requests of which many run the model

SEED = 16
CLIENTS = 8
ONE = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
# tiny_cpu.yaml's ingress limits: 8 clients and the health poller always find a slot.
OPTIONS = {"Ingress": {**ONE, "max_ongoing_requests": 32, "max_queued_requests": 32}, "MLLM": ONE, "SAM": ONE}
LIMITS = {"max_pixels": 1_000_000, "max_body_bytes": 4 * 2**20, "max_expressions": 4, "request_timeout_s": 60}
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP")


@pytest.fixture(scope="module")
def app(tiny_checkpoint):
    init_ray(num_cpus=4, object_store_mb=300)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        make_app({"checkpoint": str(tiny_checkpoint), **LIMITS}, OPTIONS), name="ppcr-fuzz", route_prefix="/"
    )
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base)
    yield base, port
    serve.shutdown()
    ray.shutdown()


@dataclass
class Case:
    kind: str
    method: str = "POST"
    path: str = "/v1/segment"
    json_body: object = None
    data: bytes | None = None
    files: dict | None = None
    form: dict | None = None
    headers: dict = field(default_factory=dict)
    raw: bytes | None = None  # sent on a bare socket, as is


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _mutations(rng: random.Random, data: bytes) -> list[bytes]:
    n = len(data)
    flipped = bytearray(data)
    for _ in range(8):
        flipped[rng.randrange(n)] = rng.randrange(256)
    inserted = bytearray(data)
    at = rng.randrange(n)
    inserted[at:at] = rng.randbytes(rng.randint(1, 64))
    return [
        data[: rng.randrange(1, n)],  # truncated anywhere
        data[: n // 2],
        data[:32],  # the header only
        bytes(flipped),
        bytes(inserted),
        data + data,  # two files back to back
        data[: n // 3] + rng.randbytes(n // 3),
        bytes(b ^ 0xFF for b in data[:64]) + data[64:],  # a broken magic number
    ]


WEIRD_TEXTS = [
    "the cup \udc00",
    "\ud800",
    "\udfff\ud800 reversed pair",
    "the\x00cup",
    "\x1b[31mred\x1b[0m",
    "bell\x07",
    "\x7f\x80\x9f",
    "the cup </s> on the left",
    "<s> the cup",
    "<unk>",
    "<pad><pad>",
    "[SEG]",
    "[BOX] box",
    "<image>",
    "<sem> x",
    "<im_start>",
    "x" * 300,  # over max_expression_chars
    "\U0001f600" * 200,  # over the context in tokens, under nothing else
    "",
    " \t\n\r ",
    "\u202ethe cup on the left\u202c",  # right-to-left override: text, answered
    "zero\u200bwidth\u200d joiner\ufeff",
    "\u0645\u06cc\u200c\u0631\u0648\u062f",  # Persian with a zero-width non-joiner
    "e\u0301" * 60,  # combining accents
    "\uffff\ufffe noncharacters",
    "\ue000 private use",
    "%s%n{expr}{0}",
    "'; DROP TABLE images; --",
    "<script>alert(1)</script>",
    "the cup\r\n\r\nHTTP/1.1 200 OK",
    "\u2028line\u2029paragraph",
    "the red block",  # a plain one among them
]

WRONG_JSON = [
    {"image": 1, "expression": "x"},
    {"image": [], "expression": "x"},
    {"image": None, "expression": "x"},
    {"image": {"b64": "x"}, "expression": "x"},
    {"image": True, "expression": "x"},
    {"expression": "x"},
    {"image": "data:image/png;base64,", "expression": "x"},
    {"image": "@@@", "expression": "x"},
    {"image": "QUJD\nREVG", "expression": "x"},
    {"image": "-_-_", "expression": "x"},
    {"image": "GOOD", "expression": 1},
    {"image": "GOOD", "expression": None},
    {"image": "GOOD", "expression": ["x"]},
    {"image": "GOOD", "expression": {"text": "x"}},
    {"image": "GOOD", "expression": 1.5},
    {"image": "GOOD", "expressions": "x"},
    {"image": "GOOD", "expressions": [1, 2]},
    {"image": "GOOD", "expressions": [[]]},
    {"image": "GOOD", "expressions": [None]},
    {"image": "GOOD", "expressions": []},
    {"image": "GOOD", "expressions": ["x"] * 100},
    {"image": "GOOD", "expression": "x", "expressions": ["y"]},
    {"image": "GOOD", "expression": "x", "extra": 1},
    {"image": "GOOD"},
    [],
    "a string",
    12,
    None,
    True,
]


def _cases(rng: random.Random, good_png: bytes) -> list[Case]:
    photo = np.asarray(Image.fromarray(skimage_data.coffee()).resize((96, 64)))
    cases: list[Case] = []
    for fmt in FORMATS:
        encoded = _encode(photo, fmt)
        for data in _mutations(rng, encoded) + _mutations(rng, encoded):
            if rng.random() < 0.5:
                cases.append(Case(f"image-{fmt}", json_body={"image": _b64(data), "expression": "the cup"}))
            else:
                files = {"image": ("x", data, f"image/{fmt.lower()}")}
                cases.append(Case(f"image-{fmt}", files=files, form={"expression": "the cup"}))
    # Valid files of odd shapes and modes: answered or refused, never a fault.
    for arr in (
        np.zeros((1, 1, 3), np.uint8),
        np.zeros((1, 400, 3), np.uint8),
        np.zeros((1000, 1001, 3), np.uint8),
    ):
        cases.append(Case("image-shape", json_body={"image": _b64(_encode(arr, "PNG")), "expression": "x"}))
    for text in WEIRD_TEXTS:
        cases.append(Case("text", json_body={"image": _b64(good_png), "expression": text}))
        utf8 = text.encode("utf-8", "surrogatepass")  # a surrogate's bytes are not UTF-8: 400
        cases.append(Case("text", files={"image": ("a.png", good_png), "expression": (None, utf8)}))
    for raw_text in (b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"ok\x00", "caf\xe9".encode("latin-1")):
        cases.append(Case("text-bytes", files={"image": ("a.png", good_png), "expression": (None, raw_text)}))
    for body in WRONG_JSON:
        if isinstance(body, dict) and body.get("image") == "GOOD":
            body = {**body, "image": _b64(good_png)}
        cases.append(
            Case("json-types", data=json.dumps(body).encode(), headers={"content-type": "application/json"})
        )
    for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"):
        cases.append(Case("method", method=method))
    for path in ("/healthz", "/", "/docs", "/example.png"):
        cases.append(Case("method", path=path, json_body={"image": _b64(good_png), "expression": "x"}))
    for path in ("/v1/segment/", "/v1/segment/x", "/V1/SEGMENT", "/..%2f..%2fetc%2fpasswd", "/%00", "/" + "a" * 4000,
                 "/v1/segment?expression=x", "/v1//segment"):  # fmt: skip
        cases.append(Case("path", path=path, json_body={"image": _b64(good_png), "expression": "the cup"}))
    body = json.dumps({"image": _b64(good_png), "expression": "the cup"}).encode()
    for ctype in ("application/json; charset=utf-16", "application/jsonx", "text/plain", "", "*/*",
                  "application/x-www-form-urlencoded", "multipart/form-data", "multipart/form-data; boundary=",
                  "multipart/form-data; boundary=" + "b" * 5000, "multipart/mixed; boundary=x", "image/png"):  # fmt: skip
        cases.append(Case("header", data=body, headers={"content-type": ctype}))
    for headers in ({"content-encoding": "gzip"}, {"expect": "100-continue"}, {"x-" + "a" * 100: "b" * 8000},
                    {f"x-h{i}": "v" for i in range(80)}, {"transfer-encoding": "identity"}):  # fmt: skip
        cases.append(Case("header", data=body, headers={"content-type": "application/json", **headers}))
    hostile = [
        rng.randbytes(2000),
        b"[" * 100_000 + b"]" * 100_000,  # nested beyond the parser's recursion limit
        b'{"image": 1' + b"0" * 5000 + b"}",  # an integer over Python's 4,300-digit limit
        b'{"image": NaN, "expression": Infinity}',
        b" " * 3_000_000,
        b'{"image": "a", "image": "b", "expression": "x"}',
        "\ufeff".encode() + body,
        json.dumps({"image": _b64(good_png), "expression": "x"}).encode("utf-16"),
        b"\x00" * 1000,
        body[: len(body) // 2],
    ]
    for data in hostile:
        cases.append(Case("body", data=data, headers={"content-type": "application/json"}))
    boundary = "fz"
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="expression"\r\n\r\nx\r\n'
    image_part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"\r\n\r\n'.encode() + good_png + b"\r\n"
    )
    multipart = [
        image_part + (part * 300).encode() + f"--{boundary}--\r\n".encode(),  # too many parts
        image_part
        + f"--{boundary}\r\nContent-Disposition: form-data\r\n\r\nx\r\n--{boundary}--\r\n".encode(),
        image_part
        + f"--{boundary}\r\nContent-Transfer-Encoding: base64\r\n"
        f'Content-Disposition: form-data; name="expression"\r\n\r\neA==\r\n--{boundary}--\r\n'.encode(),
        image_part + part.encode(),  # no closing boundary
        b"\r\n" * 500_000,  # line breaks only (issue 17.6)
        image_part + image_part + part.encode() + f"--{boundary}--\r\n".encode(),  # two images
        rng.randbytes(5000),
        f"--{boundary}\r\n".encode() + b"X-Long: " + b"a" * 10_000 + b"\r\n\r\n--fz--\r\n",
    ]
    for data in multipart:
        cases.append(
            Case(
                "multipart", data=data, headers={"content-type": f"multipart/form-data; boundary={boundary}"}
            )
        )
    # Raw bytes on a socket: framing no client library would produce.
    req = b"POST /v1/segment HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    for raw in (
        req + b"Content-Length: abc\r\n\r\n{}",
        req + b"Content-Length: -5\r\n\r\n{}",
        req + b"Content-Length: \xb2\r\n\r\n{}",
        req + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        req + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        req + b"Transfer-Encoding: chunked\r\n\r\n" + b"2\r\n{}\r\n" * 10 + b"0\r\n\r\n",
        req + b"Bad Header Line\r\nContent-Length: 2\r\n\r\n{}",
        req + b"X: " + b"a" * 100_000 + b"\r\nContent-Length: 2\r\n\r\n{}",
        b"POST /v1/segment HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",  # HTTP/1.1 without Host
        b"GET /healthz\r\n\r\n",  # HTTP/0.9 style
        b"BREW /v1/segment HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/segment HTTP/9.9\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
        rng.randbytes(300),
        b"\r\n" * 1000,
    ):
        cases.append(Case("raw", raw=raw))
    # Some good requests among them: the fuzz must not fail these either.
    for i in range(16):
        cases.append(
            Case(
                "good",
                json_body={"image": _b64(_encode(np.roll(photo, 7 * i, 1), "PNG")), "expression": "the cup"},
            )
        )
    rng.shuffle(cases)
    return cases


def _send_raw(port: int, raw: bytes) -> str:
    head = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
            while b"\r\n" not in head and len(head) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
        except (ConnectionError, TimeoutError):
            return "closed"
    if not head.startswith(b"HTTP/") or b"\r\n" not in head:
        return "closed"  # the server dropped a request it could not frame
    return head.split(b"\r\n", 1)[0].split(b" ")[1].decode()


def _send(url: str, port: int, case: Case) -> str:
    if case.raw is not None:
        return _send_raw(port, case.raw)
    try:
        r = requests.request(
            case.method,
            url + case.path,
            json=case.json_body,
            data=case.data if case.files is None else case.form,
            files=case.files,
            headers=case.headers,
            timeout=90,
        )
    except requests.ConnectionError:
        return "closed"
    if r.status_code >= 500 and r.status_code != 503:
        return f"{r.status_code} {r.text[:300]}"
    return str(r.status_code)


def test_fuzzed_requests_get_no_5xx_and_leave_the_app_answering(app):
    url, port = app
    photo = _encode(skimage_data.astronaut(), "PNG")
    before = requests.post(
        url + "/v1/segment", json={"image": _b64(photo), "expression": "the person"}, timeout=60
    )
    assert before.status_code == 200, before.text
    good_png = _encode(
        np.asarray(Image.fromarray(skimage_data.camera()).convert("RGB").resize((64, 64))), "PNG"
    )
    cases = _cases(random.Random(SEED), good_png)
    assert 250 <= len(cases) <= 400

    idle = []
    for _ in range(10):
        t0 = time.perf_counter()
        requests.get(url + "/healthz", timeout=30)
        idle.append(time.perf_counter() - t0)
    done, health = threading.Event(), []

    def poll() -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            status = requests.get(url + "/healthz", timeout=60).status_code
            health.append((status, time.perf_counter() - t0))
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    t0 = time.perf_counter()
    poller.start()
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            statuses = list(pool.map(lambda c: (c.kind, _send(url, port, c)), cases))
    finally:
        done.set()
        poller.join()
    seconds = time.perf_counter() - t0

    counts = Counter(s for _, s in statuses)
    by_kind = Counter(f"{k} {s}" for k, s in statuses)
    print(f"\nfuzz: {len(cases)} requests in {seconds:.1f} s; {dict(sorted(counts.items()))}")
    print(f"by kind: {dict(sorted(by_kind.items()))}")
    latencies = [s for _, s in health]
    print(f"healthz: {len(health)} checks, max {max(latencies):.3f} s, idle max {max(idle):.3f} s")
    faults = [(k, s) for k, s in statuses if not (s in ("closed", "503") or s.isdigit() and int(s) < 500)]
    assert not faults, faults
    assert all(k != "good" or s in ("200", "503") for k, s in statuses)
    assert {s for s, _ in health} == {200}
    assert max(latencies) < 2.0 + 10 * max(idle), (max(latencies), max(idle))

    after = requests.post(
        url + "/v1/segment", json={"image": _b64(photo), "expression": "the person"}, timeout=60
    )
    assert after.status_code == 200, after.text
    a, b = after.json(), before.json()
    assert (decode_rle(a["mask"]) != decode_rle(b["mask"])).mean() < 1e-3
    np.testing.assert_allclose(a["box"], b["box"], atol=0.05)
    assert a["score"] == pytest.approx(b["score"], abs=1e-3)
