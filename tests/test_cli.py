"""The `shoal` command's surface: what --help lists, and the error when no agent answers."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

from typer.testing import CliRunner

from shoal.cli.main import app

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> set[str]:
    """The commands in the README's "CLI in a screenful" block: `shoal <command> ...`."""
    text = README.read_text()
    section = text.split("## The CLI in a screenful", 1)[1]
    block = section.split("```", 2)[1]
    return {m.group(1) for m in re.finditer(r"^shoal ([a-z-]+)", block, re.MULTILINE)}


def test_help_lists_the_commands_the_readme_names() -> None:
    expected = readme_commands()
    assert {"apply", "get", "describe", "delete", "scale", "logs", "events", "agent"} <= expected
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    listed = set(re.findall(r"^│ ([a-z-]+)\s", result.output, re.MULTILINE)) or set(
        re.findall(r"^\s{2}([a-z-]+)\s{2,}", result.output, re.MULTILINE)
    )
    missing = expected - listed
    assert not missing, f"README names commands --help does not list: {sorted(missing)}\n{result.output}"


def test_unreachable_server_is_one_sentence_and_exit_1() -> None:
    env = {k: v for k, v in os.environ.items() if k != "SHOAL_ADDR"}
    proc = subprocess.run(
        [sys.executable, "-m", "shoal", "get", "pods", "--addr", "127.0.0.1:1"],
        capture_output=True, timeout=30, env=env,
    )
    assert proc.returncode == 1
    assert proc.stderr.decode() == "error: cannot reach shoal at 127.0.0.1:1 — is 'shoal agent --dev' running?\n"
    assert proc.stdout == b""
