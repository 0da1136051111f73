"""The CLI as a person uses it: a real subprocess, exit codes, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from bonefrac.cli import cli

from .mura_fixture import expected_images, make_mura


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bonefrac.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
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
