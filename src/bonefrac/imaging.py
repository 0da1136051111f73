"""Decode X-ray files (PNG, JPEG, DICOM) and preprocess them: one implementation for all callers.

Training caches `preprocess_file(path)`, serving calls `preprocess_bytes(upload)`; both are
`decode` followed by `preprocess`, so the same file gives the same array (invariant 1).
Every way an input can be unusable ends in an `ImageError` with a sentence for a person and a
short `.code` for machines (invariant 6). Only pixels leave this module: DICOM files are read
with the pixel-related tags alone, so patient tags are never even parsed (invariant 7).
"""

from __future__ import annotations

import re
from io import BytesIO
from pathlib import Path
from typing import TypedDict, Unpack

import cv2
import numpy as np
import pydicom
import pydicom.pixels
from PIL import Image, ImageFile, ImageOps
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from bonefrac import decode_budget as budget
from bonefrac.config import PreprocessConfig
from bonefrac.errors import UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"

# ITU-R BT.601 luma, the weights Pillow's convert("L") uses; applied in float to keep precision.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

# The only DICOM elements read. Everything else (PatientName, PatientID, dates, ...) is skipped
# by the parser, so no identifier can reach an error message, a log line or a return value.
_DICOM_PIXEL_TAGS = [
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "FloatPixelData",
    "DoubleFloatPixelData",
    "PixelData",
]
_DICOM_PIXEL_DATA = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_DICOM_PHOTOMETRICS = {"MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422"}


class Limits(TypedDict, total=False):
    """The keyword limits of `decode`, passed through by the file and bytes helpers."""

    max_pixels: int
    min_side: int
    max_bytes: int | None


class ImageError(UserError):
    """Why an input cannot be used: the message is one sentence for a person, `.code` is short.

    Codes: empty, too_large, not_an_image, truncated, corrupt, too_many_pixels, too_small,
    dicom_no_pixels, dicom_unsupported, not_found, unreadable. The code has a default so the
    error survives pickling between worker processes of the preprocessing stage.
    """

    def __init__(self, message: str, code: str = "invalid_image") -> None:
        super().__init__(message)
        self.code = code


def decode(
    data: bytes,
    *,
    max_pixels: int = 40_000_000,
    min_side: int = 32,
    max_bytes: int | None = None,
) -> np.ndarray:
    """Bytes of a PNG, JPEG or DICOM file -> 2-D grayscale float32 in [0, 1].

    The limits are checked before any pixel is decoded, so a hostile upload costs a header
    parse, not gigabytes of memory.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # A global that other code may flip; with it Pillow pads truncated files with grey and
        # the model would silently classify half an image. A fault of the process, not the file.
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True by other code; bonefrac needs "
            "it False to reject truncated images"
        )
    try:
        return _decode(data, max_pixels, min_side, max_bytes)
    except ImageError:
        raise
    except budget.BudgetError as exc:
        raise ImageError(str(exc), exc.code) from None
    except MemoryError:
        raise  # the budget keeps a file from needing this much: the server is short of memory
    except Exception:
        # Whatever a crafted file makes a decoder raise, it is a fault of the file (a 4xx).
        raise ImageError(
            "the file is damaged and cannot be decoded; export the X-ray again", "corrupt"
        ) from None


def _decode(data: bytes, max_pixels: int, min_side: int, max_bytes: int | None) -> np.ndarray:
    if not data:
        raise ImageError("the file is empty (0 bytes); send a PNG, JPEG or DICOM X-ray", "empty")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageError(
            f"the file is {_size_text(len(data))}, over the {_size_text(max_bytes)} limit; "
            "send a smaller export of the X-ray",
            "too_large",
        )
    # DICOM first: its 128-byte preamble is free-form and may itself look like another format.
    has_dicom_marker = data[128:132] == b"DICM"
    if not has_dicom_marker and data.startswith(PNG_SIGNATURE):
        return _decode_pillow(data, "PNG", max_pixels, min_side)
    if not has_dicom_marker and data.startswith(JPEG_SIGNATURE):
        return _decode_pillow(data, "JPEG", max_pixels, min_side)
    # Some DICOM writers omit the preamble and marker; without the marker accept the bytes only
    # if they parse into a dataset that describes an image.
    ds = _read_dicom(data, force=not has_dicom_marker)
    if ds is None:
        raise ImageError(
            "the file is not a PNG, JPEG or DICOM image; export the X-ray in one of these formats",
            "not_an_image",
        )
    return _dicom_to_gray(ds, len(data), max_pixels, min_side)


def load_file(path: Path, **limits: Unpack[Limits]) -> np.ndarray:
    """Read an image file and `decode` it; errors name the file, for finding it in a dataset."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path} not found: check the image path", "not_found") from None
    except OSError as exc:
        raise ImageError(f"{path} cannot be read: {exc.strerror or exc}", "unreadable") from None
    try:
        return decode(data, **limits)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}", exc.code) from None


