"""SYNTHETIC MURA-like X-ray dataset, for the demo and the tests only.

Real MURA (Stanford) needs a registration and cannot be downloaded here, so the demo and every
test run on images drawn by this module. They are NOT real radiographs, and a model's numbers on
them say nothing about real performance. What they copy is everything the pipeline depends on:

- the exact MURA-v1.1 layout (`{train,valid}/XR_<PART>/patientNNNNN/studyN_<label>/imageN.png`)
  and its four headerless CSVs, so the real reader runs unchanged;
- radiograph-like pictures: dark air, a soft-tissue haze, bright bones whose cortex is brighter
  than their marrow, Gaussian plus speckle noise, random pose and exposure, varied non-square
  sizes, and now and then an RGB file, as MURA has;
- anatomies that differ clearly even at 32-64 px (elbow: two long bones meeting at an angle;
  hand: a palm with five rays of small bones; shoulder: a round humeral head beside the glenoid
  and scapula, the clavicle across the top), so a small network can learn the body part;
- abnormal studies that show a bold fracture: a dark jagged gap across a bone with the far
  fragment displaced and angulated.

The output is deterministic: every image draws from its own generator seeded by the run's seed
and the image's place in the dataset, so the same seed writes byte-identical files (given the
same NumPy and OpenCV builds) and one image does not depend on which others were drawn.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np

from bonefrac.errors import UserError

MURA_FOLDER = "MURA-v1.1"
SPLITS = ("train", "valid")
DEFAULT_PARTS = ("XR_ELBOW", "XR_HAND", "XR_SHOULDER")

MIN_PATIENTS = 2
MIN_SIZE = 32
MIN_STUDIES_PER_LABEL = 2  # per split and part, so both classes always exist for the tests
MAX_STUDIES_PER_PATIENT = 3
MAX_IMAGES_PER_STUDY = 4
RGB_FRACTION = 1 / 6  # MURA holds a few RGB files among the grayscale ones; readers must cope

# Brightness on a 0..1 scale follows attenuation: air is dark, soft tissue a haze, dense
# cortical bone brightest, marrow in between, and a fracture gap lets X-rays through again.
BACKGROUND = 0.05
SOFT_TISSUE = 0.30
CORTEX = 0.95
MARROW = 0.62
THIN_BONE = 0.48  # scapula blade and ribs: bone seen face-on, so less dense than a shaft
FRACTURE_GAP = 0.24
MARROW_WIDTH_RATIO = 0.5  # of a shaft's width; the rest is the bright cortical rim

DESIGN_SIZE = 256  # anatomy is laid out in a 256-unit square, then scaled to the canvas

Point = np.ndarray  # (2,) float, design units: x to the right, y downwards


# --- drawing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pose:
    """Where the patient lies on the film: left or right limb, rotation, zoom and shift.

    Drawing through the pose, instead of warping a drawn picture, leaves no canvas edges in the
    image and costs nothing extra.
    """

    mirrored: bool
    rotation: float  # degrees, as cv2.ellipse measures angles
    zoom: float  # pixels per design unit
    design_center: Point  # this design point lands on ...
    pixel_center: Point  # ... this pixel

    @cached_property
    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(linear (2, 2), offset (2,)) taking design points to pixel coordinates."""
        radians = np.deg2rad(self.rotation)
        cos, sin = np.cos(radians), np.sin(radians)
        linear = self.zoom * np.array([[cos, -sin], [sin, cos]])
        if self.mirrored:
            linear = linear @ np.diag([-1.0, 1.0])
        return linear, self.pixel_center - linear @ self.design_center

    def to_pixels(self, points: Sequence[Point]) -> np.ndarray:
        """Design points as integer pixel coordinates, shape (n, 2), for OpenCV drawing."""
        linear, offset = self._affine
        return np.rint(np.asarray(points) @ linear.T + offset).astype(np.int32)

    def scaled(self, factor: float) -> _Pose:
        """The same pose on a film `factor` times the size (for the low-resolution haze)."""
        return _Pose(
            self.mirrored,
            self.rotation,
            self.zoom * factor,
            self.design_center,
            self.pixel_center * factor,
        )


