"""The `shoal agent` command: its argument parsing for the command line, and its body.

Why it exists: the rest of the `shoal` CLI is built on typer, which brings rich and
pydantic: about 8 MiB that an agent process would keep resident for its whole life (T9:
an idle client agent <= 60 MB). So the console script (`shoal.cli.main`) hands
`shoal agent ...` to `route()` before it imports typer, and the agent starts without it.

Rules:
- Same behaviour either way. `parse()` accepts only the plain forms of the agent's own
  flags: `--flag`, `--option VALUE`, `--option=VALUE`, repeatable options repeated,
  an option given twice keeping its last value, integers as plain decimal digits. For
  anything else -- `--help`, an unknown flag, a switch with a value, a value that starts
  with `-` or is not plain digits, an empty path, a positional argument -- it returns
  None and the typer command handles the arguments as it always has (its help text,
  its usage errors, its value conversions). `OPTIONS` mirrors the typer command's
  parameters; a test holds the two together.
- `run()` is the command's body, shared by both paths: the flags given (by parameter
  name, what typer calls a COMMANDLINE source) over the config file over the defaults,
  `--print-config`, logging, then the agent until SIGINT or SIGTERM. Errors are one
  sentence on stderr and exit status 1.
- Once the fast path is taken, two optional extras of libraries the agent uses are made
  unimportable for the process (`_UNUSED_EXTRAS`), each a few MiB resident for nothing:
  `rich`, which structlog imports when present for pretty tracebacks a logfmt agent
  never prints; and `charset_normalizer`/`chardet`, which requests (under the docker
  SDK) imports to guess the encoding of a response that names none -- the Docker API
  answers JSON, which needs no guess, and requests falls back to UTF-8 without them.

This module imports only the standard library at the top: `shoal.cli.main` imports it
first thing for every command.
"""

from __future__ import annotations

import os
import pathlib
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

__all__ = ["OPTIONS", "Invocation", "Option", "OptionKind", "agent_config", "parse", "route", "run"]


class OptionKind(Enum):
    SWITCH = "switch"  # present: True
    INT = "int"
    STR = "str"
    PATH = "path"
    LIST = "list"  # repeatable; the values in order


@dataclass(frozen=True, slots=True)
class Option:
    flag: str
    param: str  # `shoal agent`'s parameter name (shoal.config.Key.param)
    kind: OptionKind


OPTIONS: tuple[Option, ...] = (
    Option("--dev", "dev", OptionKind.SWITCH),
    Option("--server", "server", OptionKind.SWITCH),
    Option("--join", "join", OptionKind.LIST),
    Option("--bootstrap-expect", "bootstrap_expect", OptionKind.INT),
    Option("--bind", "bind", OptionKind.STR),
    Option("--advertise", "advertise", OptionKind.STR),
    Option("--grpc-port", "grpc_port", OptionKind.INT),
    Option("--gossip-port", "gossip_port", OptionKind.INT),
    Option("--metrics-port", "metrics_port", OptionKind.INT),
    Option("--data-dir", "data_dir", OptionKind.PATH),
    Option("--node-name", "node_name", OptionKind.STR),
    Option("--label", "label", OptionKind.LIST),
    Option("--driver", "driver", OptionKind.LIST),
    Option("--scheduler-sample-size", "scheduler_sample_size", OptionKind.INT),
    Option("--scheduler-sample-threshold", "scheduler_sample_threshold", OptionKind.INT),
    Option("--scheduler-spread-hosts", "scheduler_spread_hosts", OptionKind.INT),
    Option("--log-json", "log_json", OptionKind.SWITCH),
    Option("--log-level", "log_level", OptionKind.STR),
    Option("--seed", "seed", OptionKind.INT),
    Option("--config", "config", OptionKind.PATH),
    Option("--print-config", "print_config", OptionKind.SWITCH),
)
_BY_FLAG = {o.flag: o for o in OPTIONS}
_UNUSED_EXTRAS = ("rich", "charset_normalizer", "chardet")
# Not settings: they say where settings come from and what to do with them.
_COMMAND_PARAMS = ("config", "print_config")


@dataclass(frozen=True, slots=True, kw_only=True)
class Invocation:
    """One `shoal agent` command line: the settings given as flags, and the rest."""

    given: dict[str, Any]  # by parameter name, as typer would hand them over
    config: pathlib.Path | None = None
    print_config: bool = False


