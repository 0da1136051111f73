"""Uploads for the service tests, built here with numpy, OpenCV and pydicom: one DICOM with
patient identifiers, and every kind of bad input the service must answer with a clear 4xx."""

from __future__ import annotations

import struct
import zlib
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

PATIENT_NAME = "Testpatient^Rosalind"
PATIENT_ID = "PID-7731-0042"


def png(pixels: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", pixels)
    assert ok
    return encoded.tobytes()


def dicom(pixels: np.ndarray | None, *, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """A CR DICOM file with patient identifiers; `pixels` (H, W) uint16 or None (no image)."""
    ds = Dataset()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19500101"
    ds.Modality = "CR"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (64, 64) if pixels is None else pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if pixels is not None:
        raw = pixels.astype("<u2").tobytes()
        ds.PixelData = encapsulate([raw]) if syntax == JPEG2000Lossless else raw
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dicom_from_png(path: Path) -> bytes:
    """The radiograph in `path` as a 12-bit DICOM (so it passes the OOD gate like the PNG)."""
    gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    return dicom(gray.astype(np.uint16) * 16)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb(side: int = 30_000) -> bytes:
    """A PNG of a few hundred bytes whose header declares side x side pixels."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grey
    body = zlib.compress(b"\x00" * 4096)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", body)
        + _chunk(b"IEND", b"")
    )


def out_of_distribution() -> bytes:
    """A colourful photo-like picture: smooth colour gradients and bright blocks, nothing like a
    radiograph (dark background, bright bone)."""
    y, x = np.mgrid[0:256, 0:256].astype(np.float32) / 255
    image = np.stack([255 * x, 255 * (1 - y), 128 + 127 * np.sin(12 * x * y)], axis=-1)
    image[40:120, 140:230] = (250, 250, 250)
    return png(image.astype(np.uint8))


def bad_inputs(good: bytes) -> dict[str, tuple[bytes, int, str]]:
    """name -> (file bytes, expected HTTP status, expected error code)."""
    return {
        "empty": (b"", 400, "empty"),
        "text": (b"patient notes, not an image\n" * 20, 415, "not_an_image"),
        "truncated": (good[: len(good) // 2], 400, "truncated"),
        "decompression_bomb": (decompression_bomb(), 413, "too_many_pixels"),
        "too_small": (png(np.full((16, 16), 128, np.uint8)), 422, "too_small"),
        "dicom_no_pixels": (dicom(None), 422, "dicom_no_pixels"),
        "dicom_jpeg2000": (
            dicom(np.arange(4096, dtype=np.uint16).reshape(64, 64), syntax=JPEG2000Lossless),
            415,
            "dicom_unsupported",
        ),
        "out_of_distribution": (out_of_distribution(), 422, "out_of_distribution"),
    }
