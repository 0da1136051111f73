"""Inference runtimes for a bundle's models: OpenVINO IR (int8, bf16, fp32) or TensorFlow.

Packaging (`bonefrac.optimize`) exports each model to OpenVINO IR in fp32, quantizes it to int8
and gates every variant against the Keras fp32 outputs; bundle.json records the outcome under
`openvino`. Serving picks a runtime here:

    serve.runtime = auto            the fastest variant that passed the gate at packaging and
                                    that this CPU supports (int8 > bf16 > fp32 > tensorflow;
                                    bf16 only on CPUs with AMX, see below)
                  | openvino-int8   int8 IR for every model that passed its int8 gate, fp32 IR
                                    for a model that failed it (the gate's verdict stands)
                  | openvino-bf16   fp32 IR run in bf16 (only where the CPU has bf16)
                  | openvino-fp32   fp32 IR, precision forced to f32
                  | tensorflow      the Keras fp32 models through `tf.function`

OpenVINO's default precision on CPUs with bf16 is bf16 (with AMX, and measured on an AVX512-
bf16 Xeon without it), so every compile states its precision: an "fp32" that is silently bf16
would serve numbers nobody gated. bf16 pays off only on AMX tiles: on that Xeon without AMX it
ran at 0.57x fp32's speed (docs/benchmarks.md), so `auto` offers it only where the CPU has AMX;
`openvino-bf16` by name still runs on any CPU with bf16. If OpenVINO cannot compile
on this host, serving falls back to TensorFlow with one warning line. Grad-CAM always uses the
Keras fp32 model.
"""

from __future__ import annotations

import functools
import logging
import threading
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

logger = logging.getLogger("bonefrac.serving")

Forward = Callable[[np.ndarray], np.ndarray]  # (N, S, S, 3) uint8/float32 -> (N, outputs)


@dataclass(frozen=True)
class Loaded:
    runtime: str  # what scores requests: one of RUNTIMES
    forwards: dict[str, Forward]
    per_model: dict[str, str]  # model name -> the runtime (variant) that scores it
    note: str | None = None  # why the requested runtime is not the one running, if it is not


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


def variant_of(runtime: str, name: str, manifest: dict) -> str | None:
    """Which IR (`fp32` / `int8`) a model runs under an OpenVINO runtime, or None when the
    bundle has no IR for it. int8 falls back to fp32 for a model whose int8 failed its gate;
    bf16 needs a passed bf16 gate (packaging ran on a CPU with bf16)."""
    info = manifest.get("openvino", {}).get("models", {}).get(name)
    if not info or "fp32" not in info.get("files", {}):
        return None
    if runtime == INT8:
        return "int8" if info.get("int8", {}).get("passed") else "fp32"
    if runtime == BF16:
        return "fp32" if info.get("bf16", {}).get("passed") else None
    return "fp32"


def available(manifest: dict, names: list[str], capabilities: set[str]) -> list[str]:
    """The runtimes this bundle offers on this host, fastest first (bf16 only with AMX:
    without it bf16 is slower than fp32)."""
    out = []
    for runtime in (INT8, BF16, FP32):
        if runtime == BF16 and not {"BF16", AMX} <= capabilities:
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
    runtime = choose(requested, manifest, names, capabilities)
    if runtime == TENSORFLOW:
        forwards = tensorflow_forwards()
        return Loaded(TENSORFLOW, forwards, dict.fromkeys(names, TENSORFLOW))
    try:
        forwards, per_model = {}, {}
        for name in names:
            variant = variant_of(runtime, name, manifest)
            if variant is None:
                raise RuntimeError(f"the bundle has no {runtime} model for {name}")
            if runtime == BF16 and "BF16" not in capabilities:
                raise RuntimeError("this CPU has no bf16 support")
            forwards[name] = openvino_forward(
                bundle / name / IR_FILES[variant], PRECISION_HINT[runtime]
            )
            per_model[name] = runtime if variant == "int8" or runtime != INT8 else FP32
        return Loaded(runtime, forwards, per_model)
    except Exception as exc:  # noqa: BLE001 - any OpenVINO failure: TensorFlow serves instead
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        note = f"{runtime} unavailable ({reason}); serving with {TENSORFLOW}"
        logger.warning("runtime: %s", note)
        forwards = tensorflow_forwards()
        return Loaded(TENSORFLOW, forwards, dict.fromkeys(names, TENSORFLOW), note)
