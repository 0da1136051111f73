"""Inference runtimes for a bundle's models: OpenVINO IR (int8, bf16, fp32) or TensorFlow.

Packaging (`bonefrac.optimize`) exports each model to OpenVINO IR in fp32, quantizes it to int8
and gates every variant against the Keras fp32 outputs; bundle.json records the outcome under
`openvino`. Serving picks a runtime here:

    serve.runtime = auto            the fastest variant that passed the gate at packaging and
                                    that this CPU supports (int8 > bf16 > fp32 > tensorflow;
                                    bf16 only where it is faster than fp32 here, see below),
                                    per model: a model whose int8 failed runs bf16 there if
                                    its bf16 passed, else fp32
                  | openvino-int8   int8 IR for every model that passed its int8 gate, fp32 IR
                                    for a model that failed it (the gate's verdict stands)
                  | openvino-bf16   fp32 IR run in bf16 (only where the CPU has bf16)
                  | openvino-fp32   fp32 IR, precision forced to f32
                  | tensorflow      the Keras fp32 models through `tf.function`

OpenVINO's default precision on CPUs with bf16 is bf16 (with AMX, and measured on an AVX512-
bf16 Xeon without it), so every compile states its precision: an "fp32" that is silently bf16
would serve numbers nobody gated. Whether bf16 pays depends on the CPU, not on its flags: on an
AVX512-bf16 Xeon without AMX it ran at 0.57x fp32's speed, on an AVX512-bf16 AMD EPYC without
AMX at 1.8-1.9x (docs/benchmarks.md). So `auto` uses bf16 where the CPU has AMX tiles, and on
a CPU with bf16 but no AMX it times one model both ways at start-up (`probe_bf16`, once a
process: 0.5 s at 64 px, 0.9 s at 224 px) and uses bf16 only where that is clearly faster.
`openvino-bf16` by name runs on any CPU with bf16. If OpenVINO cannot compile on this host,
serving falls back to TensorFlow with one warning line. Grad-CAM always uses the
Keras fp32 model.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

AUTO = "auto"
TENSORFLOW = "tensorflow"
INT8, BF16, FP32 = "openvino-int8", "openvino-bf16", "openvino-fp32"
RUNTIMES = (INT8, BF16, FP32, TENSORFLOW)  # fastest first: what `auto` tries in order
IR_FILES = {"fp32": "openvino_fp32.xml", "int8": "openvino_int8.xml"}  # + .bin, per model
PRECISION_HINT = {INT8: "f32", BF16: "bf16", FP32: "f32"}  # int8 IR: the rest stays f32
DEVICE = "CPU"
AMX = "AMX"  # added to OpenVINO's capabilities when the CPU has AMX tiles (OpenVINO omits it)
BF16_FASTER = "BF16_FASTER"  # added when `probe_bf16` found bf16 faster than fp32 on this CPU
BF16_MARGIN = 0.8  # bf16 must take under this share of fp32's time: a clear win, not noise

logger = logging.getLogger("bonefrac.serving")

Forward = Callable[[np.ndarray], np.ndarray]  # (N, S, S, 3) uint8/float32 -> (N, outputs)


@dataclass(frozen=True)
class Loaded:
    runtime: str  # what scores requests: one of RUNTIMES
    forwards: dict[str, Forward]
    per_model: dict[str, str]  # model name -> the runtime (variant) that scores it
    note: str | None = None  # why the requested runtime is not the one running, if it is not
    bf16_probe: dict | None = None  # `probe_bf16`'s timings, where `auto` measured them


@dataclass(frozen=True)
class Probe:
    """Median batch-1 latency of one IR compiled for f32 and for bf16 on this CPU."""

    fp32_ms: float
    bf16_ms: float

    @property
    def bf16_faster(self) -> bool:
        return self.bf16_ms < BF16_MARGIN * self.fp32_ms

    def as_dict(self) -> dict:
        return {
            "fp32_ms": round(self.fp32_ms, 3),
            "bf16_ms": round(self.bf16_ms, 3),
            "bf16_faster": self.bf16_faster,
        }


def cpuinfo(field: str) -> str | None:
    """The first CPU's `field` ("flags", "model name") in /proc/cpuinfo; None where there is
    no such file or field."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == field:
                return value.strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    return set((cpuinfo("flags") or "").split())


