"""Drawing primitives for the synthetic radiographs: brightness levels, the patient's pose on
the film, a film that draws in design units, and bones (shafts, heads, fracture gaps)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import cv2
import numpy as np

# Brightness on a 0..1 scale follows attenuation: air is dark, soft tissue a haze, dense
# cortical bone brightest, marrow in between, and a fracture gap lets X-rays through again.
BACKGROUND = 0.05
SOFT_TISSUE = 0.30
CORTEX = 0.95
MARROW = 0.62
THIN_BONE = 0.48  # scapula blade and ribs: bone seen face-on, so less dense than a shaft
FRACTURE_GAP = 0.2
MARROW_WIDTH_RATIO = 0.5  # of a shaft's width; the rest is the bright cortical rim

DESIGN_SIZE = 256  # anatomy is laid out in a 256-unit square, then scaled to the canvas

Point = np.ndarray  # (2,) float, design units: x to the right, y downwards


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
    tissue: _Film | None = None,
) -> _Bone:
    """A tubular bone from start to end; with `fracture_at` (0..1 along it) the bone breaks.

    The break is drawn with the signs a reader looks for, bold enough to survive downsampling
    to 64 px: a dark jagged gap across the full width, the far fragment displaced sideways by
    about a shaft width and angulated 20-40 degrees, and (when `tissue` is given) soft-tissue
    swelling around the break. Nothing else in a normal film looks like it: joint spaces are
    narrower, straight and between rounded ends, so a network must find the break, not count
    dark pixels.
    """
    if fracture_at is None:
        return _Bone(shafts=[_Shaft(start, end, width)])
    axis = end - start
    direction = _unit(axis)
    across = _normal(direction)
    break_point = start + axis * fracture_at
    side = rng.choice([-1.0, 1.0])
    shift = across * side * width * rng.uniform(0.9, 1.3) + direction * width * rng.uniform(0, 0.3)
    tilt = side * rng.uniform(20, 40)
    fragment_start = break_point + shift
    fragment_end = fragment_start + _rotate(end - break_point, tilt)
    # A zig-zag across the full width and past the cortex, like a comminuted break line.
    steps = np.linspace(-0.8, 0.8, 6)
    zigzag = [
        break_point + across * s * width + direction * rng.uniform(-0.3, 0.3) * width for s in steps
    ]
    if tissue is not None:  # haematoma: the limb's outline bulges around the break
        tissue.ellipse(break_point + shift / 2, (width * 2.2, width * 1.6), 0, 1.0)
    return _Bone(
        shafts=[
            _Shaft(start, break_point, width, round_end=False),
            _Shaft(fragment_start, fragment_end, width, round_start=False),
        ],
        fracture_lines=[(zigzag, max(12.0, width * 0.6))],
    )
