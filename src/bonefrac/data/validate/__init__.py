"""Data validation stage: a Great Expectations suite over the image manifest.

The manifest (one row per image) is joined with facts read from every image file (exists,
decodes, size, mode) and with a few derived columns, then checked by two GX suites:
`images` (one row per image, failures name the offending paths) and `groups` (one row per
split x part: rows per label and class balance). Class balance is a WARNING: it is reported
but does not fail the stage. Bad data never raises; `validate` returns success=False and a
report. Only unusable inputs (no rows, missing columns) raise `DataError`.

- `facts`: `image_facts`, opening every image (in a process pool when there are many);
- `tables`: the manifest columns, the per-image and per-group tables, the statistics;
- `results`: `ExpectationFailure` and `ValidationResult`;
- `suite`: the two GX suites, Data Docs, validation.json and `validate` itself.
"""

from bonefrac.data.validate.facts import ImageFacts, image_facts
from bonefrac.data.validate.results import MAX_EXAMPLES, ExpectationFailure, ValidationResult
from bonefrac.data.validate.suite import ImageBounds, validate
from bonefrac.data.validate.tables import MANIFEST_COLUMNS, MURA_SPLITS, SPLITS

__all__ = [
    "MANIFEST_COLUMNS",
    "MAX_EXAMPLES",
    "MURA_SPLITS",
    "SPLITS",
    "ExpectationFailure",
    "ImageBounds",
    "ImageFacts",
    "ValidationResult",
    "image_facts",
    "validate",
]
