"""`bonefrac` command line: one command per user action.

Heavy libraries (TensorFlow, MLflow, Great Expectations, ...) are imported inside the
commands that need them so `bonefrac --help` stays instant. User errors print one line
and exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from bonefrac.errors import UserError


class _Group(click.Group):
    """Turns UserError from any command into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"bonefrac: error: {exc}", err=True)
            ctx.exit(2)


def _settings(ctx: click.Context, **overrides):
    from bonefrac.config import load_settings

    obj = ctx.find_root().obj or {}
    nested: dict = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, key = dotted.split(".")
        nested.setdefault(section, {})[key] = value
    return load_settings(obj.get("params"), obj.get("profile"), nested or None)


# --data, shared by every command that reads the dataset
data_option = click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder holding MURA-v1.1/ (or the MURA-v1.1 folder itself). Default: paths.data.",
)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bonefrac")
@click.option(
    "--params",
    type=click.Path(path_type=Path),
    default=None,
    help="params.yaml to use (default: the nearest one upwards from here).",
)
@click.option(
    "--profile",
    default=None,
    help="Settings profile from params.yaml, e.g. 'quick' (env: BONEFRAC_PROFILE).",
)
@click.pass_context
def cli(ctx: click.Context, params: Path | None, profile: str | None) -> None:
    """bonefrac: find fractures in elbow, hand and shoulder X-rays (MURA), with the models
    trained, tracked (MLflow), versioned (DVC) and served (BentoML).

    Decision support for clinicians; not a diagnosis.
    """
    from bonefrac.console import quiet_tools

    quiet_tools()  # before any command imports TensorFlow, Prefect, MLflow, ...
    ctx.obj = {"params": params, "profile": profile}


@cli.command()
@data_option
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the manifest CSV here (default: <artifacts>/manifest.csv).",
)
@click.pass_context
def manifest(ctx: click.Context, data: Path | None, out: Path | None) -> None:
    """Read MURA's CSVs (or scan its folders) into one row per image, with patient-disjoint
    train/val/test splits, and print the counts."""
    from bonefrac.data import mura

    settings = _settings(ctx, **{"paths.data": data})
    result = mura.build_manifest(settings.paths.data, settings.data)
    out = out or settings.paths.artifacts / "manifest.csv"
    mura.write_manifest(result.frame, out)
    for problem in result.problems:
        click.echo(f"warning: {problem}", err=True)
    click.echo(mura.counts_table(result.frame))
    click.echo(f"{len(result.frame)} images written to {out}")


