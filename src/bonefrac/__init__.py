"""bonefrac: fracture detection in elbow, hand and shoulder X-rays, trained, tracked and served."""

__version__ = "0.1.0"

DISCLAIMER = (
    "Decision support for clinicians; not a diagnosis. "
    "A qualified clinician must review the images and make the diagnosis."
)
