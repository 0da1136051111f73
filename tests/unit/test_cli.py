"""The CLI as a person uses it: a real subprocess, exit codes, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from bonefrac.cli import cli

from .mura_fixture import expected_images, make_mura


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    # MLflow's set_tracking_uri exports MLFLOW_TRACKING_URI, so an earlier in-process test can
    # leave it set; the CLI under test must see only what each test gives it.
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "MLFLOW_TRACKING_URI" and not k.startswith("BONEFRAC_")
    }
    return subprocess.run(
        [sys.executable, "-m", "bonefrac.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("manifest", "demo-data"):
        assert command in result.stdout


def test_manifest_command_writes_csv_and_prints_counts(tmp_path, project_root):
    make_mura(tmp_path / "mura")
    out = tmp_path / "manifest.csv"
    result = CliRunner().invoke(
        cli,
        [
            "--params",
            str(project_root / "params.yaml"),
            "manifest",
            "--data",
            str(tmp_path / "mura"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert out.is_file()
    assert len(out.read_text().splitlines()) == expected_images() + 1
    assert "abnormal" in result.output and f"{expected_images()} images" in result.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["manifest", "--data", "/definitely/not/here"], "not found"),
        (["--profile", "huge", "manifest"], "unknown profile"),
    ],
)
def test_user_errors_are_one_line_exit_2(args, expected, tmp_path, project_root):
    result = run_cli("--params", str(project_root / "params.yaml"), *args, cwd=tmp_path)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_option_exits_2_without_traceback(tmp_path):
    result = run_cli("manifest", "--no-such-option", cwd=tmp_path)
    assert result.returncode == 2
    assert "No such option" in result.stderr and "Traceback" not in result.stderr


def test_wrong_layout_is_one_line(tmp_path, project_root):
    (tmp_path / "empty").mkdir()
    result = run_cli(
        "--params",
        str(project_root / "params.yaml"),
        "manifest",
        "--data",
        str(tmp_path / "empty"),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "does not contain MURA-v1.1" in result.stderr


def test_ui_command_points_mlflow_at_the_projects_store(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("paths: {mlflow_db: runs/store.db, mlflow_artifacts: runs/files}\n")
    result = run_cli("--params", str(params), "ui", "--print-command", "--port", "5123")
    assert result.returncode == 0, result.stderr
    command = result.stdout.split()
    assert command[1:4] == ["-m", "mlflow", "ui"]
    assert command[command.index("--backend-store-uri") + 1] == (
        f"sqlite:///{(tmp_path / 'runs/store.db').resolve()}"
    )
    assert command[command.index("--default-artifact-root") + 1] == (
        (tmp_path / "runs/files").resolve().as_uri()
    )
    assert command[command.index("--port") + 1] == "5123"


def test_ui_command_refuses_a_remote_tracking_server(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("tracking: {tracking_uri: 'http://mlflow.internal:5000'}\n")
    result = run_cli("--params", str(params), "ui", "--print-command")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "bonefrac: error: runs are tracked at http://mlflow.internal:5000, not in a local "
        "store: open that server's UI instead"
    ]


def test_every_command_starts_with_the_tools_quietened(tmp_path, monkeypatch):
    from bonefrac.console import QUIET_ENV

    for name in QUIET_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")  # the user's own choice is kept
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    result = CliRunner().invoke(cli, ["--params", str(params), "ui", "--print-command"])
    assert result.exit_code == 0, result.output
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
