"""The int8 accuracy gate's arithmetic on plain arrays (no models): each limit bites on its own,
decisions are taken after the temperature at the part's threshold, study kappa on study means,
and the runtime choice follows the verdicts."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from bonefrac.config import PackageConfig
from bonefrac.evaluate.metrics import choose_threshold
from bonefrac.inference import apply_temperature, logits
from bonefrac.optimize import GateData, accuracy_gate
from bonefrac.runtimes import (
    AUTO,
    BF16,
    BF16_FASTER,
    FP32,
    INT8,
    TENSORFLOW,
    available,
    choose,
    variant_of,
)

CFG = PackageConfig()
RNG = np.random.default_rng(7)
N = 200
LABELS = RNG.integers(0, 2, N)
RAW = np.clip(0.15 + 0.7 * LABELS + RNG.normal(0, 0.2, N), 0.01, 0.99)[:, None]  # (N, 1)
DATA = GateData(
    calibration=np.zeros((1, 4, 4), np.uint8),
    validation=np.zeros((N, 4, 4), np.uint8),
    labels=LABELS,
    groups=np.arange(N) // 2,  # studies of two images
    threshold=0.43,
    temperature=1.8,
)


def test_identical_outputs_pass():
    result = accuracy_gate(RAW, RAW.copy(), DATA, CFG)
    assert result.passed and result.metrics["flips"] == 0 and result.metrics["max_delta_p"] == 0


def test_small_noise_passes_and_reports_the_largest_change():
    noisy = RAW + RNG.normal(0, 1e-4, RAW.shape)
    result = accuracy_gate(RAW, noisy, DATA, CFG)
    assert result.passed, result.reason
    served = apply_temperature(RAW[:, 0], 1.8)
    assert result.metrics["max_delta_p"] == pytest.approx(
        np.abs(apply_temperature(noisy[:, 0], 1.8) - served).max()
    )


def test_an_exact_copy_passes_at_a_threshold_fitted_on_the_same_val_studies():
    # how evaluation fits it: Youden on val study means of the served probabilities. An IR copy
    # of the model scores ~2e-7 lower; that must not move a study across the threshold
    served = apply_temperature(RAW[:, 0], DATA.temperature)
    study_probs = served.reshape(-1, 2).mean(axis=1)
    study_labels = LABELS.reshape(-1, 2).max(axis=1)
    threshold = choose_threshold(study_labels, study_probs, "youden")
    data = replace(DATA, labels=np.repeat(study_labels, 2), threshold=threshold)
    copy = apply_temperature(served - 2e-7, 1 / DATA.temperature)[:, None]
    result = accuracy_gate(RAW, copy, data, CFG)
    assert result.passed, result.reason
    assert result.metrics["delta_kappa"] == 0.0 and result.metrics["flips"] == 0


def test_one_flip_in_a_hundred_is_the_limit_at_the_served_threshold():
    served = apply_temperature(RAW[:, 0], DATA.temperature)
    order = np.argsort(np.abs(served - DATA.threshold))  # the images nearest the threshold
    for flipped, passes in ((2, True), (3, False)):  # 2/200 = 1% passes, 3/200 = 1.5% fails
        moved = served.copy()
        moved[order[:flipped]] = np.where(served[order[:flipped]] >= 0.43, 0.4299, 0.4301)
        raw = apply_temperature(moved, 1 / DATA.temperature)[:, None]  # back to raw outputs
        result = accuracy_gate(RAW, raw, DATA, CFG)
        assert result.metrics["flips"] == flipped
        assert ("decisions flipped" not in result.reason) == passes, result.reason


def test_each_limit_bites_on_its_own():
    shifted = RAW.copy()
    shifted[0] = 0.999 if RAW[0, 0] < 0.5 else 0.001  # one image far off: max |Δp| fails
    result = accuracy_gate(RAW, shifted, DATA, CFG)
    assert not result.passed and "max |Δp|" in result.reason
    strict = PackageConfig(gate_max_delta_auroc=0.0, gate_max_delta_kappa=0.0)
    reordered = RAW + RNG.normal(0, 0.02, RAW.shape)  # rank swaps, decisions mostly kept
    result = accuracy_gate(RAW, reordered, DATA, strict)
    assert "AUROC" in result.reason


def test_body_part_gate_uses_the_argmax():
    probs = RNG.dirichlet([1, 1, 1], N)
    labels = probs.argmax(1)
    data = GateData(DATA.calibration, DATA.validation, labels)
    swapped = probs[:, [1, 0, 2]]
    result = accuracy_gate(probs, swapped, data, CFG)
    assert not result.passed and result.metrics["flips"] > 0
    assert accuracy_gate(probs, probs, data, CFG).passed


def test_runtime_choice_follows_the_verdicts():
    def entry(int8: bool, bf16: bool = False) -> dict:
        files = {"fp32": "openvino_fp32.xml"} | ({"int8": "openvino_int8.xml"} if int8 else {})
        return {"files": files, "int8": {"passed": int8}, "bf16": {"passed": bf16}}

    names = ["body_part", "hand"]
    manifest = {"openvino": {"models": {"body_part": entry(False), "hand": entry(True)}}}
    assert variant_of(INT8, "body_part", manifest) == "fp32"  # failed: keeps fp32
    assert variant_of(INT8, "hand", manifest) == "int8"
    assert available(manifest, names, {"FP32", "INT8"}) == [INT8, FP32, TENSORFLOW]
    none_int8 = {"openvino": {"models": {n: entry(False) for n in names}}}
    assert available(none_int8, names, {"FP32", "INT8"}) == [FP32, TENSORFLOW]
    bf16 = {"openvino": {"models": {n: entry(True, True) for n in names}}}
    amx = {"FP32", "INT8", "BF16", "AMX"}
    assert available(bf16, names, amx) == [INT8, BF16, FP32, TENSORFLOW]
    # bf16 without AMX: 0.57x fp32 on an AVX512-bf16 Xeon, 1.8x on an AMD EPYC, so only where
    # probe_bf16 timed it faster on this CPU (BF16_FASTER)
    assert available(bf16, names, {"FP32", "INT8", "BF16"}) == [INT8, FP32, TENSORFLOW]
    measured = {"FP32", "INT8", "BF16", BF16_FASTER}
    assert available(bf16, names, measured) == [INT8, BF16, FP32, TENSORFLOW]
    assert available(bf16, names, {"FP32", "INT8", BF16_FASTER}) == [INT8, FP32, TENSORFLOW]
    assert available(bf16, names, {"FP32", "INT8"}) == [INT8, FP32, TENSORFLOW]  # no bf16 CPU
    bf16_only = {"openvino": {"models": {n: entry(False, True) for n in names}}}
    assert choose(AUTO, bf16_only, names, amx) == BF16  # int8 failed everywhere: bf16 next
    assert choose(AUTO, bf16_only, names, {"FP32", "INT8", "BF16"}) == FP32
    assert choose(AUTO, bf16_only, names, measured) == BF16
    assert choose(BF16, bf16_only, names, {"FP32", "INT8", "BF16"}) == BF16  # asked by name
    assert available({}, names, {"FP32"}) == [TENSORFLOW]  # a bundle from before OpenVINO
    assert available(bf16, names, set()) == [TENSORFLOW]  # OpenVINO unusable here


def test_logits_roundtrip_used_above():
    p = np.array([0.2, 0.7])
    assert apply_temperature(p, 1.0) == pytest.approx(p)
    assert logits(p) == pytest.approx(np.log(p / (1 - p)), rel=1e-6)


def test_calibration_is_a_seeded_train_sample_of_the_models_own_part(demo_cache):
    """int8 calibration images come from the model's train rows only (never val or test), as
    many as `package.calibration_images`, the same for the same seed; gate_data uses them."""
    from bonefrac.optimize import calibration_rows, gate_data

    settings, cache = demo_cache
    cfg = PackageConfig(calibration_images=7, seed=3)
    rows = calibration_rows(cache, "hand", cfg)
    index = cache.index.iloc[rows]
    assert len(rows) == 7 and list(rows) == sorted(rows)
    assert set(index["split"]) == {"train"} and set(index["body_part"]) == {"hand"}
    assert np.array_equal(rows, calibration_rows(cache, "hand", cfg))
    other = calibration_rows(cache, "hand", cfg.model_copy(update={"seed": 4}))
    assert not np.array_equal(rows, other)  # the seed draws the sample
    body = cache.index.iloc[calibration_rows(cache, "body_part", cfg)]
    assert set(body["split"]) == {"train"} and body["body_part"].nunique() > 1
    point = {"threshold": 0.4, "temperature": 1.5}
    data = gate_data(cache, "hand", ["hand"], point, cfg)
    assert np.array_equal(data.calibration, np.asarray(cache.images[rows]))


def test_load_runs_each_model_in_the_variant_and_precision_auto_chose(tmp_path, monkeypatch):
    """runtimes.load on a mixed bundle (int8 passed for two models, bf16 for two others) with
    OpenVINO faked: what each model is compiled with, under auto on three kinds of CPU and
    under each named runtime. The real compiles run in tests/service/test_runtimes.py."""
    from bonefrac import runtimes
    from bonefrac.runtimes import AMX, Probe, load

    def entry(int8: bool, bf16: bool) -> dict:
        files = {"fp32": "openvino_fp32.xml"} | ({"int8": "openvino_int8.xml"} if int8 else {})
        return {"files": files, "int8": {"passed": int8}, "bf16": {"passed": bf16}}

    verdicts = {"body_part": (True, True), "elbow": (True, False), "hand": (False, True)}
    verdicts["shoulder"] = (False, False)
    manifest = {
        "models": dict.fromkeys(verdicts, {}),
        "openvino": {"models": {n: entry(*v) for n, v in verdicts.items()}},
    }
    for name in verdicts:
        (tmp_path / name).mkdir()
        (tmp_path / name / "openvino_fp32.xml").write_text(f"<net name='{name}'/>")
    compiled: dict[str, tuple[str, str]] = {}

    def fake_forward(xml, precision):
        compiled[xml.parent.name] = (xml.name, precision)
        return lambda images: images

    timed = []
    monkeypatch.setattr(runtimes, "openvino_forward", fake_forward)

    def run(requested, capabilities, probe=None):
        compiled.clear()
        monkeypatch.setattr(runtimes, "host_capabilities", lambda: frozenset(capabilities))
        monkeypatch.setattr(runtimes, "probe_bf16", lambda xml: timed.append(xml) or probe)
        monkeypatch.setattr(runtimes, "_probes", {})
        loaded = load(requested, tmp_path, manifest, lambda: pytest.fail("TensorFlow loaded"))
        for name, used in loaded.per_model.items():  # the label is what was compiled
            assert compiled[name][1] == ("bf16" if used == BF16 else "f32"), (name, used)
        return loaded

    int8, fp32 = ("openvino_int8.xml", "f32"), ("openvino_fp32.xml", "f32")
    bf16 = ("openvino_fp32.xml", "bf16")
    plain = {"FP32", "INT8"}
    loaded = run(AUTO, plain)  # no bf16 on this CPU: failed int8 runs fp32, nothing timed
    assert loaded.runtime == INT8 and loaded.bf16_probe is None and not timed
    assert compiled == {"body_part": int8, "elbow": int8, "hand": fp32, "shoulder": fp32}
    loaded = run(AUTO, plain | {"BF16", AMX})  # AMX: bf16 wins without timing
    assert compiled["hand"] == bf16 and compiled["shoulder"] == fp32 and not timed
    assert loaded.per_model == {"body_part": INT8, "elbow": INT8, "hand": BF16, "shoulder": FP32}
    loaded = run(AUTO, plain | {"BF16"}, Probe(10.0, 5.5))  # timed here: bf16 clearly faster
    assert timed == [tmp_path / "hand" / "openvino_fp32.xml"]  # the model that may run bf16
    assert compiled["hand"] == bf16 and loaded.bf16_probe["bf16_faster"] is True
    loaded = run(AUTO, plain | {"BF16"}, Probe(10.0, 8.5))  # faster, but within the margin
    assert compiled["hand"] == fp32 and loaded.bf16_probe["bf16_faster"] is False
    timed.clear()  # one timing a process for an IR: a second load reuses it
    monkeypatch.setattr(runtimes, "probe_bf16", lambda xml: timed.append(xml) or Probe(9, 3))
    monkeypatch.setattr(runtimes, "_probes", {})
    for _ in range(2):
        loaded = load(AUTO, tmp_path, manifest, lambda: pytest.fail("TensorFlow loaded"))
        assert compiled["hand"] == bf16 and loaded.bf16_probe["bf16_ms"] == 3
    assert len(timed) == 1
    (tmp_path / "hand" / "openvino_fp32.xml").write_text("<net name='other'/>")  # another IR
    load(AUTO, tmp_path, manifest, lambda: pytest.fail("TensorFlow loaded"))
    assert len(timed) == 2

    def broken(xml):
        raise RuntimeError("cannot compile")

    monkeypatch.setattr(runtimes, "probe_bf16", broken)  # a failed timing: fp32, not cached
    monkeypatch.setattr(runtimes, "_probes", {})
    loaded = load(AUTO, tmp_path, manifest, lambda: pytest.fail("TensorFlow loaded"))
    assert compiled["hand"] == fp32 and loaded.bf16_probe is None and not runtimes._probes
    for requested in (INT8, FP32):  # named: the gate's fp32 stands, nothing timed
        timed.clear()
        loaded = run(requested, plain | {"BF16"}, Probe(10.0, 1.0))
        assert compiled["hand"] == fp32 and not timed and loaded.bf16_probe is None
    assert compiled["body_part"] == fp32  # openvino-fp32: int8 unused too
    mangled = {"body_part": None, "hand": {"bf16": [], "files": 3, "int8": "yes"}}
    damaged = {"models": dict.fromkeys(mangled, {}), "openvino": {"models": mangled}}
    for requested in (AUTO, BF16, INT8, FP32):  # a mangled openvino section: TensorFlow
        loaded = load(requested, tmp_path, damaged, lambda: dict.fromkeys(mangled))
        assert loaded.runtime == TENSORFLOW and not timed