@functools.cache
def host_capabilities() -> frozenset[str]:
    """OpenVINO's view of this CPU ("FP32", "INT8", "BF16", ...), plus AMX when the CPU has
    AMX tiles; empty without OpenVINO. Asked once per process (it builds an `ov.Core`)."""
    try:
        import openvino as ov

        capabilities = set(ov.Core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # no OpenVINO, or no usable CPU plugin: the TensorFlow path remains
        return frozenset()
    if "amx_bf16" in cpu_flags():
        capabilities.add(AMX)
    return frozenset(capabilities)


def prefers_bf16(capabilities: set[str] | frozenset[str]) -> bool:
    """bf16 beats fp32 on this CPU: it has AMX tiles, or `probe_bf16` measured it."""
    return "BF16" in capabilities and bool({AMX, BF16_FASTER} & capabilities)


def _entry(manifest: dict, *keys: str) -> dict:
    """manifest[k1][k2]...; {} where a level is missing or not a mapping (a bundle from before
    OpenVINO, or a damaged bundle.json: served by TensorFlow, not a crash)."""
    node: object = manifest
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def _passed(info: dict, variant: str) -> bool:
    return _entry(info, variant).get("passed") is True


def probe_bf16(xml: Path, runs: int = 7) -> Probe:
    """Time one fp32 IR at batch 1 on a blank image, compiled for f32 and for bf16, runs
    alternating after a warm-up so a busy moment of the host hits both alike."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(xml))
    shape = [1 if d.is_dynamic else d.get_length() for d in model.input(0).get_partial_shape()]
    blank = np.zeros(shape, np.float32)
    requests = {
        precision: core.compile_model(
            model, DEVICE, {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        ).create_infer_request()
        for precision in ("f32", "bf16")
    }
    times: dict[str, list[float]] = {p: [] for p in requests}
    for i in range(runs + 2):
        for precision, request in requests.items():
            start = time.perf_counter()
            request.infer([blank])
            if i >= 2:  # the first runs allocate and warm the caches
                times[precision].append(time.perf_counter() - start)
    return Probe(1e3 * statistics.median(times["f32"]), 1e3 * statistics.median(times["bf16"]))


def variant_of(runtime: str, name: str, manifest: dict) -> str | None:
    """Which IR (`fp32` / `int8`) a model runs under an OpenVINO runtime, or None when the
    bundle has no IR for it. int8 falls back to fp32 for a model whose int8 failed its gate;
    bf16 needs a passed bf16 gate (packaging ran on a CPU with bf16)."""
    info = _entry(manifest, "openvino", "models", name)
    if "fp32" not in _entry(info, "files"):
        return None
    if runtime == INT8:
        return "int8" if _passed(info, "int8") else "fp32"
    if runtime == BF16:
        return "fp32" if _passed(info, "bf16") else None
    return "fp32"


def available(manifest: dict, names: list[str], capabilities: set[str]) -> list[str]:
    """The runtimes this bundle offers on this host, fastest first (bf16 only where it beats
    fp32: `prefers_bf16`)."""
    out = []
    for runtime in (INT8, BF16, FP32):
        if runtime == BF16 and not prefers_bf16(capabilities):
            continue
        if "FP32" not in capabilities:
            continue
        variants = [variant_of(runtime, n, manifest) for n in names]
        if None in variants or (runtime == INT8 and "int8" not in variants):
            continue  # int8 with every model failing its gate is just fp32: not offered
        out.append(runtime)
    return [*out, TENSORFLOW]


def choose(requested: str, manifest: dict, names: list[str], capabilities: set[str]) -> str:
    """`auto` -> the fastest runtime available; a named one is kept (load() reports why, if
    it cannot run here)."""
    return available(manifest, names, capabilities)[0] if requested == AUTO else requested


_probes: dict[str, Probe] = {}  # per process: sha256 of the IR's .xml -> its timing


def _time_bf16(bundle: Path, manifest: dict, names: list[str]) -> Probe | None:
    """`probe_bf16` on the first model that would run fp32 under auto but passed its bf16
    gate (None when there is none, or the timing fails: fp32 then). Once per process and
    exported IR (the same .xml bytes), so every load of a bundle in a process (packaging's
    served evaluation, then a service or a test) makes the same choice."""
    gated = [
        n
        for n in names
        if variant_of(BF16, n, manifest) and variant_of(INT8, n, manifest) != "int8"
    ]
    if not gated:
        return None
    xml = bundle / gated[0] / IR_FILES["fp32"]
    try:
        key = hashlib.sha256(xml.read_bytes()).hexdigest()
        if key not in _probes:
            _probes[key] = probe_bf16(xml)
    except Exception as exc:  # noqa: BLE001 - fp32 serves; load() itself reports OpenVINO faults
        logger.info("runtime: bf16 not used: timing it failed (%s)", type(exc).__name__)
        return None
    probe = _probes[key]
    logger.info(
        "runtime: one image through the %s model took %.1f ms in bf16, %.1f ms in fp32 on "
        "this CPU: %s",
        gated[0],
        probe.bf16_ms,
        probe.fp32_ms,
        "bf16 serves the models whose int8 failed and whose bf16 passed its gate"
        if probe.bf16_faster
        else f"fp32 serves them (bf16 is used under {BF16_MARGIN:g}x fp32's time)",
    )
    return probe


def openvino_forward(xml: Path, precision: str) -> Forward:
    """A compiled OpenVINO model as a forward function. One infer request per calling thread:
    a request is not safe to share, a compiled model is."""
    import openvino as ov

    compiled = ov.Core().compile_model(
        str(xml),
        DEVICE,
        {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"},
    )
    local = threading.local()

    def forward(images: np.ndarray) -> np.ndarray:
        request = getattr(local, "request", None)
        if request is None:
            request = local.request = compiled.create_infer_request()
        # the models take 0..255 and normalise themselves
        result = request.infer([np.asarray(images, dtype=np.float32)])
        return np.array(result[compiled.output(0)])  # a copy: the request reuses its buffer

    shape = compiled.output(0).get_partial_shape()
    if shape.rank.is_static and shape[-1].is_static:
        forward.output_width = shape[-1].get_length()  # the body part's class count
    return forward


def load(
    requested: str,
    bundle: Path,
    manifest: dict,
    tensorflow_forwards: Callable[[], dict[str, Forward]],
) -> Loaded:
    """The forward functions of `requested` (or `auto`'s choice) for every model of the bundle;
    TensorFlow, with one warning line, when OpenVINO cannot serve them here."""
    names = list(manifest["models"])
    capabilities = host_capabilities()
    probe = None
    # auto, bf16 CPU without AMX: time bf16 against fp32 where a model may run either
    if requested == AUTO and "BF16" in capabilities and AMX not in capabilities:
        probe = _time_bf16(bundle, manifest, names)
        if probe is not None and probe.bf16_faster:
            capabilities = capabilities | {BF16_FASTER}
    runtime = choose(requested, manifest, names, capabilities)
    timings = probe.as_dict() if probe else None
    if runtime == TENSORFLOW:
        forwards = tensorflow_forwards()
        return Loaded(TENSORFLOW, forwards, dict.fromkeys(names, TENSORFLOW), None, timings)
    try:
        forwards, per_model = {}, {}
        for name in names:
            variant = variant_of(runtime, name, manifest)
            if variant is None:
                raise RuntimeError(f"the bundle has no {runtime} model for {name}")
            if runtime == BF16 and "BF16" not in capabilities:
                raise RuntimeError("this CPU has no bf16 support")
            used = runtime if variant == "int8" or runtime != INT8 else FP32
            if used == FP32 and requested == AUTO and prefers_bf16(capabilities):
                # auto: a model whose int8 failed runs bf16 where that passed and is faster
                used = BF16 if variant_of(BF16, name, manifest) else FP32
            forwards[name] = openvino_forward(
                bundle / name / IR_FILES[variant], PRECISION_HINT[used]
            )
            per_model[name] = used
        return Loaded(runtime, forwards, per_model, None, timings)
    except Exception as exc:  # noqa: BLE001 - any OpenVINO failure: TensorFlow serves instead
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        note = f"{runtime} unavailable ({reason}); serving with {TENSORFLOW}"
        logger.warning("runtime: %s", note)
        forwards = tensorflow_forwards()
        return Loaded(TENSORFLOW, forwards, dict.fromkeys(names, TENSORFLOW), note, timings)
