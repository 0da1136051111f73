"""Typed, frozen settings loaded from params.yaml (+ a profile, + environment overrides).

One object feeds the CLI, the DVC stages and the Prefect flows, so a run is described by
exactly one set of values. Nothing happens at import time.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from bonefrac.errors import UserError

MURA_PARTS = (
    "XR_ELBOW",
    "XR_FINGER",
    "XR_FOREARM",
    "XR_HAND",
    "XR_HUMERUS",
    "XR_SHOULDER",
    "XR_WRIST",
)

# Environment variables that override single settings (paths and services differ per machine).
ENV_OVERRIDES = {
    "BONEFRAC_DATA": ("paths", "data"),
    "BONEFRAC_ARTIFACTS": ("paths", "artifacts"),
    "MLFLOW_TRACKING_URI": ("tracking", "tracking_uri"),
    "MLFLOW_EXPERIMENT_NAME": ("tracking", "experiment"),
    "BONEFRAC_KNOWLEDGE": ("serve", "knowledge"),  # a hospital's own treatment-guidance YAML
}


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PathsConfig(_Section):
    project: Path = Path(".")  # the folder holding params.yaml (set by the loader)
    data: Path = Path("data")
    artifacts: Path = Path("artifacts")
    mlflow_db: Path = Path("mlflow.db")  # embedded store, unless MLFLOW_TRACKING_URI is set
    mlflow_artifacts: Path = Path("mlartifacts")


def body_part_name(part: str) -> str:
    """`XR_ELBOW` -> `elbow`: the short name used in model names and responses. (Here, not in
    data/mura.py, so serving reads part names without pandas, which the Bento does not ship.)"""
    return part.removeprefix("XR_").lower()


BODY_PART_MODEL = "body_part"  # the model that names the part (the others: one per part)
OTHER = "other"  # the body-part model's class for MURA parts without a fracture model
OTHER_PARTS = ("XR_FINGER", "XR_FOREARM", "XR_HUMERUS", "XR_WRIST")


def body_part_classes(data: DataConfig) -> list[str]:
    """The body-part model's classes, in softmax order: one per target part, then "other"
    when `data.other_parts` brings MURA's remaining parts in for it to recognise."""
    return [body_part_name(p) for p in data.parts] + ([OTHER] if data.other_parts else [])


def body_part_class(body_part: str, classes: list[str] | tuple[str, ...]) -> str:
    """A manifest body part ('wrist', 'elbow') -> the body-part model's class for it."""
    return body_part if body_part in classes else OTHER


