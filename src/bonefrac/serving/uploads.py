"""The front door: every request passes `FrontDoor` (an ASGI middleware) before BentoML's code.

On the upload routes (POST /predict, /predict_study, /predict_batch):

1. Only `multipart/form-data` is accepted (415 otherwise): form-encoded or raw bodies never
   reach BentoML's parser, which would fetch a URL given in place of a file.
2. The body is parsed as it streams in by python-multipart's state machine (linear time, no
   regular expression), under strict limits: part-header bytes, text-field bytes, number of
   files and fields, known field names only. Each part is re-emitted with headers we write:
   a file field becomes a file named `upload` (the client's filename is dropped here, so it
   never reaches a log line or a temporary file name), and a part of a file field sent
   without a filename (text, a URL) is refused, whatever its spelling.
3. A body over the route's limit gets the 413 answer at once, declared (Content-Length) or
   counted, and the connection is closed without reading the rest. A body that does not
   arrive within `serve.body_timeout_s` gets 408 and the connection is closed.

On every route, an error response that our code did not make (Starlette's 404/405,
BentoML's 400 validation errors, 429/503/504) is rewritten to the one error shape
`{"error": {"code", "message"}}`; an unmarked 5xx stays a 5xx ("internal"), with a request
id in the answer, the `x-request-id` header and the log line (no payload is logged).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from bonefrac.serving.envelope import (
    ERROR_HEADER,
    EnvelopeSend,
    Refusal,
    request_id,
    send_error,
    too_large,
)

__all__ = ["ERROR_HEADER", "FormRewriter", "FrontDoor", "Route", "request_id"]

MAX_HEADER_BYTES = 1024  # all header lines of one part together
MAX_TEXT_BYTES = 64  # a text field's value ("true", "false")
MAX_TEXT_FIELDS = 4
OUT_BOUNDARY = b"bonefrac-front-door-7f3a9c"
HINT = "send the X-ray as a multipart/form-data file field named '{field}'"

logger = logging.getLogger("bonefrac.serving")


@dataclass(frozen=True)
class Route:
    """What one upload route accepts."""

    limit: int  # body bytes
    file_field: str
    max_files: int
    text_fields: frozenset[str]
    body_timeout_s: float  # the whole body must arrive within this (slow clients hold slots)
    too_many_code: str = "too_many_images"


class FormRewriter:
    """Streams one multipart body through python-multipart and writes it out again with our
    own boundary and part headers; raises Refusal as soon as the input breaks a rule."""

    def __init__(self, boundary: bytes, route: Route) -> None:
        self.route = route
        self.out = bytearray()
        self.files = 0
        self.text_names: set[str] = set()  # a field sent twice (two body parts) is refused
        self.header_bytes = 0
        self.text_bytes = 0
        self.current: str | None = None  # "file" | "text" while inside a part
        self.field_name = b""
        self.headers: dict[bytes, bytes] = {}
        self.header_field = bytearray()
        self.header_value = bytearray()
        self.ended = False
        callbacks = {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }
        self.parser = MultipartParser(boundary, callbacks)

    def feed(self, chunk: bytes) -> bytes:
        try:
            self.parser.write(chunk)
        except MultipartParseError as exc:  # python-multipart caps header sizes itself too
            too_long = "header" in str(exc).lower()
            raise self._bad(
                "a part's headers are too long" if too_long else "the multipart body is malformed"
            ) from None
        out, self.out = bytes(self.out), bytearray()
        return out

    def finish(self) -> bytes:
        if not self.ended:
            raise self._bad("the multipart body ends before its closing boundary")
        if self.files == 0:
            field = self.route.file_field
            raise Refusal(400, "missing_file", f"the request has no '{field}' file; " + self._hint)
        return self.feed(b"")

    @cached_property
    def _hint(self) -> str:
        return HINT.format(field=self.route.file_field)

    def _bad(self, why: str) -> Refusal:
        return Refusal(400, "bad_request", f"{why}; {self._hint}")

    def _count_header(self, n: int) -> None:
        self.header_bytes += n
        if self.header_bytes > MAX_HEADER_BYTES:
            raise self._bad(f"a part's headers are too long (over {MAX_HEADER_BYTES} bytes)")

    def _part_begin(self) -> None:
        self.headers, self.header_bytes = {}, 0

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self.header_field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self.header_value += data[start:end]

    def _header_end(self) -> None:
        self.headers[bytes(self.header_field).strip().lower()] = bytes(self.header_value)
        self.header_field, self.header_value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        kind, options = parse_options_header(self.headers.get(b"content-disposition"))
        name = options.get(b"name")
        if kind != b"form-data" or not name:
            raise self._bad("a part has no form-data name")
        route, field = self.route, name.decode("latin-1")
        # Any spelling of a file name (filename, filename*) marks a file; the value is dropped.
        is_file = any(key.startswith(b"filename") for key in options)
        if field == route.file_field:
            if not is_file:
                raise Refusal(
                    400,
                    "not_a_file",
                    f"the '{field}' field must be a file, not text or a URL; {self._hint}",
                )
            self.files += 1
            if self.files > route.max_files:
                raise Refusal(
                    413 if route.too_many_code == "too_many_files" else 422,
                    route.too_many_code,
                    f"the request has over {route.max_files} files in '{field}', the limit of "
                    "this endpoint; send fewer per request",
                )
            self.current = "file"
            disposition = f'form-data; name="{field}"; filename="upload"'
            content_type = "application/octet-stream"
        elif field in route.text_fields:
            if field in self.text_names:
                raise Refusal(
                    400, "bad_request", f"the form field '{field}' was sent more than once"
                )
            self.text_names.add(field)
            if len(self.text_names) > MAX_TEXT_FIELDS:
                raise self._bad("the request has too many form fields")
            self.current, self.text_bytes = "text", 0
            disposition = f'form-data; name="{field}"'
            content_type = "text/plain; charset=utf-8"
        else:
            shown = field[:40].encode("ascii", "replace").decode()
            raise self._bad(f"the form has an unexpected field {shown!r}")
        self.out += b"--" + OUT_BOUNDARY + b"\r\n"
        self.out += f"Content-Disposition: {disposition}\r\n".encode()
        self.out += f"Content-Type: {content_type}\r\n\r\n".encode()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.current == "text":
            self.text_bytes += end - start
            if self.text_bytes > MAX_TEXT_BYTES:
                raise self._bad(f"a text field is over {MAX_TEXT_BYTES} bytes")
        self.out += data[start:end]

    def _part_end(self) -> None:
        self.out += b"\r\n"
        self.current = None

    def _end(self) -> None:
        self.out += b"--" + OUT_BOUNDARY + b"--\r\n"
        self.ended = True


class FrontDoor:
    """The ASGI middleware described in the module docstring."""

    def __init__(self, app, routes: Callable[[], dict[str, Route]]) -> None:
        self.app = app
        self._routes = routes

    @cached_property
    def routes(self) -> dict[str, Route]:
        return self._routes()  # on the first request, so importing the service reads no file

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = uuid.uuid4().hex[:12]
        token = request_id.set(rid)
        wrapped = EnvelopeSend(send, rid)
        try:
            route = self.routes.get(scope.get("path", "")) if scope["method"] == "POST" else None
            if route is None:
                await self.app(scope, receive, wrapped)
            else:
                await self._upload(scope, receive, send, route, wrapped)
        except Exception:
            # A real fault: a 500 in the one shape, with the request id; the traceback is
            # logged, never the request's payload.
            logger.exception("request %s: internal error", rid)
            if not wrapped.sent:
                text = f"the server failed on this request (request id {rid})"
                await send_error(send, 500, "internal", text, rid=rid, close=True)
        finally:
            request_id.reset(token)

    async def _upload(self, scope, receive, send, route: Route, held: EnvelopeSend) -> None:
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        kind, options = parse_options_header(headers.get(b"content-type", b""))
        boundary = options.get(b"boundary")
        if b"content-type" not in headers and _int(headers.get(b"content-length")) in (None, 0):
            field = route.file_field
            hint = HINT.format(field=field)
            await send_error(
                send, 400, "missing_file", f"the request has no '{field}' file; {hint}"
            )
            return
        if kind != b"multipart/form-data" or not boundary or len(boundary) > 200:
            hint = HINT.format(field=route.file_field)
            await send_error(send, 415, "not_multipart", f"the request is not a form; {hint}")
            return
        declared = _int(headers.get(b"content-length"))
        if declared is not None and declared > route.limit:
            await send_error(send, 413, "too_large", too_large(declared, route.limit), close=True)
            return

        rewriter = FormRewriter(boundary, route)
        state: dict = {"received": 0, "refusal": None, "done": False}
        deadline = time.monotonic() + route.body_timeout_s
        new_headers = [
            (k, v)
            for k, v in scope["headers"]
            if k.lower() not in (b"content-type", b"content-length")
        ]
        new_headers.append((b"content-type", b"multipart/form-data; boundary=" + OUT_BOUNDARY))
        inner_scope = {**scope, "headers": new_headers}

        async def guarded_receive():
            if state["refusal"] or state["done"]:
                return {"type": "http.disconnect"}
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except TimeoutError:
                state["refusal"] = Refusal(
                    408,
                    "body_timeout",
                    f"the upload did not arrive within {route.body_timeout_s:g} s; try again on a "
                    "faster connection",
                )
                return {"type": "http.disconnect"}
            if message["type"] != "http.request":
                return message
            chunk = message.get("body", b"")
            state["received"] += len(chunk)
            more = message.get("more_body", False)
            try:
                if state["received"] > route.limit:
                    text = too_large(state["received"], route.limit, at_least=True)
                    raise Refusal(413, "too_large", text)
                body = rewriter.feed(chunk)
                if not more:
                    body += rewriter.finish()
                    state["done"] = True
            except Refusal as refusal:
                state["refusal"] = refusal
                return {"type": "http.disconnect"}  # the form parser stops here
            return {"type": "http.request", "body": body, "more_body": more}

        held.refusal = lambda: state["refusal"]
        try:
            await self.app(inner_scope, guarded_receive, held)
        except Exception:
            if not state["refusal"]:
                raise
            # The app saw the disconnect we announced; the refusal below is the answer.
        refusal = state["refusal"]
        if refusal is not None:
            logger.info("request %s: refused (%s)", held.rid, refusal.code)  # never the payload
        if refusal is not None and not held.sent:
            close = refusal.status in (408, 413) or not state["done"]
            await send_error(send, refusal.status, refusal.code, refusal.message, close=close)


def _int(value: bytes | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
