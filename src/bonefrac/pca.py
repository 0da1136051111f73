"""PCA on downsampled, filtered training images: the paper's PCA put to work.

One fit gives three things the system uses:
- an out-of-distribution gate: reconstruction error above a high percentile of the
  training images' errors means "not an elbow/hand/shoulder radiograph like these";
- a drift reference: a new batch's PCA projections compared to the training ones;
- a baseline: PCA features + logistic regression for body part and for fracture, the
  comparison row next to ResNet50 (the paper's Table V).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from scipy import stats
from sklearn.decomposition import PCA, IncrementalPCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, cohen_kappa_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bonefrac.cache import Cache
from bonefrac.config import PcaConfig
from bonefrac.errors import DataError
from bonefrac.imaging import downsample  # the OOD descriptor, shared with serving
from bonefrac.inference import OodGate

DRIFT_COMPONENTS = 10


@dataclass
class PcaModel:
    """A fitted PCA with its OOD threshold and drift reference."""

    pca: PCA | IncrementalPCA
    image_size: int
    ood_threshold: float  # reconstruction MSE (Q statistic) above this = out of distribution
    t2_threshold: float  # Hotelling's T² (distance inside the PCA subspace) above this = OOD
    reference_projection: np.ndarray  # (n_ref, k) training projections, k <= DRIFT_COMPONENTS
    reference_errors: np.ndarray  # (n_ref,) training reconstruction errors

    def features(self, images: np.ndarray) -> np.ndarray:
        return self.pca.transform(downsample(images, self.image_size))

    def reconstruction_error(self, images: np.ndarray) -> np.ndarray:
        """Mean squared reconstruction error per image (pixels in [0, 1])."""
        return _errors(self.pca, downsample(images, self.image_size))

    def hotelling_t2(self, images: np.ndarray) -> np.ndarray:
        return _t2(self.pca, downsample(images, self.image_size))

    def ood_score(self, images: np.ndarray) -> np.ndarray:
        """max(Q / Q threshold, T² / T² threshold): > 1 means out of distribution.

        Q (reconstruction error) catches pictures unlike any radiograph; T² catches the right
        ingredients in extreme amounts. Both thresholds come from held-out training images.
        """
        return self.ood_gate().scores(downsample(images, self.image_size))

    def ood_gate(self) -> OodGate:
        """The OOD gate as plain arrays: what the bundle carries and serving scores with, so
        serving never loads scikit-learn or this module."""
        return OodGate(
            mean=np.asarray(self.pca.mean_, dtype=np.float64),
            components=np.asarray(self.pca.components_, dtype=np.float64),
            explained_variance=np.asarray(self.pca.explained_variance_, dtype=np.float64),
            q_threshold=self.ood_threshold,
            t2_threshold=self.t2_threshold,
            image_size=self.image_size,
        )

    def save(self, path: Path) -> None:
        joblib.dump(self, path)

    @staticmethod
    def load(path: Path) -> PcaModel:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path} not found: run the fit_pca stage first")
        return joblib.load(path)


@dataclass(frozen=True)
class DriftReport:
    drifted: bool
    p_value: float  # smallest Bonferroni-corrected KS p-value over components and errors
    statistic: float  # largest KS statistic
    n_reference: int
    n_batch: int
    ood_fraction: float  # share of the batch above the OOD threshold

    def to_dict(self) -> dict:
        return asdict(self)


def _make_pca(n_components: int, n_images: int, cfg: PcaConfig) -> PCA | IncrementalPCA:
    if n_images > cfg.incremental_above:
        return IncrementalPCA(n_components=n_components, batch_size=max(n_components * 5, 1024))
    return PCA(n_components=n_components, random_state=cfg.seed)


def _errors(pca: PCA | IncrementalPCA, flat: np.ndarray) -> np.ndarray:
    return ((flat - pca.inverse_transform(pca.transform(flat))) ** 2).mean(axis=1)


def _t2(pca: PCA | IncrementalPCA, flat: np.ndarray) -> np.ndarray:
    scores = pca.transform(flat)
    return (scores**2 / np.maximum(pca.explained_variance_, 1e-12)).sum(axis=1)


def fit(train_images: np.ndarray, cfg: PcaConfig, folds: int = 5) -> PcaModel:
    """Fit PCA (IncrementalPCA for large sets) and derive the OOD threshold and reference.

    Reference errors are out-of-fold (each image scored by a PCA that did not see it), so
    they match what a new image from the same distribution gets; in-sample errors would be
    too small and flag every unseen image as drifted or out of distribution.
    """
    from sklearn.model_selection import KFold

    flat = downsample(train_images, cfg.image_size)
    n_components = min(
        cfg.n_components, int(flat.shape[0] * (folds - 1) / folds) - 1, flat.shape[1]
    )
    if n_components < 2 or len(flat) < folds:
        raise DataError("too few training images to fit PCA (need at least a dozen)")
    errors = np.empty(len(flat), dtype=np.float64)
    t2 = np.empty(len(flat), dtype=np.float64)
    for fit_rows, held_out in KFold(folds, shuffle=True, random_state=cfg.seed).split(flat):
        fold_pca = _make_pca(n_components, len(fit_rows), cfg).fit(flat[fit_rows])
        errors[held_out] = _errors(fold_pca, flat[held_out])
        t2[held_out] = _t2(fold_pca, flat[held_out])
    pca = _make_pca(n_components, len(flat), cfg).fit(flat)
    threshold = float(np.percentile(errors, cfg.ood_percentile))
    k = min(DRIFT_COMPONENTS, n_components)
    return PcaModel(
        pca=pca,
        image_size=cfg.image_size,
        ood_threshold=max(threshold, 1e-12),
        t2_threshold=max(float(np.percentile(t2, cfg.ood_percentile)), 1e-12),
        reference_projection=pca.transform(flat)[:, :k].astype(np.float32),
        reference_errors=errors.astype(np.float32),
    )


def drift(model: PcaModel, images: np.ndarray, alpha: float = 0.01) -> DriftReport:
    """Two-sample KS tests of a new batch against the training reference, per component
    and on reconstruction errors, Bonferroni-corrected."""
    flat = downsample(images, model.image_size)
    projection = model.pca.transform(flat)[:, : model.reference_projection.shape[1]]
    errors = _errors(model.pca, flat)
    tests = [
        stats.ks_2samp(model.reference_projection[:, j], projection[:, j])
        for j in range(projection.shape[1])
    ]
    tests.append(stats.ks_2samp(model.reference_errors, errors))
    n_tests = len(tests)
    p_value = min(1.0, min(t.pvalue for t in tests) * n_tests)
    return DriftReport(
        drifted=bool(p_value < alpha),
        p_value=float(p_value),
        statistic=float(max(t.statistic for t in tests)),
        n_reference=len(model.reference_errors),
        n_batch=len(images),
        ood_fraction=float((model.ood_score(images) > 1).mean()),
    )


def _classifier(seed: int):
    return make_pipeline(
        StandardScaler(),
        LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed),
    )


def baseline_predictions(model: PcaModel, cache: Cache, seed: int = 42) -> pd.DataFrame:
    """PCA features + logistic regression, fitted on train, predicted on every image.

    Returns one row per target-part cache image with `body_part_pred`, `body_part_prob_<part>` and
    `fracture_prob` (from that image's true part's fracture classifier), so the evaluate
    stage can score the baseline exactly like ResNet50.
    """
    targets = cache.rows()  # the target parts: MURA's other parts have no fracture model
    features = model.features(cache.images)[targets]  # blockwise: the memmap stays on disk
    index = cache.index.iloc[targets].reset_index(drop=True)
    train = (index["split"] == "train").to_numpy()
    out = index[["path", "split", "body_part", "study_id", "patient_id", "label"]].copy()

    parts = sorted(index["body_part"].unique())
    if len(parts) > 1:
        part_model = _classifier(seed).fit(features[train], index.loc[train, "body_part"])
        probs = part_model.predict_proba(features)
        for j, part in enumerate(part_model.classes_):
            out[f"body_part_prob_{part}"] = probs[:, j]
        out["body_part_pred"] = part_model.classes_[probs.argmax(axis=1)]
    else:
        out[f"body_part_prob_{parts[0]}"] = 1.0
        out["body_part_pred"] = parts[0]

    out["fracture_prob"] = np.nan
    for part in parts:
        rows = (index["body_part"] == part).to_numpy()
        fit_rows = rows & train
        labels = index.loc[fit_rows, "label"]
        if labels.nunique() < 2:
            continue  # cannot fit a classifier with one class; left NaN and reported
        clf = _classifier(seed).fit(features[fit_rows], labels)
        out.loc[rows, "fracture_prob"] = clf.predict_proba(features[rows])[:, 1]
    return out


def baseline_metrics(predictions: pd.DataFrame, split: str = "test") -> dict:
    """Headline numbers of the baseline on one split (image and study level)."""
    rows = predictions[predictions["split"] == split]
    metrics: dict = {}
    if rows.empty:
        return metrics
    metrics["body_part_accuracy"] = float(accuracy_score(rows["body_part"], rows["body_part_pred"]))
    scored = rows.dropna(subset=["fracture_prob"])
    for level, frame in (
        ("image", scored),
        (
            "study",
            scored.groupby("study_id").agg(
                label=("label", "first"), fracture_prob=("fracture_prob", "mean")
            ),
        ),
    ):
        if frame["label"].nunique() == 2:
            metrics[f"fracture_{level}_auroc"] = float(
                roc_auc_score(frame["label"], frame["fracture_prob"])
            )
        metrics[f"fracture_{level}_kappa"] = float(
            cohen_kappa_score(frame["label"], (frame["fracture_prob"] >= 0.5).astype(int))
        )
    return metrics


def save_plots(model: PcaModel, cache: Cache, out_dir: Path) -> list[Path]:
    """Explained variance, 2-D projection by part and label, reconstruction errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    written = []
    ratio = model.pca.explained_variance_ratio_
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(np.arange(1, len(ratio) + 1), ratio, label="per component")
    ax.plot(np.arange(1, len(ratio) + 1), np.cumsum(ratio), "k.-", label="cumulative")
    ax.set(xlabel="component", ylabel="explained variance ratio", title="PCA explained variance")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "explained_variance.png", dpi=100)
    written.append(out_dir / "explained_variance.png")
    plt.close(fig)

    train = cache.rows(split="train")
    features = model.features(cache.images[train])
    index = cache.index.iloc[train]
    fig, ax = plt.subplots(figsize=(5, 4))
    markers = {0: "o", 1: "x"}
    for part in sorted(index["body_part"].unique()):
        for label, marker in markers.items():
            sel = ((index["body_part"] == part) & (index["label"] == label)).to_numpy()
            if sel.any():
                ax.scatter(
                    features[sel, 0],
                    features[sel, 1],
                    s=12,
                    marker=marker,
                    label=f"{part} {'abnormal' if label else 'normal'}",
                )
    ax.set(xlabel="PC1", ylabel="PC2", title="Training images in PCA space")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "projection.png", dpi=100)
    written.append(out_dir / "projection.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(model.reference_errors, bins=40)
    ax.axvline(model.ood_threshold, color="r", label="OOD threshold")
    ax.set(xlabel="reconstruction MSE", ylabel="training images", title="Reconstruction error")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "reconstruction_error.png", dpi=100)
    written.append(out_dir / "reconstruction_error.png")
    plt.close(fig)
    return written


