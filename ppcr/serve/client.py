"""HTTP client of the serving app (`ppcr segment IMAGE "expression" --server URL`); needs only `requests`.

answer = segment_remote("http://127.0.0.1:8000", Path("dog.jpg").read_bytes(), "the dog on the left")
mask = ppcr.decode_rle(answer["mask"])     # bool H×W, the union of answer["instances"]' masks
if answer["no_target"]: ...                # nothing fits: no instances, box and score None
for obj in answer["instances"]: ...        # each {"mask": RLE, "box": pixel XYXY, "score": SAM's IoU}
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


class ServerUnreachable(RuntimeError):
    """No answer from the server: refused, unknown host, timed out, or not a valid URL (one line, without
    the HTTP library's retry text)."""


def _unreachable(server: str, exc: requests.RequestException, timeout_s: float) -> ServerUnreachable:
    if isinstance(exc, requests.Timeout):
        return ServerUnreachable(f"{server} did not answer within {timeout_s:g} s")
    if isinstance(
        exc,
        (
            requests.exceptions.InvalidURL,
            requests.exceptions.MissingSchema,
            requests.exceptions.InvalidSchema,
        ),
    ):
        return ServerUnreachable(f"{server} is not a valid http(s) URL, e.g. http://127.0.0.1:8000")
    if isinstance(exc, requests.ConnectionError):
        text = str(exc)
        if "Name or service not known" in text or "nodename nor servname" in text or "getaddrinfo" in text:
            why = "unknown host"
        elif "refused" in text.lower():
            why = "connection refused"
        elif "reset" in text.lower() or "aborted" in text.lower():
            why = "the connection was closed"
        else:
            why = "no connection"
        return ServerUnreachable(f"cannot reach {server} ({why}): is `ppcr serve` running there?")
    return ServerUnreachable(f"cannot reach {server} ({type(exc).__name__})")


def segment_remote(
    server: str, image: bytes, expression: str | Sequence[str], timeout_s: float = 60.0
) -> dict:
    """POST /v1/segment as JSON. One expression -> {"box", "mask", "score", "no_target", "instances", ...}
    (docs/serving.md); a list -> {"results": [one such answer per expression], ...}.
    Raises ServerError (an error status, with the server's message) or ServerUnreachable (no answer)."""
    body = {"image": base64.b64encode(image).decode("ascii")}
    if isinstance(expression, str):
        body["expression"] = expression
    else:
        body["expressions"] = list(expression)
    try:
        r = requests.post(f"{server.rstrip('/')}/v1/segment", json=body, timeout=timeout_s)
    except requests.RequestException as exc:
        raise _unreachable(server, exc, timeout_s) from None
    try:
        answer = r.json()
    except ValueError:
        answer = None
    if r.status_code != 200:
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            raise ServerError(r.status_code, answer["error"])
        text = r.text.strip()
        if r.headers.get("content-type", "").startswith("text/plain") and text and "\n" not in text:
            raise ServerError(r.status_code, text[:300])  # Serve's own answers, e.g. its overload 503
        raise ServerError(r.status_code, f"{r.reason or 'an error'}, {_not_ppcr(server, r)}")
    keys = ("results",) if "expressions" in body else ("mask", "box", "score", "no_target", "instances")
    if not (isinstance(answer, dict) and all(k in answer for k in keys)):
        raise ServerError(r.status_code, f"not a segmentation, {_not_ppcr(server, r)}")
    return answer


def _not_ppcr(server: str, r: requests.Response) -> str:
    """The end of a one-line error for an answer that is not the ppcr app's (an HTML page, ...)."""
    ctype = r.headers.get("content-type", "").split(";")[0] or "no content type"
    return f"as {ctype} instead of the ppcr app's JSON: is {server} a ppcr server?"
