"""The decode budget: crafted files are refused with a 4xx code from their headers, and a
bounded fuzz run (hypothesis) over mutations of valid PNG, 16-bit PNG, JPEG and DICOM files
never gets anything but a picture or an ImageError, within a memory budget."""

from __future__ import annotations

import tracemalloc
from io import BytesIO

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from bonefrac.imaging import ImageError, decode

# Codes decode may answer; each maps to a 4xx in the service (STATUS in serving/service.py).
CODES = {
    "empty",
    "too_large",
    "not_an_image",
    "truncated",
    "corrupt",
    "too_many_pixels",
    "too_small",
    "dicom_no_pixels",
    "dicom_unsupported",
}
FUZZ_MAX_PIXELS = 1_000_000
FUZZ_PEAK_BYTES = 64 * 1024 * 1024  # Python/numpy allocations of one decode, at most


def dicom(syntax=ExplicitVRLittleEndian, rows=64, cols=64, pixel_data=None, **extra) -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ramp = (np.arange(rows * cols, dtype=np.uint32) % 4096).astype("<u2")
    ds.PixelData = ramp.tobytes() if pixel_data is None else pixel_data
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def jpeg_dicom(side: int, rows: int = 64, cols: int = 64) -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (side, side), dtype=np.uint8)
    frame = encode(Image.fromarray(noise), "JPEG")
    return dicom(JPEGBaseline8Bit, rows, cols, encapsulate([frame]), BitsAllocated=8,
                 BitsStored=8, HighBit=7)  # fmt: skip


def patch_element(data: bytes, tag_vr: bytes, value: bytes) -> bytes:
    """Replace one explicit-VR element's value (2-byte length form) with raw bytes."""
    at = data.index(tag_vr)
    length = int.from_bytes(data[at + 6 : at + 8], "little")
    return data[: at + 6] + len(value).to_bytes(2, "little") + value + data[at + 8 + length :]


ROWS = b"\x28\x00\x10\x00US"
SLOPE = b"\x28\x00\x53\x10DS"


def crafted() -> dict[str, tuple[bytes, dict, str]]:
    """name -> (file, decode limits, expected code): each gave a 500, a stall or gigabytes."""
    plain = dicom()
    zeros = np.zeros(4000 * 4000, np.uint16).tobytes()  # 32 MB that deflate to ~30 kB
    return {
        "deflated_bomb": (
            dicom(DeflatedExplicitVRLittleEndian, 4000, 4000, zeros),
            {},
            "dicom_unsupported",
        ),
        "unknown_syntax": (
            plain.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.3.4.5.6.7.8.9.10"),
            {},
            "dicom_unsupported",
        ),
        "rows_empty": (patch_element(plain, ROWS, b""), {}, "corrupt"),
        "rows_odd_length": (patch_element(plain, ROWS, b"\x40\x00\x00"), {}, "corrupt"),
        "rows_multi_valued": (patch_element(plain, ROWS, b"\x40\x00\x40\x00"), {}, "corrupt"),
        "slope_not_a_number": (
            patch_element(dicom(RescaleSlope="1"), SLOPE, b"ab"),
            {},
            "corrupt",
        ),
        "jpeg_frame_larger_than_header": (jpeg_dicom(300), {}, "corrupt"),
        "jpeg_frame_over_pixel_cap": (jpeg_dicom(64), {"max_pixels": 1000}, "too_many_pixels"),
        "png_expands_over_100_per_byte": (
            encode(Image.new("L", (6000, 4000)), "PNG"),
            {},
            "too_many_pixels",
        ),
        "pillow_cap_is_max_pixels": (
            encode(Image.new("L", (300, 300)), "PNG"),
            {"max_pixels": 50_000},
            "too_many_pixels",
        ),
    }


@pytest.mark.parametrize("name", list(crafted()))
def test_crafted_file_is_refused_with_a_4xx_code(name: str) -> None:
    data, limits, code = crafted()[name]
    tracemalloc.start()
    try:
        with pytest.raises(ImageError) as caught:
            decode(data, **limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.code == code, str(caught.value)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 250
    assert peak < 8 * len(data) + 16 * 1024 * 1024  # refused from the header, not decoded


def test_valid_compressed_dicom_frame_still_decodes() -> None:
    gray = decode(jpeg_dicom(64))
    assert gray.shape == (64, 64) and gray.dtype == np.float32


# -- fuzzing -------------------------------------------------------------------------------------


def _seeds() -> list[bytes]:
    y, x = np.mgrid[0:48, 0:64]
    ramp8 = ((x * 4 + y) % 256).astype(np.uint8)
    ramp16 = (ramp8.astype(np.uint16) * 257).astype(np.uint16)
    return [
        encode(Image.fromarray(ramp8), "PNG"),
        encode(Image.fromarray(ramp16), "PNG"),  # 16-bit grey
        encode(Image.fromarray(ramp8).convert("RGB"), "JPEG"),
        dicom(),
        jpeg_dicom(64),
    ]


SEEDS = _seeds()


@st.composite
def mutated(draw) -> bytes:
    """A seed file with a few byte edits: flips, overwrites with 0/255, cuts and insertions."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "truncate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80]))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at:]
    return bytes(data)


@st.composite
def dicom_headers(draw) -> bytes:
    """A DICOM whose size and value fields are drawn, including hostile ones."""
    rows = draw(st.integers(1, 70_000 // 64))
    cols = draw(st.integers(1, 70_000 // 64))
    pixel_data = bytes(min(rows * cols * 2, 200_000))  # short of the header's size when large
    data = dicom(rows=rows, cols=cols, pixel_data=pixel_data, RescaleSlope="1")
    value = draw(
        st.one_of(
            st.binary(max_size=9),
            st.sampled_from([b"", b"\x00\x00", b"\xff\xff", b"\x40\x00\x40\x00"]),
        )
    )
    return patch_element(data, draw(st.sampled_from([ROWS, SLOPE])), value)


def _decode_within_budget(data: bytes) -> None:
    tracemalloc.start()
    try:
        try:
            gray = decode(data, max_pixels=FUZZ_MAX_PIXELS, min_side=8)
        except ImageError as exc:
            assert exc.code in CODES, exc.code
            message = str(exc)
            assert message and "\n" not in message
        else:
            assert gray.ndim == 2 and gray.dtype == np.float32
            assert gray.size <= FUZZ_MAX_PIXELS and np.isfinite(gray).all()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < FUZZ_PEAK_BYTES


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(mutated())
def test_fuzzed_files_decode_or_get_a_4xx_code(data: bytes) -> None:
    _decode_within_budget(data)


@FUZZ
@given(dicom_headers())
def test_fuzzed_dicom_headers_decode_or_get_a_4xx_code(data: bytes) -> None:
    _decode_within_budget(data)
