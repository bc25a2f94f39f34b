"""Online serving with Ray Serve: an HTTP ingress and two model deployments, joined by DeploymentHandles.

    Ingress (FastAPI)  validate -> decode image once -> content hash
      ├── SAM.encode(key, image)          SAM image encoder, LRU cache of embeddings by content hash
      ├── MLLM.reason(key, image, exprs)  stages 1 + 2: semantic prompt + normalized boxes (one LLaVA, two
      │                                   LoRAs): one box, or a multi-target model's kept slots (none: no target)
      └── SAM.decode(encoded, prompts)    stage 3: prompt encoder + mask decoder per box -> each expression's
                                          instances (COCO RLE, pixel box, score) and their union

The ingress starts the SAM encoding and the MLLM stages together and hands the encode response to the
decode call (Serve resolves it in the object store), so latency ≈ max(MLLM, SAM encode) + decode.
Both model deployments batch concurrent requests with `@serve.batch` and scale on their own
`autoscaling_config`. Overload is refused by Serve's `max_queued_requests` (503 + Retry-After), never
queued without bound. The deployments hold no model logic: they call `PPCRModel.reason`,
`SegmentationStage.encode` and `PPCRModel.segment`, the code that training and evaluation run.

Launch: `ppcr serve --checkpoint DIR` or `ppcr serve --config serve_configs/tiny_cpu.yaml` (or Ray's
`serve run serve_configs/tiny_cpu.yaml`). HTTP API: `docs/serving.md`.
"""

import asyncio
import contextlib
import errno
import functools
import io
import logging
import re
import signal
import socket
import threading
import time
from dataclasses import asdict
from importlib import resources
from pathlib import Path

from fastapi import Request
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from ..config import InputError
from ..failures import ItemFailure, one_line
from ..geometry import (
    ImageDecodeError,
    ImageTooLargeError,
    decode_image,
)
from ..inputs import image_key
from ..mllm import PromptTokenizer
from .deployments import MLLMDeployment, SAMDeployment
from .examples import catalogue as examples_catalogue
from .examples import example_png
from .schema import (
    ERROR_RESPONSES,
    REQUEST_BODY,
    HTTPError,
    SegmentResponse,
    parse_json,
    parse_multipart,
    read_body,
    unavailable,
)
from .settings import (
    RANDOM_INIT_WARNING,
    ServeSettings,
    check_checkpoint,
    command_line_args,
    describe_model,
    prompt_tokenizer,
    resolve_settings,
)

logger = logging.getLogger("ppcr.serve")


# FastAPI must see `Request` itself in the routes of the class: no `from __future__ import annotations`.

# FastAPIOffline: FastAPI whose /docs and /redoc load Swagger UI and ReDoc from the fastapi-offline
# package (served under /static-offline-docs), not from a CDN: they work on a machine without internet.
# /redoc is the Ingress's own route (below): fastapi-offline's ReDoc bundle still asks ReDoc's CDN
# for its "powered by" logo.
fastapi_app = FastAPIOffline(
    title="ppcr referring image segmentation",
    description="POST an image and a referring expression, get the object's mask (COCO RLE) and box.",
    version="1",
    redoc_url=None,
)
_DOCS_STATIC = "/static-offline-docs"  # where FastAPIOffline serves its assets
# The one URL the ReDoc bundle loads from outside: an <img> it hides when the load fails. Served here
# as a blank inline image, so /redoc asks nothing of the internet (and no error reaches the console).
_REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
_BLANK_GIF = b"data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7"


REDOC_JS = "redoc.standalone.js"  # served under /web/


def offline_redoc_js() -> bytes:
    """fastapi-offline's ReDoc bundle with its CDN logo replaced by an inline blank image."""
    import fastapi_offline

    bundle = Path(fastapi_offline.__file__).parent / "static" / REDOC_JS
    return bundle.read_bytes().replace(_REDOC_LOGO, _BLANK_GIF)


@fastapi_app.exception_handler(HTTPError)
async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