class DataConfig(_Section):
    parts: tuple[str, ...] = ("XR_ELBOW", "XR_HAND", "XR_SHOULDER")
    # MURA parts only the body-part model sees, as its "other" class, so that a wrist or a
    # finger is recognised as out of scope instead of being given a covered part's guidance;
    # empty = no "other" class (a 3-class body-part model, as bundles before it had)
    other_parts: tuple[str, ...] = OTHER_PARTS
    # share of each other part's patients kept (a stable draw per patient, like the val
    # split): real MURA has ~9,000 images of them, which would double body-part training
    other_fraction: float = Field(0.25, gt=0, le=1)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 42
    min_images_per_group: int = Field(10, ge=1)  # validation: per split x part x label
    abnormal_share_bounds: tuple[float, float] = (0.1, 0.9)  # validation warning outside
    image_min_side: int = Field(32, ge=1)
    image_max_side: int = Field(8192, ge=1)

    @field_validator("parts")
    @classmethod
    def _known_parts(cls, parts: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [p for p in parts if p not in MURA_PARTS]
        if unknown:
            raise ValueError(f"unknown MURA part(s) {unknown}; choose from {list(MURA_PARTS)}")
        if not parts:
            raise ValueError("at least one part is needed")
        return parts

    @field_validator("other_parts")
    @classmethod
    def _known_other_parts(cls, parts: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [p for p in parts if p not in MURA_PARTS]
        if unknown:
            raise ValueError(f"unknown MURA part(s) {unknown}; choose from {list(MURA_PARTS)}")
        return tuple(dict.fromkeys(parts))

    @model_validator(mode="before")
    @classmethod
    def _default_other_parts(cls, values: Any) -> Any:
        """Unset, other_parts is MURA's four other parts minus any chosen as targets."""
        if isinstance(values, dict) and "other_parts" not in values and "parts" in values:
            parts = values["parts"] or ()
            values = {**values, "other_parts": tuple(p for p in OTHER_PARTS if p not in parts)}
        return values

    @model_validator(mode="after")
    def _other_parts_are_not_targets(self) -> DataConfig:
        both = [p for p in self.other_parts if p in self.parts]
        if both:
            raise ValueError(
                f"{', '.join(both)} in both data.parts and data.other_parts: a part either has "
                "a fracture model or belongs to the body-part model's 'other' class"
            )
        return self


class PreprocessConfig(_Section):
    image_size: int = Field(320, ge=16, le=1024)  # MURA baseline: 320 x 320
    clahe: bool = True
    clahe_clip_limit: float = Field(2.0, gt=0)
    clahe_tile_grid: int = Field(8, ge=1)
    gaussian_kernel: int = Field(5, ge=0)
    gaussian_sigma: float = Field(1.0, gt=0)
    workers: int = Field(0, ge=0)

    @field_validator("gaussian_kernel")
    @classmethod
    def _odd_kernel(cls, k: int) -> int:
        if k != 0 and k % 2 == 0:
            raise ValueError("must be odd (or 0 to disable the filter)")
        return k


class PcaConfig(_Section):
    image_size: int = Field(32, ge=4, le=256)
    n_components: int = Field(32, ge=2)
    ood_percentile: float = Field(99.5, gt=50, le=100)
    incremental_above: int = Field(5000, ge=1)
    seed: int = 42


class TrackingConfig(_Section):
    experiment: str = "bonefrac"
    tracking_uri: str | None = (
        None  # None: sqlite:///<paths.mlflow_db>; env MLFLOW_TRACKING_URI wins
    )
    log_models: bool = True  # mlflow.keras.log_model for every trained model


class TrainConfig(_Section):
    """Defaults follow the MURA baseline (Rajpurkar et al. 2017) where it has a value;
    docs/recipe.md gives each source and what differs."""

    weights: str = "imagenet"
    batch_size: int = Field(8, ge=1)
    head_epochs: int = Field(2, ge=0)  # phase 1: backbone frozen, only the new head trains
    finetune_epochs: int = Field(30, ge=0)  # phase 2: an upper bound; early stopping ends it
    # Backbone layers trained in phase 2, counted from the top: "all" (full fine-tuning, as
    # the MURA baseline) or a number (0 also means all, as older params files wrote it).
    finetune_layers: int | Literal["all"] = "all"
    head_learning_rate: float = Field(1e-3, gt=0)
    finetune_learning_rate: float = Field(1e-4, gt=0)
    dropout: float = Field(0.3, ge=0, lt=1)
    # From scratch (weights: none): each residual block's last BatchNorm starts with gamma 0,
    # so every block starts as the identity and the network as a shallow one (Goyal et al.
    # 2017; torchvision's zero_init_residual). Pretrained weights replace any initialisation.
    zero_init_residual: bool = False
    bn_momentum: float = Field(0.99, gt=0, lt=1)
    # Best epoch, early stopping and learning-rate drops follow the validation loss ("loss",
    # the MURA baseline's choice) or the model's metric ("metric": AUC for a fracture
    # model, accuracy for the body-part model).
    monitor: Literal["loss", "metric"] = "loss"
    patience: int = Field(5, ge=1)  # early stopping: epochs without improvement
    lr_patience: int = Field(1, ge=1)  # epochs without improvement before the rate drops
    lr_factor: float = Field(0.1, gt=0, lt=1)  # the rate is multiplied by this on a plateau
    augment: bool = True
    rotation_degrees: float = Field(30.0, ge=0, le=180)  # augmentation: up to ± this
    class_weights: bool = True
    strategy: Literal["default", "mirrored", "multi_worker"] = "default"
    mixed_precision: bool = False
    # XLA for the training step: "auto" is Keras' choice, or forced on (true) or off (false).
    # "auto" is off when TensorFlow sees only CPUs (forcing it on measured 1.44x slower to the
    # first epoch here: docs/benchmarks.md) and off while `deterministic` is on (Keras turns XLA
    # off under op determinism), so with a GPU it means XLA only with deterministic: false.
    jit_compile: bool | Literal["auto"] = "auto"
    # Same inputs, same weights: kernels and the augmentation's random draws run in a fixed
    # order (tf.config.experimental.enable_op_determinism; cost measured in docs/training.md).
    deterministic: bool = True
    seed: int = 42
    # The body-part model's own values for any key above, e.g. {finetune_epochs: 10}:
    # recognising the part is learned in a few epochs, where a fracture model needs more.
    body_part: dict[str, Any] = Field(default_factory=dict)

    def for_model(self, name: str) -> TrainConfig:
        """The settings model `name` trains with: these, with `body_part` applied to the
        body-part model."""
        if name != BODY_PART_MODEL or not self.body_part:
            return self
        return TrainConfig.model_validate({**self.model_dump(), **self.body_part, "body_part": {}})

    @field_validator("body_part", mode="before")
    @classmethod
    def _body_part_empty(cls, values: Any) -> Any:
        return {} if values is None else values  # `body_part:` with nothing under it

    @field_validator("body_part")
    @classmethod
    def _body_part_keys(cls, values: dict[str, Any]) -> dict[str, Any]:
        # not per model: the strategy, op determinism and the precision policy are the
        # process's, and an override cannot nest
        process_wide = {"body_part", "strategy", "deterministic", "mixed_precision"}
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)}")
        shared = sorted(set(values) & process_wide)
        if shared:
            raise ValueError(f"{', '.join(shared)} cannot be set for the body-part model alone")
        return values

    @field_validator("finetune_layers")
    @classmethod
    def _layers(cls, layers: int | str) -> int | str:
        if layers == 0:
            return "all"
        if isinstance(layers, int) and layers < 0:
            raise ValueError('must be "all" or a number of layers >= 1')
        return layers

    @model_validator(mode="after")
    def _patience_outlasts_lr_drop(self) -> TrainConfig:
        # a lowered learning rate needs epochs of its own before early stopping may end the run
        if self.patience <= self.lr_patience:
            raise ValueError(
                f"patience ({self.patience}) must exceed lr_patience ({self.lr_patience}), "
                "so a lowered learning rate gets epochs to work"
            )
        if self.jit_compile is True and self.deterministic:
            raise ValueError(
                "jit_compile: true needs deterministic: false (Keras turns XLA off while "
                "TensorFlow's op determinism is on)"
            )
        if self.body_part:
            try:
                self.for_model(BODY_PART_MODEL)
            except ValidationError as exc:
                error = exc.errors()[0]
                message = error["msg"].removeprefix("Value error, ")
                where = ".".join(["body_part", *(str(part) for part in error["loc"])])
                raise ValueError(f"{where}: {message}") from None
        return self


