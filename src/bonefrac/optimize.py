"""Packaging's fast CPU runtimes: each bundled Keras model -> OpenVINO IR (fp32) -> NNCF int8,
and an accuracy gate that decides which of them may serve.

Calibration uses TRAIN-split images preprocessed exactly as served (the preprocessed cache is
`imaging.preprocess`'s output, invariant 1); the gate uses VAL images, never calibration ones,
never test. A variant passes when, against the Keras fp32 outputs on val:

    max per-image |Δp|                      <= package.gate_max_delta_p
    share of decisions flipped              <= package.gate_max_flip_rate   (1%)
      (fracture: at the part's threshold, after its temperature; body part: the argmax)
    |ΔAUROC|                                <= package.gate_max_delta_auroc (0.005)
    |Δ study kappa| (body part: image kappa) <= package.gate_max_delta_kappa (0.01)

A model whose int8 fails keeps fp32; the reason goes into bundle.json (`openvino`) and onto the
model version in MLflow. bf16 is gated only where the packaging CPU has bf16.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from bonefrac.config import OTHER, PackageConfig, body_part_class
from bonefrac.inference import apply_temperature
from bonefrac.runtimes import DEVICE, IR_FILES, cpuinfo, host_capabilities

CHUNK = 32  # images per forward call when scoring the val split (bounded memory at 320 px)


@dataclass(frozen=True)
class GateData:
    """What one model is calibrated and gated on: (N, S, S) uint8 cache images."""

    calibration: np.ndarray  # train split
    validation: np.ndarray  # val split
    labels: np.ndarray  # (n_val,) 0/1, or body-part class index
    groups: np.ndarray | None = None  # (n_val,) study index (fracture models)
    threshold: float | None = None  # fracture: operating threshold; None = body part (argmax)
    temperature: float = 1.0


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str
    metrics: dict


def rgb(images: np.ndarray) -> np.ndarray:
    """(N, S, S) cache rows -> (N, S, S, 3) float32, what the served models receive."""
    return np.repeat(np.asarray(images)[..., np.newaxis], 3, axis=-1).astype(np.float32)


def in_chunks(forward: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [np.asarray(forward(rgb(images[i : i + CHUNK]))) for i in range(0, len(images), CHUNK)]
    )


# -- export and quantization --------------------------------------------------------------------


def keras_forward(model, size: int):
    """(tf.function of the Keras model, its concrete function) with a free batch dimension."""
    import tensorflow as tf

    spec = tf.TensorSpec((None, size, size, 3), tf.float32)
    graph = tf.function(lambda images: model(images, training=False), input_signature=[spec])
    return graph, graph.get_concrete_function()


def quantize_int8(ov_model, calibration: np.ndarray, cfg: PackageConfig):
    """NNCF post-training int8 quantization calibrated on these (N, S, S) images, with
    `package.bias_correction` ("none" skips NNCF's bias correction: its 54 subgraph compiles
    a ResNet50, and the int8 error it added on the quick profile's models)."""
    import nncf

    dataset = nncf.Dataset(list(calibration), lambda image: rgb(image[None]))
    advanced = nncf.AdvancedQuantizationParameters(
        disable_bias_correction=cfg.bias_correction == "none"
    )
    return nncf.quantize(
        ov_model, dataset, subset_size=len(calibration), advanced_parameters=advanced
    )


def compiled(ov_model, precision: str) -> Callable[[np.ndarray], np.ndarray]:
    import openvino as ov

    model = ov.Core().compile_model(ov_model, DEVICE, {"INFERENCE_PRECISION_HINT": precision})
    return lambda images: np.array(model(images)[model.output(0)])


# -- the gate -----------------------------------------------------------------------------------


def _safe(metric: Callable[[], float]) -> float | None:
    try:
        value = float(metric())
    except ValueError:  # one class only: undefined
        return None
    return None if np.isnan(value) else value


def _scores(outputs: np.ndarray, data: GateData) -> dict:
    """Served probabilities, decisions, AUROC and kappa of one model's raw outputs on val."""
    if data.threshold is None:  # body part: softmax over classes, decision = argmax
        probs = outputs
        decisions = outputs.argmax(axis=1)
        auroc = _safe(lambda: roc_auc_score(data.labels, probs, multi_class="ovr"))
        kappa = _safe(lambda: cohen_kappa_score(data.labels, decisions))
        return {"probs": probs, "decisions": decisions, "auroc": auroc, "kappa": kappa}
    probs = apply_temperature(outputs[:, 0], data.temperature)
    decisions = (probs >= data.threshold).astype(int)
    groups = data.groups if data.groups is not None else np.arange(len(probs))
    n = int(groups.max()) + 1 if len(groups) else 0
    study_probs = np.bincount(groups, probs, n) / np.maximum(np.bincount(groups, minlength=n), 1)
    study_labels = np.bincount(groups, data.labels, n) / np.maximum(np.bincount(groups, None, n), 1)
    kappa = _safe(
        lambda: cohen_kappa_score(study_labels.round(), (study_probs >= data.threshold).astype(int))
    )
    auroc = _safe(lambda: roc_auc_score(data.labels, probs))
    return {"probs": probs, "decisions": decisions, "auroc": auroc, "kappa": kappa}


def _delta(a: float | None, b: float | None) -> float | None:
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        return None  # defined for one and not the other: a change the gate refuses
    return abs(a - b)


def accuracy_gate(
    reference: np.ndarray, candidate: np.ndarray, data: GateData, cfg: PackageConfig
) -> GateResult:
    """Compare a variant's raw outputs with the fp32 reference on the val images."""
    ref, cand = _scores(reference, data), _scores(candidate, data)
    n = len(reference)
    flips = int((ref["decisions"] != cand["decisions"]).sum())
    metrics = {
        "n_images": n,
        "max_delta_p": float(np.abs(ref["probs"] - cand["probs"]).max()) if n else 0.0,
        "flips": flips,
        "flip_rate": flips / n if n else 0.0,
        "auroc": cand["auroc"],
        "delta_auroc": _delta(ref["auroc"], cand["auroc"]),
        "kappa": cand["kappa"],
        "delta_kappa": _delta(ref["kappa"], cand["kappa"]),
    }
    kappa_name = "image kappa" if data.threshold is None else "study kappa"
    failures = []
    if n == 0:
        failures.append("no val images to check it on")
    if metrics["max_delta_p"] > cfg.gate_max_delta_p:
        failures.append(f"max |Δp| {metrics['max_delta_p']:.4f} > {cfg.gate_max_delta_p}")
    if metrics["flip_rate"] > cfg.gate_max_flip_rate:
        failures.append(
            f"{flips} of {n} decisions flipped ({metrics['flip_rate']:.1%} > "
            f"{cfg.gate_max_flip_rate:.1%})"
        )
    for key, limit, label in (
        ("delta_auroc", cfg.gate_max_delta_auroc, "AUROC"),
        ("delta_kappa", cfg.gate_max_delta_kappa, kappa_name),
    ):
        if metrics[key] is None:
            failures.append(f"{label} defined for only one of fp32 and the variant")
        elif metrics[key] > limit:
            failures.append(f"|Δ{label}| {metrics[key]:.4f} > {limit}")
    if failures:
        return GateResult(False, "failed the accuracy gate: " + "; ".join(failures), metrics)
    return GateResult(True, f"passed the accuracy gate on {n} val images", metrics)


# -- one bundle -----------------------------------------------------------------------------------


def cpu_model() -> str:
    return cpuinfo("model name") or platform.processor() or platform.machine()


def optimize_model(
    keras_model,
    size: int,
    out_dir: Path,
    data: GateData,
    cfg: PackageConfig,
    quantizer: Callable = quantize_int8,
) -> dict:
    """Export one model's IR to `out_dir`, gate fp32 / int8 (/ bf16) IR on val against the
    Keras fp32 outputs, keep what passed. Returns its `openvino.models[name]` entry."""
    import openvino as ov

    forward, concrete = keras_forward(keras_model, size)  # one trace: reference and export
    reference = in_chunks(forward, data.validation)
    fp32_model = ov.convert_model(concrete)  # fp32 weights
    entry: dict = {"files": {}}

    def gate(ov_model, precision: str) -> GateResult:
        outputs = in_chunks(compiled(ov_model, precision), data.validation)
        return accuracy_gate(reference, outputs, data, cfg)

    fp32 = gate(fp32_model, "f32")
    entry["fp32"] = asdict(fp32)
    if not fp32.passed:  # the export itself changed the model: no OpenVINO for it at all
        entry["int8"] = {"passed": False, "reason": "not tried: the fp32 IR " + fp32.reason}
        return entry
    ov.save_model(fp32_model, out_dir / IR_FILES["fp32"], compress_to_fp16=False)
    entry["files"]["fp32"] = IR_FILES["fp32"]
    int8_model = quantizer(fp32_model.clone(), data.calibration, cfg)
    int8 = gate(int8_model, "f32")
    entry["int8"] = asdict(int8) | {
        "calibration_images": len(data.calibration),
        "bias_correction": cfg.bias_correction,
    }
    if int8.passed:
        ov.save_model(int8_model, out_dir / IR_FILES["int8"], compress_to_fp16=False)
        entry["files"]["int8"] = IR_FILES["int8"]
    if "BF16" in host_capabilities():
        entry["bf16"] = asdict(gate(fp32_model, "bf16"))
    else:
        entry["bf16"] = {"passed": False, "reason": "not gated: the packaging CPU has no bf16"}
    return entry


def optimize_bundle(
    bundle_dir: Path,
    manifest: dict,
    data: dict[str, GateData],
    cfg: PackageConfig,
    quantizer: Callable = quantize_int8,
    models: dict | None = None,
) -> dict:
    """Add every model's OpenVINO IR to a bundle folder; returns bundle.json's `openvino`
    section (the caller writes it and re-hashes the bundle). `models`: Keras models the
    caller already holds, the same ones it saved into the bundle (a load takes 1-3 s each),
    taken out of the dict as each is exported, so none stays in memory after; the others
    are loaded from the bundle."""
    import keras
    import nncf
    import openvino as ov

    size = int(manifest["image_size"])
    section = {
        "openvino": ov.__version__,
        "nncf": nncf.__version__,
        "packaging_cpu": cpu_model(),
        "packaging_capabilities": sorted(host_capabilities()),
        "models": {},
    }
    for name in manifest["models"]:
        model = models.pop(name, None) if models else None
        if model is None:
            model = keras.models.load_model(Path(bundle_dir) / name / "model.keras", compile=False)
        section["models"][name] = optimize_model(
            model, size, Path(bundle_dir) / name, data[name], cfg, quantizer
        )
    return section


def add_to_bundle(
    bundle_dir: Path,
    data: dict[str, GateData] | None,
    cfg: PackageConfig,
    quantizer: Callable = quantize_int8,
    skipped: str | None = None,
    models: dict | None = None,
) -> dict:
    """Optimize a packaged bundle in place: IR files in, bundle.json's `openvino` section
    written (`{"skipped": why}` when `skipped`), SHA-256 list redone. Returns the section."""
    from bonefrac.bundle import BUNDLE_FILE, read_bundle
    from bonefrac.bundle_integrity import write_manifest

    bundle_dir = Path(bundle_dir)
    manifest = read_bundle(bundle_dir)
    if skipped is not None or data is None:
        section = {"skipped": skipped or "no calibration data"}
    else:
        section = optimize_bundle(bundle_dir, manifest, data, cfg, quantizer, models)
    manifest["openvino"] = section
    (bundle_dir / BUNDLE_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    write_manifest(bundle_dir)  # the IR files join the SHA-256 list
    return section


def _model_part(name: str) -> str | None:
    from bonefrac.models import BODY_PART_MODEL

    return None if name == BODY_PART_MODEL else name


def calibration_rows(cache, name: str, cfg: PackageConfig) -> np.ndarray:
    """The cache rows of the train images that calibrate one model's int8 quantization: a
    sample seeded by `package.seed`, sorted."""
    rng = np.random.default_rng(cfg.seed)
    part = _model_part(name)  # the body-part model also sees MURA's other parts
    train = cache.rows(split="train", body_part=part, other=part is None)
    return np.sort(rng.permutation(train)[: cfg.calibration_images])


def gate_data(cache, name: str, classes: list[str], point: dict | None, cfg: PackageConfig):
    """One model's calibration (train, a seeded sample) and gate (val) images from the
    preprocessed cache, with the labels and operating point the gate needs."""
    part = _model_part(name)
    train = calibration_rows(cache, name, cfg)
    val = cache.rows(split="val", body_part=part, other=part is None and OTHER in classes)
    index = cache.index.iloc[val]
    if part is None:
        labels = np.array(
            [classes.index(body_part_class(p, classes)) for p in index["body_part"]], dtype=int
        )
        return GateData(np.asarray(cache.images[train]), np.asarray(cache.images[val]), labels)
    groups = index["study_id"].factorize()[0]
    return GateData(
        np.asarray(cache.images[train]),
        np.asarray(cache.images[val]),
        index["label"].to_numpy().astype(int),
        groups,
        float(point["threshold"]),
        float(point["temperature"]),
    )
