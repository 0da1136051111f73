"""OpenVINO runtimes on a real bundle of tiny CNNs (64 px): export to IR, the int8 accuracy gate
(passes on a healthy quantization, bites on a damaged one), the runtime switch and the fallback
to TensorFlow. Real OpenVINO and NNCF throughout; the models are small so this stays fast."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.service.conftest import OPERATING_POINTS, PARTS, SIZE

pytestmark = pytest.mark.slow


def tiny_cnn(outputs: int, name: str, seed: int):
    """A small conv net with the bundle models' contract: (N, S, S, 3) 0..255 in."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    for filters in (16, 32, 32):
        x = keras.layers.Conv2D(filters, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(outputs, activation="softmax" if outputs > 1 else "sigmoid")(x)
    return keras.Model(inputs, x, name=name)


def _images(paths: list[Path], cfg) -> np.ndarray:
    from bonefrac.imaging import preprocess_file

    return np.stack([preprocess_file(p, cfg)[..., 0] for p in paths])  # (N, S, S) like the cache


@pytest.fixture(scope="module")
def train_labels(gate_data, synthetic_root):
    """(images, labels) of the train split per model: what the tiny models learn from."""
    out = {"body_part": (gate_data["body_part"].calibration, [])}
    body = []
    for i, part in enumerate(PARTS):
        paths = sorted((synthetic_root / "train" / f"XR_{part.upper()}").rglob("*.png"))
        labels = np.array([int("positive" in p.parent.name) for p in paths])
        out[part] = (gate_data[part].calibration, labels)
        body += [i] * len(paths)
    out["body_part"] = (gate_data["body_part"].calibration, np.array(body))
    return out


@pytest.fixture(scope="module")
def gate_data(synthetic_root, quick_settings):
    """Calibration on the synthetic train images, the gate on the other images (never the
    calibration ones), with real labels and studies."""
    from bonefrac.optimize import GateData

    cfg = quick_settings.preprocess
    out = {}
    for part in PARTS:
        train = sorted((synthetic_root / "train" / f"XR_{part.upper()}").rglob("*.png"))
        val = sorted((synthetic_root / "valid" / f"XR_{part.upper()}").rglob("*.png"))
        out[part] = (_images(train, cfg), val)
    body_val = [p for part in PARTS for p in out[part][1]]
    data = {
        "body_part": GateData(
            np.concatenate([out[p][0] for p in PARTS]),
            _images(body_val, cfg),
            np.array([PARTS.index(p.parents[2].name[3:].lower()) for p in body_val]),
        )
    }
    for part in PARTS:
        calibration, val = out[part]
        studies = [p.parent for p in val]
        data[part] = GateData(
            calibration,
            _images(val, cfg),
            np.array([int("positive" in p.parent.name) for p in val]),
            np.unique(studies, return_inverse=True)[1],
            OPERATING_POINTS[part]["threshold"],
            OPERATING_POINTS[part]["temperature"],
        )
    return data


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, bundle_dir, train_labels) -> Path:
    """The service test bundle (its OOD gate, operating points, preprocessing) with its
    ResNet50s swapped for tiny CNNs trained briefly on the train images (a healthy model
    separates its classes; an untrained one puts every image near every other), re-hashed
    as packaging would."""
    from bonefrac.bundle_integrity import write_manifest

    out = tmp_path_factory.mktemp("tiny") / "bundle"
    shutil.copytree(bundle_dir, out)
    for seed, (name, outputs) in enumerate((("body_part", 3), *((p, 1) for p in PARTS))):
        model = tiny_cnn(outputs, name, seed)
        images, labels = train_labels[name]
        loss = "sparse_categorical_crossentropy" if outputs > 1 else "binary_crossentropy"
        model.compile(optimizer="adam", loss=loss)
        # body part: a few epochs; 3-class softmax trained to saturation on ~80 images has
        # huge logits, and int8 then moves its probabilities by up to 0.6 (measured). Hand:
        # from 25 epochs on, its CNN saturates on one val film of the session-12 generator
        # and int8 moves that film by 0.17-0.21 across the threshold (measured at 25, 30, 40
        # epochs); at 20 it is healthy (max |Δp| 0.025)
        epochs = 5 if outputs > 1 else 20 if name == "hand" else 40
        x = np.repeat(images[..., None], 3, -1).astype("float32")
        model.fit(x, labels, epochs=epochs, batch_size=16, verbose=0)
        model.save(out / name / "model.keras")
    write_manifest(out)
    return out