@dataclass
class _Film:
    """A float canvas that takes coordinates in design units, so anatomy code ignores pixels
    and pose."""

    pixels: np.ndarray  # (height, width) float32, 0..1
    pose: _Pose

    def _length(self, design_length: float) -> int:
        return max(1, round(design_length * self.pose.zoom))

    def _ellipse_frame(
        self, angle: float, span: tuple[float, float]
    ) -> tuple[float, tuple[float, float]]:
        # A mirror turns an ellipse's angle and its arc's parameter the other way round.
        if self.pose.mirrored:
            angle, span = -angle, (180 - span[1], 180 - span[0])
        return angle + self.pose.rotation, span

    def polygon(self, points: Sequence[Point], value: float) -> None:
        cv2.fillPoly(self.pixels, [self.pose.to_pixels(points)], value)

    def polyline(self, points: Sequence[Point], thickness: float, value: float) -> None:
        vertices = self.pose.to_pixels(points)
        cv2.polylines(self.pixels, [vertices], False, value, self._length(thickness))

    def ellipse(self, center: Point, axes: tuple[float, float], angle: float, value: float) -> None:
        self.arc(center, axes, angle, (0, 360), -1, value)

    def arc(
        self,
        center: Point,
        axes: tuple[float, float],
        angle: float,
        span: tuple[float, float],
        thickness: float,
        value: float,
    ) -> None:
        """Part of an ellipse outline (or, with thickness -1, a filled ellipse)."""
        angle, span = self._ellipse_frame(angle, span)
        size = (self._length(axes[0]), self._length(axes[1]))
        width = -1 if thickness < 0 else self._length(thickness)
        x, y = self.pose.to_pixels([center])[0]
        cv2.ellipse(self.pixels, (int(x), int(y)), size, angle, span[0], span[1], value, width)


def _unit(vector: Point) -> Point:
    return vector / np.linalg.norm(vector)


def _normal(direction: Point) -> Point:
    return np.array([-direction[1], direction[0]])


def _rotate(vector: Point, degrees: float) -> Point:
    radians = np.deg2rad(degrees)
    cos, sin = np.cos(radians), np.sin(radians)
    return np.array([cos * vector[0] - sin * vector[1], sin * vector[0] + cos * vector[1]])


@dataclass
class _Shaft:
    """A straight piece of bone; a flat (not rounded) end is where a fracture cut it."""

    start: Point
    end: Point
    width: float
    round_start: bool = True
    round_end: bool = True


@dataclass
class _Bone:
    """Shafts and rounded heads drawn as one bone: all cortex first, then all marrow, so the
    marrow of a joint head and its shaft merge instead of being split by a cortical line."""

    shafts: list[_Shaft] = field(default_factory=list)
    heads: list[tuple[Point, tuple[float, float], float]] = field(default_factory=list)
    fracture_lines: list[tuple[list[Point], float]] = field(default_factory=list)

    def draw(self, film: _Film) -> None:
        for ratio, value in ((1.0, CORTEX), (MARROW_WIDTH_RATIO, MARROW)):
            for shaft in self.shafts:
                _draw_shaft(film, shaft, shaft.width * ratio, value)
            head_ratio = 0.5 + ratio / 2  # heads have a thinner rim than shafts
            for center, axes, angle in self.heads:
                film.ellipse(center, (axes[0] * head_ratio, axes[1] * head_ratio), angle, value)
        for points, thickness in self.fracture_lines:
            film.polyline(points, thickness, FRACTURE_GAP)


def _draw_shaft(film: _Film, shaft: _Shaft, width: float, value: float) -> None:
    if shaft.round_start and shaft.round_end:
        film.polyline([shaft.start, shaft.end], width, value)  # OpenCV rounds thick line ends
        return
    across = _normal(_unit(shaft.end - shaft.start)) * width / 2
    film.polygon(
        [shaft.start + across, shaft.end + across, shaft.end - across, shaft.start - across],
        value,
    )
    for point, rounded in ((shaft.start, shaft.round_start), (shaft.end, shaft.round_end)):
        if rounded:
            film.ellipse(point, (width / 2, width / 2), 0, value)