@fastapi_app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # A fault of the service, not bad input (input is validated before any model runs): logged with its
    # traceback, answered in one line. An error raised in a replica arrives as a RayTaskError whose text
    # is the remote traceback in terminal colours: the answer names its cause only.
    logger.exception("internal error on %s", request.url.path)
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    return JSONResponse({"error": f"internal error: {one_line(cause)}"}, status_code=500)


def _failed(stage: str, failure: ItemFailure) -> HTTPError:
    """A model stage's answer for a request it could not process: 422 for the request's own input,
    500 for a fault of the service (one line, no traceback; the replica logged the rest)."""
    if failure.input_error:
        return HTTPError(422, failure.message)
    logger.error("the %s stage failed on a request: %s", stage, failure.message)
    return HTTPError(500, f"internal error in the {stage} stage: {failure.message}")


_WEB = resources.files("ppcr").joinpath("web")
_WEB_ASSETS = {"page.js": "text/javascript; charset=utf-8", "page.css": "text/css; charset=utf-8"}


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


def deployment_states(app_name: str) -> dict[str, dict]:
    """{deployment: {"status": Serve's DeploymentStatus, "replicas": {state: count}, "up": has a
    RUNNING replica}} of the application, from the Serve controller (`serve.status()`). Blocking."""
    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    return {
        name: {
            "status": getattr(d.status, "value", str(d.status)),
            "replicas": {getattr(k, "value", str(k)): v for k, v in d.replica_states.items() if v},
            "up": d.replica_states.get("RUNNING", 0) > 0,
            **({"message": d.message.strip().splitlines()[-1]} if d.message.strip() else {}),
        }
        for name, d in app.deployments.items()
    }