class EvaluateConfig(_Section):
    threshold_method: Literal["youden", "sensitivity"] = "youden"
    target_sensitivity: float = Field(0.9, gt=0, lt=1)
    # a "no abnormality" counts as confident (no radiologist-review flag) only below the
    # cut-off that keeps this sensitivity on val studies
    negative_sensitivity: float = Field(0.95, gt=0, lt=1)
    uncertain_band: float = Field(0.1, ge=0, lt=0.5)
    bootstrap_samples: int = Field(1000, ge=10)
    seed: int = 42


class RegistryConfig(_Section):
    model_prefix: str = "bonefrac"
    fracture_metric: str = "study_kappa"  # <level>_<metric>, measured on the gate split (val)
    body_part_metric: Literal["accuracy", "kappa"] = "accuracy"
    min_improvement: float = Field(0.0, ge=0)  # Δ's lower bound must exceed this to promote
    confidence: float = Field(0.9, gt=0.5, lt=1)  # of the one-sided interval of Δ
    bootstrap_samples: int = Field(2000, ge=100)  # patient resamples of the paired bootstrap
    seed: int = 42

    @field_validator("fracture_metric")
    @classmethod
    def _level_metric(cls, metric: str) -> str:
        level, _, key = metric.partition("_")
        known = ("accuracy", "precision", "recall", "sensitivity", "specificity", "f1", "kappa")
        if level not in {"image", "study"} or key not in (*known, "auroc", "auprc"):
            raise ValueError("must look like study_kappa or image_auroc")
        return metric