def parse(argv: Sequence[str]) -> Invocation | None:
    """The arguments after `shoal agent`, or None when typer must handle them."""
    values: dict[str, Any] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        flag, eq, inline = arg.partition("=")
        option = _BY_FLAG.get(flag)
        if option is None:
            return None  # --help, an unknown flag, a positional argument, `--`
        if option.kind is OptionKind.SWITCH:
            if eq:
                return None  # "--dev=1": typer says a switch takes no value
            values[option.param] = True
            continue
        if eq:
            value = inline
        elif i < len(args):
            value = args[i]
            i += 1
        else:
            return None  # typer says the option needs a value
        if value.startswith("-"):
            return None  # an option where a value should be, or a negative number
        if option.kind is OptionKind.LIST:
            values.setdefault(option.param, []).append(value)
        elif option.kind is OptionKind.INT:
            if not (value.isascii() and value.isdigit()):
                return None
            values[option.param] = int(value)
        elif option.kind is OptionKind.PATH:
            if not value:
                return None
            values[option.param] = pathlib.Path(value)
        else:
            values[option.param] = value
    config = values.pop("config", None)
    print_config = bool(values.pop("print_config", False))
    return Invocation(given=values, config=config, print_config=print_config)


def route(module_name: str) -> None:
    """Run `shoal agent ...` here and exit, when this process is the `shoal` command
    and the arguments are ones `parse` takes; return otherwise (every other command,
    `shoal agent --help`, a usage error, or an import of `shoal.cli.main` as a library).

    `module_name` is the importing module's `__name__`.
    """
    if sys.argv[1:2] != ["agent"] or not _is_shoal_command(module_name):
        return
    invocation = parse(sys.argv[2:])
    if invocation is None:
        return
    # Before anything imports structlog or requests (see the module docstring); an entry
    # set to None is how Python spells "this module cannot be imported".
    for name in _UNUSED_EXTRAS:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    # requests says at import that it found no encoding guesser; that is the point.
    warnings.filterwarnings("ignore", message="Unable to find acceptable character detection dependency")
    raise SystemExit(run(invocation))


def _is_shoal_command(module_name: str) -> bool:
    """Whether the process was started as `shoal` (the console script), `python -m
    shoal` or `python -m shoal.cli.main`, rather than importing the CLI as a library."""
    if module_name == "__main__":
        return True
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None:
        return spec.name in ("shoal.__main__", "shoal")
    return os.path.basename(getattr(main, "__file__", "") or "") == "shoal"


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def agent_config(settings: Any) -> tuple[Any, Any]:
    """The settings (with the per-user data dir filled in) and the `AgentConfig` they make."""
    from shoal.agent.main import AgentConfig, default_data_dir

    if settings["data_dir"] is None:
        settings = settings.replace("data_dir", default_data_dir(settings["dev"]))
    return settings, AgentConfig(
        dev=settings["dev"],
        server=settings["server"],
        join=settings["join"],
        bootstrap_expect=settings["bootstrap_expect"],
        bind=settings["bind"],
        advertise=settings["advertise"],
        grpc_port=settings["grpc_port"],
        gossip_port=settings["gossip_port"],
        metrics_port=settings["metrics_port"],
        data_dir=settings["data_dir"],
        node_name=settings["node_name"],
        labels=settings["labels"],
        drivers=settings["drivers"],
        scheduler_sample_size=settings["scheduler_sample_size"],
        scheduler_sample_threshold=settings["scheduler_sample_threshold"],
        scheduler_spread_hosts=settings["scheduler_spread_hosts"],
        seed=settings["seed"],
    )


def run(invocation: Invocation) -> int:
    """`shoal agent`: print the settings, or run the agent until it is stopped. Returns
    the exit status."""
    from shoal import config as settings_file
    from shoal.errors import ConfigError, ShoalError

    given = invocation.given

    def load() -> Any:
        # Run again on SIGHUP: the same flags over the file as it is now.
        return settings_file.resolve(given, settings_file.config_path(invocation.config, dev=bool(given.get("dev"))))

    try:
        settings = load()
    except settings_file.ConfigFileError as exc:
        for p in exc.problems:
            print(str(p), file=sys.stderr)
        return _fail(f"{len(exc.problems)} problem(s) in the config file; the agent did not start")
    except ConfigError as exc:
        return _fail(str(exc))
    settings, config = agent_config(settings)
    if invocation.print_config:
        sys.stdout.write(settings.render())
        sys.stdout.flush()
        try:
            config.validate()
        except ConfigError as exc:
            return _fail(settings.explain(str(exc)))
        return 0

    import asyncio

    import structlog

    from shoal.agent.main import run as run_agent
    from shoal.logs import configure

    gate = configure(json=settings["log_json"], level=settings["log_level"])

    def reload() -> Any:
        # The log level is the one setting applied in place; `run_agent` names the others.
        fresh, fresh_config = agent_config(load())
        gate.set(fresh["log_level"])
        if fresh["log_json"] != settings["log_json"]:
            structlog.get_logger("shoal").warning("agent.reload_needs_restart", changed=["log_json"])
        return fresh_config

    try:
        config.validate()
        _install_uvloop()
        asyncio.run(run_agent(config, reload=reload))
    except ConfigError as exc:
        return _fail(settings.explain(str(exc)))
    except ShoalError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        pass
    return 0


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()
