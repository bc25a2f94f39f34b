"""HTTP client of the serving app (`ppcr segment IMAGE "expression" --server URL`); needs only `requests`.

answer = segment_remote("http://127.0.0.1:8000", Path("dog.jpg").read_bytes(), "the dog on the left")
mask = ppcr.decode_rle(answer["mask"])     # bool H×W; answer["box"] is pixel XYXY, answer["score"] the IoU
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import requests


class ServerError(RuntimeError):
    """The server answered with an error status; the message carries its `{"error": ...}` text."""

    def __init__(self, status: int, message: str):
        super().__init__(f"server answered {status}: {message}")
        self.status = status


def segment_remote(
    server: str, image: bytes, expression: str | Sequence[str], timeout_s: float = 60.0
) -> dict:
    """POST /v1/segment as JSON. One expression -> {"box", "mask", "score", ...}; a list -> {"results": [...]}."""
    body = {"image": base64.b64encode(image).decode("ascii")}
    if isinstance(expression, str):
        body["expression"] = expression
    else:
        body["expressions"] = list(expression)
    r = requests.post(f"{server.rstrip('/')}/v1/segment", json=body, timeout=timeout_s)
    if r.status_code != 200:
        try:
            message = r.json().get("error", r.text)
        except ValueError:
            message = r.text
        raise ServerError(r.status_code, message)
    return r.json()
