"""MLflow Model Registry: register every trained model, move `champion` only on evidence from
the gate split, let people pin or roll back, and package the champions for serving.

Registered models: `bonefrac-body-part`, `bonefrac-fracture-<part>`. The gate (`bonefrac.gate`)
scores the challenger and the current champion on the same `val` images, each with its own
preprocessing and operating point, and promotes on a paired patient bootstrap of the metric's
difference. Every version carries its provenance, its preprocessing, its operating point, the
gate's Δ, interval, power and decision, and its test metrics (reported, never read by a
decision). Only "this model or alias does not exist" means "no champion": any other registry
failure stops the task and promotes nothing.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np

from bonefrac.config import PreprocessConfig, Settings, body_part_class, body_part_classes
from bonefrac.errors import DataError, UserError
from bonefrac.gate import GATE_SPLIT, Champion, Decision, Scored, decide
from bonefrac.models import BODY_PART_MODEL

CHAMPION = "champion"
PIN_TAG = "bonefrac.pinned_version"  # registered-model tag: the version a person pinned
GATE_SPLITS = (GATE_SPLIT, "test")  # scored: the gate decides on val, test is only reported


class RegistryError(UserError):
    """The registry could not be read or written: a fault of the store, not "no champion"."""


def registered_name(name: str, settings: Settings) -> str:
    prefix = settings.registry.model_prefix
    return f"{prefix}-body-part" if name == BODY_PART_MODEL else f"{prefix}-fracture-{name}"


def registry_client(settings: Settings):
    from mlflow.tracking import MlflowClient

    from bonefrac import tracking

    uri = tracking.tracking_uri(settings)
    try:
        tracking.configure(settings)
        return MlflowClient(uri)
    except Exception as exc:
        raise registry_failure(uri, "connecting", exc) from exc


def registry_failure(uri: str, doing: str, exc: Exception) -> RegistryError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return RegistryError(
        f"the MLflow registry at {uri} failed while {doing} ({first}): check the tracking "
        "URI and that the store is reachable; nothing was promoted"
    )


def guarded(client, doing: str, fn, *args, **kwargs):
    """A registry call whose failure becomes one clear RegistryError."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        raise registry_failure(client.tracking_uri, doing, exc) from exc


def current_champion(client, name: str):
    """(champion version, pin dict or None), or None when the model or its alias does not
    exist. Any other failure raises RegistryError: an outage is not "no champion"."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise registry_failure(client.tracking_uri, f"reading {name}", exc) from exc
    except Exception as exc:
        raise registry_failure(client.tracking_uri, f"reading {name}", exc) from exc
    version = (model.aliases or {}).get(CHAMPION)
    if version is None:
        return None
    doing = f"reading {name} v{version}"
    champion = guarded(client, doing, client.get_model_version, name, version)
    pinned = (model.tags or {}).get(PIN_TAG) == str(champion.version)
    pin = {k: champion.tags.get(f"bonefrac.pin.{k}") for k in ("by", "at", "reason")}
    return champion, pin if pinned else None


# --- predictions on the gate split ----------------------------------------------------------


def _preprocess_dump(cfg: PreprocessConfig) -> dict:
    return cfg.model_dump(mode="json", exclude={"workers"})


def version_preprocess(version, settings: Settings) -> dict | None:
    """The preprocessing a registered version was trained with, or None if not recorded."""
    recorded = version.tags.get("bonefrac.preprocess")
    if recorded:
        return json.loads(recorded)
    if version.tags.get("bonefrac.preprocess_hash") == settings.section_hash("preprocess"):
        return _preprocess_dump(settings.preprocess)  # older versions: only the hash
    return None


def split_images(settings: Settings, cache, rows: np.ndarray, preprocess: dict) -> np.ndarray:
    """Gate images (N, S, S) uint8 preprocessed as `preprocess` says: the cache when it was
    built that way, else freshly from the raw files (a champion trained another way)."""
    from bonefrac.data import mura
    from bonefrac.imaging import preprocess_file

    if preprocess == cache.meta.get("preprocess", _preprocess_dump(settings.preprocess)):
        return np.asarray(cache.images[rows])
    cfg = PreprocessConfig(**preprocess)
    data_dir = mura.find_mura_root(settings.paths.data).parent
    paths = cache.index["path"].iloc[rows]
    return np.stack([preprocess_file(data_dir / p, cfg)[..., 0] for p in paths])


def _scored(settings, cache, name: str, model, preprocess: dict, point: dict) -> Scored:
    """One model's predictions on the gate and test rows of its part (all parts: body part)."""
    from bonefrac.evaluate import apply_temperature
    from bonefrac.evaluate.stage import predict

    split = cache.index["split"].isin(GATE_SPLITS).to_numpy().copy()
    if name != BODY_PART_MODEL:  # the body part is judged on MURA's other parts too
        split &= (cache.index["body_part"] == name).to_numpy()
    rows = np.flatnonzero(split)
    columns = ["path", "split", "patient_id", "study_id", "label", "body_part"]
    frame = cache.index.iloc[rows][columns].reset_index(drop=True)
    outputs = predict(model, split_images(settings, cache, rows, preprocess))
    if name == BODY_PART_MODEL:
        classes = body_part_classes(settings.data)  # "other" last: a 3-class model fits
        frame["truth"] = [body_part_class(p, classes) for p in frame["body_part"]]
        frame["pred"] = np.array(classes)[outputs.argmax(axis=1)]
        return Scored(frame)
    frame["prob"] = apply_temperature(outputs[:, 0], float(point["temperature"]))
    return Scored(frame, float(point["threshold"]))


