"""The HTTP contract: response models, errors (HTTPError -> a JSON body), request parsing (JSON or multipart)."""

from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import Any

from fastapi import Request
from pydantic import BaseModel, Field
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

# python-multipart logs each parse error as a warning before raising it; the client gets it as a 400,
# and logging it too would let any client fill the replica's log.
logging.getLogger("python_multipart.multipart").setLevel(logging.ERROR)

# ---------------------------------------------------------------------------------------------------
# HTTP ingress.


class RLE(BaseModel):
    size: list[int] = Field(description="[height, width] of the original image")
    counts: str = Field(description="COCO compressed RLE (column-major), as pycocotools writes it")


class Instance(BaseModel):
    """One object the expression refers to."""

    box: list[float] = Field(description="[x1, y1, x2, y2] in pixels of the original image")
    mask: RLE
    score: float = Field(description="SAM's predicted IoU of the object's mask")


_UNION_BOX = (
    "[x1, y1, x2, y2] in pixels of the original image: the instance's box for one instance, the box "
    "enclosing all instances' boxes for several, null for no target"
)
_UNION_MASK = "the union of the instances' masks (all zeros for no target)"
_UNION_SCORE = "the instance's score for one instance, their mean for several, null for no target"
_NO_TARGET = "true when nothing in the image fits the expression (no target): no instances"
_INSTANCES = "the objects the expression refers to, in the model's order: none, one or several"


class Found(BaseModel):
    """The answer to one expression: its instances and their union."""

    box: list[float] | None = Field(description=_UNION_BOX)
    mask: RLE = Field(description=_UNION_MASK)
    score: float | None = Field(description=_UNION_SCORE)
    no_target: bool = Field(description=_NO_TARGET)
    instances: list[Instance] = Field(description=_INSTANCES)


class SegmentResponse(BaseModel):
    """One expression: its answer (`Found`'s fields) at the top level. Several (`expressions`): a
    `results` list of answers."""

    box: list[float] | None = Field(None, description=_UNION_BOX)
    mask: RLE | None = Field(None, description=_UNION_MASK)
    score: float | None = Field(None, description=_UNION_SCORE)
    no_target: bool | None = Field(None, description=_NO_TARGET)
    instances: list[Instance] | None = Field(None, description=_INSTANCES)
    results: list[Found] | None = None
    timings_ms: dict[str, float] = Field(
        description="decode_image, mllm, sam_encode (0 on a cache hit), sam_decode (replica compute) and total"
    )
    sam_cache_hit: bool
    batch_sizes: dict[str, int] = Field(description="requests in the @serve.batch call each stage ran")


class ErrorResponse(BaseModel):
    error: str


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what}
    for code, what in {
        400: "malformed request: not JSON/multipart, missing field, bad base64, wrong types",
        413: "body over max_body_bytes, or image over max_pixels (checked before decoding)",
        415: "content type other than application/json or multipart/form-data",
        422: "undecodable or zero-size image, unsupported image mode, empty or over-long expression",
        503: "overloaded or a model replica unavailable; retry after the Retry-After header",
        504: "the model stages did not answer within request_timeout_s",
    }.items()
}

REQUEST_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {"type": "string", "description": "base64 of the encoded image file"},
                    "expression": {"type": "string"},
                    "expressions": {"type": "array", "items": {"type": "string"}},
                },
                "description": "exactly one of expression / expressions",
            }
        },
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {"type": "string", "format": "binary"},
                    "expression": {"type": "string", "description": "repeat the field for several"},
                },
            }
        },
    },
}


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):  # "²".isdigit() is True
            raise HTTPError(400, f"bad Content-Length header {declared!r}")
        if int(declared) > limit:
            raise HTTPError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():  # chunked bodies have no Content-Length: count as they come
        body += chunk
        if len(body) > limit:
            raise HTTPError(413, f"request body exceeds the limit of {limit} bytes")
    return bytes(body)


