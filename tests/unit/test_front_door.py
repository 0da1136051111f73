"""The front door (serving/uploads.py) in process, on a small Starlette app that echoes the
form it receives: what reaches the app after the rewrite, and the answer to a real fault.
The same rules are checked over HTTP against `bonefrac serve` in tests/service/test_hostile.py.
"""

from __future__ import annotations

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route as StarletteRoute

from bonefrac.serving.uploads import FrontDoor, Route

BOUNDARY = "b0"


async def _echo(request):
    form = await request.form()
    items = []
    for key, value in form.multi_items():
        if hasattr(value, "filename"):
            items.append([key, value.filename, len(await value.read())])
        else:
            items.append([key, value])
    return JSONResponse(items)


async def _fault(request):
    raise RuntimeError("disk full")


APP = FrontDoor(
    Starlette(
        routes=[
            StarletteRoute("/predict", _echo, methods=["POST"]),
            StarletteRoute("/broken", _fault, methods=["GET"]),
        ]
    ),
    lambda: {"/predict": Route(10_000, "image", 2, frozenset({"explain"}), 5.0)},
)


def _multipart(*parts: tuple[str, bytes]) -> bytes:
    body = b""
    for disposition, content in parts:
        body += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        body += content + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


def _call(method: str, path: str, body: bytes = b"") -> httpx.Response:
    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=APP, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
            return await client.request(method, path, content=body, headers=headers)

    return asyncio.run(run())


def test_the_app_sees_our_filenames_and_part_headers_only():
    body = _multipart(
        ('form-data; name="image"; filename="Doe^Jane\x00' + "x" * 300 + '.png"', b"PNGDATA"),
        ('form-data; name="explain"', b"true"),
    )
    response = _call("POST", "/predict", body)
    assert response.status_code == 200
    assert response.json() == [["image", "upload", 7], ["explain", "true"]]


def test_a_real_fault_is_a_500_with_a_request_id():
    response = _call("GET", "/broken")
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "internal"
    assert response.headers["x-request-id"] in error["message"]
    assert "disk full" not in response.text


def test_header_limits_and_text_limits_are_4xx():
    long_header = _multipart(('form-data; name="image"; x="' + "a" * 5000 + '"', b"1"))
    assert _call("POST", "/predict", long_header).json()["error"]["code"] == "bad_request"
    long_text = _multipart(('form-data; name="image"; filename="a"', b"1"),
                           ('form-data; name="explain"', b"t" * 65))  # fmt: skip
    assert "over 64 bytes" in _call("POST", "/predict", long_text).json()["error"]["message"]


def test_bentoml_concurrency_limit_answers_in_the_one_shape():
    from bentoml._internal.server.http.traffic import MaxConcurrencyMiddleware

    from bonefrac.serving.bentoml_hooks import envelope_outer_errors

    envelope_outer_errors()
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(scope, receive, send):
        entered.set()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limited = MaxConcurrencyMiddleware(slow, max_concurrency=1)

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=limited)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            first = asyncio.create_task(client.get("/predict"))
            await entered.wait()  # the first request holds the only slot
            second = await client.get("/predict")
            release.set()
            return [await first, second]

    first, second = asyncio.run(run())
    assert first.status_code == 200
    assert second.status_code == 429 and second.json()["error"]["code"] == "busy"
