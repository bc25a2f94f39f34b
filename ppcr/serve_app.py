"""Online serving with Ray Serve: an HTTP ingress and two model deployments, joined by DeploymentHandles.

    Ingress (FastAPI)  validate -> decode image once -> content hash
      ├── SAM.encode(key, image)          SAM image encoder, LRU cache of embeddings by content hash
      ├── MLLM.reason(key, image, exprs)  stages 1 + 2: semantic prompt + normalized box (one LLaVA, two LoRAs)
      └── SAM.decode(encoded, prompts)    stage 3: prompt encoder + mask decoder -> COCO RLE, pixel box

The ingress starts the SAM encoding and the MLLM stages together and hands the encode response to the
decode call (Serve resolves it in the object store), so latency ≈ max(MLLM, SAM encode) + decode.
Both model deployments batch concurrent requests with `@serve.batch` and scale on their own
`autoscaling_config`. Overload is refused by Serve's `max_queued_requests` (503 + Retry-After), never
queued without bound. The deployments hold no model logic: they call `PPCRModel.reason`,
`SegmentationStage.encode` and `PPCRModel.segment`, the code that training and evaluation run.

Launch: `serve run serve_configs/tiny_cpu.yaml`, or `ppcr serve --checkpoint DIR`. HTTP API: `docs/serving.md`.
"""

# No `from __future__ import annotations`: FastAPI must see `Request` itself in the routes of the class.

import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import os
import socket
import time
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass
from email import policy
from email.parser import BytesParser
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from .config import from_dict
from .data.refer import encode_mask
from .geometry import (
    ImageDecodeError,
    ImageTooLargeError,
    clip_preprocess,
    decode_image,
    sam_input_size,
    sam_preprocess,
)
from .inference import group_images, segmentations
from .predictor import image_key
from .prompts import clean_expression

logger = logging.getLogger("ppcr.serve")

CHECKPOINT_ENV = "PPCR_CHECKPOINT"
RANDOM_INIT_WARNING = (
    "NO CHECKPOINT: serving the randomly initialised tiny preset, masks are meaningless. "
    f"Set {CHECKPOINT_ENV}=DIR (or args.checkpoint) to serve a trained model."
)


@dataclass
class ServeSettings:
    """What the application builder takes (`args:` of a Serve config); every deployment gets a copy."""

    checkpoint: str | None = None  # inference checkpoint folder; None: $PPCR_CHECKPOINT, else random tiny
    mllm_path: str | None = None  # base LLaVA folder, if moved since training (else the checkpoint's)
    sam_checkpoint: str | None = None  # base SAM .pth, if moved since training (else the checkpoint's)
    preset: str = "tiny"  # used only without a checkpoint (random init, seed 0 in every replica)
    device: str = "cpu"  # "cuda" on GPU replicas
    torch_threads: int = 1  # intra-op threads per replica (replicas share the cores)
    max_batch_size: int = 8  # requests per @serve.batch call (each request may carry several expressions)
    batch_wait_timeout_s: float = 0.0  # see _BATCHING
    cache_images: int = 64  # SAM embeddings kept per SAM replica (LRU by image content hash)
    max_body_bytes: int = 16 * 2**20
    max_pixels: int = 4096 * 4096  # checked from the image header, before decoding (decompression bombs)
    max_aspect_ratio: float = 20.0  # long side / short side; beyond it SAM's resize has a 0-pixel side
    max_expression_chars: int = 256
    max_expressions: int = 16  # per request
    # Language-model sequences (expressions) per forward; a batch of max_batch_size x max_expressions
    # runs in chunks of this many. docs/serving.md has the arithmetic behind the shipped values.
    max_sequences_per_forward: int = 32
    request_timeout_s: float = 30.0  # ingress deadline for the model calls -> 504


def resolve_settings(args: dict | None) -> ServeSettings:
    """Validate builder args (unknown keys and wrong types are errors) and resolve the checkpoint."""
    s = from_dict(ServeSettings, dict(args or {}))
    if s.checkpoint is None and os.environ.get(CHECKPOINT_ENV):
        s.checkpoint = os.environ[CHECKPOINT_ENV]
    if s.checkpoint is not None:
        s.checkpoint = str(Path(s.checkpoint).expanduser().resolve())
    for name in (
        "max_batch_size",
        "cache_images",
        "max_body_bytes",
        "max_pixels",
        "max_expressions",
        "max_sequences_per_forward",
    ):
        if getattr(s, name) < 1:
            raise ValueError(f"serve setting {name} must be >= 1; got {getattr(s, name)}")
    return s