@dataclass(frozen=True)
class PcaResult:
    out_dir: Path
    metrics: dict
    reused: bool = False  # True when an up-to-date fit for the same cache and params existed


def fit_key(cache: Cache, cfg: PcaConfig) -> str | None:
    """What a fit depends on: the cache's key (every manifest row, each image's md5, the
    preprocessing params) and the PCA params. None for a cache without a key: always refit."""
    cache_key = cache.meta.get("key")
    if not cache_key:
        return None
    params = cfg.model_dump_json()
    return hashlib.sha256(f"{cache_key}\n{params}".encode()).hexdigest()[:16]


def fit_pca_stage(
    cache: Cache, cfg: PcaConfig, out_dir: Path, metrics_path: Path, plot_path: Path
) -> PcaResult:
    """The fit_pca stage: model, plots and baseline predictions in out_dir; metrics JSON and
    explained-variance plot data (for DVC) at their own paths."""
    out_dir = Path(out_dir)
    key = fit_key(cache, cfg)
    done = out_dir / "fit.json"
    if (
        key is not None
        and done.is_file()
        and json.loads(done.read_text()).get("key") == key
        and Path(metrics_path).is_file()
    ):
        return PcaResult(out_dir, json.loads(Path(metrics_path).read_text()), reused=True)
    done.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in (metrics_path, plot_path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    train = cache.rows(split="train")
    if len(train) == 0:
        raise DataError("no training images in the cache: check the manifest's splits")
    model = fit(cache.images[train], cfg)
    model.save(out_dir / "pca.joblib")

    ratio = model.pca.explained_variance_ratio_
    pd.DataFrame(
        {
            "component": np.arange(1, len(ratio) + 1),
            "explained_variance": ratio,
            "cumulative": np.cumsum(ratio),
        }
    ).to_csv(plot_path, index=False)
    save_plots(model, cache, out_dir)
    predictions = baseline_predictions(model, cache, cfg.seed)
    predictions.to_csv(out_dir / "baseline_predictions.csv", index=False)

    non_train = cache.rows(split="test")
    test_scores = model.ood_score(cache.images[non_train]) if len(non_train) else np.array([])
    metrics = {
        "n_components": int(model.pca.n_components_),
        "explained_variance": float(ratio.sum()),
        "ood_threshold": model.ood_threshold,
        "test_ood_fraction": float((test_scores > 1).mean()) if len(test_scores) else None,
        "baseline": baseline_metrics(predictions, "test"),
    }
    text = json.dumps(metrics, indent=2) + "\n"
    (out_dir / "metrics.json").write_text(text)
    Path(metrics_path).write_text(text)
    done.write_text(json.dumps({"key": key}) + "\n")  # written last: marks a complete fit
    return PcaResult(out_dir, metrics)
