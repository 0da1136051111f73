"""Two-stage inference on uploaded X-rays, with no web framework: what the service, the CLI and
the tests all call.

An upload is decoded once and preprocessed by `imaging.preprocess` (the function training used,
invariant 1), once per distinct preprocessing in the bundle (a champion kept across a
preprocessing change gets its own, `inference.Views`); everything after that is the inference
core (`bonefrac.inference`): the PCA out-of-distribution score, the body-part ResNet50, routing
to a part's fracture ResNet50, the temperature fitted at evaluation, the study mean (MURA
protocol, invariant 3) and the finding at the evaluated threshold and uncertain band. The
evaluate stage runs the same core over the test split, so the service says what the evaluation
measured. This module only loads the bundle, runs the models and writes the response JSON.
Models are called through `tf.function`, not `model.predict`, whose per-call overhead doubles
single-image latency.

Every response carries the disclaimer (invariant 8) and says whether the models were trained
on synthetic data. Nothing from a DICOM header but pixels is ever read (see `imaging`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bonefrac import DISCLAIMER, runtimes
from bonefrac.bundle import (
    BUNDLE_FORMAT,
    MODEL_FILE,
    OOD_INPUT,
    load_ood_gate,
    model_inputs,
    operating_points,
    read_bundle,
)
from bonefrac.config import PreprocessConfig, ServeConfig
from bonefrac.errors import DataError, UserError
from bonefrac.imaging import ImageError, decode, downsample, preprocess
from bonefrac.inference import (
    OOD_LIMIT,
    OTHER,
    Decisions,
    OodGate,
    TwoStage,
    Views,
    decide,
    route,
    viewed,
)
from bonefrac.models import BODY_PART_MODEL
from bonefrac.recommend import load_knowledge, recommend
from bonefrac.recommend.engine import normalise_body_part
from bonefrac.runtimes import TENSORFLOW, Loaded
from bonefrac.serving.responses import (  # noqa: F401 - re-exported: callers and tests use them
    SYNTHETIC_NOTICE,
    OutOfDistribution,
    PredictionError,
    check_age_group,
    check_body_part,
    error_body,
    notices,
    unit_json,
    view_agreement,
)

# the response schema; every response carries it as `api_version`. 3: a body part no model
# covers answers finding "out_of_scope" with null numbers; body_part.stated/disagrees/covered
API_VERSION = "3"
MAX_STUDY_IMAGES = 8
VERSION_KEYS = ("run_id", "version", "registered_name")  # what identifies a model in responses


class KerasModels(Mapping):
    """The bundle's Keras models by name, each loaded from its file when first asked for: the
    TensorFlow runtime needs them all, Grad-CAM the fracture models, and under OpenVINO the
    body part's is never needed (a ResNet50 load takes 1-2 s). Safe from several threads."""

    def __init__(self, files: dict[str, Path]) -> None:
        import threading

        self.files = files
        self.loaded: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str):
        if name not in self.files:
            raise KeyError(name)
        with self._lock:
            if name not in self.loaded:
                import keras

                self.loaded[name] = keras.models.load_model(self.files[name], compile=False)
            return self.loaded[name]

    def __contains__(self, name) -> bool:  # Mapping's would load the model
        return name in self.files

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def _keras_forwards(models: dict[str, Any], manifest: dict) -> dict[str, Callable]:
    inputs = model_inputs(manifest)
    return {
        name: _compiled(model, json.loads(inputs[name])["image_size"])
        for name, model in models.items()
    }


def _compiled(model, size: int) -> Callable[[np.ndarray], np.ndarray]:
    """The model's forward pass on (N, S, S, 3) uint8 model inputs, as a graph with one
    signature for every batch size, so a new batch size never retraces."""
    import tensorflow as tf

    spec = tf.TensorSpec((None, size, size, 3), tf.float32)
    graph = tf.function(lambda images: model(images, training=False), input_signature=[spec])
    # the models take 0..255 and normalise themselves
    return lambda images: np.asarray(graph(np.asarray(images, dtype=np.float32)))


