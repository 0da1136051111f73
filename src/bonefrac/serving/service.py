"""The BentoML service: upload page, two-stage prediction, Grad-CAM, safe handling of bad input.

    bentoml serve bonefrac.serving.service:BonefracService     (or `bonefrac serve`)

The bundle (`bonefrac:latest` in the BentoML model store) is loaded once per worker; each API
is a thin call into `predictor.Predictor`. Uploads arrive as BentoML `Path` files: BentoML
writes each multipart file to a per-request temporary folder that it deletes after the
response; we read it into memory once and never write it anywhere. (`bytes` parameters do not
work for binary multipart uploads in BentoML 1.4: it JSON-decodes non-file fields, and a PNG
is not UTF-8, so every image would get a 500.)

Every bad input gets a 4xx JSON `{"error": {"code", "message"}}`, never a 5xx: the API methods
turn `UserError`s into that shape, and `uploads.FrontDoor` (an ASGI middleware) parses the
multipart body itself under strict limits before BentoML sees it, replaces client filenames,
and gives every other error response the same shape. A real fault stays a 5xx with a request
id. Nothing about an upload but an error code is logged; DICOM patient tags are never parsed.
"""

from __future__ import annotations

import asyncio
import html
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from importlib import resources
from pathlib import Path

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from bonefrac import DISCLAIMER
from bonefrac.config import ServeConfig
from bonefrac.errors import UserError
from bonefrac.imaging import ImageError
from bonefrac.inference import Views
from bonefrac.recommend.engine import KnowledgeError, load_knowledge, require_reviewed
from bonefrac.serving import uploads
from bonefrac.serving.batching import Batcher, Overloaded
from bonefrac.serving.uploads import ERROR_HEADER

MODEL_TAG = "bonefrac:latest"
PARAMS_ENV = "BONEFRAC_PARAMS"  # params.yaml for the serve settings; `bonefrac serve` sets it
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and the small form fields
MAX_BATCH = 16  # the largest batch (and files in one /predict_batch request)
STATIC_ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}  # never the template
KNOWN_PATHS = frozenset(
    {"/", "/predict", "/predict_study", "/predict_batch", "/docs", "/docs.json", "/schema.json"}
    | {"/healthz", "/livez", "/readyz"}
    | {f"/static/{name}" for name in STATIC_ASSETS}
)  # /metrics labels: any other path is counted as "/other"

logger = logging.getLogger("bonefrac.serving")
BATCH_SIZES = bentoml.metrics.Histogram(
    name="bonefrac_batch_size",
    documentation="Images per /predict_batch forward pass (continuous batching)",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16),
)

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
    "internal": 500,
    "unreviewed_content": 503,
    "overloaded": 503,
}  # everything else: 400


@lru_cache(maxsize=1)
def serve_settings() -> ServeConfig:
    """The `serve` section of params.yaml ($BONEFRAC_PARAMS, else the nearest one upwards from
    the working directory, else the defaults)."""
    from bonefrac.config import load_settings

    params = os.environ.get(PARAMS_ENV)
    return load_settings(Path(params) if params else None).serve


