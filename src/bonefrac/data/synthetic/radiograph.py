"""One synthetic radiograph: pose, soft-tissue haze, bones, focal-spot blur, exposure and
noise, all drawn from one seeded generator."""

from __future__ import annotations

import cv2
import numpy as np

from bonefrac.data.synthetic.anatomy import _ANATOMIES, _other_part
from bonefrac.data.synthetic.drawing import BACKGROUND, DESIGN_SIZE, SOFT_TISSUE, _Film, _Pose


def render_radiograph(
    part: str, abnormal: bool, rng: np.random.Generator, size: int = 256
) -> np.ndarray:
    """One synthetic radiograph of `part` as uint8 (height, width), each side 0.75-1.25 x `size`.

    MURA's seven parts each have their own anatomy; any other name gets a generic pair of long
    bones. Abnormal images show a displaced fracture. All randomness comes from `rng`, so a
    seeded generator gives the same pixels every time.
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
