"""Packaging: the champions (or the champions-to-be) -> one bundle -> BentoML model store ->
`bentoml build`. Refuses a champion whose operating point cannot be served, and records each
champion's own preprocessing in the bundle: a champion kept from before a preprocessing change
is served with the preprocessing it was trained with, next to challengers trained with the
new one (the service preprocesses an upload once per distinct preprocessing)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bonefrac.config import OTHER, Settings, body_part_classes
from bonefrac.errors import DataError
from bonefrac.gate import Decision
from bonefrac.models import BODY_PART_MODEL
from bonefrac.registry import (
    current_champion,
    guarded,
    registered_name,
    registry_client,
    version_preprocess,
)


def package_champions(
    settings: Settings, decisions: list[Decision] | None = None, build: bool = True
) -> dict:
    """Champions -> bundle -> BentoML model store (+ `bentoml build`). Returns tags.

    `decisions` package the champions-to-be (the versions the gate promoted, the current
    champion elsewhere) before the aliases move, so a failed build promotes nothing."""
    import mlflow

    from bonefrac.bundle import save_to_bentoml, write_bundle
    from bonefrac.data.synthetic import is_synthetic
    from bonefrac.tracking import data_version_tag
    from bonefrac.train import model_names

    client = registry_client(settings)
    names = model_names(settings)
    promoted = {d.model: d for d in decisions or [] if d.promoted}
    champions = {}
    for name in names:
        if name in promoted:
            champions[name] = guarded(
                client,
                "reading",
                client.get_model_version,
                promoted[name].registered_name,
                promoted[name].version,
            )
            continue
        found = current_champion(client, registered_name(name, settings))
        if found is None:
            raise DataError(
                f"no champion for {registered_name(name, settings)}: run the pipeline first "
                "(or pin a version with `bonefrac champion pin`)"
            )
        champions[name] = found[0]
    for name, champion in champions.items():
        if name != BODY_PART_MODEL:
            problem = _packaging_problem(champion)
            if problem:
                raise DataError(
                    f"cannot package {champion.name} v{champion.version}: {problem}; pin a "
                    "version with a usable operating point (`bonefrac champion pin`)"
                )
    preprocess = {n: version_preprocess(c, settings) for n, c in champions.items()}
    unknown = [f"{c.name} v{c.version}" for n, c in champions.items() if not _usable(preprocess[n])]
    if unknown:
        raise DataError(
            f"cannot package {', '.join(unknown)}: its preprocessing is not recorded (or not "
            "valid), so it cannot be served the way it was trained; pin a version that records "
            "it (`bonefrac champion pin`)"
        )
    with tempfile.TemporaryDirectory(prefix="bonefrac-bundle-") as tmp:
        tmp = Path(tmp)
        files, points, versions, models = {}, {}, {}, {}
        for name, champion in champions.items():
            uri = f"models:/{champion.name}/{champion.version}"
            model = models[name] = guarded(client, f"loading {uri}", mlflow.keras.load_model, uri)
            files[name] = tmp / f"{name}.keras"
            model.save(files[name])
            versions[name] = {
                "registered_name": champion.name,
                "version": champion.version,
                "run_id": champion.run_id,
                "preprocess": preprocess[name],  # each model's own; serving applies it
            }
            if name != BODY_PART_MODEL:
                points[name] = {
                    k: float(champion.tags[f"bonefrac.{k}"])
                    for k in ("threshold", "temperature", "uncertain_band")
                }
                points[name] |= _negative_point(champion.tags)
            else:
                # "other" comes last, so a champion from before it existed keeps its order
                width = int(model.output_shape[-1])
                classes = body_part_classes(settings.data)
                if width > len(classes):  # e.g. data.other_parts emptied, 4-class champion kept
                    raise DataError(
                        f"the body-part champion ({champion.name} v{champion.version}) has "
                        f"{width} classes but the settings name {len(classes)} "
                        f"({', '.join(classes)}); restore data.other_parts or retrain it"
                    )
                versions[name]["classes"] = classes[:width]
        model = None  # the models live on in `models` only, for the export to release
        bundle = write_bundle(
            tmp / "bundle",
            settings,  # the bundle-level preprocessing: the OOD gate's, fitted in this run
            files,
            points,
            settings.layout.pca / "pca.joblib",
            versions,
            data_version_tag(settings),
            is_synthetic(settings.paths.data),
        )
        if settings.package.openvino:
            add_openvino(bundle, settings, points, client, champions, models)
        model_tag = save_to_bentoml(bundle)
    bento_tag = build_bento(settings) if build else None
    return {
        "model_tag": model_tag,
        "bento_tag": bento_tag,
        "versions": {n: c.version for n, c in champions.items()},
    }


def add_openvino(
    bundle: Path,
    settings: Settings,
    points: dict,
    client,
    champions: dict,
    models: dict | None = None,
) -> dict:
    """OpenVINO IR + NNCF int8 of every bundled model, calibrated on train and gated on val
    (`bonefrac.optimize`); the outcome goes into bundle.json and onto each model version.
    `models`: the Keras models just saved into the bundle, so they are not loaded again."""
    from bonefrac.bundle import OOD_INPUT, model_inputs, preprocess_key, read_bundle
    from bonefrac.cache import load_cache
    from bonefrac.optimize import add_to_bundle, gate_data

    manifest = read_bundle(bundle)
    cache = load_cache(settings.layout.preprocessed)
    recorded = cache.meta.get("preprocess")
    cached = preprocess_key(recorded) if recorded else None
    inputs = model_inputs(manifest)
    other = [n for n in manifest["models"] if inputs[n] != cached]
    if other:
        section = add_to_bundle(
            bundle,
            None,
            settings.package,
            skipped=f"{', '.join(other)} use(s) other preprocessing than the preprocessed "
            "cache, so nothing served-like can calibrate and gate them: serving uses "
            "TensorFlow",
        )
        if cached == inputs[OOD_INPUT]:  # the OOD gate's images: the test split can be fed
            record_served_evaluation(bundle, settings, cache)
    else:
        classes = manifest["models"][BODY_PART_MODEL].get("classes") or manifest["parts"]
        data = {
            name: gate_data(cache, name, classes, points.get(name), settings.package)
            for name in manifest["models"]
        }
        section = add_to_bundle(bundle, data, settings.package, models=models)
        record_served_evaluation(bundle, settings, cache)
    for name, champion in champions.items():
        entry = section.get("models", {}).get(name, {})
        int8 = entry.get("int8", {"passed": False, "reason": section.get("skipped", "")})
        verdict = "passed" if int8.get("passed") else f"fp32 kept: {int8.get('reason', '')}"
        guarded(
            client,
            "tagging",
            client.set_model_version_tag,
            champion.name,
            champion.version,
            "bonefrac.openvino.int8",
            verdict[:5000],
        )
    return section


def record_served_evaluation(bundle: Path, settings: Settings, cache) -> dict:
    """The test split end to end through the runtime the service picks for this bundle on this
    host (`serve.runtime`), recorded in bundle.json as `served_evaluation`: the evaluate stage
    measured the Keras fp32 models; this is what int8 serving answers. Each model gets the
    test images preprocessed its own way (the cache's, or freshly from the files for a kept
    champion trained with other preprocessing). Reported, never used to choose anything
    (invariant 2)."""
    from bonefrac.bundle import BUNDLE_FILE, read_bundle
    from bonefrac.bundle_integrity import write_manifest
    from bonefrac.evaluate.end_to_end import evaluate_bundle
    from bonefrac.inference import Views
    from bonefrac.registry import split_images
    from bonefrac.serving.predictor import Predictor

    predictor = Predictor.from_bundle(bundle, settings.serve, warm_up=False)
    runtime = predictor.runtime_info
    rows = cache.rows(split="test", other=OTHER in predictor.classes)  # as evaluate_bundle
    inputs = Views(
        {
            key: np.repeat(split_images(settings, cache, rows, json.loads(key))[..., None], 3, -1)
            for key in predictor.input_configs
        }
    )
    result = evaluate_bundle(
        predictor.core,
        predictor.gate,
        cache,
        settings.evaluate,
        runtime["name"],
        inputs=inputs,
        ood=predictor.ood_scores(inputs),
    )
    served = {"runtime": runtime} | {
        level: {k: result.metrics[level].get(k) for k in ("n", "kappa", "auroc", "accuracy")}
        | {
            "abstained": result.metrics[f"{level}_abstained"],
            "submission_kappa": result.metrics[f"{level}_submission"]["kappa"],
        }
        for level in ("image", "study")
    }
    if predictor.runtime.bf16_probe:  # why auto chose bf16 or fp32 on the packaging host
        served["bf16_probe"] = predictor.runtime.bf16_probe
    manifest = read_bundle(bundle)
    manifest["served_evaluation"] = served
    (bundle / BUNDLE_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    write_manifest(bundle)
    return served


def _usable(preprocess: dict | None) -> bool:
    from bonefrac.bundle import preprocess_key

    try:
        return preprocess is not None and bool(preprocess_key(preprocess))
    except (TypeError, ValueError):  # pydantic's ValidationError is a ValueError
        return False


def _packaging_problem(version) -> str | None:
    """Why a fracture champion's operating point cannot be served, or None."""
    try:
        threshold = float(version.tags["bonefrac.threshold"])
        temperature = float(version.tags["bonefrac.temperature"])
    except (KeyError, ValueError):
        return "it has no recorded operating point (threshold, temperature)"
    if not (np.isfinite(threshold) and 0.0 < threshold < 1.0):
        return f"its threshold {threshold} is not strictly between 0 and 1"
    if not (np.isfinite(temperature) and temperature > 0):
        return f"its temperature {temperature} is not positive"
    if version.tags.get("bonefrac.gate.decision") == "not promoted" and version.tags.get(
        "bonefrac.promotion", ""
    ).startswith("not promoted: unusable operating point"):
        return version.tags["bonefrac.promotion"].removeprefix("not promoted: ")
    return None


def _negative_point(tags: dict) -> dict:
    """The confident-negative cut-off and val sensitivity a champion was registered with; a
    champion registered before they existed has none (serving then treats no negative as
    confident)."""
    point: dict = {}
    if "bonefrac.negative_cutoff" in tags:
        point["negative_cutoff"] = float(tags["bonefrac.negative_cutoff"])
    if "bonefrac.val_sensitivity" in tags:
        point["val_sensitivity"] = json.loads(tags["bonefrac.val_sensitivity"])
    return point


def build_bento(settings: Settings) -> str:
    """`bentoml build` of the project's bentofile.yaml; returns the Bento tag."""
    project = settings.paths.project
    if not (project / "bentofile.yaml").is_file():
        raise DataError(f"{project / 'bentofile.yaml'} not found: cannot build the Bento")
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "-f", "bentofile.yaml", "--output", "tag"],
        cwd=project,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        lines = [ln for ln in (result.stderr or result.stdout).splitlines() if ln.strip()]
        raise DataError(f"bentoml build failed: {lines[-1] if lines else 'no output'}")
    tag = result.stdout.strip().splitlines()[-1].strip()
    return tag.removeprefix("__tag__:")