@cli.command("demo-data")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder to create MURA-v1.1/ in (default: paths.data).",
)
@click.option(
    "--patients",
    type=click.IntRange(min=2),
    default=40,
    show_default=True,
    help="Patients per body part and MURA split (train gets this many, valid half).",
)
@click.option(
    "--size",
    type=click.IntRange(min=32, max=2048),
    default=256,
    show_default=True,
    help="Typical image side in pixels (sizes vary around it).",
)
@click.option(
    "--other-patients",
    type=click.IntRange(min=2),
    default=None,
    help="Patients per other part (data.other_parts: wrist, finger, forearm, humerus, for the "
    "body-part model's 'other' class) and split [default: a quarter of --patients, at least 2].",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.pass_context
def demo_data(
    ctx: click.Context,
    out: Path | None,
    patients: int,
    size: int,
    other_patients: int | None,
    seed: int,
) -> None:
    """Generate a SYNTHETIC MURA-like dataset (exact MURA-v1.1 layout and CSVs) for the demo
    and the tests. Not real radiographs; its numbers say nothing about real performance."""
    from bonefrac.data import synthetic

    settings = _settings(ctx)
    out = out or settings.paths.data
    root = synthetic.generate(
        out,
        patients=patients,
        size=size,
        seed=seed,
        parts=settings.data.parts,
        extra_parts=settings.data.other_parts,
        extra_patients=other_patients or max(2, patients // 4),
    )
    click.echo(f"synthetic MURA written to {root}")


@cli.command("validate")
@data_option
@click.option(
    "--manifest",
    "manifest_csv",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Validate this manifest CSV instead of building one from --data.",
)
@click.pass_context
def validate_data(ctx: click.Context, data: Path | None, manifest_csv: Path | None) -> None:
    """Check the manifest and every image with Great Expectations; write a Data Docs report
    to <artifacts>/validation and, when the data passes, the manifest. Exit 1 when it fails."""
    from bonefrac.data import mura
    from bonefrac.data.validate import validate
    from bonefrac.stages import run_validate, validation_options

    settings = _settings(ctx, **{"paths.data": data})
    if manifest_csv is None:
        result = run_validate(settings)
        for problem in result.problems:
            click.echo(f"warning: {problem}", err=True)
        success, summary, report = result.success, result.summary, result.report_path
    else:
        frame = mura.read_manifest(manifest_csv)
        data_dir = mura.find_mura_root(settings.paths.data).parent
        checked = validate(
            frame,
            data_dir,
            settings.data.parts,
            settings.layout.validation,
            other_parts=settings.data.other_parts,
            **validation_options(settings),
        )
        success, summary, report = checked.success, checked.summary(), checked.report_path
    click.echo(summary)
    click.echo(f"report: {report or settings.layout.validation}")
    if not success:
        click.echo("data failed validation: fix the rows named above and rerun", err=True)
        ctx.exit(1)


@cli.command("stage")
@click.argument(
    "name", type=click.Choice(["validate", "preprocess", "fit_pca", "train", "evaluate"])
)
@click.pass_context
def stage_command(ctx: click.Context, name: str) -> None:
    """Run one pipeline stage with the current settings (what `dvc repro` calls)."""
    from bonefrac.stages import get_stage

    settings = _settings(ctx)
    result = get_stage(name).run(settings)
    if name == "validate":
        click.echo(result.summary)
        if not result.success:
            click.echo(f"data failed validation; report: {result.report_path}", err=True)
            ctx.exit(1)
    click.echo(f"stage {name}: done")


@cli.command("dvc-yaml")
@click.option("--check", is_flag=True, help="Exit 1 if dvc.yaml differs instead of writing it.")
@click.pass_context
def dvc_yaml_command(ctx: click.Context, check: bool) -> None:
    """Write dvc.yaml from the stage list in src/bonefrac/stages.py."""
    import yaml

    from bonefrac.config import find_params
    from bonefrac.stages import dvc_yaml

    params_path = (ctx.find_root().obj or {}).get("params") or find_params()
    if params_path is None:
        raise UserError("params.yaml not found: run this in the project folder")
    project = Path(params_path).resolve().parent
    settings = _settings(ctx)
    text = dvc_yaml(settings, project, yaml.safe_load(Path(params_path).read_text()))
    target = project / "dvc.yaml"
    if check:
        if not target.is_file() or target.read_text() != text:
            click.echo("dvc.yaml is out of date: run `bonefrac dvc-yaml`", err=True)
            ctx.exit(1)
        click.echo("dvc.yaml is up to date")
        return
    target.write_text(text)
    click.echo(f"wrote {target}")


@cli.command("train")
@click.option(
    "--model",
    "models",
    multiple=True,
    help="Model(s) to train: body_part or a part (elbow, hand, shoulder). Default: all.",
)
@click.pass_context
def train_command(ctx: click.Context, models: tuple[str, ...]) -> None:
    """Train the body-part and fracture ResNet50s from the preprocessed cache, tracked in
    MLflow (one parent run, a nested run per model)."""
    from bonefrac.train import model_names, run_train_stage

    settings = _settings(ctx)
    known = model_names(settings)
    unknown = [m for m in models if m not in known]
    if unknown:
        raise UserError(f"unknown model {unknown[0]!r}: choose from {', '.join(known)}")
    results = run_train_stage(settings, list(models) or None)
    for name, result in results.items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in result.val_metrics.items())
        click.echo(f"{name}: best epoch {result.best_epoch}; val {shown}")
        if settings.train.strategy == "multi_worker":  # each worker's share, to see all took part
            rows = len(result.rows_read)
            click.echo(f"{name}: this worker ran {result.steps} steps on {rows} training images")


@cli.command("evaluate")
@click.pass_context
def evaluate_command(ctx: click.Context) -> None:
    """Evaluate every trained model on the test split (MURA valid) and end to end; print the
    comparison table. Study-level metrics follow the MURA protocol."""
    from bonefrac.evaluate.stage import run_evaluate_stage

    summary = run_evaluate_stage(_settings(ctx))
    click.echo((summary.out_dir / "comparison.md").read_text())
    click.echo(f"reports in {summary.out_dir}")


_AGE_GROUP_OPTION = click.option(
    "--age-group",
    type=click.Choice(["adult", "child", "unknown"]),
    default="unknown",
    show_default=True,
    help="The patient's age group: child adds the paediatric warnings and radiologist review.",
)


@cli.command("recommend")
@click.option(
    "--part",
    required=True,
    help="Body part: elbow, hand or shoulder (MURA names such as XR_ELBOW work too).",
)
@click.option(
    "--finding",
    required=True,
    type=click.Choice(["fracture", "no_fracture", "uncertain"]),
    help="The model's finding for the study.",
)
@click.option("--probability", required=True, type=float, help="Model fracture probability, 0-1.")
@click.option(
    "--threshold",
    type=float,
    default=0.5,
    show_default=True,
    help="Decision threshold the finding was made at.",
)
@click.option("--ood", is_flag=True, help="The image was flagged out of distribution.")
@_AGE_GROUP_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON (as the service returns it).")
@click.option(
    "--knowledge",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A hospital's own knowledge YAML (same schema; default: serve.knowledge, else the "
    "packaged one).",
)
@click.pass_context
def recommend_command(
    ctx: click.Context,
    part: str,
    finding: str,
    probability: float,
    threshold: float,
    ood: bool,
    age_group: str,
    as_json: bool,
    knowledge: Path | None,
) -> None:
    """Print the sourced treatment recommendation for a model result (decision support for
    clinicians; not a diagnosis)."""
    import json

    from bonefrac.recommend import load_knowledge, recommend

    if knowledge is None:
        knowledge = _settings(ctx).serve.knowledge
    kb = load_knowledge(knowledge)
    context = {"ood": ood, "age_group": age_group}
    result = recommend(part, finding, probability, context, threshold=threshold, knowledge=kb)
    text = json.dumps(result.model_dump(mode="json"), indent=2) if as_json else result.to_text()
    click.echo(text, nl=as_json)


def _import_flows(settings):
    """flows/ sits at the project root (orchestration, not library code)."""
    import os

    # Prefect's ephemeral API (no server needed) migrates its database on first start, which
    # takes longer than Prefect's 20 s default on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    root = str(settings.paths.project)
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        from flows import retrain
    except ImportError as exc:
        raise UserError(f"cannot import flows/retrain.py from {root}: {exc}") from None
    return retrain


@cli.command("pipeline")
@data_option
@click.pass_context
def pipeline_command(ctx: click.Context, data: Path | None) -> None:
    """Run the whole retraining flow once (Prefect): version data, validate, check drift,
    preprocess, fit PCA, train, evaluate, register, package, promote."""

    settings = _settings(ctx, **{"paths.data": data})
    flows = _import_flows(settings)
    obj = ctx.find_root().obj or {}
    summary = flows.retrain(
        profile=obj.get("profile"),
        data=str(settings.paths.data),
        params=str(obj["params"]) if obj.get("params") else None,
    )
    from bonefrac.console import where_to_look

    report, experiment = summary.get("validation_report"), summary.get("experiment_id")
    click.echo(where_to_look(settings, report, experiment))


@cli.command("ui")
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option("--print-command", is_flag=True, help="Print the command instead of running it.")
@click.pass_context
def ui_command(ctx: click.Context, port: int, print_command: bool) -> None:
    """Start the MLflow UI on this project's store (paths.mlflow_db, paths.mlflow_artifacts):
    the experiment's runs, their dataset inputs, metrics, artifacts and the registry."""
    import os
    import shlex

    from bonefrac.tracking import experiment_id, mlflow_ui_command, mlflow_ui_url

    settings = _settings(ctx)
    command = mlflow_ui_command(settings, port)
    if print_command:
        click.echo(shlex.join(command))
        return
    url = mlflow_ui_url(port, experiment_id(settings))
    click.echo(f"MLflow UI: open {url} once it has started (Ctrl-C stops it)")
    sys.stdout.flush()
    os.execv(command[0], command)  # become the server: Ctrl-C and SIGTERM reach it


@cli.command("schedule")
@click.option(
    "--cron", default="0 3 * * 1", show_default=True, help="When to retrain (cron syntax, UTC)."
)
@click.pass_context
def schedule_command(ctx: click.Context, cron: str) -> None:
    """Serve the retraining flow on a schedule from this machine (Ctrl-C stops). For a
    Prefect server and workers, use prefect.yaml (`prefect deploy`)."""
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError:
        raise UserError(f'invalid cron expression {cron!r}: e.g. "0 3 * * 1"') from None
    settings = _settings(ctx)
    flows = _import_flows(settings)
    obj = ctx.find_root().obj or {}
    flows.retrain.serve(  # the flow applies pipeline.task_runner itself, as for a deployment
        name="bonefrac-scheduled",
        cron=cron,
        parameters={
            "profile": obj.get("profile"),
            "params": str(obj["params"]) if obj.get("params") else None,
        },
    )


@cli.group("champion")
def champion_group() -> None:
    """Move a model's `champion` alias by hand. Each move pins the champion (the automatic
    gate keeps it until `unpin`) and records who, when and why on the version."""


_reason_option = click.option(
    "--reason", required=True, help="Why the champion is moved by hand (recorded on the version)."
)


def _move_champion(ctx: click.Context, model: str, version: str, reason: str, action: str):
    from bonefrac.champion import set_champion

    click.echo(set_champion(_settings(ctx), model, version, reason, action=action))


@champion_group.command("pin")
@click.argument("model")
@click.argument("version")
@_reason_option
@click.pass_context
def champion_pin(ctx: click.Context, model: str, version: str, reason: str) -> None:
    """Make VERSION of MODEL (body_part, elbow, hand, shoulder) the pinned champion."""
    _move_champion(ctx, model, version, reason, "pin")


@champion_group.command("rollback")
@click.argument("model")
@click.argument("version")
@_reason_option
@click.pass_context
def champion_rollback(ctx: click.Context, model: str, version: str, reason: str) -> None:
    """Move MODEL's champion back to an older VERSION, pinned there."""
    _move_champion(ctx, model, version, reason, "rollback")


@champion_group.command("unpin")
@click.argument("model")
@_reason_option
@click.pass_context
def champion_unpin(ctx: click.Context, model: str, reason: str) -> None:
    """Let the gate decide MODEL's champion again (the champion stays where it is)."""
    from bonefrac.champion import unpin

    click.echo(unpin(_settings(ctx), model, reason))


SHUTDOWN_GRACE_S = 20  # `bonefrac serve`: seconds in-flight requests get after SIGTERM

_BUNDLE_OPTION = click.option(
    "--bundle",
    type=click.Path(path_type=Path),
    default=None,
    help="A packaged bundle folder to use (serve: imported into the BentoML model store first).",
)


@cli.command("serve")
@click.option("--host", default=None, help="Interface to listen on (default: serve.host).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Default: serve.port.")
@_BUNDLE_OPTION
@click.pass_context
def serve_command(ctx: click.Context, host: str | None, port: int | None, bundle: Path | None):
    """Start the BentoML service (bonefrac:latest from the model store): the upload page on
    http://HOST:PORT/, POST /predict, /predict_study, /predict_batch, GET /healthz, /readyz,
    /metrics. Ctrl-C or SIGTERM stops it."""
    import os

    from bonefrac.config import find_params
    from bonefrac.console import page_url

    settings = _settings(ctx)
    from bonefrac.recommend.engine import load_knowledge, require_reviewed

    # the guidance the service will serve: validated and approved (or allowed) before it starts
    knowledge = settings.serve.knowledge
    require_reviewed(load_knowledge(knowledge), settings.serve.allow_unreviewed, "serve")
    if bundle is not None:
        from bonefrac.bundle import save_to_bentoml
        from bonefrac.data.mura import body_part_name

        parts = [body_part_name(p) for p in settings.data.parts]
        tag = save_to_bentoml(bundle, parts=parts)
        click.echo(f"imported {bundle} into the BentoML model store as {tag}")
    else:
        _stored_bundle()  # one line now rather than a traceback from the server
    env = dict(os.environ)
    root = ctx.find_root().obj or {}
    params = root.get("params") or find_params()
    if params:
        env["BONEFRAC_PARAMS"] = str(Path(params).resolve())  # the service reads serve.* there
    if root.get("profile"):
        env["BONEFRAC_PROFILE"] = root["profile"]  # so the service sees --profile's serve.*
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    host, port = host or settings.serve.host, port or settings.serve.port
    command = [sys.executable, "-m", "bentoml", "serve", "bonefrac.serving.service:BonefracService"]
    page = page_url(host, port)
    click.echo(f"serving the page on {page} (open it once {page}readyz answers 200)")
    sys.stdout.flush()
    sys.stderr.flush()
    # Become the server (same PID): SIGTERM/SIGINT from systemd, a supervisor or `kill` reach
    # BentoML itself, which stops its workers and frees the port; no orphan keeps serving.
    # In-flight requests get SHUTDOWN_GRACE_S to finish after the signal.
    grace = ["--timeout-graceful-shutdown", str(SHUTDOWN_GRACE_S)]
    os.execve(sys.executable, [*command, "--host", host, "--port", str(port), *grace], env)


@cli.command("predict")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--explain", is_flag=True, help="Add the Grad-CAM heatmap (base64 PNG overlay).")
@click.option(
    "--allow-ood",
    is_flag=True,
    help="Analyse images that do not look like elbow/hand/shoulder radiographs anyway.",
)
@_AGE_GROUP_OPTION
@click.option(
    "--body-part",
    type=click.Choice(
        ["elbow", "hand", "shoulder", "wrist", "finger", "forearm", "humerus", "other"]
    ),
    default=None,
    help="The part imaged (default: the model decides). One the models do not cover answers "
    "out_of_scope; one the model disagrees with is flagged and the finding is uncertain.",
)
@_BUNDLE_OPTION
@click.pass_context
def predict_command(
    ctx: click.Context,
    images: tuple[Path, ...],
    explain: bool,
    allow_ood: bool,
    age_group: str,
    body_part: str | None,
    bundle: Path | None,
) -> None:
    """Print the service's JSON for IMAGE (PNG, JPEG or DICOM); several IMAGEs are one study.
    Decision support for clinicians; not a diagnosis."""
    import json
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from bonefrac.bundle import read_bundle
    from bonefrac.config import PreprocessConfig
    from bonefrac.imaging import preprocess_bytes
    from bonefrac.serving.predictor import Predictor

    settings = _settings(ctx)
    limits = settings.serve
    if bundle is not None:
        folder, source = bundle, None
    else:
        stored = _stored_bundle()
        folder, source = Path(stored.path), str(stored.tag)
    preprocess_cfg = PreprocessConfig(**read_bundle(folder)["preprocess"])
    data = []
    for path in images:  # every file checked before the models spend seconds loading
        try:
            data.append(path.read_bytes())
            preprocess_bytes(
                data[-1],
                preprocess_cfg,
                max_pixels=limits.max_pixels,
                min_side=limits.min_side,
                max_bytes=int(limits.max_upload_mb * 1_000_000),
            )
        except OSError as exc:
            raise UserError(f"{path} cannot be read ({exc.strerror}): check the path") from None
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None
    predictor = Predictor.from_bundle(folder, limits, source=source, warm_up=False)
    options = {
        "explain": explain,
        "allow_ood": allow_ood,
        "age_group": age_group,
        "body_part": body_part,
    }
    if len(data) == 1:
        result = predictor.predict_bytes(data[0], **options)
    else:
        result = predictor.predict_study(data, **options)
    click.echo(json.dumps(result, indent=2))


def _stored_bundle():
    """bonefrac:latest from the BentoML model store, or a one-line UserError."""
    import bentoml

    try:
        return bentoml.models.get("bonefrac:latest")
    except bentoml.exceptions.NotFound:
        raise UserError(
            "no bonefrac model in the BentoML model store: pass --bundle DIR (a packaged "
            "bundle folder) or package the models first"
        ) from None


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="bonefrac")


if __name__ == "__main__":
    sys.exit(main())