def error_response(code: str, message: str, status: int | None = None) -> JSONResponse:
    """The one error shape of this service, marked so FrontDoor passes it through."""
    status = status or STATUS.get(code, 400)
    body = {"error": {"code": code, "message": message}}
    headers = {ERROR_HEADER: code, "x-request-id": uploads.request_id.get()}
    return JSONResponse(body, status_code=status, headers=headers)


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
        rid = uploads.request_id.get()
        logger.exception("%s: internal error (request %s)", api, rid)  # no payload in it
        return error_response(
            "internal", f"the server failed on this request (request id {rid})", 500
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


async def static_asset(request: Request) -> Response:
    """The page's script and style sheet, by name: the page template is not an asset."""
    name = request.path_params["name"]
    if name not in STATIC_ASSETS:
        return error_response("not_found", "there is no such file", 404)
    return FileResponse(WEB_DIR / name, media_type=STATIC_ASSETS[name], headers=PAGE_HEADERS)


web_app = Starlette(
    routes=[
        Route("/", index_page, methods=["GET"]),
        Route("/static/{name}", static_asset, methods=["GET"]),
    ]
)


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
        from bonefrac.serving import bentoml_hooks
        from bonefrac.serving.predictor import Predictor

        bentoml_hooks.bound_endpoint_labels(KNOWN_PATHS)
        bentoml_hooks.envelope_outer_errors()
        bentoml_hooks.quiet_refused_uploads()
        stored = self.bundle
        self.settings = serve_settings()
        self.max_bytes = int(self.settings.max_upload_mb * 1_000_000)
        # Draft (clinically unreviewed) guidance is refused unless serve.allow_unreviewed. The
        # service then stays up without loading a model: /readyz answers 503 and every
        # prediction a 503 naming the reason (raising here would only make BentoML respawn the
        # worker in a loop). `bonefrac serve` refuses before starting at all.
        self.refusal: str | None = None
        try:
            knowledge = load_knowledge(self.settings.knowledge)
            require_reviewed(knowledge, self.settings.allow_unreviewed, "serve")
        except KnowledgeError as exc:
            self.refusal = str(exc)
            logger.error("refusing to serve: %s", exc)
            return
        self.predictor = Predictor.from_bundle(
            Path(stored.path), self.settings, source=str(stored.tag)
        )
        self.batcher = Batcher(self.predictor.predict_batch, MAX_BATCH, BATCH_SIZES.observe)
        # /predict_batch decodes one request at a time (bounded memory, as BentoML's one-thread
        # limit on sync APIs does for /predict), beside the models' batch thread.
        self.decoder = ThreadPoolExecutor(1, thread_name_prefix="bonefrac-decode")

    def __is_ready__(self) -> bool:
        """BentoML's /readyz: not ready while the guidance is refused."""
        return self.refusal is None

    def _answer(self, api: str, work: Callable[[], dict]) -> dict | JSONResponse:
        if self.refusal is not None:
            return error_response("unreviewed_content", self.refusal, 503)
        return answer(api, work)

    @bentoml.api(route="/predict")
    def predict(
        self,
        image: Path,
        explain: bool = False,
        allow_ood: bool = False,
        age_group: str = "unknown",
        body_part: str = "",
    ) -> dict:
        """One X-ray (PNG, JPEG or DICOM) -> body part, abnormality finding, recommendation.
        age_group: adult, child or unknown (the default). body_part: the part imaged (elbow,
        hand, shoulder, wrist, finger, forearm, humerus or other; empty: the model decides);
        one the models do not cover answers "out_of_scope", one the model disagrees with is
        flagged."""

        def work() -> dict:
            data = read_upload(image, self.max_bytes)
            return self.predictor.predict_bytes(
                data,
                explain=explain,
                allow_ood=allow_ood,
                age_group=age_group,
                body_part=body_part,
            )

        return self._answer("predict", work)

    @bentoml.api(route="/predict_study")
    def predict_study(
        self,
        images: list[Path],
        explain: bool = False,
        allow_ood: bool = False,
        age_group: str = "unknown",
        body_part: str = "",
    ) -> dict:
        """Several views of one study -> the study result (MURA mean), each image's, and a flag
        when the views disagree. age_group and body_part: as for /predict."""

        def work() -> dict:
            data = [read_upload(path, self.max_bytes) for path in images]
            return self.predictor.predict_study(
                data,
                explain=explain,
                allow_ood=allow_ood,
                age_group=age_group,
                body_part=body_part,
            )

        return self._answer("predict_study", work)

    @bentoml.api(route="/predict_batch")
    async def predict_batch(self, images: list[Path]) -> list[dict]:
        """Independent X-rays, batched across concurrent requests (continuous batching:
        `batching.Batcher`). Each item gets the /predict result or its own `{"error": ...}`; no
        explain, no override. FrontDoor has bounded the body and the file count; `decode`
        refuses a file over the size limit and turns any decoding failure into that file's own
        4xx error. Files are decoded here, in a thread, while the models run other batches."""
        if self.refusal is not None:
            refused = {"error": {"code": "unreviewed_content", "message": self.refusal}}
            return [refused for _ in images]
        try:
            loop = asyncio.get_running_loop()
            decoded = await loop.run_in_executor(self.decoder, self._decode_batch, images)
            views = [item for item in decoded if isinstance(item, Views)]
            return self.predictor.merge_batch(decoded, await self.batcher.submit(views))
        except Overloaded as exc:
            return error_response("overloaded", f"the server is busy: {exc}; try again later", 503)
        except Exception:  # a fault of ours: a 5xx with the request id (invariant 6)
            rid = uploads.request_id.get()
            logger.exception("predict_batch: internal error (request %s)", rid)  # no payload
            return error_response(
                "internal", f"the server failed on this request (request id {rid})", 500
            )

    def _decode_batch(self, images: list[Path]) -> list:
        return self.predictor.decode_batch([path.read_bytes() for path in images])


def _routes() -> dict[str, uploads.Route]:
    from bonefrac.serving.predictor import MAX_STUDY_IMAGES

    cfg = serve_settings()
    one = int(cfg.max_upload_mb * 1_000_000) + MULTIPART_OVERHEAD
    options, wait = (
        frozenset({"explain", "allow_ood", "age_group", "body_part"}),
        cfg.body_timeout_s,
    )
    return {
        "/predict": uploads.Route(one, "image", 1, options, wait, "too_many_files"),
        "/predict_study": uploads.Route(
            one * MAX_STUDY_IMAGES, "images", MAX_STUDY_IMAGES, options, wait
        ),
        "/predict_batch": uploads.Route(one * MAX_BATCH, "images", MAX_BATCH, frozenset(), wait),
    }


BonefracService.add_asgi_middleware(uploads.FrontDoor, routes=_routes)