class Pipeline:
    """The composition behind the HTTP routes: validate, decode once, MLLM ∥ SAM encode, then SAM decode."""

    def __init__(
        self,
        mllm: DeploymentHandle,
        sam: DeploymentHandle,
        settings: dict,
        prompts: PromptTokenizer | None = None,
        model: dict | None = None,
    ):
        """prompts: the text rules; default `settings.prompt_tokenizer` (the served checkpoint's tokenizer).
        model: what is served, for /healthz; default `settings.describe_model` (reads the checkpoint)."""
        self.mllm, self.sam = mllm, sam
        self.s = ServeSettings(**settings)
        self.prompts = prompts if prompts is not None else prompt_tokenizer(self.s)
        self.model = model if model is not None else describe_model(self.s)

    def health(self, deployments: dict[str, dict] | None = None) -> tuple[int, dict]:
        """(HTTP status, body) of `/healthz`: 200 when every deployment has a running replica, else 503.

        deployments: {name: {"status", "replicas", "up"}} (`deployment_states`); None (outside Serve,
        in unit tests) reports the model only. The body says what is served (`describe_model`: preset,
        checkpoint, random weights or not, what it was trained on and its evaluation numbers)."""
        up = deployments is None or all(d["up"] for d in deployments.values())
        out = {
            "status": "ok" if up else "unavailable",
            "checkpoint": self.s.checkpoint,
            "preset": self.model.get("preset"),
            "model": self.model,
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
        if deployments is not None:
            out["deployments"] = deployments
        if self.model.get("warning"):
            out["warning"] = self.model["warning"]
        return (200 if up else 503), out

    def check_texts(self, expressions: list) -> list[str]:
        """The text rules every entry point applies (`PromptTokenizer.check_expression`, with the
        served model's tokenizer and context) plus the server's own limits; HTTPError 400 / 422 naming
        the expression. Blocking (tokenizes): called in a worker thread."""
        if not 1 <= len(expressions) <= self.s.max_expressions:
            raise HTTPError(422, f"{len(expressions)} expressions; send 1 to {self.s.max_expressions}")
        texts = []
        for i, e in enumerate(expressions):
            if not isinstance(e, str):
                raise HTTPError(400, f"expression {i} must be a string; got {type(e).__name__}")
            try:
                texts.append(self.prompts.check_expression(e, max_chars=self.s.max_expression_chars))
            except InputError as exc:
                raise HTTPError(422, f"expression {i}: {exc}") from None
        return texts

    async def segment(self, raw: bytes, expressions: list, overlap: bool = True) -> dict:
        """Encoded image bytes + expressions -> {"results": [...], "timings_ms", ...}; raises HTTPError.

        overlap=False runs SAM encoding before the MLLM instead of beside it (the benchmark's baseline).
        """
        t0 = time.perf_counter()
        texts = await asyncio.to_thread(self.check_texts, expressions)
        try:
            image = await asyncio.to_thread(decode_image, raw, "image", self.s.image_limits())
        except ImageTooLargeError as exc:
            raise HTTPError(413, str(exc)) from None
        except ImageDecodeError as exc:  # also a shape outside the limits (ImageShapeError)
            raise HTTPError(422, str(exc)) from None
        h, w = image.shape[:2]
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
            if isinstance(r, ItemFailure):
                raise _failed("MLLM", r)
            decoded = self.sam.decode.remote(encoded, r["semantic"], r["box"], (h, w))
            pending.append(decoded)
            d = await wait(decoded)
            if isinstance(d, ItemFailure):
                raise _failed("SAM", d)
        except BackPressureError:
            raise unavailable("a model deployment's queue is full") from None
        except (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError) as exc:
            raise unavailable(f"a model replica is unavailable ({type(exc).__name__})") from None
        except RayServeException as exc:
            # The decode call takes the encode response as its argument; when the SAM replica that
            # encoded dies, Serve wraps its ActorDiedError as an "upstream actor died" RayServeException.
            if not isinstance(exc.__cause__, RayActorError):
                raise
            raise unavailable(f"a model replica is unavailable ({type(exc.__cause__).__name__})") from None
        finally:
            for response in pending:
                # Frees the replicas after a timeout or an error. On a call that already failed, cancel()
                # re-raises its error, which would replace the 503 above with a 500: nothing to free there.
                with contextlib.suppress(Exception):
                    response.cancel()
        results = [_wire(f) for f in d["results"]]
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


def _wire(answer: dict) -> dict:
    """A SAM replica's answer (`inference.encode_answer`) as the HTTP API gives it (`schema.Found`):
    boxes rounded to 0.01 px and scores to 1e-5; box and score null for no target."""

    def box(b) -> list[float] | None:
        return None if b is None else [round(float(v), 2) for v in b]

    def score(s) -> float | None:
        return None if s is None else round(float(s), 5)

    return {
        "box": box(answer["box"]),
        "mask": answer["mask"],
        "score": score(answer["score"]),
        "no_target": bool(answer["no_target"]),
        "instances": [
            {"box": box(i["box"]), "mask": i["mask"], "score": score(i["score"])} for i in answer["instances"]
        ],
    }


@serve.deployment(name="Ingress")  # options: default_options(), overridden by a Serve config
@serve.ingress(fastapi_app)
class Ingress:
    def __init__(self, mllm: DeploymentHandle, sam: DeploymentHandle, settings: dict):
        self.pipeline = Pipeline(mllm, sam, settings)
        self.s = self.pipeline.s
        self.page = _WEB.joinpath("index.html").read_text(encoding="utf-8")
        self.assets = {name: _WEB.joinpath(name).read_bytes() for name in _WEB_ASSETS}
        self.redoc_js: bytes | None = None  # read on first use (1 MB)
        self.app_name = serve.get_replica_context().app_name
        self._states: dict[str, dict] = {}
        self._states_at = -1e9

    @fastapi_app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @fastapi_app.get("/web/{name}", include_in_schema=False)
    async def web_asset(self, name: str) -> Response:
        """The page's script and style sheet (ppcr/web/), and ReDoc's bundle (`offline_redoc_js`):
        the pages load nothing from elsewhere."""
        if name == REDOC_JS:
            if self.redoc_js is None:
                self.redoc_js = await asyncio.to_thread(offline_redoc_js)
            return Response(self.redoc_js, media_type="text/javascript; charset=utf-8")
        if name not in _WEB_ASSETS:
            raise HTTPError(404, f"no page asset {name!r}")
        return Response(
            self.assets[name], media_type=_WEB_ASSETS[name], headers={"Cache-Control": "no-cache"}
        )

    @fastapi_app.get("/redoc", response_class=HTMLResponse, include_in_schema=False)
    async def redoc(self, request: Request) -> HTMLResponse:
        """ReDoc, every asset from the app (fastapi-offline's, with `offline_redoc_js`)."""
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{fastapi_app.openapi_url}",
            title=f"{fastapi_app.title} - ReDoc",
            redoc_js_url=f"{root}/web/{REDOC_JS}",
            redoc_favicon_url=f"{root}{_DOCS_STATIC}/favicon.png",
            with_google_fonts=False,
        )

    @fastapi_app.get("/example.png", include_in_schema=False)
    async def example(self) -> Response:
        """A small synthetic image for trying the page (and for its browser test)."""
        return Response(_example_png(), media_type="image/png")

    @fastapi_app.get("/examples", include_in_schema=False)
    async def examples(self) -> dict:
        """The page's gallery (ppcr.serve.examples): synthetic scenes, and photographs if scikit-image
        is installed (else `photos` says how to get them)."""
        return await asyncio.to_thread(examples_catalogue)

    @fastapi_app.get("/examples/{name}.png", include_in_schema=False)
    async def example_image(self, name: str) -> Response:
        png = await asyncio.to_thread(example_png, name)
        if png is None:
            raise HTTPError(404, f"no example {name!r}")
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @fastapi_app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """What the app serves (`model`: preset, checkpoint, random weights or not, training data and
        evaluation numbers) and whether each deployment has a running replica: 200 when all do, 503
        otherwise. `warning` is set for random weights, a toy model or an under-trained one."""
        states = await asyncio.to_thread(self._deployment_states)
        status, body = self.pipeline.health(states)
        return JSONResponse(body, status_code=status)

    def _deployment_states(self) -> dict[str, dict]:
        # One controller call per second at most, however often /healthz is polled.
        now = time.monotonic()
        if now - self._states_at > 1.0:
            self._states, self._states_at = deployment_states(self.app_name), now
        return self._states

    @fastapi_app.post(
        "/v1/segment",
        response_model=SegmentResponse,
        response_model_exclude_unset=True,  # an answer's null box stays; an unused results list goes
        responses=ERROR_RESPONSES,
        openapi_extra={"requestBody": REQUEST_BODY},
    )
    async def segment_http(self, request: Request) -> dict:
        """Segment the object each expression refers to. JSON `{"image": base64, "expression": str}` or
        multipart (`image` file + `expression` field); `expressions` (a list) for several on one image."""
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):  # RFC 9110 8.4: a coding the server does not decode is a 415
            raise HTTPError(415, f"Content-Encoding {encoding!r} is not accepted: send the body uncompressed")
        body = await read_body(request, self.s.max_body_bytes)
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            parse = parse_json
        elif ctype.startswith("multipart/form-data"):
            parts = max(64, self.s.max_expressions + 1)
            parse = functools.partial(parse_multipart, content_type=ctype, max_parts=parts)
        else:
            raise HTTPError(415, f"content type {ctype!r}: send application/json or multipart/form-data")
        # Off the event loop, as image decoding: a large or hostile body never stalls other requests
        # (health checks included) while it is parsed.
        raw, exprs, many = await asyncio.to_thread(parse, body)
        out = await self.pipeline.segment(raw, exprs)
        if not many:
            out.update(out.pop("results")[0])
        return out

    async def segment(self, raw: bytes, expressions: list, overlap: bool = True) -> dict:
        """`Pipeline.segment` for DeploymentHandle callers (the benchmark compares overlap on/off)."""
        return await self.pipeline.segment(raw, expressions, overlap)


