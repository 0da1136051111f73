"""The decode budget: what an upload may cost, checked from its headers before pixels exist.

`imaging.decode` calls these checks; each refusal is an `ImageError` with a 4xx code. A
hostile file (a few kB declaring gigapixels, a deflated DICOM that inflates to gigabytes, a
JPEG frame larger than the DICOM header says) costs a header parse here, not memory.

- PNG/JPEG: the header's size against `max_pixels`, and at most `MAX_EXPANSION` pixels per
  byte of file above `EXPANSION_FLOOR` pixels (an X-ray export never compresses ~1000:1; a
  crafted flat image does). Pillow's own `MAX_IMAGE_PIXELS` is tied to `max_pixels`, and its
  `DecompressionBombWarning` is raised as an error (`pillow_guard`).
- DICOM: the transfer syntax must be known and decodable here (deflated ones are refused:
  zlib inflates the whole dataset before any check can run); Rows, Columns, Samples per
  Pixel, Bits Allocated/Stored and Number of Frames must be single in-range integers; the
  first frame's declared size is held to `max_pixels`, and a compressed frame's own header
  (JPEG, JPEG 2000) must agree with Rows x Columns before it is decoded.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO

import pydicom
import pydicom.pixels
from PIL import Image
from pydicom.uid import UID

from bonefrac.errors import UserError

MAX_EXPANSION = 100  # pixels per byte of file, for images over EXPANSION_FLOOR pixels
EXPANSION_FLOOR = 4_000_000
DEFLATED_SYNTAXES = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"}
NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
SAMPLES = {1, 3}
BITS_ALLOCATED = {1, 8, 16, 32}
FRAME_SIGNATURES = (b"\xff\xd8", b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP")  # JPEG, J2K, JP2
MAX_FRAMES = 10_000  # only the first frame is decoded; more is a header that lies


class BudgetError(UserError):
    """A refusal from the budget; `imaging` re-raises it as its ImageError with the code."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def check_pixels(width: int, height: int, n_bytes: int, max_pixels: int, min_side: int) -> None:
    """Declared size against the pixel cap, the smallest side and the expansion limit."""
    pixels = width * height
    if pixels > max_pixels:
        raise BudgetError(
            f"the image is {width} x {height} pixels ({pixels:,}), over the limit of "
            f"{max_pixels:,}; downscale it first",
            "too_many_pixels",
        )
    if min(width, height) < min_side:
        raise BudgetError(
            f"the image is {width} x {height} pixels; both sides must be at least {min_side} "
            "pixels",
            "too_small",
        )
    if pixels > EXPANSION_FLOOR and pixels > MAX_EXPANSION * n_bytes:
        raise BudgetError(
            f"the image declares {pixels:,} pixels in a {n_bytes:,}-byte file (over "
            f"{MAX_EXPANSION} pixels per byte), which no X-ray export does; export it again",
            "too_many_pixels",
        )


@contextmanager
def pillow_guard(max_pixels: int) -> Iterator[None]:
    """Pillow's decompression-bomb guard at our cap, its warning raised as an error."""
    Image.MAX_IMAGE_PIXELS = max_pixels  # the same value on every call: one setting per process
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def check_dicom_meta(data: bytes) -> None:
    """Refuse deflated transfer syntaxes before pydicom inflates the dataset."""
    marked = data[128:132] == b"DICM"
    if not marked and not data.startswith(b"\x02\x00"):
        return  # no file meta: pydicom reads the dataset with a native syntax
    try:
        fp = BytesIO(data)
        pydicom.filereader.read_preamble(fp, not marked)
        meta = pydicom.filereader._read_file_meta_info(fp)
        syntax = str(meta.get("TransferSyntaxUID", "")).strip()
    except Exception:
        if not marked:
            return  # not DICOM file meta after all: `imaging` decides what the bytes are
        raise BudgetError(
            "the DICOM file meta header is damaged; export the X-ray again", "corrupt"
        ) from None
    if syntax in DEFLATED_SYNTAXES:
        raise BudgetError(
            f"the DICOM file is deflate-compressed ({syntax}), which is not accepted; export "
            "the X-ray as uncompressed DICOM, PNG or JPEG",
            "dicom_unsupported",
        )


