"""T9's correctness side: what an idle client agent loads, and the `shoal agent` command
line that reaches it without the CLI framework.

- A client agent started as `python -m shoal agent`, connected to a server and idle,
  has never imported the server-only modules (Raft, the replicated store and SQLite,
  the controllers), the CLI framework (typer, rich, pydantic) or requests' encoding
  guessers; with the process driver alone, not the Docker SDK either. The list is read
  from inside the agent at its exit, by a `sitecustomize` on its PYTHONPATH; nothing
  else about its start differs.
- `shoal.agent.command.parse` hands over exactly what typer would for the flags it
  takes, and declines (None) whatever typer must handle itself.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import typing
from typing import Any

import pytest
import typer

from shoal import config as settings_file
from shoal.agent.command import OPTIONS, OptionKind, parse
from shoal.cli.main import agent as agent_command
from shoal.cli.main import app
from tests.cluster import ROOT, DevAgent
from tests.helpers import free_port, wait_until

# Never in a client agent: the server's half, the CLI framework, the extras of its
# libraries it has no use for (shoal.agent.command). (`import grpc` itself imports the bare
# `grpc_reflection` package as a shim; the reflection service is its `v1alpha`.)
FORBIDDEN = (
    "shoal.leader", "sqlite3", "_sqlite3", "grpc_reflection.v1alpha",
    "typer", "click", "rich", "pygments", "pydantic", "pydantic_core", "charset_normalizer", "chardet",
)
# ...and with the process driver alone, not the docker driver's SDK either.
DOCKER = ("docker", "requests", "urllib3", "shoal.agent.runtime.docker")

_DUMP_MODULES = """\
import atexit, os, sys

def _dump() -> None:
    with open(os.environ["SHOAL_TEST_MODULES_OUT"], "w") as f:
        f.write("\\n".join(sorted(name for name, mod in sys.modules.items() if mod is not None)))

atexit.register(_dump)
"""


def _matching(modules: list[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in prefixes))


@pytest.mark.e2e
@pytest.mark.parametrize("driver", ["process", pytest.param("docker", marks=pytest.mark.docker)])
def test_an_idle_client_agent_loads_no_server_or_cli_modules_and_docker_only_for_its_driver(
        tmp_path: pathlib.Path, driver: str) -> None:
    if driver == "docker":
        docker = pytest.importorskip("docker")
        try:
            docker.from_env().ping()
        except Exception as exc:  # noqa: BLE001
            pytest.skip(f"Docker Engine not reachable: {exc}")
    server = DevAgent(tmp_path / "server", mode=("--server",), extra_args=("--driver", "process"))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_DUMP_MODULES)
    out = tmp_path / "modules.txt"
    log_path = tmp_path / "client.log"
    client: subprocess.Popen[bytes] | None = None
    try:
        server.start(timeout=60)
        env = {**os.environ, "PYTHONPATH": str(hook), "SHOAL_TEST_MODULES_OUT": str(out)}
        with open(log_path, "wb") as log:
            client = subprocess.Popen(
                [sys.executable, "-m", "shoal", "agent", "--join", f"127.0.0.1:{server.gossip_port}",
                 "--driver", driver, "--data-dir", str(tmp_path / "client"), "--grpc-port", str(free_port()),
                 "--gossip-port", str(free_port()), "--metrics-port", str(free_port()),
                 "--node-name", f"{server.node}-client", "--config", "/dev/null"],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

        def client_log() -> str:
            return log_path.read_text(errors="replace")

        def connected() -> bool:
            assert client is not None
            if client.poll() is not None:
                raise AssertionError(f"the client agent exited with {client.returncode}:\n{client_log()}")
            # The leader's first assignment set arrived: the watch stream is up, the
            # client is in its steady state.
            return "agent.assignments" in client_log()

        wait_until(connected, 60, interval=0.2, what="the client agent to hear from the leader")
        client.send_signal(signal.SIGTERM)
        assert client.wait(timeout=30) == 0, client_log()
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        server.stop()
    modules = out.read_text().split()
    assert "shoal.agent.main" in modules  # the dump saw the agent
    assert _matching(modules, FORBIDDEN) == []
    if driver == "process":
        assert "shoal.agent.runtime.process" in modules
        assert _matching(modules, DOCKER) == []
    else:
        assert "shoal.agent.runtime.docker" in modules  # the SDK is there when it is used


# --------------------------------------------------------------------------- the parser


def _typer_invocation(argv: list[str]) -> tuple[dict[str, Any], Any, bool]:
    """What the typer command hands its body for `shoal agent ARGV`."""
    command = typer.main.get_command(app).commands["agent"]  # type: ignore[attr-defined]
    ctx = command.make_context("agent", list(argv))
    given = {
        key.param: ctx.params[key.param]
        for key in settings_file.KEYS
        if getattr(ctx.get_parameter_source(key.param), "name", "") == "COMMANDLINE"
    }
    return given, ctx.params["config"], ctx.params["print_config"]


@pytest.mark.parametrize("argv", [
    [],
    ["--dev"],
    ["--server", "--bootstrap-expect", "3", "--join", "10.0.0.1", "--join", "10.0.0.2:7421", "--bind", "0.0.0.0",
     "--advertise", "10.0.0.3"],
    ["--join=h1", "--grpc-port=7500", "--gossip-port", "7501", "--metrics-port", "0", "--data-dir", "/srv/shoal"],
    ["--data-dir=rel/dir", "--node-name", "n1", "--label", "zone=a", "--label=disk=ssd", "--driver", "process"],
    ["--log-json", "--log-level", "debug", "--seed", "7", "--config", "/dev/null", "--print-config"],
    ["--grpc-port", "1", "--grpc-port", "2", "--dev", "--dev"],  # the last value wins; a switch twice is on
    ["--log-level", "loud", "--driver", "podman"],  # typer takes any string; the settings refuse them later
    ["--node-name", ""],
])
def test_the_fast_parser_hands_over_what_typer_does(argv: list[str]) -> None:
    got = parse(argv)
    assert got is not None
    given, config, print_config = _typer_invocation(argv)
    assert got.given == given
    assert (got.config, got.print_config) == (config, print_config)


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["-h"],
    ["--dev=true"],  # a switch with a value: typer's usage error
    ["--grpc-port"],  # no value
    ["--grpc-port", "x"],
    ["--grpc-port", "+7"],
    ["--grpc-port", "-1"],
    ["--bind", "--dev"],  # an option where the value should be
    ["--data-dir", ""],
    ["--no-such-flag"],
    ["--dev", "extra"],  # a positional argument
    ["--", "--dev"],
    ["--grpc", "7420"],  # no abbreviations
])
def test_the_fast_parser_leaves_anything_else_to_typer(argv: list[str]) -> None:
    assert parse(argv) is None


def test_the_fast_parser_knows_every_flag_of_the_typer_command() -> None:
    command = typer.main.get_command(app).commands["agent"]  # type: ignore[attr-defined]
    hints = typing.get_type_hints(agent_command)
    kinds = {bool: OptionKind.SWITCH, int: OptionKind.INT, int | None: OptionKind.INT, str: OptionKind.STR,
             pathlib.Path | None: OptionKind.PATH, list[str] | None: OptionKind.LIST}
    typer_flags = {(tuple(p.opts), tuple(p.secondary_opts)): (p.name, kinds[hints[p.name]])
                   for p in command.params if p.name != "help"}
    ours = {((o.flag,), ()): (o.param, o.kind) for o in OPTIONS}
    assert ours == typer_flags