def build_app(args: dict) -> serve.Application:
    """Serve application builder (`import_path: ppcr.serve:build_app`, `args:` = ServeSettings).

    Under Ray's `serve run ppcr.serve:build_app checkpoint=DIR` (a click command calling the builder
    in its own process) a checkpoint or args that cannot load end the command in one line,
    `Error: <cause>`, instead of a traceback; its `key=value` strings are read as the settings' types
    (`command_line_args`). From a config file, Serve builds in a remote task and
    shows the error there (docs/serving.md)."""
    import click

    from ..config import ConfigError
    from ..weights import WeightsError

    from_command_line = click.get_current_context(silent=True) is not None
    try:
        return make_app(command_line_args(args) if from_command_line else args)
    except (FileNotFoundError, ConfigError, WeightsError, ValueError) as exc:
        if not from_command_line:
            raise
        raise click.ClickException(str(exc)) from None


# The one place the deployments' options are written: the shipped Serve config of the tiny CPU app
# (serve_configs/tiny_cpu.yaml links to it; package data, so an installed ppcr has it too).
DEFAULT_SERVE_CONFIG = Path(__file__).with_name("tiny_cpu.yaml")


@functools.cache
def default_options() -> dict[str, dict]:
    """Deployment options by name ("Ingress", "MLLM", "SAM") from DEFAULT_SERVE_CONFIG: what every app
    starts from, before `make_app`'s `options` or a Serve config's `deployments:` override them."""
    return read_serve_config(DEFAULT_SERVE_CONFIG)["options"]