def check_syntax(syntax: UID) -> None:
    """The transfer syntax must be a known one with a decoder installed here."""
    text = str(syntax)
    if text in NATIVE_SYNTAXES:
        return
    if text in DEFLATED_SYNTAXES:
        raise BudgetError(
            "the DICOM file is deflate-compressed, which is not accepted; export the X-ray as "
            "uncompressed DICOM, PNG or JPEG",
            "dicom_unsupported",
        )
    try:
        known = syntax.is_transfer_syntax and syntax.is_compressed
        available = known and pydicom.pixels.get_decoder(syntax).is_available
    except Exception:
        known = available = False
    if not known:
        raise BudgetError(
            f"the DICOM transfer syntax {text[:64]!r} is not a known one; export the X-ray as "
            "uncompressed DICOM, PNG or JPEG",
            "dicom_unsupported",
        )
    if not available:
        raise BudgetError(
            f"the DICOM pixel data is compressed as {syntax.name!r}, which cannot be decoded "
            "here (no decoder installed); export the X-ray as uncompressed DICOM, PNG or JPEG",
            "dicom_unsupported",
        )


def dicom_int(ds: pydicom.Dataset, keyword: str, default: int | None, low: int, high: int) -> int:
    """One single-valued integer element within [low, high], else a 400."""
    if keyword not in ds:
        if default is None:
            raise BudgetError(
                f"the DICOM file does not say its {keyword}; export the X-ray again", "corrupt"
            )
        return default
    try:
        value = ds[keyword].value
        if isinstance(value, (bytes, str)):
            value = value.strip(b"\x00 " if isinstance(value, bytes) else "\x00 ")
        number = int(value)
        if number != float(value):
            raise ValueError
    except Exception:
        raise BudgetError(
            f"the DICOM {keyword} is not a single whole number; export the X-ray again",
            "corrupt",
        ) from None
    if not low <= number <= high:
        raise BudgetError(
            f"the DICOM {keyword} is {number}, outside {low}..{high}; export the X-ray again",
            "corrupt",
        )
    return number


def check_dicom(ds: pydicom.Dataset, n_bytes: int, max_pixels: int, min_side: int) -> None:
    """Header fields that size the first frame, before pydicom allocates it."""
    rows = dicom_int(ds, "Rows", None, 1, 65535)
    columns = dicom_int(ds, "Columns", None, 1, 65535)
    dicom_int(ds, "SamplesPerPixel", 1, 1, 3)
    if int(ds.get("SamplesPerPixel", 1)) not in SAMPLES:
        raise BudgetError("the DICOM SamplesPerPixel must be 1 or 3", "dicom_unsupported")
    bits = dicom_int(ds, "BitsAllocated", None, 1, 32)
    if bits not in BITS_ALLOCATED:
        raise BudgetError(
            f"the DICOM BitsAllocated is {bits}; 1, 8, 16 or 32 are supported", "dicom_unsupported"
        )
    dicom_int(ds, "BitsStored", bits, 1, bits)
    dicom_int(ds, "NumberOfFrames", 1, 1, MAX_FRAMES)
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        if keyword in ds:
            try:
                float(ds[keyword].value)
            except Exception:
                raise BudgetError(
                    f"the DICOM {keyword} is not a number; export the X-ray again", "corrupt"
                ) from None
    check_pixels(columns, rows, n_bytes, max_pixels, min_side)


def check_compressed_frame(ds: pydicom.Dataset, max_pixels: int) -> None:
    """A JPEG or JPEG 2000 frame's own size must match Rows x Columns before it is decoded."""
    try:
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    except Exception:
        raise BudgetError(
            "the DICOM compressed pixel data is damaged; export the X-ray again", "corrupt"
        ) from None
    if not frame.startswith(FRAME_SIGNATURES):
        return  # RLE and others: their decoders allocate from Rows x Columns
    try:
        with pillow_guard(max_pixels), Image.open(BytesIO(frame)) as header:
            width, height = header.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        width = height = max_pixels + 1
    except Exception:
        return  # Pillow cannot read this header; the decoder's own checks apply
    if (width, height) != (int(ds.Columns), int(ds.Rows)):
        raise BudgetError(
            f"the DICOM compressed frame is {width} x {height} pixels but the header says "
            f"{int(ds.Columns)} x {int(ds.Rows)}; export the X-ray again",
            "corrupt",
        )