def _long_bone(
    start: Point,
    end: Point,
    width: float,
    rng: np.random.Generator,
    fracture_at: float | None = None,
) -> _Bone:
    """A tubular bone from start to end; with `fracture_at` (0..1 along it) the far fragment is
    displaced sideways and angulated and a dark jagged gap crosses the break, bold enough to
    survive downsampling to 64 px."""
    if fracture_at is None:
        return _Bone(shafts=[_Shaft(start, end, width)])
    axis = end - start
    direction = _unit(axis)
    across = _normal(direction)
    break_point = start + axis * fracture_at
    side = rng.choice([-1.0, 1.0])
    shift = across * side * width * rng.uniform(0.35, 0.7) + direction * width * rng.uniform(0, 0.2)
    tilt = side * rng.uniform(8, 22)
    fragment_start = break_point + shift
    fragment_end = fragment_start + _rotate(end - break_point, tilt)
    # A zig-zag across the full width, a little past the cortex, like a comminuted break line.
    steps = np.linspace(-0.65, 0.65, 6)
    zigzag = [
        break_point + across * s * width + direction * rng.uniform(-0.25, 0.25) * width
        for s in steps
    ]
    return _Bone(
        shafts=[
            _Shaft(start, break_point, width, round_end=False),
            _Shaft(fragment_start, fragment_end, width, round_start=False),
        ],
        fracture_lines=[(zigzag, max(6.0, width * 0.3))],
    )


# --- anatomy ---------------------------------------------------------------------------------
# Each function lays out one body part in the 256-unit frame: it adds soft tissue to `tissue`
# (drawn as 1.0, blurred later into a haze) and returns the bones' drawing steps in order.
# `fracture` says whether to break one bone; break sites follow the part's common fractures.

_Drawing = Callable[[_Film], None]  # draws one bone (or group) on the film


def _p(x: float, y: float) -> Point:
    return np.array([x, y], dtype=float)


def _elbow(tissue: _Film, rng: np.random.Generator, fracture: bool) -> list[_Drawing]:
    """Lateral elbow: humerus from the top, radius and ulna leaving the rounded joint at an
    angle, the olecranon cupping the condyles."""
    joint = _p(128 + rng.normal(0, 6), 124 + rng.normal(0, 6))
    up = _unit(_p(rng.normal(0, 0.08), -1))
    humerus_top = joint + up * 210
    # 180 degrees would be a straight arm; lateral elbow films are usually taken flexed.
    bend = rng.uniform(100, 150) * rng.choice([-1.0, 1.0])
    forearm_direction = _rotate(up, bend)
    forearm_end = joint + forearm_direction * 210
    across = _normal(forearm_direction)

    tissue.polyline([humerus_top, joint, forearm_end], rng.uniform(85, 100), 1.0)
    tissue.ellipse(joint, (55, 50), 0, 1.0)

    humerus_width = rng.uniform(32, 38)
    broken = rng.choice(["humerus", "radius", "ulna"]) if fracture else None
    humerus = _long_bone(
        humerus_top,
        joint + up * 10,
        humerus_width,
        rng,
        fracture_at=rng.uniform(0.55, 0.8) if broken == "humerus" else None,
    )
    humerus.heads.append((joint, (30, 25), float(np.degrees(np.arctan2(up[1], up[0])))))
    sign = np.sign(bend)
    ulna_start = joint - forearm_direction * 18 + across * sign * 10
    ulna = _long_bone(
        ulna_start,
        forearm_end + across * sign * 14,
        rng.uniform(18, 22),
        rng,
        fracture_at=rng.uniform(0.25, 0.55) if broken == "ulna" else None,
    )
    ulna.heads.append((ulna_start, (17, 14), 0.0))  # olecranon
    radius_start = joint + forearm_direction * 22 - across * sign * 12
    radius = _long_bone(
        radius_start,
        forearm_end - across * sign * 10,
        rng.uniform(17, 21),
        rng,
        fracture_at=rng.uniform(0.15, 0.5) if broken == "radius" else None,
    )
    radius.heads.append((radius_start, (13, 11), 0.0))  # radial head
    return [humerus.draw, ulna.draw, radius.draw]