def make_app(args: dict | None = None, options: dict[str, dict] | None = None) -> serve.Application:
    """The application for Python callers (tests, the demo, the benchmark). options: deployment options
    by name ("Ingress", "MLLM", "SAM"), each key replacing that key of `default_options()` (a Serve
    config sets them in its `deployments:` list instead)."""
    s = resolve_settings(args)
    if s.checkpoint is None:
        logger.warning(RANDOM_INIT_WARNING)
    check_checkpoint(s)  # a checkpoint that cannot load fails here, in one line, before any replica starts
    settings = asdict(s)
    opts = options or {}
    unknown = set(opts) - {"Ingress", "MLLM", "SAM"}
    if unknown:
        raise ValueError(f"unknown deployment(s) {sorted(unknown)}; the app has Ingress, MLLM, SAM")
    defaults = default_options()
    ingress, mllm, sam = (
        d.options(**{**defaults[d.name], **opts.get(d.name, {})})
        for d in (Ingress, MLLMDeployment, SAMDeployment)
    )
    return ingress.bind(mllm.bind(settings), sam.bind(settings), settings)


# ---------------------------------------------------------------------------------------------------
# Starting the app from Python (`ppcr serve`, the demo, tests).


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeStartError(RuntimeError):
    """The app did not start (a replica failed in its constructor); the message is the cause, one line."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The errors a replica raises for a checkpoint that cannot load: their message says it all.
_PLAIN_ERRORS = re.compile(r"^(?:[\w.]+\.)?(?:WeightsError|ConfigError|FileNotFoundError|InputError): ")


def start_failure(app_name: str, serve_error: str) -> str:
    """One line naming why the application did not start. Serve's own error says only which
    deployments failed; the cause is the last line of a failed deployment's message (the exception its
    replica constructor raised, e.g. a checkpoint whose tensors do not fit the model): "MLLM: <cause>".
    Falls back to the last line of `serve_error`."""
    states = {}
    with contextlib.suppress(Exception):
        states = serve.status().applications[app_name].deployments
    for dep_name, d in states.items():
        lines = [ln.strip() for ln in _ANSI.sub("", d.message or "").splitlines() if ln.strip()]
        if getattr(d.status, "value", str(d.status)) == "DEPLOY_FAILED" and lines:
            # "ppcr.weights.WeightsError: ..." -> "WeightsError: ..." -> "..."
            cause = re.sub(r"^(?:\w+\.)+(?=\w+: )", "", lines[-1])
            return f"{dep_name}: {_PLAIN_ERRORS.sub('', cause)}"
    lines = [ln.strip() for ln in serve_error.splitlines() if ln.strip()]
    return lines[-1] if lines else "Serve gave no reason"


def quiet_shutdown(stop_ray: bool = False) -> None:
    """Shut Serve (and Ray, if stop_ray) down without their chatter (log lines, a raylet's retry
    notice): the user is told in one line why the app stops."""
    import io

    import ray

    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            with contextlib.suppress(Exception):
                serve.shutdown()
            if stop_ray:
                with contextlib.suppress(Exception):
                    ray.shutdown()
    finally:
        logging.disable(logging.NOTSET)


def check_port_free(host: str, port: int) -> None:
    """ServeStartError naming host:port when this machine cannot listen there (another server holds
    the port, or the address is not this machine's): before Ray starts, in one line."""
    with contextlib.closing(socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Serve's server: TIME_WAIT is free
        try:
            sock.bind((host, port))
        except OSError as exc:
            hint = (
                "is another server using the port? Choose another with --port"
                if exc.errno == errno.EADDRINUSE
                else "is the host an address of this machine?"
            )
            raise ServeStartError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): {hint}") from None


def _not_reconnecting(record: logging.LogRecord) -> bool:
    # serve.run, right after start's own serve.start, "connects to the existing Serve app" and logs
    # that "new http_options will not be applied": they were, by that serve.start.
    return not record.getMessage().startswith("Connecting to existing Serve app")


def start(
    args: dict | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = "ppcr",
    blocking: bool = False,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    options: dict[str, dict] | None = None,
    http_options: dict | None = None,
) -> str:
    """Start Ray (ppcr.ray_cluster) and Serve on host:port, run the app; returns its base URL.
    http_options: Serve's other HTTP options (e.g. request_timeout_s).

    The checkpoint is checked before anything starts (`check_checkpoint`: FileNotFoundError,
    ConfigError or WeightsError naming it); a replica that still fails to start ends the app, and
    raises ServeStartError with the failure's last line. blocking: then wait until KeyboardInterrupt."""
    from ..ray_cluster import init_ray, require_resources

    app = make_app(args, options)  # validates the settings and the checkpoint before Ray starts
    if ray_address is None:  # a local cluster: Serve's proxy will listen here
        check_port_free(host, port)
    on_term = signal.getsignal(signal.SIGTERM)
    init_ray(address=ray_address, num_cpus=num_cpus)
    if callable(on_term) and threading.current_thread() is threading.main_thread():
        # Ray's start-up installs its own fatal-signal handler (a C++ stack trace) over SIGTERM: the
        # caller's Python handler (ppcr serve's clean stop) is put back.
        signal.signal(signal.SIGTERM, on_term)
    require_resources({"CPU": 2.0}, "the ppcr serving app (one MLLM and one SAM replica)")
    try:
        serve.start(http_options={**(http_options or {}), "host": host, "port": port})
    except RayTaskError as exc:  # the proxy could not listen: a 50-line remote traceback otherwise
        if "Failed to bind" not in str(exc):
            raise
        quiet_shutdown()
        raise ServeStartError(f"cannot listen on {host}:{port}: {one_line(exc.cause or exc)}") from None
    serve_log = logging.getLogger("ray.serve")
    serve_log.addFilter(_not_reconnecting)
    try:
        serve.run(app, name=name, route_prefix="/")
    except RuntimeError as exc:
        if f"Deploying application {name} failed" not in str(exc):
            raise
        cause = start_failure(name, str(exc))
        quiet_shutdown()
        raise ServeStartError(f"the app did not start: {cause}") from None
    finally:
        serve_log.removeFilter(_not_reconnecting)
    if blocking:
        while True:
            time.sleep(3600)
    return f"http://{host}:{port}"


def read_serve_config(path: str | Path) -> dict:
    """A Serve config file (serve_configs/*.yaml) as `start`'s keyword arguments: its application's
    args, deployment options by name, name, host, port and other http_options. Validated by Serve's
    own schema; ConfigError unless it holds exactly one application of `ppcr.serve:build_app`."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from ..config import ConfigError

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"Serve config {file} not found")
    try:
        schema = ServeDeploySchema.model_validate(yaml.safe_load(file.read_text()) or {})
    except Exception as exc:  # pydantic's ValidationError: many lines, the first names the key
        raise ConfigError(f"{file}: not a Serve config ({str(exc).splitlines()[0]})") from None
    apps = schema.applications
    if len(apps) != 1 or apps[0].import_path != "ppcr.serve:build_app":
        raise ConfigError(f"{file}: expected one application with import_path ppcr.serve:build_app")
    http = schema.http_options.model_dump(exclude_unset=True)
    return {
        "args": dict(apps[0].args or {}),
        "options": {d.name: d.model_dump(exclude_unset=True, exclude={"name"}) for d in apps[0].deployments},
        "name": apps[0].name,
        "host": http.pop("host", "127.0.0.1"),
        "port": http.pop("port", 8000),
        "http_options": http,
    }


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

    from .client import segment_remote

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
