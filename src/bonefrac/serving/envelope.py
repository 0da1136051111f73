"""One error shape for every status the service sends: `{"error": {"code", "message"}}`.

`EnvelopeSend` wraps an ASGI `send`: successes and our own marked errors pass untouched; any
other error response (Starlette's 404/405, BentoML's validation 400s, 429/503/504, an unmarked
5xx) is answered in the one shape instead. A 5xx stays a 5xx, with the request id.
"""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import Callable

ERROR_HEADER = "x-bonefrac-error"  # marks our own error responses: passed through untouched
logger = logging.getLogger("bonefrac.serving")
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class Refusal(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class EnvelopeSend:
    """Wraps `send`: successes and our own marked errors pass; any other error response is
    held and answered in the one error shape instead (or replaced by a pending refusal)."""

    def __init__(self, send, rid: str, refusal: Callable[[], Refusal | None] = lambda: None):
        self.send, self.rid, self.refusal = send, rid, refusal
        self.start: dict | None = None
        self.body: list[bytes] = []
        self.sent = False

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            marked = any(k.lower() == ERROR_HEADER.encode() for k, _ in message.get("headers", []))
            if self.refusal() is None and (message["status"] < 400 or marked):
                self.sent = True
                await self.send(message)
            else:
                self.start = message
            return
        if message["type"] == "http.response.body" and self.start is not None:
            self.body.append(message.get("body", b""))
            if not message.get("more_body", False):
                start, self.start = self.start, None
                if self.refusal() is not None:
                    return  # FrontDoor answers with the refusal
                status, code, text = translate(start["status"], b"".join(self.body), self.rid)
                self.sent = True
                await send_error(self.send, status, code, text, rid=self.rid)
            return
        await self.send(message)


def translate(status: int, body: bytes, rid: str) -> tuple[int, str, str]:
    """(status, code, message) for an error response that Starlette or BentoML made."""
    if status == 404:
        return 404, "not_found", "there is no such page or endpoint; see /docs for the API"
    if status == 405:
        return 405, "method_not_allowed", "this endpoint does not take that HTTP method"
    if status in (429, 503):
        return status, "busy", "the server is busy; try again in a minute"
    if status == 504:
        return 504, "timeout", "the server took too long on this request; try again later"
    if status >= 500:
        logger.error("request %s: internal error (status %s)", rid, status)  # no payload
        return status, "internal", f"the server failed on this request (request id {rid})"
    try:
        detail = json.loads(body).get("detail") or []
        first = detail[0]
        location = ".".join(str(p) for p in first.get("loc", ()))
        reason = str(first.get("msg", "invalid value")).rstrip(".")[:120]
    except (ValueError, AttributeError, IndexError, KeyError, TypeError):
        return status, "bad_request", "the request could not be read; check the API at /docs"
    if first.get("type") == "missing":
        return 400, "missing_field", f"the request has no '{location}' field"
    return 400, "bad_request", f"the form field '{location[:40]}' is invalid ({reason})"


def too_large(size: int, limit: int, at_least: bool = False) -> str:
    size_text = "over" if at_least else f"{size / 1e6:.1f} MB, over"
    return (
        f"the upload is {size_text} the {limit / 1e6:.1f} MB limit of this endpoint; send a "
        "smaller export of the X-ray (or fewer images)"
    )


async def send_error(
    send, status: int, code: str, message: str, *, rid: str | None = None, close: bool = False
) -> None:
    payload = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (ERROR_HEADER.encode(), code.encode()),
        (b"x-request-id", (rid or request_id.get()).encode()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