def _hand(tissue: _Film, rng: np.random.Generator, fracture: bool) -> list[_Drawing]:
    """PA hand: forearm bones at the bottom, a cluster of carpals, then five rays of
    metacarpals and phalanges fanning upwards, the thumb off to the side."""
    wrist = _p(128 + rng.normal(0, 5), 200 + rng.normal(0, 5))
    spread = rng.uniform(0.8, 1.3)  # fingers together or splayed
    sites = ["radius", "metacarpal", "phalanx"]
    broken = rng.choice(sites, p=[0.5, 0.3, 0.2]) if fracture else None
    broken_ray = int(rng.integers(1, 5))

    tissue.ellipse(wrist + _p(0, -42), (60, 55), 0, 1.0)
    tissue.polyline([wrist + _p(0, -10), wrist + _p(0, 160)], 105, 1.0)

    bones = [
        _long_bone(
            wrist + _p(-18, 18),
            wrist + _p(-22, 160),
            rng.uniform(26, 32),
            rng,
            fracture_at=rng.uniform(0.08, 0.25) if broken == "radius" else None,
        ),
        _long_bone(wrist + _p(22, 20), wrist + _p(24, 160), rng.uniform(17, 21), rng),
    ]
    carpals = _Bone()
    for dx, dy in ((-22, 4), (-7, 6), (8, 5), (22, 2), (-20, -14), (-6, -13), (8, -14), (22, -12)):
        carpals.heads.append((wrist + _p(dx, dy), (9.5, 8.0), rng.uniform(0, 180)))
    bones.append(carpals)

    # Rays: thumb, index, middle, ring, little; angle from straight up, lengths of each bone.
    rays = (
        (-52, [40, 30, 22], 12.0),
        (-16, [62, 38, 24, 17], 11.0),
        (-4, [64, 42, 27, 18], 11.0),
        (8, [58, 39, 25, 17], 10.5),
        (20, [52, 30, 19, 15], 10.0),
    )
    for index, (angle, lengths, width) in enumerate(rays):  # index 1-4: the breakable rays
        direction = _rotate(_p(0, -1), angle * spread + rng.normal(0, 3))
        is_thumb = index == 0
        base = wrist + _p((index - 2) * 11 - 14 * is_thumb, -24 + 12 * is_thumb)
        ray_end = base + direction * (sum(lengths) + 4 * len(lengths))
        tissue.polyline([base, ray_end], width * 2.4, 1.0)
        point = base
        for bone_index, length in enumerate(lengths):
            end = point + direction * length
            bone_width = width * (1.0 - 0.12 * bone_index)
            breaks_here = index == broken_ray and (
                (broken == "metacarpal" and bone_index == 0)
                or (broken == "phalanx" and bone_index == 1)
            )
            bones.append(
                _long_bone(
                    point,
                    end,
                    bone_width * (1.3 if breaks_here else 1.0),  # boxer's fractures swell
                    rng,
                    fracture_at=rng.uniform(0.45, 0.75) if breaks_here else None,
                )
            )
            point = end + direction * 4  # joint space
    return [bone.draw for bone in bones]


def _shoulder(tissue: _Film, rng: np.random.Generator, fracture: bool) -> list[_Drawing]:
    """AP shoulder: a large round humeral head beside the cup of the glenoid, the scapula blade
    and faint ribs towards the chest, the clavicle and acromion across the top."""
    head = _p(150 + rng.normal(0, 6), 125 + rng.normal(0, 6))
    radius = rng.uniform(38, 46)
    broken = rng.choice(["neck", "clavicle"], p=[0.6, 0.4]) if fracture else None

    tissue.ellipse(head + _p(-5, 40), (100, 150), 0, 1.0)
    tissue.polygon([_p(-80, 40), _p(120, 30), _p(120, 340), _p(-80, 340)], 1.0)

    glenoid = head + _p(-radius - 5, 0)
    blade = [
        glenoid + _p(-4, -radius * 0.8),
        _p(25 + rng.normal(0, 5), 80 + rng.normal(0, 5)),
        _p(65 + rng.normal(0, 6), 255 + rng.normal(0, 8)),
        glenoid + _p(-6, radius * 0.8),
    ]
    acromion_end = head + _p(radius + 8, -radius - 10)
    rib_tops = [110 + index * 44 + rng.normal(0, 4) for index in range(4)]

    def draw_thin_bones(film: _Film) -> None:
        # The scapula blade and the ribs are thin bone, so fainter than any shaft.
        film.polygon(blade, THIN_BONE)
        film.polyline(blade[1:], 7, MARROW)  # the blade's thicker borders
        film.polyline([blade[1], acromion_end + _p(-radius, 6)], 12, MARROW)  # scapular spine
        for top in rib_tops:
            film.arc(_p(-40, top + 45), (150, 45), 0, (270, 340), 8, THIN_BONE + 0.08)
        # Glenoid fossa: a shallow bright cup facing the humeral head.
        film.arc(glenoid, (12, radius * 0.85), 0, (90, 270), 8, CORTEX)

    humerus = _long_bone(
        head + _p(5, radius * 0.5),
        head + _p(rng.normal(8, 6), 210),
        rng.uniform(34, 40),
        rng,
        fracture_at=rng.uniform(0.06, 0.2) if broken == "neck" else None,
    )
    humerus.heads.append((head, (radius, radius * 0.95), 0.0))
    humerus.heads.append((head + _p(radius * 0.75, radius * 0.3), (14, 20), 0.0))  # tuberosity

    acromion = _long_bone(head + _p(-radius * 0.2, -radius - 18), acromion_end, 15, rng)
    clavicle_lateral = head + _p(-radius * 0.25, -radius - 30 + rng.normal(0, 4))
    clavicle = _long_bone(
        _p(-60, clavicle_lateral[1] + rng.uniform(-5, 20)),
        clavicle_lateral,
        rng.uniform(17, 21),
        rng,
        fracture_at=rng.uniform(0.5, 0.75) if broken == "clavicle" else None,
    )
    coracoid = _Bone(heads=[(glenoid + _p(-2, -radius * 0.95), (12, 8), 30.0)])
    return [draw_thin_bones, coracoid.draw, humerus.draw, acromion.draw, clavicle.draw]