def _operating_problem(scored: Scored) -> str | None:
    from bonefrac.evaluate import operating_point_problem, study_level

    if scored.threshold is None:
        return None
    studies = study_level(scored.frame[scored.frame["split"] == GATE_SPLIT])
    return operating_point_problem(studies["label"], studies["prob"], scored.threshold)


def _champion_input(settings, client, cache, name: str, found) -> Champion:
    import mlflow

    version, pin = found
    preprocess = version_preprocess(version, settings)
    if preprocess is None:
        return Champion(str(version.version), None, "its preprocessing is not recorded", pin)
    point = {}
    if name != BODY_PART_MODEL:
        try:
            point = {k: float(version.tags[f"bonefrac.{k}"]) for k in ("threshold", "temperature")}
        except (KeyError, ValueError):
            return Champion(str(version.version), None, "its operating point is not recorded", pin)
    uri = f"models:/{version.name}/{version.version}"
    model = guarded(client, f"loading {uri}", mlflow.keras.load_model, uri)
    return Champion(
        str(version.version), _scored(settings, cache, name, model, preprocess, point), None, pin
    )


# --- register, promote ----------------------------------------------------------------------


def decide_for(settings: Settings, name: str, reg_name: str, challenger, champion):
    """The champion gate for model `name`, configured by `registry` (the one place that
    maps settings to `gate.decide`'s arguments)."""
    cfg = settings.registry
    multiclass = name == BODY_PART_MODEL
    return decide(
        challenger,
        champion,
        model=name,
        registered_name=reg_name,
        metric=cfg.body_part_metric if multiclass else cfg.fracture_metric,
        multiclass=multiclass,
        operating_problem=_operating_problem(challenger),
        confidence=cfg.confidence,
        min_improvement=cfg.min_improvement,
        n_samples=cfg.bootstrap_samples,
        seed=cfg.seed,
    )


def register(settings: Settings) -> list[Decision]:
    """Decide, per model, whether the latest trained model should become champion, then
    register it with the decision on its version. Aliases are not moved here: `promote` does
    that once everything downstream (packaging) has succeeded."""
    import mlflow

    from bonefrac import tracking
    from bonefrac.cache import load_cache
    from bonefrac.models import forget_trained, load_trained
    from bonefrac.tracking import read_runs
    from bonefrac.train import model_names

    layout = settings.layout
    runs = read_runs(layout.models)
    results = json.loads((layout.evaluation / "metrics.json").read_text())
    cache = load_cache(layout.preprocessed)
    client = registry_client(settings)
    provenance = tracking.provenance_tags(settings)
    preprocess = _preprocess_dump(settings.preprocess)
    decisions = []
    for name in model_names(settings):
        if name not in runs:
            raise DataError(f"no trained run for model {name!r}: run the train stage first")
        reg_name = registered_name(name, settings)
        multiclass = name == BODY_PART_MODEL
        point = {} if multiclass else results[name]
        model = load_trained(layout.models / name / "model.keras")  # as evaluate loaded it
        challenger = _scored(settings, cache, name, model, preprocess, point)
        found = current_champion(client, reg_name)
        champion = _champion_input(settings, client, cache, name, found) if found else None
        decision = decide_for(settings, name, reg_name, challenger, champion)
        decisions.append((name, reg_name, point, decision))
    forget_trained()  # the last stage to read the model files

    registered = []
    for name, reg_name, point, decision in decisions:
        tags = {
            **provenance,
            "bonefrac.model": name,
            "bonefrac.preprocess_hash": settings.section_hash("preprocess"),
            "bonefrac.preprocess": json.dumps(preprocess, sort_keys=True),
            "bonefrac.image_size": str(settings.preprocess.image_size),
            "bonefrac.test_set": results["test_set"],
            **{
                f"bonefrac.{k}": str(point[k])
                for k in ("threshold", "temperature", "uncertain_band", "negative_cutoff")
                if k in point
            },
            # the val sensitivity the service shows next to a finding (packaged with the point)
            **(
                {"bonefrac.val_sensitivity": json.dumps(point["val_sensitivity"])}
                if point.get("val_sensitivity")
                else {}
            ),
            **decision.tags(),
        }
        uri = runs.get("model_uris", {}).get(name) or f"runs:/{runs[name]}/model"
        version = guarded(
            client, f"registering {reg_name}", mlflow.register_model, uri, reg_name, tags=tags
        )
        registered.append(replace(decision, version=str(version.version)))
    return registered


def promote(settings: Settings, decisions: list[Decision]) -> None:
    """Move `champion` to every version the gate promoted."""
    client = registry_client(settings)
    for decision in decisions:
        if decision.promoted:
            guarded(
                client,
                f"moving {decision.registered_name}@{CHAMPION}",
                client.set_registered_model_alias,
                decision.registered_name,
                CHAMPION,
                decision.version,
            )
