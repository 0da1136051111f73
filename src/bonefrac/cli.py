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
    ctx.obj = {"params": params, "profile": profile}


@cli.command()
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder holding MURA-v1.1/ (or the MURA-v1.1 folder itself). Default: paths.data.",
)
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
@click.option("--patients", type=click.IntRange(min=2), default=24, show_default=True,
              help="Patients per body part and MURA split (train gets this many, valid half).")
@click.option("--size", type=click.IntRange(min=32, max=2048), default=256, show_default=True,
              help="Typical image side in pixels (sizes vary around it).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.pass_context
def demo_data(ctx: click.Context, out: Path | None, patients: int, size: int, seed: int) -> None:
    """Generate a SYNTHETIC MURA-like dataset (exact MURA-v1.1 layout and CSVs) for the demo
    and the tests. Not real radiographs; its numbers say nothing about real performance."""
    from bonefrac.data import synthetic

    settings = _settings(ctx)
    out = out or settings.paths.data
    root = synthetic.generate(out, patients=patients, size=size, seed=seed)
    click.echo(f"synthetic MURA written to {root}")


@cli.command("validate")
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder holding MURA-v1.1/ (or the MURA-v1.1 folder itself). Default: paths.data.",
)
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
    and validation.json to <artifacts>/validation. Exit 1 when the data fails."""
    from bonefrac.data import mura
    from bonefrac.data.validate import validate

    settings = _settings(ctx, **{"paths.data": data})
    if manifest_csv is not None:
        frame, data_dir = mura.read_manifest(manifest_csv), settings.paths.data
        if not (data_dir / "MURA-v1.1").is_dir() and data_dir.name == "MURA-v1.1":
            data_dir = data_dir.parent  # paths in the manifest start with MURA-v1.1/
    else:
        built = mura.build_manifest(settings.paths.data, settings.data)
        frame, data_dir = built.frame, built.data_dir
    out_dir = settings.paths.artifacts / "validation"
    result = validate(frame, data_dir, settings.data.parts, out_dir)
    click.echo(result.summary())
    click.echo(f"report: {result.report_path or out_dir}")
    if not result.success:
        click.echo("data failed validation: fix the rows named above and rerun", err=True)
        ctx.exit(1)


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
@click.option("--json", "as_json", is_flag=True, help="Print JSON (as the service returns it).")
def recommend_command(
    part: str, finding: str, probability: float, threshold: float, ood: bool, as_json: bool
) -> None:
    """Print the sourced treatment recommendation for a model result (decision support for
    clinicians; not a diagnosis)."""
    import json

    from bonefrac.recommend import recommend

    result = recommend(part, finding, probability, {"ood": ood}, threshold=threshold)
    text = json.dumps(result.model_dump(mode="json"), indent=2) if as_json else result.to_text()
    click.echo(text, nl=as_json)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="bonefrac")


if __name__ == "__main__":
    sys.exit(main())