def preprocess(gray: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """2-D grayscale in [0, 1] -> uint8 (S, S, 3) model input.

    Steps: CLAHE (optional) -> Gaussian filter (K=0 disables) -> resize keeping the aspect
    ratio (longer side = S) -> centre on a black S x S canvas -> 3 channels (ResNet50 expects
    RGB). Between CLAHE and the final rounding the image stays float32, so the filter and the
    resize add no quantisation; uint8 output keeps the training cache small.
    """
    gray = np.asarray(gray)
    if gray.ndim != 2 or gray.size == 0:
        raise ValueError(f"preprocess needs a non-empty 2-D grayscale array, got {gray.shape}")
    if not np.isfinite(gray).all():
        raise ValueError("preprocess needs finite values in [0, 1], got NaN or infinity")
    size = cfg.image_size

    # 1. Contrast: OpenCV's CLAHE works on integer images, so quantise to 8 bits first.
    if cfg.clahe:
        grid = (cfg.clahe_tile_grid, cfg.clahe_tile_grid)
        clahe = cv2.createCLAHE(clipLimit=cfg.clahe_clip_limit, tileGridSize=grid)
        image = clahe.apply(_to_uint8(gray)).astype(np.float32)  # (H, W), 0..255
    else:
        image = np.clip(gray, 0.0, 1.0).astype(np.float32) * np.float32(255)  # (H, W), 0..255

    # 2. Denoise with the paper's Gaussian kernel (see `gaussian_kernel`; OpenCV samples the same
    #    normalised Gaussian and applies it separably).
    if cfg.gaussian_kernel:
        k = cfg.gaussian_kernel
        image = cv2.GaussianBlur(
            image,
            (k, k),
            sigmaX=cfg.gaussian_sigma,
            sigmaY=cfg.gaussian_sigma,
            borderType=cv2.BORDER_REFLECT_101,
        )

    # 3. Resize so the longer side is S; INTER_AREA averages when shrinking (no aliasing).
    height, width = image.shape
    if width >= height:
        new_width, new_height = size, max(1, round(height * size / width))
    else:
        new_width, new_height = max(1, round(width * size / height)), size
    if (new_width, new_height) != (width, height):
        shrinking = new_width < width
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        image = cv2.resize(image, (new_width, new_height), interpolation=interpolation)

    # 4. Pad with black (the X-ray background) to S x S, content centred.
    canvas = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - new_height) // 2, (size - new_width) // 2
    canvas[top : top + new_height, left : left + new_width] = _round_to_uint8(image)

    # 5. Three identical channels for an ImageNet-shaped backbone.
    return cv2.merge([canvas, canvas, canvas])  # (S, S, 3) uint8


def preprocess_bytes(data: bytes, cfg: PreprocessConfig, **limits: Unpack[Limits]) -> np.ndarray:
    """Serving path: uploaded bytes -> model input, identical to `preprocess_file` on the file."""
    return preprocess(decode(data, **limits), cfg)


def preprocess_file(path: Path, cfg: PreprocessConfig, **limits: Unpack[Limits]) -> np.ndarray:
    """Training path: an image file -> model input, identical to `preprocess_bytes`."""
    return preprocess(load_file(path, **limits), cfg)


HISTOGRAM_BINS = 16


