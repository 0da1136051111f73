"""Two-stage inference on uploaded X-rays, with no web framework: what the service, the CLI and
the tests all call.

An upload is decoded and preprocessed by `imaging.preprocess_bytes` (the function training
used, invariant 1), scored by the PCA out-of-distribution gate, classified by the body-part
ResNet50 and then by that part's fracture ResNet50. The fracture probability is calibrated
with the temperature fitted at evaluation and judged at the evaluated threshold, so the
service says what the evaluation measured. Study results average the images' calibrated
probabilities (MURA protocol, invariant 3). Models are called through `tf.function`, not
`model.predict`, whose per-call overhead doubles single-image latency.

Every response carries the disclaimer (invariant 8) and says whether the models were trained
on synthetic data. Nothing from a DICOM header but pixels is ever read (see `imaging`).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bonefrac import DISCLAIMER
from bonefrac.bundle import read_bundle
from bonefrac.config import PreprocessConfig, ServeConfig
from bonefrac.errors import DataError, UserError
from bonefrac.evaluate.calibration import apply_temperature
from bonefrac.evaluate.metrics import UNCERTAIN, finding
from bonefrac.imaging import ImageError, preprocess_bytes
from bonefrac.models import BODY_PART_MODEL
from bonefrac.pca import PcaModel
from bonefrac.recommend import recommend

OOD_LIMIT = 1.0  # PcaModel.ood_score above this = unlike the training radiographs
BODY_PART_MIN_CONFIDENCE = 0.5  # below: the part (and so the fracture model) is a guess
MAX_STUDY_IMAGES = 8
VERSION_KEYS = ("run_id", "version", "registered_name")  # what identifies a model in responses
SYNTHETIC_NOTICE = (
    "These models were trained on SYNTHETIC images (the demo dataset), not real radiographs: "
    "their output says nothing about real X-rays."
)


class PredictionError(UserError):
    """A request the models cannot answer; `.code` is short and stable for machines."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class OutOfDistribution(PredictionError):
    """The image does not look like the radiographs the models were trained on."""

    def __init__(self, score: float, where: str = "the image") -> None:
        super().__init__(
            f"{where} does not look like an elbow, hand or shoulder radiograph (out-of-"
            f"distribution score {score:.2f} > {OOD_LIMIT:.0f}); send an X-ray of one of these "
            "parts, or set allow_ood to analyse it anyway",
            "out_of_distribution",
        )
        self.score = score


@dataclass(frozen=True)
class _Scored:
    """The numbers one response is built from, for N images routed to one or more parts."""

    body_probs: np.ndarray  # (N, P) softmax over Predictor.classes
    parts: list[str]  # (N,) the fracture model each image went to
    raw_probs: np.ndarray  # (N,) fracture model outputs
    probs: np.ndarray  # (N,) calibrated with that part's temperature
    ood_scores: np.ndarray  # (N,)


def _compiled(model, size: int) -> Callable[[np.ndarray], Any]:
    """The model's forward pass as a graph with one signature for every batch size, so a new
    batch size never retraces."""
    import tensorflow as tf

    spec = tf.TensorSpec((None, size, size, 3), tf.float32)
    return tf.function(lambda images: model(images, training=False), input_signature=[spec])


