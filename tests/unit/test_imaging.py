"""Decoding and preprocessing: every input built here with numpy, Pillow and pydicom."""

from __future__ import annotations

import logging
import pickle
import struct
import warnings
import zlib
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from scipy import ndimage

from bonefrac.config import PreprocessConfig
from bonefrac.errors import UserError
from bonefrac.imaging import (
    ImageError,
    decode,
    gaussian_kernel,
    load_file,
    preprocess,
    preprocess_bytes,
    preprocess_file,
)

LUMA = np.array([0.299, 0.587, 0.114])
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-31415926"
RNG_SEED = 7

# Preprocessing with nothing but the resize, to isolate one step at a time.
PLAIN = PreprocessConfig(image_size=64, clahe=False, gaussian_kernel=0)


def rng() -> np.random.Generator:
    return np.random.default_rng(RNG_SEED)


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def gradient(height: int = 48, width: int = 64) -> np.ndarray:
    """uint8 (H, W) with distinct values in both directions."""
    y, x = np.mgrid[0:height, 0:width]
    return ((x * 3 + y * 2) % 256).astype(np.uint8)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid-looking 8-bit grayscale PNG header with a tiny body: a decompression bomb."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\0" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", body)
        + png_chunk(b"IEND", b"")
    )


def dicom_bytes(
    pixels: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    syntax: str = ExplicitVRLittleEndian,
    file_format: bool = True,
    **elements: object,
) -> bytes:
    """A small CR dataset with patient identifiers; `pixels` (H, W) or (frames, H, W) uint16."""
    ds = Dataset()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.Modality = "CR"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    shape = (64, 64) if pixels is None else pixels.shape[-2:]
    ds.Rows, ds.Columns = shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    if pixels is not None:
        if pixels.ndim == 3:
            ds.NumberOfFrames = pixels.shape[0]
        raw = pixels.astype("<u2").tobytes()
        ds.PixelData = encapsulate([raw]) if syntax == JPEG2000 else raw
    buffer = BytesIO()
    if file_format:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(buffer, enforce_file_format=True)
    else:  # a bare dataset: no 128-byte preamble, no "DICM", no file meta
        ds.save_as(buffer, implicit_vr=True, little_endian=True)
    return buffer.getvalue()


def dicom_ramp() -> np.ndarray:
    """uint16 (64, 64) holding every 12-bit value 0..4095 once, in order."""
    return np.arange(4096, dtype=np.uint16).reshape(64, 64)


# --- decoding PNG / JPEG -------------------------------------------------------------------


def _png_case(mode: str) -> tuple[bytes, np.ndarray]:
    """(file bytes, expected gray) for one Pillow mode, expected computed from the raw values."""
    gray8 = gradient()
    if mode == "L":
        return encode(Image.fromarray(gray8)), gray8 / 255
    if mode == "I;16":
        gray16 = gray8.astype(np.uint16) * 257 + np.arange(64, dtype=np.uint16)  # uses low bits
        image = Image.fromarray(gray16)
        assert image.mode == "I;16"
        return encode(image), gray16 / 65535
    rgb = np.stack([gray8, 255 - gray8, gray8 // 2], axis=-1)
    if mode == "RGB":
        return encode(Image.fromarray(rgb)), rgb @ LUMA / 255
    alpha = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
    if mode == "RGBA":
        image = Image.fromarray(np.dstack([rgb, alpha]))
        return encode(image), (rgb @ LUMA / 255) * (alpha / 255)  # composited on black
    if mode == "LA":
        image = Image.fromarray(np.dstack([gray8, alpha]))
        return encode(image), (gray8 / 255) * (alpha / 255)
    if mode == "P":
        palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [10, 20, 200]], np.uint8)
        indices = (gradient() % 4).astype(np.uint8)
        image = Image.fromarray(indices, mode="P")
        image.putpalette(palette.ravel().tolist())
        return encode(image), palette[indices] @ LUMA / 255
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["L", "I;16", "RGB", "RGBA", "LA", "P"])
def test_png_modes_decode_to_expected_gray(mode: str) -> None:
    data, expected = _png_case(mode)
    assert Image.open(BytesIO(data)).mode == mode
    gray = decode(data)
    assert gray.dtype == np.float32 and gray.shape == (48, 64)
    assert gray.min() >= 0.0 and gray.max() <= 1.0
    np.testing.assert_allclose(gray, expected, atol=1e-5)


