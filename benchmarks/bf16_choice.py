"""Does `auto`'s start-up timing (`runtimes.probe_bf16`: batch 1, 2 warm-up + 7 alternating
runs) pick what a longer measurement would? ResNet50s, untrained, exported as packaging does,
at the quick profile's 64 px, the serving benchmarks' 224 px and the default profile's 320 px:
the probe's verdict, then the fp32 IR compiled for f32 (the baseline) and for bf16, timed at
batch 1 and 8 over `--repeat` runs.
Prints the CPU first: bf16 without AMX is 0.57x fp32 on one AVX512-bf16 Xeon and faster on
AMD EPYCs with AVX512-bf16, so only ratios from one run count.
Usage: python benchmarks/bf16_choice.py [--sizes 64,224,320] [--repeat 30]"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from harness import compare, cpu_info, dump  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="64,224,320")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()

    import openvino as ov

    from bonefrac.config import TrainConfig
    from bonefrac.models import build_classifier
    from bonefrac.optimize import keras_forward
    from bonefrac.runtimes import BF16_MARGIN, DEVICE, host_capabilities, probe_bf16

    cpu = cpu_info()
    capabilities = sorted(host_capabilities())
    print("OpenVINO capabilities:", capabilities)
    if "BF16" not in capabilities:
        print("this CPU has no bf16: auto never times it here")
        return
    results = []
    core = ov.Core()
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            model = build_classifier(1, size, TrainConfig(weights="none"), f"resnet50_{size}")
            xml = Path(tmp) / f"{size}.xml"
            ov.save_model(
                ov.convert_model(keras_forward(model, size)[1]), xml, compress_to_fp16=False
            )
            start = time.perf_counter()
            probe = probe_bf16(xml)
            probe_s = time.perf_counter() - start
            ratio = probe.bf16_ms / probe.fp32_ms
            verdict = "bf16" if probe.bf16_faster else "fp32"
            print(
                f"{size} px probe: fp32 {probe.fp32_ms:.2f} ms, bf16 {probe.bf16_ms:.2f} ms "
                f"(bf16/fp32 {ratio:.2f}, bf16 used below {BF16_MARGIN:g}) -> {verdict}; "
                f"the probe took {probe_s:.2f} s"
            )
            results.append({"size": size, "probe": probe.as_dict(), "probe_s": probe_s})
            requests = {
                hint: core.compile_model(
                    str(xml),
                    DEVICE,
                    {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"},
                ).create_infer_request()
                for hint in ("f32", "bf16")
            }
            rng = np.random.default_rng(0)
            for batch in (1, 8):
                x = rng.integers(0, 256, (batch, size, size, 3)).astype(np.float32)
                result = compare(
                    f"{size} px batch {batch}: bf16 vs fp32 IR",
                    lambda x=x, r=requests["bf16"]: r.infer([x]),
                    lambda x=x, r=requests["f32"]: r.infer([x]),
                    repeat=args.repeat,
                    warmup=3,
                    items=batch,
                    unit="img",
                )
                results.append(result | {"size": size, "batch": batch})
    dump([{"cpu": cpu}, *results])


if __name__ == "__main__":
    main()