@pytest.fixture(scope="module")
def optimized(tmp_path_factory, tiny_bundle, gate_data, quick_settings) -> Path:
    from bonefrac.optimize import add_to_bundle

    out = tmp_path_factory.mktemp("optimized") / "bundle"
    shutil.copytree(tiny_bundle, out)
    add_to_bundle(out, gate_data, quick_settings.package)
    return out


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, tiny_bundle, gate_data, quick_settings) -> Path:
    """int8 calibrated on blank images: activation ranges of nothing, so real images clip."""
    from bonefrac.optimize import add_to_bundle, quantize_int8

    def blank_calibration(model, calibration, cfg):
        return quantize_int8(model, np.zeros_like(calibration), cfg)

    out = tmp_path_factory.mktemp("damaged") / "bundle"
    shutil.copytree(tiny_bundle, out)
    add_to_bundle(out, gate_data, quick_settings.package, quantizer=blank_calibration)
    return out


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "bundle.json").read_text())


def _predict(bundle: Path, runtime: str, images: np.ndarray):
    from bonefrac.serving.predictor import Predictor

    predictor = Predictor.from_bundle(bundle, warm_up=False, runtime=runtime)
    batch = np.repeat(images[..., None], 3, axis=-1)
    return predictor, predictor.predict_batch(list(batch), allow_ood=True)


def test_export_writes_ir_that_computes_what_keras_computes(optimized, gate_data):
    from bonefrac.bundle_integrity import verify_bundle

    manifest = _manifest(optimized)
    verify_bundle(optimized, manifest)  # the IR files are in the SHA-256 list
    section = manifest["openvino"]
    assert section["openvino"].startswith("2026.4") and section["packaging_cpu"]
    for name in ("body_part", *PARTS):
        entry = section["models"][name]
        assert (optimized / name / entry["files"]["fp32"]).is_file()
        assert entry["fp32"]["passed"], entry["fp32"]["reason"]
        assert entry["fp32"]["metrics"]["max_delta_p"] < 1e-4
        assert entry["fp32"]["metrics"]["n_images"] == len(gate_data[name].validation)


def test_gate_passes_a_healthy_int8_quantization(optimized):
    """The fracture CNNs quantize well (measured here: max |Δp| 0.006-0.025, no flips) and
    pass. The body-part CNN is a weak 3-class model whose probabilities sit close together on
    27 images: its verdict has gone both ways with the data (|ΔAUROC| 0.012, failed, before
    session 12; max |Δp| 0.069, passed, since), so only its file is checked against it."""
    section = _manifest(optimized)["openvino"]
    verdicts = {
        n: (m["int8"]["reason"], m["int8"]["metrics"]) for n, m in section["models"].items()
    }
    for name in PARTS:
        int8 = section["models"][name]["int8"]
        assert int8["passed"], verdicts
        assert int8["metrics"]["flips"] == 0
        assert 0 < int8["metrics"]["max_delta_p"] <= 0.1  # int8 is not fp32, but close
        assert (optimized / name / "openvino_int8.xml").is_file()
    for name, entry in section["models"].items():  # a verdict is what decides the file
        assert (optimized / name / "openvino_int8.xml").is_file() == entry["int8"]["passed"]


def test_gate_bites_a_damaged_quantization_and_the_model_keeps_fp32(damaged, gate_data):
    from bonefrac.runtimes import BF16, BF16_FASTER, FP32, host_capabilities, prefers_bf16

    section = _manifest(damaged)["openvino"]
    failed = {n: m["int8"] for n, m in section["models"].items() if not m["int8"]["passed"]}
    assert failed, "blank-calibrated int8 passed the gate"
    for name, int8 in failed.items():
        assert int8["reason"].startswith("failed the accuracy gate: ")
        assert not (damaged / name / "openvino_int8.xml").exists()
    # every model that failed int8 is scored by its fp32 IR under the int8 runtime
    images = gate_data["elbow"].validation[:2]
    runtime = "openvino-int8" if len(failed) < len(section["models"]) else "auto"
    predictor, _ = _predict(damaged, runtime, images)
    probe = predictor.runtime.bf16_probe  # auto only: bf16 where this CPU runs it faster
    faster = {BF16_FASTER} if probe and probe["bf16_faster"] else set()
    bf16_wins = runtime == "auto" and prefers_bf16(host_capabilities() | faster)
    for name in failed:
        bf16 = bf16_wins and section["models"][name].get("bf16", {}).get("passed")
        assert predictor.runtime_info["models"][name] == (BF16 if bf16 else FP32)
    if "FP32" in host_capabilities() and len(failed) == 4 and not bf16_wins:
        assert predictor.runtime_info["name"] == FP32  # auto: int8 is not offered at all