def test_jpeg_decodes_to_gray_values() -> None:
    # Constant 8x8 blocks survive JPEG almost exactly (only the DC coefficient is non-zero).
    blocks = np.kron(np.array([[20, 90, 160], [230, 60, 120]], np.uint8), np.ones((16, 16)))
    blocks = blocks.astype(np.uint8)  # (32, 48)
    for image in (Image.fromarray(blocks), Image.fromarray(np.dstack([blocks] * 3))):
        gray = decode(encode(image, "JPEG", quality=95))
        assert gray.shape == (32, 48) and gray.dtype == np.float32
        np.testing.assert_allclose(gray, blocks / 255, atol=3 / 255)


def test_jpeg_exif_orientation_is_applied() -> None:
    stored = np.zeros((40, 64), np.uint8)
    stored[:, 32:] = 255  # left half dark, right half bright, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    gray = decode(encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif))
    assert gray.shape == (64, 40)  # displayed upright: tall
    assert gray[:32].mean() < 0.1 and gray[32:].mean() > 0.9  # the left edge is now the top


# --- preprocessing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        PreprocessConfig(image_size=64),
        PreprocessConfig(image_size=32, clahe=False, gaussian_kernel=3, gaussian_sigma=0.8),
        PLAIN,
    ],
)
@pytest.mark.parametrize("shape", [(48, 64), (90, 30), (20, 20)])
def test_preprocess_output_shape_and_dtype(cfg: PreprocessConfig, shape: tuple[int, int]) -> None:
    gray = rng().random(shape)
    out = preprocess(gray, cfg)
    size = cfg.image_size
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])


def test_wide_image_keeps_aspect_and_is_padded_top_and_bottom() -> None:
    out = preprocess(np.ones((50, 100)), PLAIN)[..., 0]  # -> 64 x 32 content
    assert (out[:16] == 0).all() and (out[48:] == 0).all()
    assert (out[16:48] == 255).all()


def test_tall_image_is_padded_left_and_right_and_small_images_grow() -> None:
    out = preprocess(np.ones((40, 20)), PLAIN)[..., 0]  # enlarged to 32 x 64
    assert (out[:, :16] == 0).all() and (out[:, 48:] == 0).all()
    assert (out[:, 16:48] == 255).all()


def _cases_for_identity(tmp_path: Path) -> list[Path]:
    data, _ = _png_case("I;16")
    files = {
        "gray8.png": encode(Image.fromarray(gradient(400, 512))),
        "gray16.png": data,
        "photo.jpg": encode(Image.fromarray(np.dstack([gradient()] * 3)), "JPEG"),
        "xray.dcm": dicom_bytes(dicom_ramp(), RescaleSlope=2, RescaleIntercept=-1024),
    }
    paths = []
    for name, payload in files.items():
        path = tmp_path / name
        path.write_bytes(payload)
        paths.append(path)
    return paths


def test_training_and_serving_paths_give_identical_arrays(tmp_path: Path) -> None:
    cfg = PreprocessConfig(image_size=64)  # CLAHE + 5x5 Gaussian, the defaults
    for path in _cases_for_identity(tmp_path):
        from_file = preprocess_file(path, cfg)
        from_upload = preprocess_bytes(path.read_bytes(), cfg)
        assert np.array_equal(from_file, from_upload), path.name
        assert np.array_equal(from_file, preprocess_file(path, cfg)), "not deterministic"


