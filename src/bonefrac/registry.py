"""MLflow Model Registry: register every trained model, move `champion` only forward,
and package the champions for serving.

Registered models: `bonefrac-body-part`, `bonefrac-fracture-<part>`. Each version carries
its provenance and test metrics as tags. The alias `champion` moves to a new version only if
it beats the current champion on the configured metric on the same test set (the champion
is re-scored when the test set changed); otherwise the champion stays and the reason is
recorded on the new version.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bonefrac.config import Settings
from bonefrac.data.mura import body_part_name
from bonefrac.errors import DataError
from bonefrac.models import BODY_PART_MODEL

CHAMPION = "champion"


def registered_name(name: str, settings: Settings) -> str:
    prefix = settings.registry.model_prefix
    return f"{prefix}-body-part" if name == BODY_PART_MODEL else f"{prefix}-fracture-{name}"


def metric_value(results: dict, name: str, settings: Settings) -> tuple[str, float | None]:
    """The gate's metric for a model from the evaluate stage's metrics.json."""
    if name == BODY_PART_MODEL:
        metric = settings.registry.body_part_metric
        value = results[BODY_PART_MODEL].get(metric)
    else:
        metric = settings.registry.fracture_metric
        level, _, key = metric.partition("_")
        value = results[name].get(level, {}).get(key)
    return metric, None if value is None else float(value)


@dataclass(frozen=True)
class Decision:
    model: str
    registered_name: str
    version: str
    metric: str
    value: float | None
    champion_version: str | None
    champion_value: float | None
    promoted: bool
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def _client(settings: Settings):
    from mlflow.tracking import MlflowClient

    from bonefrac import tracking

    tracking.configure(settings)
    return MlflowClient(tracking.tracking_uri(settings))


def _champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def register(settings: Settings) -> list[Decision]:
    """Register the models of the latest train + evaluate stages and decide, per model,
    whether it should become champion. Aliases are not moved here: `promote` does that
    once everything downstream (packaging) has succeeded."""
    import mlflow

    from bonefrac import tracking
    from bonefrac.train import model_names, read_runs

    layout = settings.layout
    runs = read_runs(layout.models)
    results = json.loads((layout.evaluation / "metrics.json").read_text())
    client = _client(settings)
    provenance = tracking.provenance_tags(settings)
    decisions = []
    for name in model_names(settings):
        if name not in runs:
            raise DataError(f"no trained run for model {name!r}: run the train stage first")
        reg_name = registered_name(name, settings)
        metric, value = metric_value(results, name, settings)
        operating = results.get(name, {}) if name != BODY_PART_MODEL else {}
        tags = {
            **provenance,
            "bonefrac.model": name,
            "bonefrac.preprocess_hash": settings.section_hash("preprocess"),
            "bonefrac.image_size": str(settings.preprocess.image_size),
            "bonefrac.test_set": results["test_set"],
            f"bonefrac.metric.{metric}": "nan" if value is None else f"{value:.6f}",
            **{
                f"bonefrac.{k}": str(operating[k])
                for k in ("threshold", "temperature", "uncertain_band")
                if k in operating
            },
        }
        uri = runs.get("model_uris", {}).get(name) or f"runs:/{runs[name]}/model"
        version = mlflow.register_model(uri, reg_name, tags=tags).version
        decision = _decide(
            settings, client, name, reg_name, str(version), metric, value, results["test_set"]
        )
        client.set_model_version_tag(reg_name, str(version), "bonefrac.promotion", decision.reason)
        decisions.append(decision)
    return decisions


def promote(settings: Settings, decisions: list[Decision]) -> None:
    """Move `champion` to every version the gate promoted."""
    client = _client(settings)
    for decision in decisions:
        if decision.promoted:
            client.set_registered_model_alias(decision.registered_name, CHAMPION, decision.version)


def _decide(settings, client, name, reg_name, version, metric, value, test_set) -> Decision:
    champion = _champion(client, reg_name)
    margin = settings.registry.min_improvement

    def decision(promoted: bool, reason: str, champion_value=None) -> Decision:
        return Decision(
            name,
            reg_name,
            version,
            metric,
            value,
            champion.version if champion else None,
            champion_value,
            promoted,
            reason,
        )

    if value is None or not np.isfinite(value):
        return decision(False, f"not promoted: {metric} could not be computed")
    if champion is None:
        return decision(True, f"promoted: first version ({metric} {value:.3f})")
    champion_value = _champion_score(settings, champion, name, metric, test_set)
    if champion_value is None:
        return decision(True, f"promoted: champion v{champion.version} has no {metric}")
    if value > champion_value + margin:
        return decision(
            True,
            f"promoted: {metric} {value:.3f} beats champion "
            f"v{champion.version} ({champion_value:.3f})",
            champion_value,
        )
    return decision(
        False,
        f"kept champion v{champion.version}: {metric} {value:.3f} does not "
        f"beat {champion_value:.3f}",
        champion_value,
    )


def _champion_score(settings, champion, name, metric, test_set) -> float | None:
    """The champion's metric on this test set: its recorded value when the test set is the
    same, else it is scored again on the current test split."""
    recorded = champion.tags.get(f"bonefrac.metric.{metric}")
    if champion.tags.get("bonefrac.test_set") == test_set and recorded not in (None, "nan"):
        return float(recorded)
    return rescore(settings, champion, name, metric)


def rescore(settings: Settings, version, name: str, metric: str) -> float | None:
    """Score a registered version on the current test split with its own operating point."""
    import mlflow

    from bonefrac.cache import load_cache
    from bonefrac.evaluate import apply_temperature, binary_metrics, multiclass_metrics, study_level
    from bonefrac.evaluate.stage import predict

    cache = load_cache(settings.layout.preprocessed)
    if str(cache.image_size) != version.tags.get("bonefrac.image_size"):
        return None  # different input size: not comparable, the new model wins
    model = mlflow.keras.load_model(f"models:/{version.name}/{version.version}")
    parts = [body_part_name(p) for p in settings.data.parts]
    if name == BODY_PART_MODEL:
        rows = cache.rows(split="test")
        predicted = np.array(parts)[predict(model, cache.images[rows]).argmax(axis=1)]
        truth = cache.index["body_part"].to_numpy()[rows]
        return multiclass_metrics(truth, predicted, parts).get(metric)
    rows = cache.rows(split="test", body_part=name)
    frame = cache.index.iloc[rows].copy()
    temperature = float(version.tags.get("bonefrac.temperature", 1.0))
    threshold = float(version.tags.get("bonefrac.threshold", 0.5))
    frame["prob"] = apply_temperature(predict(model, cache.images[rows])[:, 0], temperature)
    level, _, key = metric.partition("_")
    scored = study_level(frame) if level == "study" else frame
    return binary_metrics(scored["label"], scored["prob"], threshold).get(key)


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

    client = _client(settings)
    names = model_names(settings)
    promoted = {d.model: d for d in decisions or [] if d.promoted}
    champions = {}
    for name in names:
        if name in promoted:
            champions[name] = client.get_model_version(
                promoted[name].registered_name, promoted[name].version
            )
            continue
        champion = _champion(client, registered_name(name, settings))
        if champion is None:
            raise DataError(
                f"no champion for {registered_name(name, settings)}: run the pipeline first"
            )
        champions[name] = champion
    hashes = {c.tags.get("bonefrac.preprocess_hash") for c in champions.values()}
    if hashes != {settings.section_hash("preprocess")}:
        raise DataError(
            "champions were trained with different preprocessing than the current "
            "settings: retrain with the current params before packaging"
        )
    with tempfile.TemporaryDirectory(prefix="bonefrac-bundle-") as tmp:
        tmp = Path(tmp)
        files, points, versions = {}, {}, {}
        for name, champion in champions.items():
            model = mlflow.keras.load_model(f"models:/{champion.name}/{champion.version}")
            files[name] = tmp / f"{name}.keras"
            model.save(files[name])
            versions[name] = {
                "registered_name": champion.name,
                "version": champion.version,
                "run_id": champion.run_id,
            }
            if name != BODY_PART_MODEL:
                points[name] = {
                    k: float(champion.tags[f"bonefrac.{k}"])
                    for k in ("threshold", "temperature", "uncertain_band")
                }
            else:
                versions[name]["classes"] = [body_part_name(p) for p in settings.data.parts]
        bundle = write_bundle(
            tmp / "bundle",
            settings,
            files,
            points,
            settings.layout.pca / "pca.joblib",
            versions,
            data_version_tag(settings),
            is_synthetic(settings.paths.data),
        )
        model_tag = save_to_bentoml(bundle)
    bento_tag = build_bento(settings) if build else None
    return {
        "model_tag": model_tag,
        "bento_tag": bento_tag,
        "versions": {n: c.version for n, c in champions.items()},
    }


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
