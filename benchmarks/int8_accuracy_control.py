"""int8 with NNCF accuracy control on trained models: does reverting the most sensitive layers
to fp32 let packaging's accuracy gate pass, and what speed does it keep?

For each model of a packaged bundle, with packaging's own export, calibration sample (train)
and gate (val, never test), one run:

  plain     `nncf.quantize`, what packaging does today (`optimize.quantize_int8`)
  control   `nncf.quantize_with_accuracy_control`: NNCF reverts the layers that cost the most
            until its metric drops by at most `--max-drop`. The metric is agreement with the
            fp32 model, 1 - mean |p_int8 - p_fp32| (served probabilities, after temperature),
            on TRAIN images that calibration did not use. Never val: val is the gate's.

then the gate on val (`optimize.accuracy_gate`) and the batch-1 latency of the fp32 IR and
of both int8 models, in the same process, so the speed kept is a ratio of one run.

    python benchmarks/int8_accuracy_control.py --bundle DIR --params params.yaml --profile quick

(the project whose pipeline packaged the bundle: its preprocessed cache and `package` settings)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from harness import cpu_info, dump, time_it  # noqa: E402


def latency_ms(forward, image: np.ndarray, repeat: int) -> float:
    """Median batch-1 latency (harness.time_it: one warm-up call, then `repeat` timed)."""
    return 1000 * time_it("forward", lambda: forward(image), repeat=repeat).median_s


def held_out_train(cache, name: str, cfg, n: int) -> np.ndarray:
    """Train images of this model that packaging's calibration sample does not hold."""
    from bonefrac.models import BODY_PART_MODEL
    from bonefrac.optimize import calibration_rows

    rows = cache.rows(split="train", body_part=None if name == BODY_PART_MODEL else name)
    calibration = set(calibration_rows(cache, name, cfg).tolist())
    rest = np.array([r for r in rows if r not in calibration], dtype=int)
    return np.asarray(cache.images[rest[:n]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a packaged bundle folder")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--profile", default=None)
    parser.add_argument("--models", default=None, help="comma-separated; default every model")
    parser.add_argument("--max-drop", type=float, default=0.005)
    parser.add_argument("--control-images", type=int, default=120)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results: dict = {"cpu": cpu_info(), "max_drop": args.max_drop, "models": {}}

    import keras
    import nncf
    import openvino as ov

    from bonefrac.bundle import read_bundle
    from bonefrac.cache import load_cache
    from bonefrac.config import load_settings
    from bonefrac.inference import apply_temperature
    from bonefrac.models import BODY_PART_MODEL
    from bonefrac.optimize import (
        accuracy_gate,
        compiled,
        gate_data,
        in_chunks,
        keras_forward,
        quantize_int8,
        rgb,
    )

    settings = load_settings(args.params, args.profile)
    cfg = settings.package
    manifest = read_bundle(args.bundle)
    cache = load_cache(settings.layout.preprocessed)
    size = int(manifest["image_size"])
    classes = manifest["models"][BODY_PART_MODEL].get("classes") or manifest["parts"]
    names = args.models.split(",") if args.models else list(manifest["models"])
    for name in names:
        point = manifest["models"][name]
        data = gate_data(cache, name, classes, point, cfg)
        model = keras.models.load_model(args.bundle / name / "model.keras", compile=False)
        forward, concrete = keras_forward(model, size)
        reference = in_chunks(forward, data.validation)
        fp32 = ov.convert_model(concrete)
        keras.backend.clear_session()

        def served(outputs: np.ndarray, data=data) -> np.ndarray:
            if data.threshold is None:
                return outputs
            return apply_temperature(outputs[:, 0], data.temperature)

        control = held_out_train(cache, name, cfg, args.control_images)
        if len(control) == 0:
            raise SystemExit(f"{name}: calibration uses every train image; none left to control on")
        fp32_forward = compiled(fp32, "f32")
        targets = served(in_chunks(fp32_forward, control))
        items = [(image, target) for image, target in zip(control, targets, strict=True)]

        def agreement(compiled_model, items, served=served) -> tuple[float, list[float]]:
            output = compiled_model.output(0)
            per_item = []
            for image, target in items:
                p = served(np.array(compiled_model(rgb(image[None]))[output]))[0]
                per_item.append(1.0 - float(np.abs(p - target).max()))
            return float(np.mean(per_item)), per_item

        row = {"n_val": len(data.validation), "n_control": len(control)}
        start = time.perf_counter()
        plain = quantize_int8(fp32.clone(), data.calibration, cfg)
        row["plain_quantize_s"] = time.perf_counter() - start
        start = time.perf_counter()
        controlled = nncf.quantize_with_accuracy_control(
            fp32.clone(),
            nncf.Dataset(list(data.calibration), lambda image: rgb(image[None])),
            nncf.Dataset(items, lambda item: rgb(item[0][None])),
            agreement,
            max_drop=args.max_drop,
            drop_type=nncf.DropType.ABSOLUTE,
            subset_size=len(data.calibration),
        )
        row["control_quantize_s"] = time.perf_counter() - start
        image = rgb(data.validation[:1])
        row["fp32_ms"] = latency_ms(fp32_forward, image, args.repeat)
        for label, variant in (("plain", plain), ("control", controlled)):
            forward = compiled(variant, "f32")
            verdict = accuracy_gate(reference, in_chunks(forward, data.validation), data, cfg)
            row[label] = {
                "passed": verdict.passed,
                "reason": verdict.reason,
                "max_delta_p": verdict.metrics["max_delta_p"],
                "flips": verdict.metrics["flips"],
                "delta_kappa": verdict.metrics["delta_kappa"],
                "ms": latency_ms(forward, image, args.repeat),
                "fake_quantize_nodes": sum(
                    op.get_type_name() == "FakeQuantize" for op in variant.get_ops()
                ),
            }
        results["models"][name] = row
        print(f"\n{name}: val {row['n_val']} images, control metric on {row['n_control']} train")
        print(f"  fp32 IR   {row['fp32_ms']:7.2f} ms")
        for label in ("plain", "control"):
            r = row[label]
            print(
                f"  {label:<8}  {r['ms']:7.2f} ms ({row['fp32_ms'] / r['ms']:.2f}x fp32)  "
                f"FQ {r['fake_quantize_nodes']:3d}  max|dp| {r['max_delta_p']:.3f}  "
                f"flips {r['flips']}  {'PASS' if r['passed'] else 'FAIL'}"
            )
    dump([results], args.out)


if __name__ == "__main__":
    main()