def test_gaussian_kernel_is_the_papers_formula() -> None:
    kernel = gaussian_kernel(5, 1.5)
    assert kernel.shape == (5, 5)
    assert kernel.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(kernel, kernel.T)
    np.testing.assert_allclose(kernel, kernel[::-1, ::-1])
    # G(x, y) ∝ exp(-(x² + y²) / (2σ²)): ratios between samples fix the shape exactly.
    assert kernel[2, 3] / kernel[2, 2] == pytest.approx(np.exp(-1 / (2 * 1.5**2)))
    assert kernel[0, 0] / kernel[2, 2] == pytest.approx(np.exp(-8 / (2 * 1.5**2)))
    with pytest.raises(ValueError, match="odd"):
        gaussian_kernel(4, 1.0)


@pytest.mark.parametrize(("size", "sigma"), [(3, 0.8), (5, 1.0), (7, 2.0)])
def test_filter_equals_paper_kernel_via_filter2d_and_scipy(size: int, sigma: float) -> None:
    gray = rng().random((40, 56))
    cfg = PreprocessConfig(image_size=56, clahe=False, gaussian_kernel=size, gaussian_sigma=sigma)
    kernel = gaussian_kernel(size, sigma)
    image = (gray * 255).astype(np.float32)
    blurred = cv2.GaussianBlur(image, (size, size), sigma, borderType=cv2.BORDER_REFLECT_101)
    paper = cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REFLECT_101)
    np.testing.assert_allclose(blurred, paper, atol=1e-3)  # values 0..255 in float32
    # SciPy as an independent reference: the same kernel by direct convolution.
    reference = ndimage.convolve(gray * 255, kernel, mode="mirror")
    r = size // 2
    np.testing.assert_allclose(blurred[r:-r, r:-r], reference[r:-r, r:-r], atol=1e-3)
    np.testing.assert_allclose(blurred, reference, atol=1e-3)  # "mirror" is REFLECT_101
    # ...and SciPy's own Gaussian filter, cut at the same radius.
    scipy_gauss = ndimage.gaussian_filter(gray * 255, sigma, truncate=r / sigma, mode="mirror")
    np.testing.assert_allclose(blurred[r:-r, r:-r], scipy_gauss[r:-r, r:-r], atol=1e-3)
    # preprocess applies exactly this filter (content 56 x 40 needs no resize, only padding).
    out = preprocess(gray, cfg)[8:48, :, 0]
    assert np.abs(out.astype(float) - np.clip(reference, 0, 255)).max() <= 0.5 + 1e-3


def test_kernel_zero_disables_the_filter() -> None:
    gray = rng().random((64, 64))
    out = preprocess(gray, PLAIN)[..., 0]
    assert np.array_equal(out, np.rint(gray * 255).astype(np.uint8))
    with_clahe = preprocess(gray, PreprocessConfig(image_size=64, gaussian_kernel=0))[..., 0]
    clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
    assert np.array_equal(with_clahe, clahe.apply(np.rint(gray * 255).astype(np.uint8)))


def test_filter_reduces_noise_variance_on_a_flat_image() -> None:
    noisy = np.clip(0.5 + rng().normal(0, 0.08, (128, 128)), 0, 1)
    plain = PreprocessConfig(image_size=128, clahe=False, gaussian_kernel=0)
    filtered = PreprocessConfig(image_size=128, clahe=False, gaussian_kernel=5, gaussian_sigma=1)
    variance_before = preprocess(noisy, plain)[..., 0].astype(float).var()
    variance_after = preprocess(noisy, filtered)[..., 0].astype(float).var()
    assert variance_after < 0.2 * variance_before  # white noise: about 1 / (4πσ²) ≈ 0.08
    assert preprocess(noisy, filtered).mean() == pytest.approx(0.5 * 255, abs=1)


def test_clahe_raises_local_contrast() -> None:
    dull = 0.4 + 0.1 * gradient().astype(float) / 255  # contrast squeezed into 10 % of the range
    off = preprocess(dull, PreprocessConfig(image_size=64, clahe=False, gaussian_kernel=0))
    on = preprocess(dull, PreprocessConfig(image_size=64, clahe=True, gaussian_kernel=0))
    assert on[8:56].std() > 1.3 * off[8:56].std()


