"""Two hooks into BentoML's own middlewares, which it builds outside any middleware a service
can add (so the only handle is their classes; pinned to BentoML 1.4 in requirements.lock; if
a class moves, serving goes on without the hook and a warning says so):

- `bound_endpoint_labels`: BentoML labels request series with the raw request path, so every
  probe of a random URL adds series (unbounded memory) and publishes the path text. A path
  outside the service's own routes is counted as `/other`; the app inside sees the real path.
- `envelope_outer_errors`: the 429 of BentoML's concurrency limit and the 504 of its timeout
  get the service's one error shape (`envelope.EnvelopeSend`).
- `quiet_refused_uploads`: when the front door refuses an upload mid-body, BentoML's form
  parser sees the disconnect it announces and logs a ClientDisconnect traceback; that record
  is dropped (FrontDoor logs one line with the refusal's code instead).
"""

from __future__ import annotations

import logging
import uuid

from bonefrac.serving.envelope import EnvelopeSend

OTHER = "/other"
_REAL_PATH = "bonefrac.real_path"
logger = logging.getLogger("bonefrac.serving")


class _RealPath:
    """Inside the metrics middleware: the app routes on the real path again."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if _REAL_PATH in scope:
            scope = {**scope, "path": scope[_REAL_PATH]}
            del scope[_REAL_PATH]
        await self.app(scope, receive, send)


def bound_endpoint_labels(known: frozenset[str]) -> None:
    """Count requests to any path outside `known` under the one label OTHER."""
    try:
        from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware
    except ImportError:
        logger.warning("BentoML's metrics middleware moved: /metrics labels are not bounded")
        return
    cls = RunnerTrafficMetricsMiddleware
    if getattr(cls, "_bonefrac_known", None) is None:
        original = cls.__call__

        async def __call__(self, scope, receive, send) -> None:
            path = scope.get("path", "")
            if scope.get("type") == "http" and path not in cls._bonefrac_known:
                if not isinstance(self.app, _RealPath):
                    self.app = _RealPath(self.app)
                scope = {**scope, "path": OTHER, _REAL_PATH: path}
            await original(self, scope, receive, send)

        cls.__call__ = __call__
    cls._bonefrac_known = known | {"/metrics"}


def envelope_outer_errors() -> None:
    """Answer BentoML's own 429 (max_concurrency) and 504 (timeout) in the one error shape."""
    try:
        from bentoml._internal.server.http import traffic
    except ImportError:
        logger.warning("BentoML's traffic middlewares moved: their 429/504 keep BentoML's shape")
        return
    for cls in (traffic.MaxConcurrencyMiddleware, traffic.TimeoutMiddleware):
        if getattr(cls, "_bonefrac_enveloped", False):
            continue
        original = cls.__call__

        async def __call__(self, scope, receive, send, _original=original) -> None:
            if scope.get("type") == "http":
                send = EnvelopeSend(send, uuid.uuid4().hex[:12])
            await _original(self, scope, receive, send)

        cls.__call__ = __call__
        cls._bonefrac_enveloped = True


class _NoClientDisconnect(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return type(exc).__name__ != "ClientDisconnect"


def quiet_refused_uploads() -> None:
    """Drop BentoML's traceback for a form whose body the front door cut off."""
    bentoml_logger = logging.getLogger("bentoml._internal.server.http_app")
    if not any(isinstance(f, _NoClientDisconnect) for f in bentoml_logger.filters):
        bentoml_logger.addFilter(_NoClientDisconnect())