def test_auto_serves_bf16_only_where_this_cpu_runs_it_faster(damaged, gate_data, monkeypatch):
    """A model whose int8 failed runs bf16 under `auto` where the CPU has bf16 and a timing
    of both on this host says bf16 is clearly faster (AMD EPYC: ~1.8x at 64 and 224 px), fp32
    where not (an AVX512-bf16 Xeon without AMX: 0.57x; these tiny CNNs: equal). The real
    timing runs first, then both outcomes, forced, to check each branch on any bf16 CPU."""
    from bonefrac import runtimes
    from bonefrac.runtimes import AMX, BF16, BF16_MARGIN, FP32, INT8, Probe, host_capabilities

    models = _manifest(damaged)["openvino"]["models"]
    candidates = [
        n for n, m in models.items() if not m["int8"]["passed"] and m.get("bf16", {}).get("passed")
    ]
    capabilities = host_capabilities()
    timed = bool(candidates) and "BF16" in capabilities and AMX not in capabilities
    images = gate_data["shoulder"].validation[:4]
    _, reference = _predict(damaged, "tensorflow", images)

    predictor, _ = _predict(damaged, "auto", images)  # the real timing on this CPU
    probe = predictor.runtime.bf16_probe
    assert (probe is not None) == timed, (capabilities, candidates)
    if probe:
        assert probe["fp32_ms"] > 0 and probe["bf16_ms"] > 0
        assert probe["bf16_faster"] == (probe["bf16_ms"] < BF16_MARGIN * probe["fp32_ms"])

    calls = []
    for forced, expected in ((Probe(10.0, 5.0), BF16), (Probe(10.0, 9.0), FP32)):
        monkeypatch.setattr(runtimes, "probe_bf16", lambda xml, p=forced: calls.append(xml) or p)
        monkeypatch.setattr(runtimes, "_probes", {})  # else the real timing above is reused
        predictor, results = _predict(damaged, "auto", images)
        for name in candidates:
            want = BF16 if AMX in capabilities else expected if timed else FP32
            assert predictor.runtime_info["models"][name] == want
        for got, want in zip(results, reference, strict=True):  # bf16: a gated variant
            assert got["fracture"]["probability"] == pytest.approx(
                want["fracture"]["probability"], abs=0.02
            )
    assert len(calls) == (2 if timed else 0)
    predictor, _ = _predict(damaged, "auto", images)  # timed once a process: no third call
    assert len(calls) == (2 if timed else 0)
    predictor, _ = _predict(damaged, INT8, images)  # asked by name: the gate's fp32 stands
    assert len(calls) == (2 if timed else 0) and predictor.runtime.bf16_probe is None
    for name, entry in models.items():
        if not entry["int8"]["passed"] and predictor.runtime_info["name"] == INT8:
            assert predictor.runtime_info["models"][name] == FP32