def test_preprocess_rejects_arrays_that_are_not_gray_images() -> None:
    with pytest.raises(ValueError, match="2-D"):
        preprocess(np.zeros((8, 8, 3)), PLAIN)
    with pytest.raises(ValueError, match="NaN"):
        preprocess(np.full((8, 8), np.nan), PLAIN)


# --- errors ----------------------------------------------------------------------------------


def _error_cases() -> dict[str, tuple[bytes, dict[str, int], str, str]]:
    """name -> (bytes, limits, expected code, phrase the message must contain)."""
    png = encode(Image.fromarray(gradient()))
    jpeg = encode(Image.fromarray(gradient()), "JPEG")
    noise = encode(Image.fromarray(rng().integers(0, 256, (48, 64), dtype=np.uint8)))
    damaged = bytearray(noise)
    idat = noise.index(b"IDAT") + 8
    damaged[idat : idat + 200] = rng().bytes(200)  # complete file, garbage deflate stream
    return {
        "empty": (b"", {}, "empty", "empty"),
        "text": (b"patient notes, not an image\n" * 20, {}, "not_an_image", "not a PNG, JPEG"),
        "random": (rng().bytes(3000), {}, "not_an_image", "not a PNG, JPEG or DICOM image"),
        "bmp": (encode(Image.fromarray(gradient()), "BMP"), {}, "not_an_image", "not a PNG"),
        "truncated_png": (png[: len(png) // 2], {}, "truncated", "PNG file is truncated"),
        "truncated_png_header": (png[:40], {}, "truncated", "PNG file is truncated"),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], {}, "truncated", "JPEG file is truncated"),
        "damaged_png": (bytes(damaged), {}, "corrupt", "damaged"),
        "bomb_header": (png_claiming_size(50_000, 50_000), {}, "too_many_pixels", "2,500,000,000"),
        "bomb_limit": (png, {"max_pixels": 1000}, "too_many_pixels", "over the limit of 1,000"),
        "too_small": (encode(Image.new("L", (300, 20))), {}, "too_small", "at least 32"),
        "too_large": (png, {"max_bytes": 10}, "too_large", "over the 10 bytes limit"),
    }


@pytest.mark.parametrize("name", list(_error_cases()))
def test_bad_input_gets_a_clear_error(name: str) -> None:
    data, limits, code, phrase = _error_cases()[name]
    with pytest.raises(ImageError) as caught:
        decode(data, **limits)
    error = caught.value
    assert isinstance(error, UserError)
    assert error.code == code
    assert phrase in str(error)
    assert "\n" not in str(error) and len(str(error)) < 200


def test_bomb_dimensions_are_refused_before_decoding() -> None:
    # Pillow's guard is tied to max_pixels (its warning an error): refused in `open`.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageError) as caught:
            decode(png_claiming_size(12_000, 12_000))
    assert caught.value.code == "too_many_pixels"
    assert "144,000,000 pixels" in str(caught.value)


