"""The BentoML service: upload page, two-stage prediction, Grad-CAM, safe handling of bad input.

    bentoml serve bonefrac.serving.service:BonefracService     (or `bonefrac serve`)

The bundle (`bonefrac:latest` in the BentoML model store) is loaded once per worker; each API
is a thin call into `predictor.Predictor`. Uploads arrive as BentoML `Path` files: BentoML
writes each multipart file to a per-request temporary folder that it deletes after the
response; we read it into memory once and never write it anywhere. (`bytes` parameters do not
work for binary multipart uploads in BentoML 1.4: it JSON-decodes non-file fields, and a PNG
is not UTF-8, so every image would get a 500.)

Every bad input gets a 4xx JSON `{"error": {"code", "message"}}`, never a 5xx: the API methods
turn `UserError`s into that shape, and `UploadGuard` (an ASGI middleware) refuses oversized
bodies before they are read and rewrites BentoML's own request-parsing errors into it.
Nothing about an upload but an error code is logged; DICOM patient tags are never parsed.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
from collections.abc import Callable
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from bonefrac import DISCLAIMER
from bonefrac.config import ServeConfig
from bonefrac.errors import UserError
from bonefrac.imaging import ImageError

MODEL_TAG = "bonefrac:latest"
PARAMS_ENV = "BONEFRAC_PARAMS"  # params.yaml for the serve settings; `bonefrac serve` sets it
ERROR_HEADER = "x-bonefrac-error"  # marks our own error responses for UploadGuard
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and the small form fields
DRAIN_LIMIT = 256 * 1024 * 1024  # read (and drop) at most this much of a refused body
MAX_BATCH = 16  # adaptive batching's largest batch (and files in one /predict_batch request)

logger = logging.getLogger("bonefrac.serving")

# HTTP status per error code: 413 = send something smaller, 415 = send another format,
# 422 = well-formed but not something the models can judge, 400 = broken request or file.
STATUS = {
    "too_large": 413,
    "too_many_pixels": 413,
    "not_an_image": 415,
    "dicom_unsupported": 415,
    "too_small": 422,
    "dicom_no_pixels": 422,
    "out_of_distribution": 422,
    "too_many_images": 422,
}  # everything else: 400


@lru_cache(maxsize=1)
def serve_settings() -> ServeConfig:
    """The `serve` section of params.yaml ($BONEFRAC_PARAMS, else the nearest one upwards from
    the working directory, else the defaults)."""
    from bonefrac.config import load_settings

    params = os.environ.get(PARAMS_ENV)
    return load_settings(Path(params) if params else None).serve


def error_response(code: str, message: str, status: int | None = None) -> JSONResponse:
    """The one error shape of this service, marked so UploadGuard passes it through."""
    status = status or STATUS.get(code, 400)
    body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers={ERROR_HEADER: code})


def read_upload(path: Path, max_bytes: int) -> bytes:
    """The bytes of one uploaded file, checking its size before reading it."""
    size = path.stat().st_size
    if size > max_bytes:
        raise ImageError(
            f"the file is {size / 1e6:.1f} MB, over the {max_bytes / 1e6:.1f} MB limit; send a "
            "smaller export of the X-ray",
            "too_large",
        )
    return path.read_bytes()


def answer(api: str, work: Callable[[], dict]) -> dict | JSONResponse:
    """Run one API call; a UserError becomes its 4xx JSON, anything else a logged 500."""
    try:
        return work()
    except UserError as exc:
        code = getattr(exc, "code", "bad_request")
        logger.info("%s: rejected (%s)", api, code)  # the code only: messages stay with users
        return error_response(code, str(exc))
    except Exception:
        logger.exception("%s: internal error", api)
        return error_response(
            "internal", "the server failed on this request; it has been logged", 500
        )


# -- the web page ------------------------------------------------------------------------------

WEB_DIR = Path(str(resources.files("bonefrac.serving").joinpath("web")))
PAGE_HEADERS = {
    # Everything comes from this server: the page works on offline hospital networks and
    # cannot be made to load anything from elsewhere.
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


async def index_page(_: Request) -> HTMLResponse:
    page = (WEB_DIR / "index.html").read_text(encoding="utf-8")
    cfg = serve_settings()
    page = page.replace("{{DISCLAIMER}}", html.escape(DISCLAIMER))
    page = page.replace("{{MAX_UPLOAD_MB}}", f"{cfg.max_upload_mb:g}")
    return HTMLResponse(page, headers=PAGE_HEADERS)


web_app = Starlette(
    routes=[
        Route("/", index_page, methods=["GET"]),
        Mount("/static", StaticFiles(directory=WEB_DIR), name="static"),
    ]
)


# -- refusing oversized bodies, and one error shape for BentoML's own errors --------------------


class UploadGuard:
    """ASGI middleware for the upload APIs.

    1. A body over the route's limit is refused with 413 before the API parses it (declared
       by Content-Length, or counted while a chunked body streams in); the rest of the body
       is read and dropped so the client sees the 413 instead of a reset connection.
    2. A file field sent as plain text is refused with 400 while the form streams in: BentoML
       would otherwise treat the text as a URL and download it (server-side request forgery).
    3. Errors BentoML produces before our code runs (a missing or malformed form field: its
       400 validation error, or a 500 from parsing a form that is not what the API takes) are
       rewritten to `{"error": {"code", "message"}}` with a 4xx status. Our own errors carry
       ERROR_HEADER and pass through untouched, as do successful responses.
    """

    def __init__(self, app, routes: Callable[[], dict[str, tuple[int, str]]]) -> None:
        self.app = app
        self._routes = routes  # () -> {path: (body limit in bytes, name of the file field)}

    @cached_property
    def routes(self) -> dict[str, tuple[int, str]]:
        return self._routes()  # on the first request, so importing the service reads no file

    async def __call__(self, scope, receive, send) -> None:
        route = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        limit, field = route
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _drain(receive)
            await _send_error(send, 413, "too_large", _too_large(declared, limit))
            return

        plain_field = re.compile(
            rb'content-disposition:[^\r\n]*\bname="?' + re.escape(field.encode()) + rb'"?'
            rb"(?:;[^\r\n]*)?\r?\n",
            re.IGNORECASE,
        )
        state: dict[str, Any] = {"received": 0, "tail": b"", "refusal": None, "sent": False}
        held: dict[str, Any] = {"start": None, "body": []}

        async def refuse(message, refusal: tuple[int, str, str]):
            state["refusal"] = refusal
            if message.get("more_body", False):
                await _drain(receive)
            return {"type": "http.disconnect"}  # the form parser stops here

        async def guarded_receive():
            if state["refusal"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] != "http.request":
                return message
            chunk = message.get("body", b"")
            state["received"] += len(chunk)
            if state["received"] > limit:
                text = _too_large(state["received"], limit, at_least=True)
                return await refuse(message, (413, "too_large", text))
            window = state["tail"] + chunk
            if any(b"filename" not in m.group(0).lower() for m in plain_field.finditer(window)):
                text = f"the '{field}' field must be a file, not text or a URL; " + _HINT
                return await refuse(message, (400, "not_a_file", text.format(field=field)))
            state["tail"] = window[-4096:]  # a part header split across two chunks
            return message

        async def guarded_send(message):
            if message["type"] == "http.response.start":
                headers = {k.lower() for k, _ in message.get("headers", [])}
                if not state["refusal"] and (
                    message["status"] < 400 or ERROR_HEADER.encode() in headers
                ):
                    state["sent"] = True
                    await send(message)
                else:
                    held["start"] = message
                return
            if message["type"] == "http.response.body" and held["start"] is not None:
                held["body"].append(message.get("body", b""))
                if not message.get("more_body", False):
                    status = held["start"]["status"]
                    held["start"], state["sent"] = None, True
                    refusal = state["refusal"] or _translate(status, b"".join(held["body"]), field)
                    await _send_error(send, *refusal)
                return
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if not state["refusal"]:
                raise
            # The app saw the disconnect we announced; the refusal below is the answer.
        if not state["sent"] and state["refusal"]:
            await _send_error(send, *state["refusal"])


def _content_length(scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _drain(receive) -> None:
    """Read and drop what is left of a refused body (up to DRAIN_LIMIT), in constant memory."""
    drained = 0
    while drained <= DRAIN_LIMIT:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        drained += len(message.get("body", b""))


def _too_large(size: int, limit: int, at_least: bool = False) -> str:
    size_text = "over" if at_least else f"{size / 1e6:.1f} MB, over"
    return (
        f"the upload is {size_text} the {limit / 1e6:.1f} MB limit of this endpoint; send a "
        "smaller export of the X-ray (or fewer images)"
    )


_HINT = "send the X-ray as a multipart/form-data file field named '{field}'"


def _translate(status: int, body: bytes, field: str) -> tuple[int, str, str]:
    """(status, code, message) for an error response that BentoML made."""
    hint = _HINT.format(field=field)
    if status in (429, 503, 504):
        return status, "unavailable", "the server is busy; try again in a minute"
    try:
        detail = json.loads(body).get("detail") or []
    except (ValueError, AttributeError):
        detail = []
    if status == 400 and detail:
        first = detail[0]
        location = ".".join(str(p) for p in first.get("loc", ()))
        reason = str(first.get("msg", "invalid value")).rstrip(".")
        if not location:
            return 400, "bad_request", f"the request is not a readable form; {hint}"
        if first.get("type") == "missing" and location.split(".")[0] == field:
            return 400, "missing_file", f"the request has no '{field}' file; {hint}"
        return 400, "bad_request", f"the form field '{location}' is invalid ({reason})"
    # A 500 here came from parsing the request before our code ran (our code answers its own
    # failures): e.g. a multipart body that does not parse, or an unknown file field.
    logger.warning("request rejected by BentoML with %s; answered 400", status)
    return 400, "bad_request", f"the request could not be read; {hint}"


async def _send_error(send, status: int, code: str, message: str) -> None:
    payload = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (ERROR_HEADER.encode(), code.encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


# -- the service ---------------------------------------------------------------------------------


@bentoml.asgi_app(web_app, path="/")
@bentoml.service(
    name="bonefrac",
    workers=1,  # each worker holds every model; TensorFlow already uses all cores per call
    traffic={"timeout": 120, "max_concurrency": 64},
)
class BonefracService:
    """Fracture detection for elbow, hand and shoulder X-rays (decision support, not a
    diagnosis): POST /predict, /predict_study, /predict_batch; GET / for the upload page."""

    bundle = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        from bonefrac.serving.predictor import Predictor

        stored = self.bundle
        self.settings = serve_settings()
        self.max_bytes = int(self.settings.max_upload_mb * 1_000_000)
        self.predictor = Predictor.from_bundle(
            Path(stored.path), self.settings, source=str(stored.tag)
        )

    @bentoml.api(route="/predict")
    def predict(self, image: Path, explain: bool = False, allow_ood: bool = False) -> dict:
        """One X-ray (PNG, JPEG or DICOM) -> body part, fracture finding, recommendation."""

        def work() -> dict:
            data = read_upload(image, self.max_bytes)
            return self.predictor.predict_bytes(data, explain=explain, allow_ood=allow_ood)

        return answer("predict", work)

    @bentoml.api(route="/predict_study")
    def predict_study(
        self, images: list[Path], explain: bool = False, allow_ood: bool = False
    ) -> dict:
        """Several views of one study -> the study result (MURA mean) and each image's."""

        def work() -> dict:
            data = [read_upload(path, self.max_bytes) for path in images]
            return self.predictor.predict_study(data, explain=explain, allow_ood=allow_ood)

        return answer("predict_study", work)

    @bentoml.api(
        route="/predict_batch", batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=30_000
    )
    def predict_batch(self, images: list[Path]) -> list[dict]:
        """Independent X-rays, batched across concurrent requests (adaptive batching). Each
        item gets the /predict result or its own `{"error": ...}`; no explain, no override.
        UploadGuard has bounded the body, and `decode` refuses a file over the size limit."""
        try:
            return self.predictor.predict_batch_bytes([path.read_bytes() for path in images])
        except Exception:
            logger.exception("predict_batch: internal error")
            failed = {"error": {"code": "internal", "message": "the server failed on this batch"}}
            return [failed for _ in images]


def _limits() -> dict[str, tuple[int, str]]:
    from bonefrac.serving.predictor import MAX_STUDY_IMAGES

    one = int(serve_settings().max_upload_mb * 1_000_000) + MULTIPART_OVERHEAD
    return {
        "/predict": (one, "image"),
        "/predict_study": (one * MAX_STUDY_IMAGES, "images"),
        "/predict_batch": (one * MAX_BATCH, "images"),
    }


BonefracService.add_asgi_middleware(UploadGuard, routes=_limits)