@pytest.mark.parametrize(
    "runtime", ["tensorflow", "openvino-fp32", "openvino-bf16", "openvino-int8"]
)
def test_runtime_switch_scores_with_the_runtime_it_names(optimized, gate_data, runtime):
    from bonefrac.runtimes import host_capabilities

    images = gate_data["elbow"].validation[:6]
    _, reference = _predict(optimized, "tensorflow", images)
    predictor, results = _predict(optimized, runtime, images)
    models = _manifest(optimized)["openvino"]["models"]
    bf16_here = "BF16" in host_capabilities() and all(m["bf16"]["passed"] for m in models.values())
    if runtime == "openvino-bf16" and not bf16_here:  # no bf16 CPU, or a model failed its gate
        assert predictor.runtime_info["name"] == results[0]["runtime"]["name"] == "tensorflow"
        assert "openvino-bf16 unavailable" in predictor.runtime.note
        return
    assert predictor.runtime_info["name"] == runtime
    for name, used in predictor.runtime_info["models"].items():
        if runtime == "openvino-int8" and not models[name]["int8"]["passed"]:
            assert used == "openvino-fp32"  # its int8 failed the gate: fp32 IR scores it
        else:
            assert used == runtime
    tolerance = {"tensorflow": 0.0, "openvino-fp32": 1e-4, "openvino-bf16": 0.01}.get(runtime, 0.1)
    for got, want in zip(results, reference, strict=True):
        assert got["runtime"]["name"] == runtime  # every response says what scored it
        assert got["fracture"]["model"] == want["fracture"]["model"]
        assert got["fracture"]["probability"] == pytest.approx(
            want["fracture"]["probability"], abs=tolerance
        )


def test_auto_picks_the_fastest_gated_runtime_and_old_bundles_stay_on_tensorflow(
    optimized, tiny_bundle, gate_data
):
    from bonefrac.runtimes import host_capabilities

    images = gate_data["hand"].validation[:2]
    predictor, _ = _predict(optimized, "auto", images)
    expected = "openvino-int8" if "FP32" in host_capabilities() else "tensorflow"
    assert predictor.runtime_info["name"] == expected
    predictor, results = _predict(tiny_bundle, "auto", images)  # no openvino section
    assert predictor.runtime_info["name"] == results[0]["runtime"]["name"] == "tensorflow"


def test_openvino_that_cannot_compile_falls_back_to_tensorflow_with_one_log_line(
    optimized, gate_data, tmp_path, caplog, monkeypatch
):
    # a logging configuration run in this process by an earlier test (BentoML's, Prefect's
    # dictConfig) may have disabled the logger or stopped it propagating to caplog's handler
    serving_logger = logging.getLogger("bonefrac.serving")
    monkeypatch.setattr(serving_logger, "disabled", False)
    monkeypatch.setattr(serving_logger, "propagate", True)
    broken = tmp_path / "bundle"
    shutil.copytree(optimized, broken)
    (broken / "hand" / "openvino_fp32.xml").write_text("<net>not a model</net>")
    images = gate_data["hand"].validation[:3]
    _, reference = _predict(optimized, "tensorflow", images)
    with caplog.at_level(logging.WARNING, logger="bonefrac.serving"):
        predictor, results = _predict(broken, "openvino-fp32", images)
    lines = [r.getMessage() for r in caplog.records if r.name == "bonefrac.serving"]
    assert len(lines) == 1 and "openvino-fp32 unavailable" in lines[0], lines
    assert "serving with tensorflow" in lines[0]
    assert predictor.runtime_info["name"] == "tensorflow"
    assert [r["fracture"]["probability"] for r in results] == [
        r["fracture"]["probability"] for r in reference
    ]


def test_packaging_records_the_test_split_through_the_served_runtime(
    optimized, gate_data, quick_settings, tmp_path
):
    """packaging.record_served_evaluation on a cache-shaped test split: the recorded numbers
    are what the default runtime answers, and the bundle stays intact."""
    import pandas as pd

    from bonefrac.bundle_integrity import verify_bundle
    from bonefrac.cache import Cache
    from bonefrac.packaging import record_served_evaluation

    images = np.concatenate([gate_data[p].validation for p in PARTS])
    labels = np.concatenate([gate_data[p].labels for p in PARTS])
    parts = [p for p in PARTS for _ in gate_data[p].validation]
    index = pd.DataFrame(
        {
            "path": [f"img{i}.png" for i in range(len(images))],
            "split": "test",
            "body_part": parts,
            "patient_id": [f"p{i // 2}" for i in range(len(images))],
            "study_id": [f"s{i // 2}" for i in range(len(images))],
            "study_path": [f"s{i // 2}/" for i in range(len(images))],
            "label": labels,
        }
    )
    bundle = tmp_path / "bundle"
    shutil.copytree(optimized, bundle)
    cache = Cache(images=images, index=index, meta={"image_size": SIZE})
    served = record_served_evaluation(bundle, quick_settings, cache)
    manifest = _manifest(bundle)
    verify_bundle(bundle, manifest)
    assert manifest["served_evaluation"] == json.loads(json.dumps(served))
    assert served["runtime"]["name"] in ("openvino-int8", "tensorflow")
    assert served["image"]["n"] == len(images)