class PipelineConfig(_Section):
    task_runner: Literal["sequential", "threads", "processes", "dask"] = "sequential"
    dask_address: str | None = None  # existing Dask scheduler; None starts a local cluster
    dask_workers: int = Field(2, ge=1)  # local cluster only: worker processes, 1 thread each
    # local cluster only: times a training is retried when its worker dies (Dask's
    # distributed.scheduler.allowed-failures; an external scheduler sets its own)
    dask_allowed_failures: int = Field(1, ge=0)
    drift_gate: bool = False  # stop the run when the data drifted from the champion's
    drift_alpha: float = Field(0.01, gt=0, lt=1)
    drift_sample: int = Field(500, ge=10)  # images preprocessed for the drift check
    build_bento: bool = True


class ServeConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(3000, ge=1, le=65535)
    max_upload_mb: float = Field(20, gt=0)
    max_pixels: int = Field(40_000_000, ge=1)
    min_side: int = Field(32, ge=1)
    ood_gate: bool = True
    body_timeout_s: float = Field(30, gt=0)  # an upload body must arrive within this
    # Treatment guidance: a hospital's own validated knowledge YAML (None = the packaged one),
    # and whether draft (clinically unreviewed) content may be served (demo/tests only).
    knowledge: Path | None = None
    allow_unreviewed: bool = False
    # What scores requests (bonefrac.runtimes): auto = the fastest variant that passed the
    # packaging accuracy gate and that this CPU supports; TensorFlow if OpenVINO cannot compile.
    runtime: Literal["auto", "openvino-int8", "openvino-bf16", "openvino-fp32", "tensorflow"] = (
        "auto"
    )


class PackageConfig(_Section):
    """Packaging's OpenVINO export, int8 quantization and the accuracy gate against fp32."""

    openvino: bool = True  # export OpenVINO IR (fp32 + int8) into the bundle
    calibration_images: int = Field(300, ge=1)  # train-split images for NNCF calibration
    gate_max_delta_p: float = Field(0.1, gt=0, le=1)  # per image |p_int8 - p_fp32|
    gate_max_flip_rate: float = Field(0.01, ge=0, le=1)  # decisions changed at the threshold
    gate_max_delta_auroc: float = Field(0.005, ge=0)
    gate_max_delta_kappa: float = Field(0.01, ge=0)  # study kappa (body part: image kappa)
    # NNCF's bias correction after quantizing: "fast" (its default) or "none". On the quick
    # profile's SYNTHETIC 64 px models "fast" made int8 worse (docs/benchmarks.md)
    bias_correction: Literal["fast", "none"] = "fast"
    seed: int = 42


class Layout(BaseModel):
    """Where each stage writes, under paths.artifacts (one place for every path)."""

    model_config = ConfigDict(frozen=True)
    artifacts: Path

    @property
    def manifest(self) -> Path:
        return self.artifacts / "manifest.csv"

    @property
    def validation(self) -> Path:
        return self.artifacts / "validation"

    @property
    def preprocessed(self) -> Path:
        return self.artifacts / "preprocessed"

    @property
    def pca(self) -> Path:
        return self.artifacts / "pca"

    @property
    def models(self) -> Path:
        return self.artifacts / "models"

    @property
    def evaluation(self) -> Path:
        return self.artifacts / "evaluation"

    @property
    def metrics(self) -> Path:
        """Small JSON metrics per stage, for `dvc metrics show` (kept outside stage outs)."""
        return self.artifacts / "metrics"

    @property
    def plots(self) -> Path:
        """CSV plot data per stage, for `dvc plots show`."""
        return self.artifacts / "plots"