class Predictor:
    """The bundle's models, loaded once; every method is safe to call from several threads."""

    def __init__(
        self,
        manifest: dict,
        models: dict[str, Any],
        gate: OodGate,
        serve: ServeConfig,
        source: str,
        loaded: Loaded | None = None,
    ) -> None:
        self.manifest = manifest
        self.serve = serve
        self.gate = gate
        self.preprocess_cfg = PreprocessConfig(**manifest["preprocess"])  # the OOD gate's
        self.size = self.preprocess_cfg.image_size
        self.input_keys = model_inputs(manifest)
        # every distinct preprocessing an upload goes through (one, unless a kept champion
        # predates a preprocessing change)
        self.input_configs = {
            k: PreprocessConfig(**json.loads(k)) for k in self.input_keys.values()
        }
        self.parts: list[str] = list(manifest["parts"])
        body = manifest["models"][BODY_PART_MODEL]
        self.classes: list[str] = list(body.get("classes") or self.parts)  # softmax order
        missing = [c for c in self.classes if c != OTHER and c not in models]
        if missing:
            raise DataError(f"the bundle has no fracture model for {', '.join(missing)}")
        self._keras = models  # Grad-CAM always runs on these (Keras fp32)
        if loaded is None:  # the Keras models themselves
            forward = _keras_forwards(models, manifest)
            loaded = Loaded(TENSORFLOW, forward, dict.fromkeys(models, TENSORFLOW))
        # the served body-part model's width: the compiled IR's, else the Keras model's
        width = getattr(loaded.forwards.get(BODY_PART_MODEL), "output_width", None)
        if width is None:
            shape = getattr(models.get(BODY_PART_MODEL), "output_shape", None)  # None: stand-in
            width = len(self.classes) if shape is None else int(shape[-1])
        if width != len(self.classes):  # else every request fails in the response's zip
            raise DataError(
                f"the bundle's body-part model has {width} outputs but names "
                f"{len(self.classes)} classes ({', '.join(self.classes)})"
            )
        self.runtime = loaded
        single = len(self.input_configs) == 1
        forward = {n: viewed(f, self.input_keys[n], single) for n, f in loaded.forwards.items()}
        self.core = TwoStage(
            classes=tuple(self.classes),
            body_part=forward[BODY_PART_MODEL],
            fracture={part: forward[part] for part in self.classes if part != OTHER},
            points=operating_points(manifest),
        )
        self._gradcams: dict[str, Any] = {}
        self.knowledge = load_knowledge(serve.knowledge)  # validated now, not per request
        self.synthetic = bool(manifest.get("synthetic", False))
        self.versions = {
            "bundle": source,
            "bundle_format": manifest.get("format", BUNDLE_FORMAT),
            "created": manifest.get("created"),
            "data_version": manifest.get("data_version"),
            "models": {
                name: {k: v for k, v in meta.items() if k in VERSION_KEYS}
                for name, meta in manifest["models"].items()
            },
        }
        # which runtime scores requests, and each model's variant (int8 falls back per model)
        self.runtime_info = {"name": loaded.runtime, "models": dict(loaded.per_model)}

    @classmethod
    def from_bundle(
        cls,
        path: Path,
        serve: ServeConfig | None = None,
        *,
        source: str | None = None,
        warm_up: bool = True,
        runtime: str | None = None,
    ) -> Predictor:
        """Load a bundle folder (see `bonefrac.bundle`). `source` names it in responses (the
        BentoML tag); `warm_up` traces every graph now, so no request pays for it; `runtime`
        (default `serve.runtime`) picks what scores requests (see `bonefrac.runtimes`)."""
        path = Path(path)
        manifest = read_bundle(path)
        names = [BODY_PART_MODEL, *manifest["parts"]]
        for name in names:
            file = path / name / MODEL_FILE
            if not file.is_file():
                raise DataError(f"{file} not found: package the models again")
        models = KerasModels({name: path / name / MODEL_FILE for name in names})
        serve = serve or ServeConfig()
        loaded = runtimes.load(
            runtime or serve.runtime, path, manifest, lambda: _keras_forwards(models, manifest)
        )
        predictor = cls(manifest, models, load_ood_gate(path), serve, source or path.name, loaded)
        if warm_up:
            predictor.warm_up()
        return predictor

    def warm_up(self) -> None:
        """Trace each model's graph (and Grad-CAM's) on a blank image: seconds each at start-up
        instead of on the first requests."""
        blank = Views(
            {
                key: np.zeros((1, cfg.image_size, cfg.image_size, 3), np.uint8)
                for key, cfg in self.input_configs.items()
            }
        )
        self.core.body_part(blank)
        for name, forward in self.core.fracture.items():
            forward(blank)
            self._gradcam(name).heatmaps(blank[self.input_keys[name]].astype(np.float32))

    # -- inputs -------------------------------------------------------------------------------

    @property
    def max_bytes(self) -> int:
        return int(self.serve.max_upload_mb * 1_000_000)

    def _decode(self, data: bytes) -> np.ndarray:
        return decode(
            data,
            max_pixels=self.serve.max_pixels,
            min_side=self.serve.min_side,
            max_bytes=self.max_bytes,
        )

    def preprocess(self, data: bytes) -> np.ndarray:
        """Upload bytes -> (S, S, 3) uint8 input as the bundle's preprocessing makes it (every
        model's, unless a kept champion predates a preprocessing change: see `inputs`).
        Raises ImageError (with `.code`) for anything unusable."""
        return preprocess(self._decode(data), self.preprocess_cfg)

    def inputs(self, data: bytes) -> Views:
        """Upload bytes -> one image in every preprocessing the bundle's models and OOD gate
        take, each exactly as training preprocessed files (decoded once). Raises ImageError."""
        gray = self._decode(data)
        return Views({k: preprocess(gray, cfg)[None] for k, cfg in self.input_configs.items()})

    def as_views(self, images: np.ndarray | Views) -> Views:
        """(N, S, S, 3) preprocessed images -> Views; only a bundle with one preprocessing can
        take arrays (with several, pass upload bytes: each model needs its own input)."""
        if isinstance(images, Views):
            return images
        if len(self.input_configs) > 1:
            raise DataError(
                "this bundle's models take differently preprocessed images: pass the upload's "
                "bytes (predict_bytes / predict_study) so each model gets its own"
            )
        return Views({next(iter(self.input_configs)): np.asarray(images)})

    # -- public predictions -------------------------------------------------------------------

    def predict_bytes(
        self,
        data: bytes,
        *,
        explain: bool = False,
        allow_ood: bool = False,
        age_group: str = "unknown",
        body_part: str | None = None,
    ) -> dict:
        """One uploaded file -> the response JSON (see `predict_image`)."""
        age_group = check_age_group(age_group)
        body_part = check_body_part(body_part)
        return self.predict_image(
            self.inputs(data),
            explain=explain,
            allow_ood=allow_ood,
            age_group=age_group,
            body_part=body_part,
        )

    def predict_image(
        self,
        image: np.ndarray | Views,
        *,
        explain: bool = False,
        allow_ood: bool = False,
        age_group: str = "unknown",
        body_part: str | None = None,
    ) -> dict:
        """One preprocessed image -> body part, calibrated fracture probability and finding,
        recommendation, quality, optional Grad-CAM heatmap. Raises OutOfDistribution when the
        image fails the OOD gate and `allow_ood` is not set. The image is judged alone, so the
        recommendation asks for the part's standard views (the single-view safeguard).
        `image`: (S, S, 3), or `inputs(data)` (one image in each preprocessing).
        `body_part`: the part the user states (routes the image; flagged if the model
        disagrees); a part no fracture model covers gets "out_of_scope"."""
        age_group = check_age_group(age_group)
        body_part = check_body_part(body_part)
        images = image if isinstance(image, Views) else self.as_views(np.asarray(image)[None])
        if len(images) != 1:
            raise ValueError(f"predict_image takes one image, got {len(images)}")
        ood = self.ood_scores(images)
        self._gate(ood, allow_ood)
        decisions = decide(self.core, route(self.core, images, stated=body_part), ood)
        result = self._result(decisions, 0)
        result["age_group"] = age_group
        result["recommendation"] = self._recommendation(
            result, age_group=age_group, single_image=True
        )
        if explain and decisions.in_scope[0]:  # no fracture model judged an out-of-scope part
            result.update(self._explain(str(decisions.part[0]), images)[0])
        return self._envelope(result, "image")

    def predict_study(
        self,
        files: Sequence[bytes],
        *,
        explain: bool = False,
        allow_ood: bool = False,
        age_group: str = "unknown",
        body_part: str | None = None,
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
                images.append(self.inputs(data))
            except ImageError as exc:
                raise ImageError(f"image {i} of {len(files)}: {exc}", exc.code) from None
        return self.predict_study_images(
            Views.concat(images),
            explain=explain,
            allow_ood=allow_ood,
            age_group=age_group,
            body_part=body_part,
        )

    def predict_study_images(
        self,
        batch: np.ndarray | Views,
        *,
        explain: bool = False,
        allow_ood: bool = False,
        age_group: str = "unknown",
        body_part: str | None = None,
    ) -> dict:
        """`predict_study` on (N, S, S, 3) preprocessed images. The study probability stays the
        MURA mean; `views` flags views on both sides of the threshold (a finding on one view
        that the mean may dilute), and such a study asks for radiologist review."""
        age_group = check_age_group(age_group)
        body_part = check_body_part(body_part)
        batch = self.as_views(batch)
        ood = self.ood_scores(batch)
        for i, score in enumerate(ood, start=1):
            self._gate(np.array([score]), allow_ood, where=f"image {i} of {len(batch)}")
        one_study = np.zeros(len(batch), dtype=int)
        routed = route(self.core, batch, one_study, body_part)  # every image to the study's part
        study = decide(self.core, routed, ood, one_study)
        per_image = decide(self.core, routed, ood)
        images = [self._result(per_image, i) | {"index": i} for i in range(len(batch))]
        if explain and study.in_scope[0]:
            for result, extra in zip(images, self._explain(str(study.part[0]), batch), strict=True):
                result.update(extra)
        result = self._result(study, 0)
        result["n_images"] = len(batch)
        result["age_group"] = age_group
        result["views"] = (
            view_agreement(per_image, study.threshold[0])
            if study.in_scope[0]
            else {"disagree": False, "abnormal": [], "normal": []}  # no view was judged
        )
        result["recommendation"] = self._recommendation(
            result,
            study_images=len(batch),
            age_group=age_group,
            views_disagree=result["views"]["disagree"],
        )
        result["images"] = images
        return self._envelope(result, "study")

    def predict_batch(
        self, images: Sequence[np.ndarray | Views], *, allow_ood: bool = False
    ) -> list[dict]:
        """Independent images in one forward pass per model (/predict_batch's batches):
        each item gets the `predict_image` response, or `{"error": {code, message}}` when it
        fails the OOD gate, so one bad image never fails the others in its batch."""
        if not len(images):
            return []
        batch = Views.concat(
            [i if isinstance(i, Views) else self.as_views(np.asarray(i)[None]) for i in images]
        )
        ood = self.ood_scores(batch)
        keep = np.flatnonzero((ood <= OOD_LIMIT) | allow_ood | (not self.serve.ood_gate))
        out: list[dict] = [error_body(OutOfDistribution(float(s))) for s in ood]
        if len(keep):
            decisions = decide(self.core, route(self.core, batch[keep]), ood[keep])
            for j, i in enumerate(keep):
                result = self._result(decisions, j)
                result["age_group"] = "unknown"
                result["recommendation"] = self._recommendation(result, single_image=True)
                out[i] = self._envelope(result, "image")
        return out

    def predict_batch_bytes(self, files: Sequence[bytes], *, allow_ood: bool = False) -> list[dict]:
        """`predict_batch` on uploads; an undecodable item gets its `{"error": ...}` in place."""
        decoded = self.decode_batch(files)
        views = [item for item in decoded if isinstance(item, Views)]
        return self.merge_batch(decoded, self.predict_batch(views, allow_ood=allow_ood))

    @staticmethod
    def merge_batch(decoded: Sequence[Views | dict], results: Sequence[dict]) -> list[dict]:
        """`decode_batch`'s items with each decoded one replaced by its result, in order."""
        expected = sum(isinstance(item, Views) for item in decoded)
        if len(results) != expected:
            raise ValueError(f"{len(results)} results for {expected} decoded images")
        answers = iter(results)
        return [next(answers) if isinstance(item, Views) else item for item in decoded]

    def decode_batch(self, files: Sequence[bytes]) -> list[Views | dict]:
        """Each upload -> its `inputs`, or its `{"error": ...}` body if it cannot be used."""
        out: list[Views | dict] = []
        for data in files:
            try:
                out.append(self.inputs(data))
            except ImageError as exc:
                out.append(error_body(exc))
        return out

    def ood_scores(self, images: np.ndarray | Views) -> np.ndarray:
        """(N,) PCA out-of-distribution scores of preprocessed images; > 1 = unlike training."""
        gated = self.as_views(images)[self.input_keys[OOD_INPUT]]
        return self.gate.scores(downsample(gated, self.gate.image_size))

    def _gate(self, ood: np.ndarray, allow_ood: bool, where: str = "the image") -> None:
        if self.serve.ood_gate and not allow_ood and float(ood.max()) > OOD_LIMIT:
            raise OutOfDistribution(float(ood.max()), where)

    # -- response pieces ----------------------------------------------------------------------

    def _negative_cutoff(self, part: str) -> float | None:
        if part == OTHER:
            return None
        cutoff = self.core.points[part].negative_cutoff
        return 0.0 if cutoff is None else cutoff  # not recorded: no negative is confident

    def _recommendation(self, result: dict, study_images: int | None = None, **context) -> dict:
        fracture = result["fracture"]
        context |= {"ood": not result["quality"]["accepted"], "study_images": study_images}
        if fracture["model"] is None:  # out of scope: generic guidance, radiologist review
            stated = result["body_part"]["stated"]
            # a stated part the knowledge has an entry for but this bundle has no model for
            # (a bundle of fewer parts) gets the generic guidance too, never that part's
            rec = recommend(
                stated if stated and normalise_body_part(stated) is None else OTHER,
                "uncertain",
                None,
                context,
                threshold=None,
                knowledge=self.knowledge,
            )
            return rec.model_dump(mode="json")
        try:
            rec = recommend(
                fracture["model"],
                fracture["finding"],
                fracture["probability"],
                context,
                threshold=fracture["threshold"],
                negative_cutoff=fracture["negative_cutoff"],
                knowledge=self.knowledge,
            )
        except UserError as exc:  # the bundle's operating point, not the request: a 5xx
            raise RuntimeError(
                f"the {fracture['model']} model's operating point is unusable: {exc}"
            ) from exc
        return rec.model_dump(mode="json")

    def _gradcam(self, part: str):
        if part not in self._gradcams:
            from bonefrac.explain import GradCam

            self._gradcams[part] = GradCam(self._keras[part])
        return self._gradcams[part]

    def _explain(self, part: str, views: Views) -> list[dict]:
        """Grad-CAM of the fracture model each image was judged by, as base64 PNG overlays,
        on the images as that model saw them."""
        from bonefrac.explain import overlay_png

        images = views[self.input_keys[part]]
        heatmaps = self._gradcam(part).heatmaps(images)
        return [
            {
                "heatmap": base64.b64encode(overlay_png(image, heatmap)).decode("ascii"),
                "heatmap_info": {
                    "target": "abnormal",
                    "model": part,
                    "empty": bool(heatmap.max() == 0),
                    "meaning": "red = regions that raised the abnormality score most; blue = least",
                },
            }
            for image, heatmap in zip(images, heatmaps, strict=True)
        ]

    def _result(self, decisions: Decisions, i: int) -> dict:
        """Body part, abnormality finding and quality of unit i (an image or a study)."""
        part = str(decisions.part[i])
        model = self.manifest["models"].get(part, {})  # none for OTHER: not judged
        return unit_json(
            decisions,
            i,
            self.classes,
            negative_cutoff=self._negative_cutoff(part),
            sensitivity=model.get("val_sensitivity"),
        )

    def _envelope(self, result: dict, level: str) -> dict:
        """What every response carries besides the prediction itself."""
        return {
            "api_version": API_VERSION,
            "level": level,
            **result,
            "model_versions": self.versions,
            "runtime": self.runtime_info,
            "synthetic_models": self.synthetic,
            "notices": notices(result, self.synthetic),
            "disclaimer": DISCLAIMER,
        }