def test_bias_correction_setting_reaches_nncf(tiny_bundle, gate_data, quick_settings):
    """package.bias_correction: "none" leaves every convolution's and dense layer's bias as
    the fp32 IR has it; "fast" (NNCF's default) corrects some of them."""
    import keras
    import openvino as ov

    from bonefrac.optimize import keras_forward, quantize_int8

    # hand: on this tiny CNN NNCF corrects the head's bias (on elbow and body part, none)
    model = keras.models.load_model(tiny_bundle / "hand" / "model.keras", compile=False)
    fp32 = ov.convert_model(keras_forward(model, SIZE)[1])

    def biases(ov_model) -> dict[str, np.ndarray]:
        """The constant operand of each Add that follows a convolution or MatMul."""
        out = {}
        for op in ov_model.get_ordered_ops():
            if op.get_type_name() != "Add":
                continue
            inputs = [op.input_value(i).get_node() for i in range(2)]
            consts = [n for n in inputs if n.get_type_name() == "Constant"]
            if consts and any(n.get_type_name() in ("Convolution", "MatMul") for n in inputs):
                out[op.get_friendly_name()] = consts[0].get_data().copy()
        return out

    reference = biases(fp32)
    assert len(reference) >= 4  # three convolutions and the head
    changed = {}
    for mode in ("none", "fast"):
        cfg = quick_settings.package.model_copy(update={"bias_correction": mode})
        int8 = biases(quantize_int8(fp32.clone(), gate_data["hand"].calibration, cfg))
        assert int8.keys() == reference.keys()
        changed[mode] = [k for k in reference if not np.array_equal(int8[k], reference[k])]
    assert changed["none"] == []
    assert changed["fast"]


def test_under_openvino_keras_models_load_only_for_grad_cam(optimized, valid_pngs):
    """Under OpenVINO the Keras files are read only when Grad-CAM needs one: the body part's
    never (a ResNet50 load is 1-2 s at every service start and packaging's served
    evaluation)."""
    from bonefrac.serving.predictor import Predictor

    predictor = Predictor.from_bundle(optimized, warm_up=False, runtime="openvino-fp32")
    assert predictor.runtime_info["name"] == "openvino-fp32"
    assert predictor._keras.loaded == {}
    upload = valid_pngs["hand"][0].read_bytes()
    plain = predictor.predict_bytes(upload, allow_ood=True, body_part="hand")
    assert plain["fracture"]["model"] == "hand" and predictor._keras.loaded == {}
    predictor.predict_batch([np.zeros((SIZE, SIZE, 3), np.uint8)] * 2, allow_ood=True)
    assert predictor._keras.loaded == {}
    # Grad-CAM asks for its part's model (these tiny CNNs have no ResNet50 backbone for
    # Grad-CAM itself; test_predictor explains with the ResNet50 bundle)
    hand = predictor._keras["hand"]
    assert list(predictor._keras.loaded) == ["hand"] and predictor._keras["hand"] is hand
    assert hand.name == "hand" and "body_part" in predictor._keras


def test_a_bundle_whose_classes_do_not_match_its_body_part_ir_is_refused_at_load(
    optimized, tmp_path
):
    """The width check reads the served model: under OpenVINO the compiled IR's output."""
    from bonefrac.bundle import BUNDLE_FILE
    from bonefrac.bundle_integrity import write_manifest
    from bonefrac.errors import DataError
    from bonefrac.inference import OTHER
    from bonefrac.serving.predictor import Predictor

    bundle = tmp_path / "bundle"
    shutil.copytree(optimized, bundle)
    manifest = json.loads((bundle / BUNDLE_FILE).read_text())
    manifest["models"]["body_part"]["classes"] = [*PARTS, OTHER]
    (bundle / BUNDLE_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    write_manifest(bundle)
    with pytest.raises(DataError, match="has 3 outputs but names 4 classes"):
        Predictor.from_bundle(bundle, warm_up=False, runtime="openvino-fp32")