def load_serving_model(s: ServeSettings, parts: tuple[str, ...]):
    """The part of the PPCRModel a replica serves ("mllm" or "sam": only that part is built and
    loaded), from the checkpoint, or the random-init preset (seeded, so every replica of every
    deployment holds the same weights) with a loud warning."""
    from .checkpoint import load_checkpoint

    torch.set_num_threads(max(1, s.torch_threads))
    if s.checkpoint is not None:
        overrides: dict[str, Any] = {}
        if s.mllm_path is not None:
            overrides["mllm_path"] = s.mllm_path
        if s.sam_checkpoint is not None:
            overrides["sam"] = {"checkpoint": s.sam_checkpoint}
        return load_checkpoint(s.checkpoint, overrides=overrides, device=s.device, parts=parts)
    from .config import load_config
    from .model import PPCRModel

    logger.warning(RANDOM_INIT_WARNING)
    warnings.warn(RANDOM_INIT_WARNING, stacklevel=2)
    torch.manual_seed(0)
    return PPCRModel(load_config(s.preset).model, parts=parts).to(s.device).eval()


# _BATCHING: the batch handlers compute on the replica's user event loop instead of in a thread.
# Serve forms the next batch as soon as one is dispatched (ray/serve/batching.py `_process_batches`),
# so with compute in a thread, requests arriving during a batch form batches of one that queue on
# `max_concurrent_batches`. Computing on the loop holds arrivals back until the batch is done, then
# takes all of them: the batch grows with the load and a lone request waits for nobody
# (batch_wait_timeout_s = 0). Serve's health checks and routing run on the replica's own loop.


def _tensor(a: np.ndarray, device) -> torch.Tensor:
    # Arrays passed between deployments arrive read-only (object store); torch needs a writable copy.
    return torch.from_numpy(np.array(a, copy=True)).to(device)


# ---------------------------------------------------------------------------------------------------
# Model deployments. Default options are the tiny CPU ones; serve_configs/*.yaml override them by name.

MODEL_DEPLOYMENT_DEFAULTS = dict(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=16,
    max_queued_requests=64,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8},
    health_check_period_s=2,
)