class Settings(_Section):
    profile: str | None = None
    paths: PathsConfig = PathsConfig()
    data: DataConfig = DataConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    pca: PcaConfig = PcaConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    serve: ServeConfig = ServeConfig()
    tracking: TrackingConfig = TrackingConfig()
    registry: RegistryConfig = RegistryConfig()
    pipeline: PipelineConfig = PipelineConfig()
    package: PackageConfig = PackageConfig()

    @property
    def mura_root(self) -> Path:
        """The MURA-v1.1 folder under the data path."""
        return self.paths.data / "MURA-v1.1"

    @property
    def layout(self) -> Layout:
        return Layout(artifacts=self.paths.artifacts)

    def flat(self) -> dict[str, Any]:
        """Flattened `section.key -> value` view, as logged to MLflow."""
        out: dict[str, Any] = {}
        for section, values in self.model_dump(mode="json").items():
            if isinstance(values, dict):
                for key, value in values.items():
                    out[f"{section}.{key}"] = value
            else:
                out[section] = values
        return out

    def section_hash(self, *sections: str) -> str:
        """Short stable hash of the given sections, for cache keys and registry tags."""
        dump = self.model_dump(mode="json")
        payload = json.dumps({s: dump[s] for s in sections}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _format_validation_error(exc: ValidationError, source: str) -> str:
    first = exc.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{source}: {key}: {message}"


def find_params(start: Path | None = None) -> Path | None:
    """params.yaml in the working directory or the nearest parent that has one."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "params.yaml"
        if candidate.is_file():
            return candidate
    return None


def load_settings(
    params_path: Path | None = None,
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> Settings:
    """Load settings: params.yaml, then the profile, then environment, then explicit overrides.

    `overrides` is nested like params.yaml (`{"train": {"epochs": 1}}`). Relative paths are
    resolved against the folder holding params.yaml so every caller sees the same files.
    Raises UserError with one line naming the bad key.
    """
    env = dict(os.environ) if env is None else env
    params_path = params_path or find_params()
    raw: dict[str, Any] = {}
    base_dir = Path.cwd()
    source = "settings"
    if params_path is not None:
        params_path = Path(params_path)
        if not params_path.is_file():
            raise UserError(f"{params_path} not found: pass --params pointing at a params.yaml")
        try:
            raw = yaml.safe_load(params_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{params_path} is not valid YAML: {exc}".splitlines()[0]) from None
        if not isinstance(raw, dict):
            raise UserError(f"{params_path} must be a mapping of sections")
        base_dir = params_path.resolve().parent
        source = str(params_path)

    profiles = raw.pop("profiles", {}) or {}
    profile = profile or env.get("BONEFRAC_PROFILE") or raw.pop("profile", None) or None
    raw.pop("profile", None)
    if profile:
        if profile not in profiles:
            known = ", ".join(sorted(profiles)) or "none defined"
            raise UserError(f"unknown profile {profile!r} (known: {known})")
        raw = _deep_merge(raw, profiles[profile])
        raw["profile"] = profile

    for var, (section, key) in ENV_OVERRIDES.items():
        if env.get(var):
            raw.setdefault(section, {})[key] = env[var]
    if overrides:
        raw = _deep_merge(raw, overrides)

    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_format_validation_error(exc, source)) from None

    paths = {
        name: value if value.is_absolute() else base_dir / value
        for name, value in settings.paths.model_dump().items()
    }
    update: dict[str, Any] = {"paths": PathsConfig(**paths)}
    knowledge = settings.serve.knowledge
    if knowledge is not None and not knowledge.is_absolute():  # relative to params.yaml too
        update["serve"] = settings.serve.model_copy(update={"knowledge": base_dir / knowledge})
    return settings.model_copy(update=update)
