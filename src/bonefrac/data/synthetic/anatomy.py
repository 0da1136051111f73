"""The body parts of the synthetic radiographs: elbow, hand and shoulder (the models' parts),
MURA's four other parts (wrist, finger, forearm, humerus), each drawn as its own anatomy so a
body-part model can tell them apart, and a generic pair of long bones for any unknown name.

Each function lays out one body part in the 256-unit frame: it adds soft tissue to `tissue`
(drawn as 1.0, blurred later into a haze) and returns the bones' drawing steps in order.
`fracture` says whether to break one bone; break sites follow the part's common fractures.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bonefrac.data.synthetic.drawing import (
    CORTEX,
    MARROW,
    THIN_BONE,
    Point,
    _Bone,
    _Film,
    _long_bone,
    _normal,
    _rotate,
    _unit,
)

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
        tissue=tissue,
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
        tissue=tissue,
    )
    ulna.heads.append((ulna_start, (17, 14), 0.0))  # olecranon
    radius_start = joint + forearm_direction * 22 - across * sign * 12
    radius = _long_bone(
        radius_start,
        forearm_end - across * sign * 10,
        rng.uniform(17, 21),
        rng,
        fracture_at=rng.uniform(0.15, 0.5) if broken == "radius" else None,
        tissue=tissue,
    )
    radius.heads.append((radius_start, (13, 11), 0.0))  # radial head
    return [humerus.draw, ulna.draw, radius.draw]


def _hand(tissue: _Film, rng: np.random.Generator, fracture: bool) -> list[_Drawing]:
    """PA hand: forearm bones at the bottom, a cluster of carpals, then five rays of
    metacarpals and phalanges fanning upwards, the thumb off to the side."""
    wrist = _p(128 + rng.normal(0, 5), 165 + rng.normal(0, 5))
    spread = rng.uniform(0.8, 1.3)  # fingers together or splayed
    # Distal radius (80%) and metacarpal (boxer's) fractures, the commonest hand-film fractures;
    # a phalanx is left out because at 64 px it is a few pixels wide. The wrist sits high enough
    # that a distal radius break 1-4 cm above the joint is inside the film.
    broken = rng.choice(["radius", "metacarpal"], p=[0.8, 0.2]) if fracture else None
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
            tissue=tissue,
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
        lengths = [0.85 * length for length in lengths]  # the whole hand fits above the wrist
        direction = _rotate(_p(0, -1), angle * spread + rng.normal(0, 3))
        is_thumb = index == 0
        base = wrist + _p((index - 2) * 11 - 14 * is_thumb, -24 + 12 * is_thumb)
        ray_end = base + direction * (sum(lengths) + 4 * len(lengths))
        tissue.polyline([base, ray_end], width * 2.4, 1.0)
        point = base
        for bone_index, length in enumerate(lengths):
            end = point + direction * length
            bone_width = width * (1.0 - 0.12 * bone_index)
            breaks_here = index == broken_ray and broken == "metacarpal" and bone_index == 0
            bones.append(
                _long_bone(
                    point,
                    end,
                    bone_width * (1.5 if breaks_here else 1.0),  # boxer's fractures swell
                    rng,
                    fracture_at=rng.uniform(0.45, 0.75) if breaks_here else None,
                    tissue=tissue,
                )
            )
            point = end + direction * 4  # joint space
    return [bone.draw for bone in bones]


def _shoulder(tissue: _Film, rng: np.random.Generator, fracture: bool) -> list[_Drawing]:
    """AP shoulder: a large round humeral head beside the cup of the glenoid, the scapula blade
    and faint ribs towards the chest, the clavicle and acromion across the top."""
    head = _p(150 + rng.normal(0, 6), 125 + rng.normal(0, 6))
    radius = rng.uniform(38, 46)
    broken = rng.choice(["neck", "clavicle"], p=[0.8, 0.2]) if fracture else None

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
        tissue=tissue,
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
        tissue=tissue,
    )
    coracoid = _Bone(heads=[(glenoid + _p(-2, -radius * 0.95), (12, 8), 30.0)])
    return [draw_thin_bones, coracoid.draw, humerus.draw, acromion.draw, clavicle.draw]


def _wrist(tissue: _Film, rng: np.random.Generator, fracture: bool) -> list[_Drawing]:
    """PA wrist, closer in than a hand film: radius and ulna from the bottom, a large cluster
    of carpals in the middle, the five metacarpal bases cut off by the top edge."""
    wrist = _p(128 + rng.normal(0, 6), 150 + rng.normal(0, 6))
    tissue.polyline([wrist + _p(0, -150), wrist + _p(0, 170)], 175, 1.0)
    broken = rng.choice(["radius", "ulna"], p=[0.8, 0.2]) if fracture else None
    bones = [
        _long_bone(
            wrist + _p(-32, 40),
            wrist + _p(-38, 190),
            rng.uniform(44, 52),
            rng,
            fracture_at=rng.uniform(0.08, 0.3) if broken == "radius" else None,
            tissue=tissue,
        ),
        _long_bone(
            wrist + _p(36, 42),
            wrist + _p(40, 190),
            rng.uniform(28, 34),
            rng,
            fracture_at=rng.uniform(0.1, 0.35) if broken == "ulna" else None,
            tissue=tissue,
        ),
    ]
    carpals = _Bone()
    for dx, dy in ((-38, 8), (-12, 12), (14, 10), (38, 4), (-34, -22), (-10, -24), (14, -24)):
        carpals.heads.append((wrist + _p(dx, dy), (16, 13), rng.uniform(0, 180)))
    carpals.heads.append((wrist + _p(40, -20), (11, 10), 0.0))  # pisiform
    bones.append(carpals)
    for index in range(5):
        base = wrist + _p(-48 + 24 * index, -46)
        direction = _rotate(_p(0, -1), (index - 2) * 7 + rng.normal(0, 2))
        bones.append(_long_bone(base, base + direction * 140, 17 - 1.2 * abs(index - 2), rng))
    return [bone.draw for bone in bones]


def _finger(tissue: _Film, rng: np.random.Generator, fracture: bool) -> list[_Drawing]:
    """One finger, close up: the metacarpal head at the bottom, then proximal, middle and
    distal phalanges with joint spaces, inside a narrow sleeve of soft tissue."""
    direction = _rotate(_p(0, -1), rng.normal(0, 6))
    base = _p(128 + rng.normal(0, 6), 262)
    lengths, width = [70, 78, 48, 34], rng.uniform(26, 32)
    broken = int(rng.integers(1, 3)) if fracture else None  # proximal or middle phalanx
    tissue.polyline([base, base + direction * (sum(lengths) + 30)], width * 2.1, 1.0)
    bones, point = [], base
    for index, length in enumerate(lengths):
        end = point + direction * length
        bones.append(
            _long_bone(
                point,
                end,
                width * (1.0 - 0.1 * index),
                rng,
                fracture_at=rng.uniform(0.3, 0.7) if index == broken else None,
                tissue=tissue,
            )
        )
        point = end + direction * 9  # joint space
    return [bone.draw for bone in bones]


def _forearm(tissue: _Film, rng: np.random.Generator, fracture: bool) -> list[_Drawing]:
    """AP forearm: radius and ulna side by side the whole height of the film, the radius
    crossing towards the ulna, a sliver of wrist and elbow at the ends."""
    tilt = rng.normal(0, 6)
    direction = _rotate(_p(0, 1), tilt)
    across = _normal(direction)
    top = _p(128, -40)
    length = 340
    tissue.polyline([top, top + direction * length], 120, 1.0)
    broken = rng.choice(["radius", "ulna", "both"]) if fracture else None
    at = rng.uniform(0.35, 0.65)
    radius = _long_bone(
        top - across * 14,
        top + direction * length - across * 30,
        rng.uniform(20, 24),
        rng,
        fracture_at=at if broken in ("radius", "both") else None,
        tissue=tissue,
    )
    ulna = _long_bone(
        top + across * 22,
        top + direction * length + across * 22,
        rng.uniform(18, 22),
        rng,
        fracture_at=at + rng.uniform(-0.05, 0.05) if broken in ("ulna", "both") else None,
        tissue=tissue,
    )
    ulna.heads.append((top + across * 22, (20, 16), 0.0))  # olecranon at the top edge
    radius.heads.append((radius.shafts[-1].end, (22, 14), 0.0))  # distal end, moved with a break
    return [radius.draw, ulna.draw]


def _humerus(tissue: _Film, rng: np.random.Generator, fracture: bool) -> list[_Drawing]:
    """AP humerus: one thick shaft down the film, the round head at the top, the flared
    condyles at the bottom, a strip of scapula beside the head."""
    direction = _rotate(_p(0, 1), rng.normal(0, 5))
    top = _p(118 + rng.normal(0, 6), 20)
    bottom = top + direction * 230
    tissue.polyline([top, bottom], 140, 1.0)
    tissue.ellipse(top, (80, 60), 0, 1.0)
    humerus = _long_bone(
        top + direction * 10,
        bottom,
        rng.uniform(46, 54),  # the thickest long bone of the arm
        rng,
        fracture_at=rng.uniform(0.3, 0.7) if fracture else None,
        tissue=tissue,
    )
    humerus.heads.append((top, (46, 44), 0.0))
    humerus.heads.append((humerus.shafts[-1].end, (44, 16), 0.0))  # condyles, moved with a break
    scapula = _Bone(heads=[(top + _p(-52, 10), (10, 60), 8.0)])
    return [scapula.draw, humerus.draw]


def _other_part(tissue: _Film, rng: np.random.Generator, fracture: bool) -> list[_Drawing]:
    """A part MURA does not have: the generic pair of long bones."""
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
            tissue=tissue,
        ).draw
        for index, (offset, width) in enumerate(((-20, 26.0), (22, 20.0)))
    ]


_ANATOMIES: dict[str, Callable[[_Film, np.random.Generator, bool], list[_Drawing]]] = {
    "XR_ELBOW": _elbow,
    "XR_HAND": _hand,
    "XR_SHOULDER": _shoulder,
    # MURA's other four parts: only the body-part model's "other" class would see them.
    "XR_WRIST": _wrist,
    "XR_FINGER": _finger,
    "XR_FOREARM": _forearm,
    "XR_HUMERUS": _humerus,
}