def _other_part(tissue: _Film, rng: np.random.Generator, fracture: bool) -> list[_Drawing]:
    """Any other MURA part (wrist, forearm, finger, humerus): a plain pair of long bones, only
    there so readers' body-part filtering can be tested."""
    tilt = rng.normal(0, 8)
    direction = _rotate(_p(0, 1), tilt)
    across = _normal(direction)
    top = _p(128, -60)
    tissue.polyline([top, top + direction * 380], 110, 1.0)
    broken = int(rng.integers(0, 2)) if fracture else None
    return [
        _long_bone(
            top + across * offset,
            top + across * offset + direction * 380,
            width,
            rng,
            fracture_at=rng.uniform(0.35, 0.65) if broken == index else None,
        ).draw
        for index, (offset, width) in enumerate(((-20, 26.0), (22, 20.0)))
    ]


_ANATOMIES: dict[str, Callable[[_Film, np.random.Generator, bool], list[_Drawing]]] = {
    "XR_ELBOW": _elbow,
    "XR_HAND": _hand,
    "XR_SHOULDER": _shoulder,
}


# --- one radiograph --------------------------------------------------------------------------


def render_radiograph(
    part: str, abnormal: bool, rng: np.random.Generator, size: int = 256
) -> np.ndarray:
    """One synthetic radiograph of `part` as uint8 (height, width), each side 0.75-1.25 x `size`.

    Parts other than elbow, hand and shoulder get a generic pair of long bones. Abnormal images
    show a displaced fracture. All randomness comes from `rng`, so a seeded generator gives the
    same pixels every time.
    """
    height, width = (round(size * rng.uniform(0.75, 1.25)) for _ in range(2))
    pose = _Pose(
        mirrored=bool(rng.random() < 0.5),
        rotation=rng.uniform(-15, 15),
        zoom=np.sqrt(height * width) / DESIGN_SIZE * rng.uniform(0.88, 1.08),
        design_center=DESIGN_SIZE / 2 + rng.normal(0, 10, 2),
        pixel_center=np.array([width, height]) / 2,
    )

    # 1. Soft tissue: a mask drawn and blurred at quarter resolution (it is a haze anyway).
    haze_shape = (max(1, height // 4), max(1, width // 4))
    tissue = _Film(np.zeros(haze_shape, np.float32), pose.scaled(haze_shape[0] / height))
    bone_drawings = _ANATOMIES.get(part, _other_part)(tissue, rng, abnormal)
    haze = cv2.GaussianBlur(tissue.pixels, (0, 0), 9 * tissue.pose.zoom)
    haze = cv2.resize(haze, (width, height), interpolation=cv2.INTER_LINEAR)
    film = _Film(BACKGROUND + (SOFT_TISSUE - BACKGROUND) * rng.uniform(0.8, 1.15) * haze, pose)

    # 2. Bones on top, then a slight blur for the X-ray tube's finite focal spot.
    for draw_bone in bone_drawings:
        draw_bone(film)
    pixels = cv2.GaussianBlur(film.pixels, (0, 0), max(0.5, 1.2 * pose.zoom))

    # 3. Exposure: the heel effect (brightness falls off across the film), gain and gamma.
    heel_angle = rng.uniform(0, 2 * np.pi)
    across_x = np.linspace(-0.5, 0.5, width, dtype=np.float32) * np.cos(heel_angle)
    across_y = np.linspace(-0.5, 0.5, height, dtype=np.float32) * np.sin(heel_angle)
    pixels *= 1 + rng.uniform(0.05, 0.15) * (across_y[:, np.newaxis] + across_x[np.newaxis, :])
    pixels = rng.uniform(0.85, 1.1) * cv2.pow(np.clip(pixels, 0, 1), rng.uniform(0.8, 1.25))

    # 4. Noise for the preprocessing filter to remove, Gaussian with a spread that grows with
    #    brightness: quantum (speckle, multiplicative) plus electronic (additive) noise.
    noise = rng.standard_normal((height, width), dtype=np.float32)
    pixels += noise * (rng.uniform(0.05, 0.1) * pixels + rng.uniform(0.01, 0.03))
    return (np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8)


# --- the dataset -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Study:
    """One study as MURA files it: a patient's visit for one body part, with 1-4 views."""

    split: str
    part: str
    patient: int
    number: int  # 1, 2, ... per patient
    abnormal: bool
    image_count: int

    def path_in(self, mura_folder: Path) -> Path:
        """The study's folder inside a MURA-v1.1 folder (or a staging folder standing in)."""
        return mura_folder / self.folder.removeprefix(f"{MURA_FOLDER}/")

    @property
    def folder(self) -> str:
        """The study's path as MURA's CSVs write it: from MURA-v1.1/, with a trailing slash."""
        label = "positive" if self.abnormal else "negative"
        return (
            f"{MURA_FOLDER}/{self.split}/{self.part}/"
            f"patient{self.patient:05d}/study{self.number}_{label}/"
        )


def _stable_key(text: str) -> int:
    """A seed component that, unlike hash(), is the same in every Python process."""
    return zlib.crc32(text.encode())


def _plan_studies(
    parts: Sequence[str], patients: int, seed: int, abnormal_fraction: float
) -> list[_Study]:
    """Patients, studies, labels and view counts for the whole dataset, in MURA's folder order.

    Patient numbers run on across parts and from train into valid, as in MURA, so a patient
    belongs to exactly one split: the splits stay patient-disjoint.
    """
    studies: list[_Study] = []
    next_patient = 1
    for split in SPLITS:
        patient_count = patients if split == "train" else max(MIN_PATIENTS, patients // 2)
        for part in parts:
            rng = np.random.default_rng([seed, _stable_key(split), _stable_key(part)])
            studies_per_patient = rng.integers(1, MAX_STUDIES_PER_PATIENT + 1, patient_count)
            _top_up(studies_per_patient, 2 * MIN_STUDIES_PER_LABEL)
            abnormal = rng.random(studies_per_patient.sum()) < abnormal_fraction
            _ensure_both_labels(abnormal, rng)
            image_counts = rng.integers(1, MAX_IMAGES_PER_STUDY + 1, abnormal.size)
            study_index = 0
            for patient_offset, study_count in enumerate(studies_per_patient):
                for number in range(1, study_count + 1):
                    studies.append(
                        _Study(
                            split,
                            part,
                            next_patient + patient_offset,
                            number,
                            bool(abnormal[study_index]),
                            int(image_counts[study_index]),
                        )
                    )
                    study_index += 1
            next_patient += patient_count
    return studies


def _top_up(studies_per_patient: np.ndarray, minimum_total: int) -> None:
    """Adds studies to patients in turn until there are enough to hold both labels twice."""
    patient = 0
    while studies_per_patient.sum() < minimum_total:
        if studies_per_patient[patient] < MAX_STUDIES_PER_PATIENT:
            studies_per_patient[patient] += 1
        patient = (patient + 1) % studies_per_patient.size


def _ensure_both_labels(abnormal: np.ndarray, rng: np.random.Generator) -> None:
    """Flips random studies until each label has MIN_STUDIES_PER_LABEL, so every split and part
    can be trained and evaluated on both classes whatever `abnormal_fraction` says."""
    for label in (True, False):
        missing = MIN_STUDIES_PER_LABEL - int(np.count_nonzero(abnormal == label))
        if missing > 0:
            others = np.flatnonzero(abnormal != label)
            abnormal[rng.choice(others, missing, replace=False)] = label


def _write_image(path: Path, pixels: np.ndarray) -> None:
    # OpenCV writes a (H, W) array as 8-bit grayscale and (H, W, 3) as RGB, with no timestamp.
    if not cv2.imwrite(str(path), pixels):
        raise UserError(f"could not write {path}: check the --out folder is writable")


def _check_arguments(
    patients: int, size: int, seed: int, parts: Sequence[str], abnormal_fraction: float
) -> None:
    if patients < MIN_PATIENTS:
        raise UserError(f"patients is {patients}: use at least {MIN_PATIENTS} per body part")
    if size < MIN_SIZE:
        raise UserError(f"size is {size}: use at least {MIN_SIZE} pixels")
    if seed < 0:
        raise UserError(f"seed is {seed}: use a seed of 0 or more")
    if not 0 <= abnormal_fraction <= 1:
        raise UserError(f"abnormal_fraction is {abnormal_fraction}: use a value from 0 to 1")
    for part in parts:
        if not re.fullmatch(r"XR_[A-Z]+", part):
            raise UserError(f"body part {part!r} is not a MURA name: use e.g. XR_ELBOW")


def generate(
    out: Path,
    patients: int = 24,
    size: int = 256,
    seed: int = 0,
    parts: Sequence[str] = DEFAULT_PARTS,
    extra_parts: Sequence[str] = (),
    abnormal_fraction: float = 0.4,
) -> Path:
    """Writes a synthetic dataset as `out/MURA-v1.1/` and returns that folder.

    `patients` is per body part in train; valid gets half (at least 2). Each patient has 1-3
    studies of 1-4 images. `extra_parts` adds parts outside the project's three, so that readers'
    filtering can be tested. The dataset is built in a hidden sibling folder and renamed into
    place at the end, so an interrupted run never leaves a half-written MURA-v1.1.
    """
    out = Path(out)
    all_parts = list(dict.fromkeys([*parts, *extra_parts]))  # keeps order, drops repeats
    _check_arguments(patients, size, seed, all_parts, abnormal_fraction)
    target = out / MURA_FOLDER
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{target} already exists: choose an empty --out folder or delete it")

    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{MURA_FOLDER}.partial-", dir=out))
    try:
        _write_dataset(
            staging, _plan_studies(all_parts, patients, seed, abnormal_fraction), seed, size
        )
        staging.chmod(0o755)  # mkdtemp makes it private; the dataset is meant to be shared
        if target.exists():
            target.rmdir()  # empty, checked above; rename cannot replace a folder everywhere
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _write_dataset(root: Path, studies: list[_Study], seed: int, size: int) -> None:
    """Renders and writes every image, then MURA's four CSVs, inside `root` (the MURA folder).

    Images render on a few threads (OpenCV and NumPy release the GIL); each has its own seed,
    so the files do not depend on the order in which threads finish.
    """
    image_lines: dict[str, list[str]] = {split: [] for split in SPLITS}
    study_lines: dict[str, list[str]] = {split: [] for split in SPLITS}
    views: list[tuple[_Study, int]] = []
    for study in studies:
        study.path_in(root).mkdir(parents=True)
        study_lines[study.split].append(f"{study.folder},{int(study.abnormal)}")
        for image_number in range(1, study.image_count + 1):
            image_lines[study.split].append(f"{study.folder}image{image_number}.png")
            views.append((study, image_number))

    def write_view(view: tuple[_Study, int]) -> None:
        study, image_number = view
        # Seeded by the image's place in the dataset, not by a shared running generator.
        place = [study.split, study.part, study.patient, study.number, image_number]
        rng = np.random.default_rng([seed, *(_stable_key(str(key)) for key in place)])
        pixels = render_radiograph(study.part, study.abnormal, rng, size)
        if rng.random() < RGB_FRACTION:
            pixels = np.repeat(pixels[:, :, np.newaxis], 3, axis=2)  # (H, W, 3) gray as RGB
        _write_image(study.path_in(root) / f"image{image_number}.png", pixels)

    pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
    try:
        for _ in pool.map(write_view, views):
            pass  # iterating re-raises the first error from any thread
    finally:
        # On an error or Ctrl-C, drop the queued images instead of rendering them all first.
        pool.shutdown(wait=True, cancel_futures=True)

    for split in SPLITS:
        for name, lines in (("image_paths", image_lines), ("labeled_studies", study_lines)):
            text = "".join(f"{line}\n" for line in lines[split])
            (root / f"{split}_{name}.csv").write_text(text, encoding="utf-8", newline="\n")