def test_load_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError) as caught:
        load_file(missing)
    assert caught.value.code == "not_found" and str(missing) in str(caught.value)
    cut = tmp_path / "cut.png"
    png = encode(Image.fromarray(gradient()))
    cut.write_bytes(png[: len(png) // 2])
    with pytest.raises(ImageError) as caught:
        preprocess_file(cut, PLAIN)
    assert caught.value.code == "truncated" and str(caught.value).startswith(str(cut))


def test_truncated_images_stay_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    decode(encode(Image.fromarray(gradient())))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode(encode(Image.fromarray(gradient())))


def test_image_error_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(ImageError("the file is empty", "empty")))
    assert error.code == "empty" and str(error) == "the file is empty"


# --- DICOM -----------------------------------------------------------------------------------


def test_dicom_applies_rescale_and_window() -> None:
    stored = dicom_ramp()
    values = stored.ravel().astype(float) * 2 - 1024  # modality LUT: -1024 .. 7166
    data = dicom_bytes(
        stored, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=1000, WindowWidth=1000
    )
    gray = decode(data).ravel()
    assert gray.dtype == np.float32
    assert (gray[values < 490] == 0).all() and (gray[values > 1510] == 1).all()
    assert gray[values == 1000] == pytest.approx(0.5, abs=0.01)
    assert (np.diff(gray) >= 0).all()  # the window is monotone


def test_dicom_without_window_is_min_max_scaled() -> None:
    stored = dicom_ramp()
    gray = decode(dicom_bytes(stored, RescaleSlope=2, RescaleIntercept=-1024))
    np.testing.assert_allclose(gray, stored / 4095, atol=1e-6)


def test_dicom_monochrome1_is_inverted() -> None:
    stored = (dicom_ramp() * 7) % 4096
    mono2 = decode(dicom_bytes(stored, photometric="MONOCHROME2"))
    mono1 = decode(dicom_bytes(stored, photometric="MONOCHROME1"))
    np.testing.assert_allclose(mono1, 1 - mono2, atol=1e-6)
    assert mono2[0, 1] > mono2[0, 0] and mono1[0, 1] < mono1[0, 0]


def test_dicom_multi_frame_gives_the_first_frame() -> None:
    first, second = dicom_ramp(), 4095 - dicom_ramp()
    gray = decode(dicom_bytes(np.stack([first, second])))
    np.testing.assert_allclose(gray, first / 4095, atol=1e-6)


def test_dicom_without_preamble_decodes_like_a_file_with_one() -> None:
    stored = dicom_ramp()
    bare = dicom_bytes(stored, file_format=False, RescaleSlope=1, RescaleIntercept=0)
    assert bare[128:132] != b"DICM"
    np.testing.assert_array_equal(decode(bare), decode(dicom_bytes(stored)))


def _dicom_error_cases() -> dict[str, tuple[bytes, dict[str, int], str, str]]:
    full = dicom_bytes(dicom_ramp())
    return {
        "no_pixels": (dicom_bytes(None), {}, "dicom_no_pixels", "no Pixel Data"),
        "jpeg2000": (
            dicom_bytes(dicom_ramp(), syntax=JPEG2000),
            {},
            "dicom_unsupported",
            "JPEG 2000",
        ),
        "truncated": (full[: len(full) - 3000], {}, "truncated", "truncated"),
        "too_small": (full, {"min_side": 100}, "too_small", "at least 100"),
        "too_many_pixels": (full, {"max_pixels": 100}, "too_many_pixels", "64 x 64"),
    }


@pytest.mark.parametrize("name", list(_dicom_error_cases()))
def test_dicom_errors_are_clear_and_never_mention_the_patient(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    data, limits, code, phrase = _dicom_error_cases()[name]
    assert PATIENT_NAME.encode() in data  # the identifiers really are in the file
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught_warnings:
        warnings.simplefilter("always")
        with pytest.raises(ImageError) as caught:
            decode(data, **limits)
    error = caught.value
    assert error.code == code and phrase in str(error)
    assert "\n" not in str(error) and len(str(error)) < 240
    # No chained pydicom exception that a traceback could print.
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__
    said = " ".join(
        [str(error), repr(error), repr(error.args), caplog.text]
        + [str(w.message) for w in caught_warnings]
    )
    for identifier in (PATIENT_NAME, PATIENT_ID, "Doe", "31415926"):
        assert identifier not in said


def test_dicom_decode_returns_pixels_only(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    gray = decode(dicom_bytes(dicom_ramp(), RescaleSlope=2, RescaleIntercept=-1024))
    assert type(gray) is np.ndarray and gray.dtype == np.float32 and gray.shape == (64, 64)
    assert PATIENT_NAME not in caplog.text and PATIENT_ID not in caplog.text