def parse_json(body: bytes) -> tuple[bytes, Any, bool]:
    """JSON body -> (image bytes, expressions, several?); HTTPError 400 naming the problem. Blocking:
    the ingress runs it in a worker thread, never on its event loop."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise HTTPError(400, "body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer over 4,300 digits
        raise HTTPError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise HTTPError(400, "JSON body must be an object with 'image' and 'expression'")
    unknown = set(data) - {"image", "expression", "expressions"}
    if unknown:
        raise HTTPError(400, f"unknown field(s) {sorted(unknown)}; expected image, expression(s)")
    image = data.get("image")
    if not isinstance(image, str) or not image:
        raise HTTPError(400, "'image' must be a non-empty base64 string of the encoded image file")
    if image.startswith("data:") and "," in image:  # tolerate a data URL
        image = image.split(",", 1)[1]
    try:
        raw = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HTTPError(400, f"'image' is not valid base64: {exc}") from None
    if ("expression" in data) == ("expressions" in data):
        raise HTTPError(400, "give exactly one of 'expression' (a string) or 'expressions' (a list)")
    if "expression" in data:
        return raw, [data["expression"]], False
    exprs = data["expressions"]
    if not isinstance(exprs, list):
        raise HTTPError(400, "'expressions' must be a list of strings")
    return raw, exprs, True


def parse_multipart(body: bytes, content_type: str, max_parts: int = 64) -> tuple[bytes, Any, bool]:
    """multipart/form-data (RFC 7578) -> (image bytes, expressions, several?); HTTPError 400 naming
    the problem. Blocking: the ingress runs it in a worker thread, never on its event loop.

    Parsed by python-multipart (Starlette's form parser), which scans the body for the boundary in
    C-speed `bytes.find` steps: a 15 MiB body of line breaks takes milliseconds, where the stdlib's
    line-oriented email parser took seconds (docs/serving.md). It bounds the headers of a part (8
    headers, 4 KiB); `max_parts` bounds the parts.
    """
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise HTTPError(400, "multipart body could not be parsed: the content type has no boundary")
    parts: list[tuple[dict[bytes, bytes], bytearray]] = []
    header = [bytearray(), bytearray()]  # name, value of the header being read
    ended = False

    def on_part_begin() -> None:
        if len(parts) >= max_parts:
            raise HTTPError(400, f"multipart body has more than {max_parts} parts")
        parts.append(({}, bytearray()))

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        parts[-1][0][bytes(header[0]).strip().lower()] = bytes(header[1]).strip()
        header[0], header[1] = bytearray(), bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1][1].extend(data[start:end])

    def on_end() -> None:
        nonlocal ended
        ended = True

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_end": on_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:  # the base of its errors (a bad boundary, bad framing)
        raise HTTPError(400, f"multipart body could not be parsed: {exc}") from None
    if not ended:
        raise HTTPError(
            400, "multipart body could not be parsed: no closing boundary (missing or wrong boundary?)"
        )
    image, exprs = None, []
    for headers, payload in parts:
        disposition, options = parse_options_header(headers.get(b"content-disposition"))
        if disposition != b"form-data" or b"name" not in options:
            raise HTTPError(400, "multipart part without a Content-Disposition: form-data name")
        name = options[b"name"].decode("latin-1")
        encoding = headers.get(b"content-transfer-encoding", b"binary").lower()
        if encoding not in (b"binary", b"8bit", b"7bit"):
            raise HTTPError(
                400,
                f"field {name!r}: Content-Transfer-Encoding {encoding.decode('latin-1')!r} is not "
                "accepted in multipart/form-data (RFC 7578 4.7): send the bytes as they are",
            )
        if name == "image":
            if image is not None:
                raise HTTPError(400, "multipart body has more than one 'image' field")
            image = bytes(payload)
        elif name in ("expression", "expressions"):
            try:
                exprs.append(payload.decode("utf-8"))
            except UnicodeDecodeError:
                raise HTTPError(400, "'expression' field is not UTF-8 text") from None
        else:
            raise HTTPError(400, f"unknown form field {name!r}; expected image, expression")
    if image is None:
        raise HTTPError(400, "multipart body has no 'image' file field")
    if not exprs:
        raise HTTPError(400, "multipart body has no 'expression' field")
    return image, exprs, len(exprs) > 1


def unavailable(what: str) -> HTTPError:
    return HTTPError(503, f"{what}; retry shortly", headers={"Retry-After": "1"})
