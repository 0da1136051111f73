"""Hostile uploads against the real `bonefrac serve` (the session server): crafted multipart
bodies, crafted DICOMs, lying sizes and slow bodies get one clear 4xx in the one error shape,
quickly, without fetching URLs, without leaking client filenames, and without a 5xx."""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .conftest import MAX_UPLOAD_MB
from .inputs import dicom

pytestmark = pytest.mark.slow
TIMEOUT = 120
BOUNDARY = "hostile-boundary"


def multipart(*parts: tuple[str, bytes]) -> bytes:
    """A multipart body from (raw Content-Disposition value, content) pairs."""
    body = b""
    for disposition, content in parts:
        body += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        body += content + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


def post(server, route: str, body: bytes, **headers: str) -> httpx.Response:
    content_type = headers.pop("content_type", f"multipart/form-data; boundary={BOUNDARY}")
    return httpx.post(
        f"{server.url}{route}",
        content=body,
        headers={"content-type": content_type, **headers},
        timeout=TIMEOUT,
    )


def assert_error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["message"] and "\n" not in error["message"]
    return error["message"]


class Listener:
    """A local TCP listener that counts connections: a fetched URL would show up here."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.connections = 0
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/xray.png"

    def _run(self) -> None:
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.sock.close()


def test_a_long_repeated_part_header_is_refused_and_the_server_keeps_answering(server):
    line = b"content-disposition: " * 20_000  # ~400 kB of header: quadratic for the old regex
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; x="'.encode()
        + line
        + b'"\r\n\r\nabc\r\n'
        + f"--{BOUNDARY}--\r\n".encode()
    )
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, server, "/predict", body)
        assert httpx.get(f"{server.url}/healthz", timeout=TIMEOUT).status_code == 200
        assert "headers are too long" in assert_error(pending.result(), 400, "bad_request")


def test_urls_in_place_of_files_are_never_fetched(server):
    listener = Listener()
    try:
        url = listener.url.encode()
        form = f"image={listener.url}".encode()
        cases = {
            "form-encoded": (form, "application/x-www-form-urlencoded", 415, "not_multipart"),
            "no filename": (multipart(('form-data; name="image"', url)), None, 400, "not_a_file"),
            "trailing space": (
                multipart(('form-data; name="image" ', url)), None, 400, "not_a_file"
            ),
            "xfilename": (
                multipart(('form-data; name="image"; xfilename="a.png"', url)),
                None, 400, "not_a_file",
            ),
            "quoted filename as a value": (
                multipart(('form-data; name="image"; x="filename"', url)),
                None, 400, "not_a_file",
            ),
            "filename* only": (  # RFC 2231 names are not read: no filename, so text
                multipart(("form-data; name=\"image\"; filename*=UTF-8''a.png", url)),
                None, 400, "not_a_file",
            ),
        }  # fmt: skip
        for name, (body, content_type, status, code) in cases.items():
            extra = {"content_type": content_type} if content_type else {}
            response = post(server, "/predict", body, **extra)
            assert response.status_code == status, (name, response.text)
            assert response.json()["error"]["code"] == code, name
    finally:
        listener.close()
    assert listener.connections == 0


def test_client_filenames_never_reach_the_log(server, good_png):
    png = good_png.read_bytes()
    names = ["Doe^Jane_" + "x" * 300 + ".png", "Roe^Richard\x00.png", "../../Smith^Anna.png"]
    for name in names:
        disposition = f'form-data; name="image"; filename="{name}"'.encode("latin-1")
        body = multipart((disposition.decode("latin-1"), png))
        response = post(server, "/predict", body)
        assert response.status_code == 200, response.text
    log = server.log_text()
    for marker in ("Doe^Jane", "Roe^Richard", "Smith^Anna"):
        assert marker not in log


def test_crafted_dicoms_get_a_4xx_and_fail_only_themselves_in_a_batch(server, good_png):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    bomb = dicom(np.zeros((4000, 4000), np.uint16), syntax=DeflatedExplicitVRLittleEndian)
    assert len(bomb) < 200_000  # 32 MB of pixels
    plain = dicom(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    at = plain.index(b"\x28\x00\x10\x00US")
    multi_rows = plain[: at + 6] + b"\x04\x00\x40\x00\x40\x00" + plain[at + 10 :]
    unknown = plain.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.3.4.5.6.7.8.9.10")
    files = {"bomb": bomb, "rows": multi_rows, "syntax": unknown}
    expected = {"bomb": (415, "dicom_unsupported"), "rows": (400, "corrupt"),
                "syntax": (415, "dicom_unsupported")}  # fmt: skip
    for name, data in files.items():
        body = multipart(('form-data; name="image"; filename="x.dcm"', data))
        assert_error(post(server, "/predict", body), *expected[name])

    parts = [('form-data; name="images"; filename="a"', good_png.read_bytes())]
    parts += [('form-data; name="images"; filename="b"', data) for data in files.values()]
    items = post(server, "/predict_batch", multipart(*parts)).json()
    assert "error" not in items[0]
    assert [item["error"]["code"] for item in items[1:]] == [c for _, c in expected.values()]


def test_batch_and_study_file_counts_are_enforced(server, good_png):
    png = good_png.read_bytes()
    batch = multipart(*[('form-data; name="images"; filename="a"', png)] * 17)
    assert "over 16 files" in assert_error(post(server, "/predict_batch", batch), 422,
                                           "too_many_images")  # fmt: skip
    two = multipart(*[('form-data; name="image"; filename="a"', png)] * 2)
    assert_error(post(server, "/predict", two), 413, "too_many_files")
    unknown = multipart(('form-data; name="image"; filename="a"', png),
                        ('form-data; name="debug"', b"1"))  # fmt: skip
    assert "unexpected field" in assert_error(post(server, "/predict", unknown), 400,
                                              "bad_request")  # fmt: skip
    # two statements of the body part are a contradiction, not "the last one wins"
    twice = multipart(('form-data; name="image"; filename="a"', png),
                      ('form-data; name="body_part"', b"elbow"),
                      ('form-data; name="body_part"', b"wrist"))  # fmt: skip
    assert "'body_part' was sent more than once" in assert_error(
        post(server, "/predict", twice), 400, "bad_request"
    )


def _raw_exchange(server, head: bytes, body: bytes, wait_s: float = TIMEOUT) -> bytes:
    """Send a request head and part of a body on a raw socket; return all the server sends
    until it closes the connection."""
    parsed = urlparse(server.url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=wait_s) as sock:
        sock.sendall(head + body)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_a_declared_oversize_body_is_answered_413_and_the_connection_closed(server):
    declared = (MAX_UPLOAD_MB + 50) * 1_000_000
    head = (
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n"
    ).encode()
    received = _raw_exchange(server, head, b"--" + BOUNDARY.encode() + b"\r\n")
    status_line, _, rest = received.partition(b"\r\n")
    assert b" 413 " in status_line
    assert b"connection: close" in rest.lower() and b'"too_large"' in rest


def test_a_stalled_body_gets_408_and_the_connection_closed(server):
    head = (
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n"
    ).encode()
    received = _raw_exchange(server, head, b"--" + BOUNDARY.encode() + b"\r\n")  # then nothing
    assert b" 408 " in received.partition(b"\r\n")[0] and b'"body_timeout"' in received


def test_every_error_status_has_the_one_error_shape(server):
    assert_error(httpx.get(f"{server.url}/no/such/page"), 404, "not_found")
    assert_error(httpx.get(f"{server.url}/predict"), 405, "method_not_allowed")
    assert_error(httpx.get(f"{server.url}/static/index.html"), 404, "not_found")
    template = httpx.get(f"{server.url}/static/app.js")
    assert (
        template.status_code == 200
        and "frame-ancestors 'none'" in template.headers["content-security-policy"]
    )


def test_metrics_labels_are_bounded(server):
    for i in range(3):
        httpx.get(f"{server.url}/probe-Doe-Jane-{i}")
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "probe-Doe-Jane" not in metrics
    assert 'endpoint="/other"' in metrics and 'endpoint="/predict"' in metrics


@st.composite
def _mutated_requests(draw, valid: bytes) -> bytes:
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "cut", "insert"]))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 32))]
        else:
            data[at:at] = draw(st.sampled_from([b"\r\n", b'"', b";", b"--", b"filename=", b"\x00"]))
    return bytes(data)


def test_fuzzed_multipart_requests_never_get_a_5xx(server, good_png):
    valid = multipart(('form-data; name="image"; filename="a.png"', good_png.read_bytes()[:600]),
                      ('form-data; name="explain"', b"false"))  # fmt: skip
    statuses = []

    @settings(max_examples=40, deadline=None, database=None)
    @given(_mutated_requests(valid))
    def check(body: bytes) -> None:
        response = post(server, "/predict", body)
        statuses.append(response.status_code)
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert set(response.json()) == {"error"}

    check()
    assert len(statuses) >= 40


def test_refused_uploads_leave_no_traceback_in_the_log(server):
    response = post(server, "/predict", multipart(('form-data; name="image"', b"http://x/")))
    assert_error(response, 400, "not_a_file")
    assert "ClientDisconnect" not in server.log_text()
