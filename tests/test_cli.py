"""CLI conventions: --help everywhere, exit codes 0/1/2, `TypeName: message` on errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from typer.testing import CliRunner

from sheetanchor import __version__
from sheetanchor.cli import app


def test_version_and_help() -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["version"]).output.strip() == __version__
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0
    for command in ("demo", "wait"):
        assert command in top.output
        sub = runner.invoke(app, [command, "--help"])
        assert sub.exit_code == 0, sub.output
        assert "Example" in sub.output or "e.g." in sub.output


def test_demo_lists_drills_and_rejects_unknown_ones() -> None:
    runner = CliRunner()
    listed = runner.invoke(app, ["demo", "--list"])
    assert listed.exit_code == 0
    assert "001" in listed.output
    unknown = runner.invoke(app, ["demo", "--only", "999"])
    assert unknown.exit_code == 2
    assert "unknown drill" in unknown.output


def test_errors_print_type_and_message_not_a_traceback() -> None:
    # A malformed URL is a ConfigError raised inside the command: a usage error, exit 2.
    proc = subprocess.run(
        [sys.executable, "-m", "sheetanchor", "wait", "--pg", "mysql://x@y/z", "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "ConfigError: unsupported URL scheme" in proc.stderr
    assert "Traceback" not in proc.stderr


_WAIT_UNREACHABLE = [sys.executable, "-m", "sheetanchor", "wait", "--pg", "postgresql://u@h:1/x"]


def test_nan_or_zero_timeout_is_a_usage_error_not_an_endless_wait() -> None:
    for bad in ("nan", "0", "inf"):
        proc = subprocess.run(
            [*_WAIT_UNREACHABLE, "--timeout", bad],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 2, (bad, proc.stderr)
        assert "timeout" in proc.stderr


def test_demo_json_stdout_is_only_json_even_with_logging_on() -> None:
    env = {**os.environ, "SHEETANCHOR_LOG_LEVEL": "INFO"}
    proc = subprocess.run(
        [sys.executable, "-m", "sheetanchor", "demo", "--only", "001", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["passed"] is True
    assert [d["drill"] for d in doc["drills"]] == ["001"]
    assert "not ready" in proc.stderr, "INFO logs went to stderr"
