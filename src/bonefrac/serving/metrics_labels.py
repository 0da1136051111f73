"""Bounded `/metrics` labels: BentoML labels request series with the raw request path, so
every probe of a random URL adds series (unbounded memory) and publishes the path text.

BentoML builds its metrics middleware outside any middleware a service can add, so the only
hook is its class: `bound_endpoint_labels` wraps its `__call__` so that a path outside the
service's own routes is counted as `/other`, and hands the real path back to the app inside.
Pinned to BentoML 1.4 (requirements.lock); if the class moves, serving goes on unpatched and
a warning says so.
"""

from __future__ import annotations

import logging

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
