"""Tiny shared harness: time a function against a plain baseline in the same process and
print the ratio. Speed is measured here, never asserted in tests.

    from harness import compare
    compare("preprocess", lambda: ours(x), lambda: plain(x), items=len(x), unit="img")
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Timing:
    name: str
    median_s: float
    p95_s: float
    runs: int
    items: int

    @property
    def per_second(self) -> float:
        return self.items / self.median_s if self.median_s > 0 else float("inf")


def time_it(
    name: str, fn: Callable[[], object], *, repeat: int = 5, warmup: int = 1, items: int = 1
) -> Timing:
    """Median and p95 wall time of `fn()` over `repeat` runs after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    samples.sort()
    p95 = samples[min(len(samples) - 1, round(0.95 * (len(samples) - 1)))]
    return Timing(name, statistics.median(samples), p95, repeat, items)


def compare(
    name: str,
    candidate: Callable[[], object],
    baseline: Callable[[], object],
    *,
    repeat: int = 5,
    warmup: int = 1,
    items: int = 1,
    unit: str = "item",
) -> dict:
    """Time candidate and baseline alternately-fair (same process, same inputs) and print
    `candidate/baseline` time ratio (< 1 means the candidate is faster)."""
    base = time_it(f"{name} (baseline)", baseline, repeat=repeat, warmup=warmup, items=items)
    cand = time_it(name, candidate, repeat=repeat, warmup=warmup, items=items)
    ratio = cand.median_s / base.median_s if base.median_s > 0 else float("nan")
    for t in (base, cand):
        print(
            f"{t.name:<40} median {t.median_s * 1e3:9.1f} ms  p95 {t.p95_s * 1e3:9.1f} ms  "
            f"{t.per_second:9.1f} {unit}/s"
        )
    print(f"{name}: time ratio candidate/baseline = {ratio:.3f}")
    return {
        "name": name,
        "ratio": ratio,
        "baseline": asdict(base),
        "candidate": asdict(cand),
        "machine": platform.processor() or platform.machine(),
    }


def dump(results: list[dict], path: str | None = None) -> None:
    """Print (or write) machine-readable results for docs/benchmarks.md."""
    text = json.dumps(results, indent=2)
    if path:
        with open(path, "w") as fh:
            fh.write(text)
    print(text)


def cpu_info() -> dict:
    """lscpu's model name and flags: the machine these numbers belong to."""
    fields = {}
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = fields.get("Flags", "").split()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "avx512_bf16")
    info = {
        "model_name": fields.get("Model name", "?"),
        "cpus": fields.get("CPU(s)", "?"),
        "inference_flags": [f for f in wanted if f in flags],
    }
    print(f"CPU: {info['model_name']}, {info['cpus']} CPUs")
    print(f"lscpu flags: {' '.join(flags)}")
    return info
