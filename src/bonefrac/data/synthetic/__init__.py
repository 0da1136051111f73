"""SYNTHETIC MURA-like X-ray dataset, for the demo and the tests only.

Real MURA (Stanford) needs a registration and cannot be downloaded here, so the demo and every
test run on images drawn by this package. They are NOT real radiographs, and a model's numbers
on them say nothing about real performance. What they copy is everything the pipeline depends
on:

- the exact MURA-v1.1 layout (`{train,valid}/XR_<PART>/patientNNNNN/studyN_<label>/imageN.png`)
  and its four headerless CSVs, so the real reader runs unchanged;
- radiograph-like pictures: dark air, a soft-tissue haze, bright bones whose cortex is brighter
  than their marrow, Gaussian plus speckle noise, random pose and exposure, varied non-square
  sizes, and now and then an RGB file, as MURA has;
- anatomies that differ clearly even at 32-64 px (elbow: two long bones meeting at an angle;
  hand: a palm with five rays of small bones; shoulder: a round humeral head beside the glenoid
  and scapula, the clavicle across the top), so a small network can learn the body part; MURA's
  other four parts, when asked for (`extra_parts`), are drawn as their own anatomies too (wrist:
  carpals close up; finger: one ray of phalanges; forearm: radius and ulna side by side;
  humerus: one thick shaft with its head), as a body-part model's "other" class would need;
- abnormal studies that show a bold fracture: a dark jagged gap across a large bone (never a
  phalanx, a few pixels wide at 64 px), the far fragment displaced by about a shaft width and
  angulated, and soft-tissue swelling around it. It is local: global brightness statistics do
  not give it away (tested), so a model has to find the break.

The output is deterministic: every image draws from its own generator seeded by the run's seed
and the image's place in the dataset, so the same seed writes byte-identical files (given the
same NumPy and OpenCV builds) and one image does not depend on which others were drawn.

- `drawing`: brightness levels, pose, film and bone primitives, fractures;
- `anatomy`: elbow, hand, shoulder and other parts laid out in design units;
- `radiograph`: `render_radiograph`, one image from haze to noise;
- `dataset`: the MURA layout and CSVs, and `generate`.
"""

from bonefrac.data.synthetic.dataset import (
    DEFAULT_PARTS,
    MAX_IMAGES_PER_STUDY,
    MAX_STUDIES_PER_PATIENT,
    MIN_PATIENTS,
    MIN_SIZE,
    MIN_STUDIES_PER_LABEL,
    MURA_FOLDER,
    RGB_FRACTION,
    SPLITS,
    SYNTHETIC_MARKER,
    generate,
    is_synthetic,
)
from bonefrac.data.synthetic.drawing import (
    BACKGROUND,
    CORTEX,
    DESIGN_SIZE,
    FRACTURE_GAP,
    MARROW,
    MARROW_WIDTH_RATIO,
    SOFT_TISSUE,
    THIN_BONE,
    Point,
)
from bonefrac.data.synthetic.radiograph import render_radiograph

__all__ = [
    "BACKGROUND",
    "CORTEX",
    "DEFAULT_PARTS",
    "DESIGN_SIZE",
    "FRACTURE_GAP",
    "MARROW",
    "MARROW_WIDTH_RATIO",
    "MAX_IMAGES_PER_STUDY",
    "MAX_STUDIES_PER_PATIENT",
    "MIN_PATIENTS",
    "MIN_SIZE",
    "MIN_STUDIES_PER_LABEL",
    "MURA_FOLDER",
    "RGB_FRACTION",
    "SOFT_TISSUE",
    "SPLITS",
    "SYNTHETIC_MARKER",
    "THIN_BONE",
    "Point",
    "generate",
    "is_synthetic",
    "render_radiograph",
]