class Predictor:
    """The bundle's models, loaded once; every method is safe to call from several threads."""

    def __init__(
        self,
        manifest: dict,
        models: dict[str, Any],
        pca: PcaModel,
        serve: ServeConfig,
        source: str,
    ) -> None:
        self.manifest = manifest
        self.serve = serve
        self.pca = pca
        self.preprocess_cfg = PreprocessConfig(**manifest["preprocess"])
        self.size = self.preprocess_cfg.image_size
        self.parts: list[str] = list(manifest["parts"])
        body = manifest["models"][BODY_PART_MODEL]
        self.classes: list[str] = list(body.get("classes") or self.parts)  # softmax order
        missing = [c for c in self.classes if c not in models]
        if missing:
            raise DataError(f"the bundle has no fracture model for {', '.join(missing)}")
        self._keras = models
        self._forward = {name: _compiled(m, self.size) for name, m in models.items()}
        self._gradcams: dict[str, Any] = {}
        self.synthetic = bool(manifest.get("synthetic", False))
        self.versions = {
            "bundle": source,
            "created": manifest.get("created"),
            "data_version": manifest.get("data_version"),
            "models": {
                name: {k: v for k, v in meta.items() if k in VERSION_KEYS}
                for name, meta in manifest["models"].items()
            },
        }

    @classmethod
    def from_bundle(
        cls,
        path: Path,
        serve: ServeConfig | None = None,
        *,
        source: str | None = None,
        warm_up: bool = True,
    ) -> Predictor:
        """Load a bundle folder (see `bonefrac.bundle`). `source` names it in responses (the
        BentoML tag); `warm_up` traces every graph now, so no request pays for it."""
        import keras

        path = Path(path)
        manifest = read_bundle(path)
        names = [BODY_PART_MODEL, *manifest["parts"]]
        models = {}
        for name in names:
            file = path / name / "model.keras"
            if not file.is_file():
                raise DataError(f"{file} not found: package the models again")
            models[name] = keras.models.load_model(file, compile=False)
        predictor = cls(
            manifest,
            models,
            PcaModel.load(path / "pca.joblib"),
            serve or ServeConfig(),
            source or path.name,
        )
        if warm_up:
            predictor.warm_up()
        return predictor

    def warm_up(self) -> None:
        """Trace each model's graph (and Grad-CAM's) on a blank image: seconds each at start-up
        instead of on the first requests."""
        blank = np.zeros((1, self.size, self.size, 3), np.float32)
        for name, forward in self._forward.items():
            forward(blank)
            if name != BODY_PART_MODEL:
                self._gradcam(name).heatmaps(blank)

    # -- inputs -------------------------------------------------------------------------------

    @property
    def max_bytes(self) -> int:
        return int(self.serve.max_upload_mb * 1_000_000)

    def preprocess(self, data: bytes) -> np.ndarray:
        """Upload bytes -> (S, S, 3) uint8 model input, exactly as training preprocessed files.
        Raises ImageError (with `.code`) for anything unusable."""
        return preprocess_bytes(
            data,
            self.preprocess_cfg,
            max_pixels=self.serve.max_pixels,
            min_side=self.serve.min_side,
            max_bytes=self.max_bytes,
        )

    # -- public predictions -------------------------------------------------------------------

    def predict_bytes(self, data: bytes, *, explain: bool = False, allow_ood: bool = False) -> dict:
        """One uploaded file -> the response JSON (see `predict_image`)."""
        return self.predict_image(self.preprocess(data), explain=explain, allow_ood=allow_ood)

    def predict_image(
        self, image: np.ndarray, *, explain: bool = False, allow_ood: bool = False
    ) -> dict:
        """One preprocessed image -> body part, calibrated fracture probability and finding,
        recommendation, quality, optional Grad-CAM heatmap. Raises OutOfDistribution when the
        image fails the OOD gate and `allow_ood` is not set."""
        images = image[None]
        ood = self._ood(images)
        self._gate(ood, allow_ood)
        scored = self._score(images, ood)
        result = self._image_result(scored, 0)
        result["recommendation"] = self._recommendation(
            scored.parts[0], result["fracture"], result["quality"]["accepted"]
        )
        if explain:
            result.update(self._explain(scored.parts[0], images)[0])
        return self._envelope(result, "image")

    def predict_study(
        self, files: Sequence[bytes], *, explain: bool = False, allow_ood: bool = False
    ) -> dict:
        """Several images of one study -> the study result (body part from the mean body-part
        probabilities; fracture probability = mean of the images' calibrated probabilities,
        each image judged by the study's part model) plus per-image results under `images`."""
        if not files:
            raise PredictionError("the study has no images; send one or more X-ray files", "empty")
        if len(files) > MAX_STUDY_IMAGES:
            raise PredictionError(
                f"the study has {len(files)} images, over the limit of {MAX_STUDY_IMAGES}; send "
                "the views of one study only",
                "too_many_images",
            )
        images = []
        for i, data in enumerate(files, start=1):
            try:
                images.append(self.preprocess(data))
            except ImageError as exc:
                raise ImageError(f"image {i} of {len(files)}: {exc}", exc.code) from None
        batch = np.stack(images)
        ood = self._ood(batch)
        for i, score in enumerate(ood, start=1):
            self._gate(np.array([score]), allow_ood, where=f"image {i} of {len(files)}")
        body_probs = np.asarray(self._forward[BODY_PART_MODEL](batch.astype(np.float32)))
        study_part = self.classes[int(body_probs.mean(axis=0).argmax())]
        scored = self._score(batch, ood, body_probs=body_probs, part=study_part)

        per_image = [self._image_result(scored, i) for i in range(len(batch))]
        if explain:
            for result, extra in zip(per_image, self._explain(study_part, batch), strict=True):
                result.update(extra)
        for i, result in enumerate(per_image):
            result["index"] = i
        accepted = bool((ood <= OOD_LIMIT).all())
        study_body = body_probs.mean(axis=0)
        fracture = self._fracture(
            study_part,
            float(scored.probs.mean()),
            float(scored.raw_probs.mean()),
            forced_uncertain=not accepted or study_body.max() < BODY_PART_MIN_CONFIDENCE,
        )
        result = {
            "body_part": self._body_part(study_body),
            "fracture": fracture,
            "quality": _quality(float(ood.max()), accepted),
            "n_images": len(batch),
            "recommendation": self._recommendation(
                study_part, fracture, accepted, study_images=len(batch)
            ),
            "images": per_image,
        }
        return self._envelope(result, "study")

    def predict_batch(self, images: Sequence[np.ndarray], *, allow_ood: bool = False) -> list[dict]:
        """Independent images in one forward pass per model (adaptive batching's worker):
        each item gets the `predict_image` response, or `{"error": {code, message}}` when it
        fails the OOD gate, so one bad image never fails the others in its batch."""
        if not len(images):
            return []
        batch = np.stack(images)
        ood = self._ood(batch)
        keep = np.flatnonzero((ood <= OOD_LIMIT) | allow_ood | (not self.serve.ood_gate))
        out: list[dict] = [error_body(OutOfDistribution(float(s))) for s in ood]
        if len(keep):
            scored = self._score(batch[keep], ood[keep])
            for j, i in enumerate(keep):
                result = self._image_result(scored, j)
                result["recommendation"] = self._recommendation(
                    scored.parts[j], result["fracture"], result["quality"]["accepted"]
                )
                out[i] = self._envelope(result, "image")
        return out

    def predict_batch_bytes(self, files: Sequence[bytes], *, allow_ood: bool = False) -> list[dict]:
        """`predict_batch` on uploads; an undecodable item gets its `{"error": ...}` in place."""
        out: list[dict | None] = []
        images, where = [], []
        for i, data in enumerate(files):
            try:
                images.append(self.preprocess(data))
                where.append(i)
                out.append(None)
            except ImageError as exc:
                out.append(error_body(exc))
        for i, result in zip(where, self.predict_batch(images, allow_ood=allow_ood), strict=True):
            out[i] = result
        return [r for r in out if r is not None]

    # -- the two stages -----------------------------------------------------------------------

    def _ood(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.pca.ood_score(images), dtype=float)

    def _gate(self, ood: np.ndarray, allow_ood: bool, where: str = "the image") -> None:
        if self.serve.ood_gate and not allow_ood and float(ood.max()) > OOD_LIMIT:
            raise OutOfDistribution(float(ood.max()), where)

    def _score(
        self,
        images: np.ndarray,
        ood: np.ndarray,
        *,
        body_probs: np.ndarray | None = None,
        part: str | None = None,
    ) -> _Scored:
        """Both stages on (N, S, S, 3) uint8: each image goes to its own most likely part's
        fracture model, or every image to `part` (a study)."""
        inputs = images.astype(np.float32)  # models take 0..255 and normalise themselves
        if body_probs is None:
            body_probs = np.asarray(self._forward[BODY_PART_MODEL](inputs))  # (N, P)
        parts = [part] * len(images) if part else [self.classes[k] for k in body_probs.argmax(1)]
        raw = np.empty(len(images))
        calibrated = np.empty(len(images))
        for name in dict.fromkeys(parts):  # one batched call per fracture model
            rows = np.array([p == name for p in parts])
            raw[rows] = np.asarray(self._forward[name](inputs[rows]))[:, 0]
            calibrated[rows] = apply_temperature(raw[rows], self._point(name)["temperature"])
        return _Scored(body_probs, parts, raw, calibrated, ood)

    # -- response pieces ----------------------------------------------------------------------

    def _point(self, part: str) -> dict:
        """The part's operating point from evaluation; defaults where a bundle lacks one."""
        meta = self.manifest["models"][part]
        return {
            "threshold": float(meta.get("threshold", 0.5)),
            "temperature": float(meta.get("temperature", 1.0)),
            "uncertain_band": float(meta.get("uncertain_band", 0.0)),
        }

    def _body_part(self, probs: np.ndarray) -> dict:
        best = int(probs.argmax())
        return {
            "label": self.classes[best],
            "probabilities": {c: float(p) for c, p in zip(self.classes, probs, strict=True)},
            "confident": bool(probs[best] >= BODY_PART_MIN_CONFIDENCE),
        }

    def _fracture(
        self, part: str, prob: float, raw: float, *, forced_uncertain: bool = False
    ) -> dict:
        point = self._point(part)
        model_finding = finding(prob, point["threshold"], point["uncertain_band"])
        return {
            "model": part,
            "probability": prob,
            "uncalibrated_probability": raw,
            "finding": UNCERTAIN if forced_uncertain else model_finding,
            "model_finding": model_finding,
            "threshold": point["threshold"],
            "uncertain_band": point["uncertain_band"],
        }

    def _image_result(self, scored: _Scored, i: int) -> dict:
        score = float(scored.ood_scores[i])
        body = self._body_part(scored.body_probs[i])
        accepted = score <= OOD_LIMIT
        unsure_part = scored.body_probs[i].max() < BODY_PART_MIN_CONFIDENCE
        return {
            "body_part": body,
            "fracture": self._fracture(
                scored.parts[i],
                float(scored.probs[i]),
                float(scored.raw_probs[i]),
                forced_uncertain=not accepted or unsure_part,
            ),
            "quality": _quality(score, accepted),
        }

    def _recommendation(
        self, part: str, fracture: dict, accepted: bool, study_images: int | None = None
    ) -> dict:
        context = {"ood": not accepted, "study_images": study_images}
        try:
            rec = recommend(
                part,
                fracture["finding"],
                fracture["probability"],
                context,
                threshold=fracture["threshold"],
            )
        except UserError as exc:  # the bundle's operating point, not the request: a 5xx
            raise RuntimeError(f"the {part} model's operating point is unusable: {exc}") from exc
        return rec.model_dump(mode="json")

    def _gradcam(self, part: str):
        if part not in self._gradcams:
            from bonefrac.explain import GradCam

            self._gradcams[part] = GradCam(self._keras[part])
        return self._gradcams[part]

    def _explain(self, part: str, images: np.ndarray) -> list[dict]:
        """Grad-CAM of the fracture model each image was judged by, as base64 PNG overlays."""
        from bonefrac.explain import overlay_png

        heatmaps = self._gradcam(part).heatmaps(images)
        return [
            {
                "heatmap": base64.b64encode(overlay_png(image, heatmap)).decode("ascii"),
                "heatmap_info": {
                    "target": "abnormal",
                    "model": part,
                    "empty": bool(heatmap.max() == 0),
                    "meaning": "red = regions that raised the fracture score most; blue = least",
                },
            }
            for image, heatmap in zip(images, heatmaps, strict=True)
        ]

    def _envelope(self, result: dict, level: str) -> dict:
        """What every response carries besides the prediction itself."""
        notices = [SYNTHETIC_NOTICE] if self.synthetic else []
        body = result["body_part"]
        if not body["confident"]:
            top = body["probabilities"][body["label"]]
            notices.append(
                f"The body part is uncertain (most likely {body['label']}, probability "
                f"{top:.2f} < {BODY_PART_MIN_CONFIDENCE:.2f}), so the finding is 'uncertain'."
            )
        if not result["quality"]["accepted"]:
            notices.append(
                "The image does not look like the radiographs the models were trained on; it was "
                "analysed only because the override was set, so the finding is 'uncertain'."
            )
        return {
            "level": level,
            **result,
            "model_versions": self.versions,
            "synthetic_models": self.synthetic,
            "notices": notices,
            "disclaimer": DISCLAIMER,
        }


def _quality(ood_score: float, accepted: bool) -> dict:
    return {"ood_score": ood_score, "accepted": accepted, "ood_limit": OOD_LIMIT}


def error_body(exc: Exception) -> dict:
    """`{"error": {"code", "message"}}` for a UserError: the shape every bad input gets."""
    code = getattr(exc, "code", "bad_request")
    return {"error": {"code": code, "message": str(exc)}}