@serve.deployment(name="MLLM", **MODEL_DEPLOYMENT_DEFAULTS)
class MLLMStage:
    """Stages 1 + 2: LLaVA with LoRA A (semantic prompt) and LoRA B (box), vision features once per image."""

    def __init__(self, settings: dict):
        self.s = ServeSettings(**settings)
        self.model = load_serving_model(self.s, parts=("mllm",))  # never builds SAM
        self.device = torch.device(self.s.device)
        self.reason.set_max_batch_size(self.s.max_batch_size)
        self.reason.set_batch_wait_timeout_s(self.s.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def reason(
        self, keys: list[str], images: list[np.ndarray], expressions: list[list[str]]
    ) -> list[dict]:
        """Per request: semantic prompts (E, D) float32, boxes (E, 4) normalized XYXY or None."""
        return self._reason(keys, images, expressions)  # blocking on purpose: see _BATCHING

    @torch.no_grad()
    def _reason(self, keys, images, expressions) -> list[dict]:
        t0 = time.perf_counter()
        per_expr = [(key, image) for key, image, exprs in zip(keys, images, expressions) for _ in exprs]
        first, index = group_images([key for key, _ in per_expr])
        distinct = [per_expr[i][1] for i in first]
        out = self.model.reason(
            torch.stack([clip_preprocess(im, self.model.clip_size) for im in distinct]).to(self.device),
            index.to(self.device),
            [t for exprs in expressions for t in exprs],
            torch.tensor([im.shape[:2] for im in distinct], dtype=torch.long),
            max_sequences=self.s.max_sequences_per_forward,
        )
        sem = out.semantic_prompt.float().cpu().numpy()
        box = None if out.box is None else out.box.float().cpu().numpy()
        ms = (time.perf_counter() - t0) * 1000
        results, start = [], 0
        for exprs in expressions:
            sl = slice(start, start + len(exprs))
            start += len(exprs)
            results.append(
                {
                    "semantic": sem[sl],
                    "box": None if box is None else box[sl],
                    "ms": ms,
                    "batch": len(keys),
                }
            )
        return results


@serve.deployment(name="SAM", **MODEL_DEPLOYMENT_DEFAULTS)
class SAMStage:
    """Stage 3: SAM image encoder (with an LRU cache of embeddings), prompt encoder and mask decoder."""

    def __init__(self, settings: dict):
        self.s = ServeSettings(**settings)
        self.model = load_serving_model(self.s, parts=("sam",))  # never builds LLaVA
        self.device = torch.device(self.s.device)
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        for method in (self.encode, self.decode):
            method.set_max_batch_size(self.s.max_batch_size)
            method.set_batch_wait_timeout_s(self.s.batch_wait_timeout_s)

    def pid(self) -> int:
        """The replica's process id (tests kill it to check that Serve replaces the replica)."""
        return os.getpid()

    def cache_info(self) -> dict:
        return {"entries": len(self.cache), "capacity": self.s.cache_images}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def encode(self, keys: list[str], images: list[np.ndarray]) -> list[dict]:
        """Per request: the image embedding (C, h, w) float32, whether it came from the cache, and timing."""
        return self._encode(keys, images)  # blocking on purpose: see _BATCHING

    @torch.no_grad()
    def _encode(self, keys, images) -> list[dict]:
        t0 = time.perf_counter()
        hits = [k in self.cache for k in keys]
        todo = {k: im for k, im in zip(keys, images) if k not in self.cache}  # each new image once
        if todo:
            pixels = torch.stack([sam_preprocess(im, self.model.sam_size) for im in todo.values()])
            emb = self.model.segmentation.encode(pixels.to(self.device))
            for k, e in zip(todo, emb):
                self.cache[k] = e
        for k in keys:
            self.cache.move_to_end(k)
        while len(self.cache) > self.s.cache_images:
            self.cache.popitem(last=False)
        ms = (time.perf_counter() - t0) * 1000
        return [
            {
                "embedding": self.cache[k].float().cpu().numpy(),
                "sam_input_hw": sam_input_size(im.shape[:2], self.model.sam_size),
                "hit": hit,
                "ms": ms,
                "batch": len(keys),
            }
            for k, im, hit in zip(keys, images, hits)
        ]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def decode(
        self,
        encoded: list[dict],
        semantic: list[np.ndarray],
        boxes: list[np.ndarray | None],
        hws: list[tuple[int, int]],
    ) -> list[dict]:
        """Per request: one {"mask": COCO RLE, "box": pixel XYXY, "score"} per expression, and timing."""
        return self._decode(encoded, semantic, boxes, hws)  # blocking on purpose: see _BATCHING

    @torch.no_grad()
    def _decode(self, encoded, semantic, boxes, hws) -> list[dict]:
        t0 = time.perf_counter()
        dtype = next(self.model.segmentation.parameters()).dtype
        emb = torch.stack([_tensor(e["embedding"], self.device) for e in encoded]).to(dtype)
        index = torch.tensor([i for i, s in enumerate(semantic) for _ in range(len(s))], device=self.device)
        sem = _tensor(np.concatenate(semantic), self.device)
        box = None if boxes[0] is None else _tensor(np.concatenate(boxes), self.device)
        low, iou, masks = self.model.segment(
            emb,
            index,
            sem,
            box,
            torch.tensor([tuple(hw) for hw in hws], dtype=torch.long),
            torch.tensor([tuple(e["sam_input_hw"]) for e in encoded], dtype=torch.long),
        )
        found = [
            {"box": seg.box, "mask": encode_mask(seg.mask), "score": seg.score}
            for seg in segmentations(masks, box, iou)
        ]
        ms = (time.perf_counter() - t0) * 1000
        results, start = [], 0
        for e, s in zip(encoded, semantic):
            results.append(
                {
                    "results": found[start : start + len(s)],
                    "decode_ms": ms,
                    "encode_ms": e["ms"],
                    "cache_hit": e["hit"],
                    "batch": {"sam_encode": e["batch"], "sam_decode": len(encoded)},
                }
            )
            start += len(s)
        return results


# ---------------------------------------------------------------------------------------------------
# HTTP ingress.


class RLE(BaseModel):
    size: list[int] = Field(description="[height, width] of the original image")
    counts: str = Field(description="COCO compressed RLE (column-major), as pycocotools writes it")


class Found(BaseModel):
    box: list[float] = Field(description="[x1, y1, x2, y2] in pixels of the original image")
    mask: RLE
    score: float = Field(description="SAM's predicted IoU of the mask")


class SegmentResponse(BaseModel):
    """One expression: box, mask, score at the top level. Several (`expressions`): a `results` list."""

    box: list[float] | None = None
    mask: RLE | None = None
    score: float | None = None
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


_ERRORS: dict[int | str, dict[str, Any]] = {
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

_REQUEST_BODY = {
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

fastapi_app = FastAPI(
    title="ppcr referring image segmentation",
    description="POST an image and a referring expression, get the object's mask (COCO RLE) and box.",
    version="1",
)


@fastapi_app.exception_handler(HTTPError)
async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


@fastapi_app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # A bug, not bad input (input is validated before any model runs): logged, and still JSON.
    logger.exception("internal error on %s", request.url.path)
    return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPError(400, f"bad Content-Length header {declared!r}")
        if int(declared) > limit:
            raise HTTPError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():  # chunked bodies have no Content-Length: count as they come
        body += chunk
        if len(body) > limit:
            raise HTTPError(413, f"request body exceeds the limit of {limit} bytes")
    return bytes(body)


def _parse_json(body: bytes) -> tuple[bytes, Any, bool]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
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


def _parse_multipart(body: bytes, content_type: str) -> tuple[bytes, Any, bool]:
    # The stdlib email parser reads multipart/form-data; it spares a python-multipart dependency.
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    msg = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise HTTPError(400, "multipart body could not be parsed (missing or wrong boundary?)")
    image, exprs = None, []
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if name == "image":
            image = payload
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


def _unavailable(what: str) -> HTTPError:
    return HTTPError(503, f"{what}; retry shortly", headers={"Retry-After": "1"})


_PAGE = resources.files("ppcr").joinpath("web/index.html")


# Defined above the deployments: Serve pickles their classes when decorated, with the globals then
# defined.
def _example_png() -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (160, 120), (128, 128, 128))
    draw = ImageDraw.Draw(im)
    draw.ellipse((20, 30, 70, 80), fill=(220, 30, 30))
    draw.rectangle((95, 40, 140, 95), fill=(30, 60, 220))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


class Pipeline:
    """The composition behind the HTTP routes: validate, decode once, MLLM ∥ SAM encode, then SAM decode."""

    def __init__(self, mllm: DeploymentHandle, sam: DeploymentHandle, settings: dict):
        self.mllm, self.sam = mllm, sam
        self.s = ServeSettings(**settings)

    def health(self) -> dict:
        out = {
            "status": "ok",
            "checkpoint": self.s.checkpoint,
            "preset": None if self.s.checkpoint else self.s.preset,
            "limits": {
                k: getattr(self.s, k)
                for k in (
                    "max_body_bytes",
                    "max_pixels",
                    "max_aspect_ratio",
                    "max_expression_chars",
                    "max_expressions",
                )
            },
        }
        if self.s.checkpoint is None:
            out["warning"] = RANDOM_INIT_WARNING
        return out

    async def segment(self, raw: bytes, expressions: list, overlap: bool = True) -> dict:
        """Encoded image bytes + expressions -> {"results": [...], "timings_ms", ...}; raises HTTPError.

        overlap=False runs SAM encoding before the MLLM instead of beside it (the benchmark's baseline).
        """
        t0 = time.perf_counter()
        if not 1 <= len(expressions) <= self.s.max_expressions:
            raise HTTPError(422, f"{len(expressions)} expressions; send 1 to {self.s.max_expressions}")
        texts = []
        for i, e in enumerate(expressions):
            if not isinstance(e, str):
                raise HTTPError(400, f"expression {i} must be a string; got {type(e).__name__}")
            try:
                texts.append(clean_expression(e, max_chars=self.s.max_expression_chars))
            except ValueError as exc:
                raise HTTPError(422, f"expression {i}: {exc}") from None
        try:
            image = await asyncio.to_thread(decode_image, raw, "image", self.s.max_pixels)
        except ImageTooLargeError as exc:
            raise HTTPError(413, str(exc)) from None
        except ImageDecodeError as exc:
            raise HTTPError(422, str(exc)) from None
        h, w = image.shape[:2]
        if max(h, w) > self.s.max_aspect_ratio * min(h, w):
            raise HTTPError(422, f"image is {w}x{h}: aspect ratio over {self.s.max_aspect_ratio:g}")
        key = await asyncio.to_thread(image_key, image)
        t_decoded = time.perf_counter()
        pending: list[DeploymentResponse] = []
        deadline = t0 + self.s.request_timeout_s

        async def wait(response: DeploymentResponse):
            try:
                return await asyncio.wait_for(response, max(0.0, deadline - time.perf_counter()))
            except asyncio.TimeoutError:
                raise HTTPError(
                    504, f"model stages did not answer within {self.s.request_timeout_s:g} s"
                ) from None

        try:
            encoded = self.sam.encode.remote(key, image)
            pending.append(encoded)
            if not overlap:
                await wait(encoded)
            reasoning = self.mllm.reason.remote(key, image, texts)
            pending.append(reasoning)
            r = await wait(reasoning)
            decoded = self.sam.decode.remote(encoded, r["semantic"], r["box"], (h, w))
            pending.append(decoded)
            d = await wait(decoded)
        except BackPressureError:
            raise _unavailable("a model deployment's queue is full") from None
        except (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError) as exc:
            raise _unavailable(f"a model replica is unavailable ({type(exc).__name__})") from None
        except RayServeException as exc:
            # The decode call takes the encode response as its argument; when the SAM replica that
            # encoded dies, Serve wraps its ActorDiedError as an "upstream actor died" RayServeException.
            if not isinstance(exc.__cause__, RayActorError):
                raise
            raise _unavailable(f"a model replica is unavailable ({type(exc.__cause__).__name__})") from None
        finally:
            for response in pending:
                # Frees the replicas after a timeout or an error. On a call that already failed, cancel()
                # re-raises its error, which would replace the 503 above with a 500: nothing to free there.
                with contextlib.suppress(Exception):
                    response.cancel()
        results = [
            {"box": [round(float(v), 2) for v in f["box"]], "mask": f["mask"], "score": round(f["score"], 5)}
            for f in d["results"]
        ]
        return {
            "results": results,
            "timings_ms": {
                "decode_image": round((t_decoded - t0) * 1000, 2),
                "mllm": round(r["ms"], 2),
                "sam_encode": 0.0 if d["cache_hit"] else round(d["encode_ms"], 2),
                "sam_decode": round(d["decode_ms"], 2),
                "total": round((time.perf_counter() - t0) * 1000, 2),
            },
            "sam_cache_hit": d["cache_hit"],
            "batch_sizes": {"mllm": r["batch"], **d["batch"]},
        }


@serve.deployment(
    name="Ingress",
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=32,
    max_queued_requests=32,
    backpressure_config={"retry_after_s": 1},
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16},
)
@serve.ingress(fastapi_app)
class Ingress:
    def __init__(self, mllm: DeploymentHandle, sam: DeploymentHandle, settings: dict):
        self.pipeline = Pipeline(mllm, sam, settings)
        self.s = self.pipeline.s
        self.page = _PAGE.read_text(encoding="utf-8")

    @fastapi_app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @fastapi_app.get("/example.png", include_in_schema=False)
    async def example(self) -> Response:
        """A small synthetic image for trying the page (and for its browser test)."""
        return Response(_example_png(), media_type="image/png")

    @fastapi_app.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness of the ingress and what it serves; `warning` is set when no checkpoint is served."""
        return self.pipeline.health()

    @fastapi_app.post(
        "/v1/segment",
        response_model=SegmentResponse,
        response_model_exclude_none=True,
        responses=_ERRORS,
        openapi_extra={"requestBody": _REQUEST_BODY},
    )
    async def segment_http(self, request: Request) -> dict:
        """Segment the object each expression refers to. JSON `{"image": base64, "expression": str}` or
        multipart (`image` file + `expression` field); `expressions` (a list) for several on one image."""
        body = await _read_body(request, self.s.max_body_bytes)
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            raw, exprs, many = _parse_json(body)
        elif ctype.startswith("multipart/form-data"):
            raw, exprs, many = _parse_multipart(body, ctype)
        else:
            raise HTTPError(415, f"content type {ctype!r}: send application/json or multipart/form-data")
        out = await self.pipeline.segment(raw, exprs)
        if not many:
            out.update(out.pop("results")[0])
        return out

    async def segment(self, raw: bytes, expressions: list, overlap: bool = True) -> dict:
        """`Pipeline.segment` for DeploymentHandle callers (the benchmark compares overlap on/off)."""
        return await self.pipeline.segment(raw, expressions, overlap)


def build_app(args: dict) -> serve.Application:
    """Serve application builder (`import_path: ppcr.serve_app:build_app`, `args:` = ServeSettings)."""
    return make_app(args)


def make_app(args: dict | None = None, options: dict[str, dict] | None = None) -> serve.Application:
    """The application for Python callers (tests, the demo, the benchmark). options: deployment options
    by name ("Ingress", "MLLM", "SAM"), which a Serve config sets in its `deployments:` list instead."""
    s = resolve_settings(args)
    if s.checkpoint is None:
        logger.warning(RANDOM_INIT_WARNING)
    elif not Path(s.checkpoint).is_dir():
        logger.warning(
            "checkpoint %s is not a folder on this node; replicas will fail to start", s.checkpoint
        )
    settings = asdict(s)
    opts = options or {}
    unknown = set(opts) - {"Ingress", "MLLM", "SAM"}
    if unknown:
        raise ValueError(f"unknown deployment(s) {sorted(unknown)}; the app has Ingress, MLLM, SAM")
    ingress, mllm, sam = (d.options(**opts.get(d.name, {})) for d in (Ingress, MLLMStage, SAMStage))
    return ingress.bind(mllm.bind(settings), sam.bind(settings), settings)


# ---------------------------------------------------------------------------------------------------
# Starting the app from Python (`ppcr serve`, the demo, tests).


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(
    args: dict | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = "ppcr",
    blocking: bool = False,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    options: dict[str, dict] | None = None,
) -> str:
    """Start Ray (ppcr.ray_cluster) and Serve on host:port, run the app; returns its base URL."""
    from .ray_cluster import init_ray, require_resources

    init_ray(address=ray_address, num_cpus=num_cpus)
    require_resources({"CPU": 2.0}, "the ppcr serving app (one MLLM and one SAM replica)")
    serve.start(http_options={"host": host, "port": port})
    serve.run(make_app(args, options), name=name, route_prefix="/", blocking=blocking)
    return f"http://{host}:{port}"


def wait_healthy(url: str, timeout_s: float = 120.0) -> dict:
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            r = requests.get(f"{url}/healthz", timeout=5)
            if r.status_code == 200:
                return r.json()
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/healthz did not answer 200 within {timeout_s:g} s")
        time.sleep(0.5)


def demo_serving(checkpoint: str | Path, samples: list[tuple[bytes, str]]) -> list[dict]:
    """Serve `checkpoint` on a free local port, segment each (encoded image, expression) over HTTP,
    shut Serve down; returns the JSON answers (what `ppcr demo` shows at its end)."""
    import ray

    from .serve_client import segment_remote

    started_ray = not ray.is_initialized()
    one = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
    options = {"Ingress": one, "MLLM": one, "SAM": one}
    url = start(
        {"checkpoint": str(checkpoint)}, port=free_port(), name="ppcr-demo", num_cpus=4, options=options
    )
    try:
        wait_healthy(url)
        return [segment_remote(url, image, expression) for image, expression in samples]
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()


__all__ = [
    "ServeSettings",
    "MLLMStage",
    "SAMStage",
    "Ingress",
    "build_app",
    "make_app",
    "start",
    "demo_serving",
]