def downsample(images: np.ndarray, size: int, batch: int = 1024) -> np.ndarray:
    """The PCA descriptor of preprocessed images (PCA fitting and the serving OOD gate):
    (N, S, S) or (N, S, S, 3) uint8 -> (N, size*size + 16) float32.

    The downsampled intensities in [0, 1], plus the full-resolution intensity histogram
    (weighted to count like the pixels): downsampling alone turns noise or a page of text
    into a plausible blurry grey, while the histogram keeps what makes a radiograph one
    (dark background, bright bone) visible to PCA.
    """
    weight = np.sqrt(size * size / HISTOGRAM_BINS)
    out = np.empty((len(images), size * size + HISTOGRAM_BINS), dtype=np.float32)
    for start in range(0, len(images), batch):
        block = np.asarray(images[start : start + batch])
        if block.ndim == 4:
            block = block[..., 0]
        for i, image in enumerate(block):
            small = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
            histogram = (
                np.bincount(image.reshape(-1) // (256 // HISTOGRAM_BINS), minlength=HISTOGRAM_BINS)
                / image.size
            )
            out[start + i, : size * size] = small.reshape(-1).astype(np.float32) / 255.0
            out[start + i, size * size :] = weight * np.sqrt(histogram)
    return out


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """The paper's normalised 2-D Gaussian: exp(-(x²+y²)/(2σ²)) / (2πσ²) on a K x K grid.

    The grid is centred at 0 and the kernel divided by its sum, so filtering keeps the mean
    brightness. `preprocess` uses OpenCV's separable equivalent; a test proves they agree.
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd number, got {size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    x, y = np.meshgrid(offsets, offsets)
    kernel = np.exp(-(x**2 + y**2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)
    return kernel / kernel.sum()


def _size_text(n_bytes: int) -> str:
    if n_bytes >= 1_000_000:
        return f"{n_bytes / 1e6:.1f} MB"
    return f"{n_bytes / 1e3:.1f} kB" if n_bytes >= 1000 else f"{n_bytes} bytes"


def _to_uint8(gray: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(gray, 0.0, 1.0) * 255).astype(np.uint8)


def _round_to_uint8(image: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(image, 0, 255)).astype(np.uint8)


def _decode_pillow(data: bytes, kind: str, max_pixels: int, min_side: int) -> np.ndarray:
    try:
        with budget.pillow_guard(max_pixels), Image.open(BytesIO(data), formats=[kind]) as opened:
            # The header gives the size; check it before `load` allocates the pixels.
            budget.check_pixels(*opened.size, len(data), max_pixels, min_side)
            opened.load()
            ImageOps.exif_transpose(opened, in_place=True)  # photos of films carry a rotation
            return _pillow_to_gray(opened)
    except (ImageError, budget.BudgetError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard at max_pixels (pillow_guard) fires in `open`, before our check.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise ImageError(
            f"the image has {size}, over the limit of {max_pixels:,}; downscale it first",
            "too_many_pixels",
        ) from None
    except MemoryError:
        raise
    except Exception as exc:
        # Pillow reports damaged input with many types (OSError, SyntaxError, EOFError,
        # ValueError, struct.error, ...): for untrusted bytes they all mean "unusable file".
        raise _damaged(kind, data, exc) from None


def _damaged(kind: str, data: bytes, exc: Exception) -> ImageError:
    end_marker = b"IEND" if kind == "PNG" else b"\xff\xd9"
    if "truncat" in str(exc).lower() or isinstance(exc, EOFError) or end_marker not in data:
        return ImageError(
            f"the {kind} file is truncated (its data ends early); send the complete file",
            "truncated",
        )
    return ImageError(
        f"the {kind} file is damaged and cannot be decoded; export the X-ray again", "corrupt"
    )


def _pillow_to_gray(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":  # 16-bit PNG (older Pillow: "I"), full scale 65535
        gray = np.asarray(image, dtype=np.float32) / np.float32(65535)
    elif mode in ("L", "1"):
        gray = np.asarray(image.convert("L") if mode == "1" else image, dtype=np.float32) / 255
    elif mode == "LA":
        pixels = np.asarray(image, dtype=np.float32) / np.float32(255)  # (H, W, 2)
        gray = pixels[..., 0] * pixels[..., 1]  # composite on black
    elif "A" in mode or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / np.float32(255)
        gray = (rgba[..., :3] @ _LUMA) * rgba[..., 3]  # composite on black
    else:  # RGB, P without transparency, CMYK, YCbCr
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255)
        gray = rgb @ _LUMA
    return np.ascontiguousarray(np.clip(gray, 0.0, 1.0), dtype=np.float32)


def _read_dicom(data: bytes, *, force: bool = False) -> pydicom.Dataset | None:
    """Parse only the pixel-related elements; with `force` (no "DICM" marker) None when the
    bytes do not parse into a dataset that describes an image.

    Exceptions from pydicom are never chained or quoted, here or below: only pixels, sizes and
    transfer syntax names leave this module.
    """
    budget.check_dicom_meta(data)  # before dcmread, which would inflate a deflated dataset
    try:
        ds = pydicom.dcmread(BytesIO(data), force=force, specific_tags=_DICOM_PIXEL_TAGS)
    except MemoryError:
        raise
    except Exception:
        if force:
            return None
        raise ImageError(
            "the DICOM file is damaged and cannot be parsed; export the X-ray again", "corrupt"
        ) from None
    if force and not any(k in ds for k in ("Rows", *_DICOM_PIXEL_DATA)):
        return None
    return ds


def _dicom_to_gray(ds: pydicom.Dataset, n_bytes: int, max_pixels: int, min_side: int) -> np.ndarray:
    if not any(k in ds for k in _DICOM_PIXEL_DATA):
        raise ImageError(
            "the DICOM file holds no image (it has no Pixel Data); send the DICOM file of the "
            "X-ray image itself",
            "dicom_no_pixels",
        )
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageError(
            "the DICOM file does not say its image size (Rows/Columns); export the X-ray again",
            "corrupt",
        )
    budget.check_dicom(ds, n_bytes, max_pixels, min_side)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric not in _DICOM_PHOTOMETRICS:
        raise ImageError(
            f"the DICOM photometric interpretation {photometric!r} is not supported; export the "
            "X-ray as grayscale DICOM, PNG or JPEG",
            "dicom_unsupported",
        )
    syntax = _transfer_syntax(ds)
    budget.check_syntax(syntax)
    if syntax.is_compressed:
        budget.check_compressed_frame(ds, max_pixels)

    try:
        with budget.pillow_guard(max_pixels):  # pydicom decodes JPEG frames with Pillow
            pixels = pydicom.pixels.pixel_array(ds, index=0)  # first frame of a multi-frame file
    except MemoryError:
        raise
    except Exception as exc:
        raise _undecodable_dicom(syntax, exc) from None
    if pixels.shape[:2] != (int(ds.Rows), int(ds.Columns)):
        raise ImageError(
            "the DICOM pixel data does not match its header and cannot be decoded; export the "
            "X-ray again",
            "corrupt",
        )

    try:
        if pixels.ndim == 3:  # colour (H, W, 3), already converted to RGB by pydicom
            values = pixels.astype(np.float64) @ _LUMA.astype(np.float64)
        else:
            # Stored values -> physical units (Modality LUT / rescale) -> the intended window.
            values = pydicom.pixels.apply_modality_lut(pixels, ds)
            values = pydicom.pixels.apply_voi_lut(values, ds, index=0)
        values = np.asarray(values, dtype=np.float64)
    except MemoryError:
        raise
    except Exception:
        raise ImageError(
            "the DICOM rescale or window values cannot be applied; export the X-ray again",
            "corrupt",
        ) from None
    if not np.isfinite(values).all():
        raise ImageError(
            "the DICOM pixel data contains invalid numbers (NaN or infinity); export the X-ray "
            "again",
            "corrupt",
        )
    low, high = float(values.min()), float(values.max())
    gray = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if photometric == "MONOCHROME1":  # 0 means white in MONOCHROME1
        gray = 1.0 - gray
    return np.ascontiguousarray(gray, dtype=np.float32)


def _transfer_syntax(ds: pydicom.Dataset) -> pydicom.uid.UID:
    """The dataset's transfer syntax; a file without file meta gets the one it was read with."""
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        if implicit:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        else:
            ds.file_meta.TransferSyntaxUID = (
                ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian
            )
    return ds.file_meta.TransferSyntaxUID


def _undecodable_dicom(syntax: pydicom.uid.UID, exc: Exception) -> ImageError:
    if not syntax.is_compressed:
        if "less than expected" in str(exc):  # pydicom's wording for short native pixel data
            return ImageError(
                "the DICOM pixel data is shorter than its header says (the file is truncated); "
                "send the complete file",
                "truncated",
            )
        return ImageError(
            "the DICOM pixel data does not match its header and cannot be decoded; export the "
            "X-ray again",
            "corrupt",
        )
    name = f"{syntax.name!r} ({syntax})" if syntax.name != str(syntax) else repr(str(syntax))
    try:
        installed = pydicom.pixels.get_decoder(syntax).is_available
    except NotImplementedError:
        installed = False
    reason = "the decoder failed" if installed else "no decoder installed"
    return ImageError(
        f"the DICOM pixel data is compressed as {name}, which cannot be decoded here ({reason}); "
        "export the X-ray as uncompressed DICOM, PNG or JPEG",
        "dicom_unsupported",
    )
