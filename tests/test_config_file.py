"""The agent's config file (`shoal.config`): every problem located, flags over the file
over the defaults, `--print-config` with sources, and SIGHUP reloading the log level in
a running agent."""

from __future__ import annotations

import io
import pathlib
import re
import signal
import textwrap
from collections.abc import Iterator

import pytest
import structlog
import typer
from shoal.cli.main import app
from typer.testing import CliRunner

from shoal import config
from shoal.errors import ConfigError
from shoal.logs import LogLevelGate
from tests.cluster import DevAgent
from tests.helpers import wait_until


def _write(tmp_path: pathlib.Path, text: str, name: str = "agent.yaml") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def _problems(path: pathlib.Path) -> list[str]:
    with pytest.raises(config.ConfigFileError) as info:
        config.load_file(path)
    return [str(p) for p in info.value.problems]


# --------------------------------------------------------------------------- loading


def test_a_full_file_loads_with_the_line_of_every_key(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path, """
        # a server of three
        server: yes
        bootstrap_expect: 3
        join: [198.18.0.1, "198.18.0.2:7421"]
        bind: 0.0.0.0
        advertise: 198.18.0.3
        grpc_port: 7500
        gossip_port: 7501
        metrics_port: 0
        data_dir: /var/lib/shoal
        node_name: "007"
        labels: {zone: eu-1, disk: ssd}
        drivers: process
        log_level: debug
        log_json: true
        dev: false
        seed: 7
        scheduler_sample_size: 8
        scheduler_sample_threshold: 100
        scheduler_spread_hosts: 2
    """)
    got = config.load_file(path)
    assert got == {
        "server": (True, 2), "bootstrap_expect": (3, 3), "join": (("198.18.0.1", "198.18.0.2:7421"), 4),
        "bind": ("0.0.0.0", 5), "advertise": ("198.18.0.3", 6), "grpc_port": (7500, 7), "gossip_port": (7501, 8),
        "metrics_port": (0, 9), "data_dir": (pathlib.Path("/var/lib/shoal"), 10), "node_name": ("007", 11),
        "labels": ((("disk", "ssd"), ("zone", "eu-1")), 12), "drivers": (("process",), 13),
        "log_level": ("debug", 14), "log_json": (True, 15), "dev": (False, 16), "seed": (7, 17),
        "scheduler_sample_size": (8, 18), "scheduler_sample_threshold": (100, 19), "scheduler_spread_hosts": (2, 20),
    }
    assert {k.name for k in config.KEYS} == set(got)


@pytest.mark.parametrize("text", ["", "# nothing set\n", "---\n", "~\n"])
def test_an_empty_file_sets_nothing(tmp_path: pathlib.Path, text: str) -> None:
    assert config.load_file(_write(tmp_path, text)) == {}


def test_null_means_the_default(tmp_path: pathlib.Path) -> None:
    assert config.load_file(_write(tmp_path, "node_name:\njoin: ~\nserver: true\n")) == {"server": (True, 3)}


def test_every_problem_at_once_each_with_file_line_and_key(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path, """
        server: "true"
        bootstrap-expect: 3
        grpc_port: "7420"
        gossip_port: 70000
        data_dir: var/lib/shoal
        join: [198.18.0.1, 7421]
        labels:
          zone: 1
          rack: r1
        drivers: [docker, podman]
        log_level: verbose
        frobnicate: 1
        server: false
        node_name: 12
        advertise: [a, b]
    """)
    p = str(path)
    assert _problems(path) == [
        f'{p}:1: server: must be true or false, got "true" (a string); remove the quotes',
        f'{p}:2: bootstrap-expect: unknown key; did you mean "bootstrap_expect"?',
        f'{p}:3: grpc_port: must be an integer, got "7420" (a string); remove the quotes',
        f"{p}:4: gossip_port: must be between 0 and 65535, got 70000",
        f'{p}:5: data_dir: must be an absolute path, got "var/lib/shoal"',
        f"{p}:6: join: each item must be a non-empty string, got 7421 (an integer)",
        f'{p}:8: labels.zone: must be a string, got 1 (an integer); quote it ("...") if a string is meant',
        f'{p}:10: drivers: unknown value "podman"; use docker or process',
        f'{p}:11: log_level: unknown value "verbose"; use debug, info, warning or error',
        f"{p}:12: frobnicate: unknown key; the keys are dev, server, bootstrap_expect, join, bind, advertise, "
        "grpc_port, gossip_port, metrics_port, data_dir, node_name, labels, drivers, scheduler_sample_size, "
        "scheduler_sample_threshold, scheduler_spread_hosts, log_level, log_json",
        f"{p}:13: server: given twice (first on line 1)",
        f'{p}:14: node_name: must be a string, got 12 (an integer); quote it ("...") if a string is meant',
        f"{p}:15: advertise: must be a string, got a list",
    ]


@pytest.mark.parametrize(("text", "expected"), [
    ("server: true\n  bind: x\n", ":2: not valid YAML: mapping values are not allowed here"),
    ("server: [true\n", ":2: not valid YAML:"),
    ("- server\n", ":1: must be a mapping of settings (key: value), one per line"),
    ("just words\n", ":1: must be a mapping of settings"),
    ("server: true\n---\nbind: x\n", ":2: not valid YAML: expected a single document in the stream but found another document"),
    ("? [a]\n: 1\n", ":1: keys must be plain names"),
    ("grpc-port: 1\n", ': grpc-port: unknown key; did you mean "grpc_port"?'),
    ("label: {a: b}\n", ': label: unknown key; did you mean "labels"?'),
    ("driver: docker\n", ': driver: unknown key; did you mean "drivers"?'),
    ("bootstrap_expect: true\n", ": bootstrap_expect: must be an integer, got true (a boolean)"),
    ("bootstrap_expect: 12\n", ": bootstrap_expect: must be between 0 and 9, got 12"),
    ("labels: [a]\n", ": labels: must be a mapping of strings to strings, got a list"),
    ("labels: {a: b, a: c}\n", ": labels.a: given twice"),
    ("server: !!python/object:os.system x\n", ": server: cannot be read"),
    ("data_dir: 5\n", ": data_dir: must be an absolute path, got 5 (an integer)"),
])
def test_each_problem_is_located(tmp_path: pathlib.Path, text: str, expected: str) -> None:
    (problem,) = _problems(_write(tmp_path, text))
    assert problem.startswith(str(tmp_path / "agent.yaml")) and expected in problem, problem


def test_an_unreadable_file_is_one_sentence(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read the config file .*missing.yaml: No such file or directory"):
        config.load_file(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- precedence


def test_flags_win_over_the_file_which_wins_over_the_default(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path, "server: true\njoin: [198.18.0.1, 198.18.0.2]\ngrpc_port: 7500\nlabels: {zone: a}\n")
    s = config.resolve({"grpc_port": 7600, "join": ["198.18.0.9"], "label": ["rack=r1"]}, path)
    assert s["server"] is True and s.items["server"].origin == f"{path}:1"
    assert s["grpc_port"] == 7600 and s.items["grpc_port"].origin == "flag --grpc-port"
    # A repeatable flag replaces the file's list; it does not add to it.
    assert s["join"] == ("198.18.0.9",) and s.items["join"].origin == "flag --join"
    assert s["labels"] == (("rack", "r1"),) and s.items["labels"].origin == "flag --label"
    assert s["gossip_port"] == 7421 and s.items["gossip_port"].origin == "default"
    assert s["drivers"] == ("docker", "process")


def test_no_file_means_the_defaults(tmp_path: pathlib.Path) -> None:
    s = config.resolve({}, None)
    assert {k: s[k.name] for k in config.KEYS} == {k: k.default for k in config.KEYS}
    assert {s.items[k.name].origin for k in config.KEYS} == {"default"}


def test_which_file_is_read(tmp_path: pathlib.Path) -> None:
    default = tmp_path / "etc" / "agent.yaml"
    assert config.config_path(None, dev=False, default=default) is None  # absent: none
    default.parent.mkdir()
    default.write_text("server: true\n")
    assert config.config_path(None, dev=False, default=default) == default
    assert config.config_path(None, dev=True, default=default) is None  # --dev keeps to itself
    explicit = tmp_path / "other.yaml"
    assert config.config_path(explicit, dev=True, default=default) == explicit


def test_bad_flag_values_are_one_sentence() -> None:
    with pytest.raises(ConfigError, match='--label must be KEY=VALUE, got "zone"'):
        config.resolve({"label": ["zone"]}, None)
    with pytest.raises(ConfigError, match='--log-level must be debug, info, warning or error, got "loud"'):
        config.resolve({"log_level": "loud"}, None)


def test_a_cross_field_error_says_where_the_file_set_it(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path, "join: [198.18.0.1]\nbootstrap_expect: 3\n")
    s = config.resolve({"bind": "0.0.0.0"}, path)
    msg = s.explain("--bootstrap-expect is for servers: add --server")
    assert msg == f"--bootstrap-expect is for servers: add --server (bootstrap_expect is set in {path}:2)"
    # A flag-given value needs no pointer; a flag that is a prefix of another is not matched.
    assert s.explain("--bind 0.0.0.0 listens on every address") == "--bind 0.0.0.0 listens on every address"


def test_the_rendered_settings_load_back_as_the_same_settings(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path, "server: true\njoin: 198.18.0.1\nlabels: {zone: 'eu 1', n: '7'}\ndata_dir: /srv/s\n")
    s = config.resolve({"node_name": "a: b", "driver": ["process"], "seed": 3}, path)
    again = config.load_file(_write(tmp_path, s.render(), "rendered.yaml"))
    assert {k: v for k, (v, _) in again.items()} == {k.name: s[k.name] for k in config.KEYS}


# --------------------------------------------------------------------------- the CLI


def _agent_params() -> dict[str, object]:
    command = typer.main.get_command(app)
    agent = command.commands["agent"]  # type: ignore[attr-defined]
    return {p.name: p.default for p in agent.params}


def test_every_agent_flag_has_a_key_with_the_flags_default() -> None:
    params = _agent_params()
    assert set(params) - {"config", "print_config"} == {k.param for k in config.KEYS}
    for key in config.KEYS:
        if key.param in ("join", "label", "driver"):
            assert params[key.param] is None  # repeatable: the key holds the default
        else:
            assert params[key.param] == key.default, key.name


def test_print_config_shows_each_value_and_where_it_came_from(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path, "# comment\nserver: true\njoin: [198.18.0.1]\nbind: 0.0.0.0\nadvertise: 198.18.0.2\n"
                            "data_dir: /srv/shoal\n")
    result = CliRunner().invoke(app, ["agent", "--config", str(path), "--print-config", "--grpc-port", "7500"])
    assert result.exit_code == 0, result.output
    rows = dict(re.findall(r"^(\w+): .*?\s+# (.*)$", result.stdout, flags=re.M))
    assert rows["server"] == f"{path}:2"
    assert rows["join"] == f"{path}:3"
    assert rows["grpc_port"] == "flag --grpc-port"
    assert rows["gossip_port"] == "default"
    assert re.search(r"^grpc_port: 7500 ", result.stdout, flags=re.M)
    assert re.search(r"^data_dir: /srv/shoal ", result.stdout, flags=re.M)
    assert "seed" not in rows  # a test knob, shown only when set


def test_print_config_without_a_file_shows_defaults_and_flags() -> None:
    result = CliRunner().invoke(app, ["agent", "--dev", "--print-config"])
    assert result.exit_code == 0, result.output
    assert "the config file (none read)" in result.stdout
    assert re.search(r"^dev: true +# flag --dev$", result.stdout, flags=re.M)
    assert re.search(r"^data_dir: /.*shoal/dev +# default$", result.stdout, flags=re.M)


def test_an_invalid_combination_is_shown_then_refused(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path, "bootstrap_expect: 3\njoin: [198.18.0.1]\n")
    result = CliRunner().invoke(app, ["agent", "--config", str(path), "--print-config"])
    assert result.exit_code == 1
    assert "bootstrap_expect: 3" in result.stdout
    assert f"--bootstrap-expect is for servers: add --server (bootstrap_expect is set in {path}:1)" in result.stderr


def test_a_bad_file_stops_the_agent_with_every_problem(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path, "server: 1\nfoo: 2\n")
    result = CliRunner().invoke(app, ["agent", "--config", str(path)])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"{path}:1: server: must be true or false, got 1 (an integer)",
        f"{path}:2: foo: unknown key; the keys are dev, server, bootstrap_expect, join, bind, advertise, grpc_port, "
        "gossip_port, metrics_port, data_dir, node_name, labels, drivers, scheduler_sample_size, "
        "scheduler_sample_threshold, scheduler_spread_hosts, log_level, log_json",
        "error: 2 problem(s) in the config file; the agent did not start",
    ]


def test_a_missing_config_file_is_an_error(tmp_path: pathlib.Path) -> None:
    result = CliRunner().invoke(app, ["agent", "--config", str(tmp_path / "nope.yaml"), "--print-config"])
    assert result.exit_code == 1
    assert "cannot read the config file" in result.stderr


# --------------------------------------------------------------------------- reloading


@pytest.fixture
def structlog_to_buffer() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.KeyValueRenderer(key_order=["event"])],
        wrapper_class=structlog.make_filtering_bound_logger(20),
        logger_factory=structlog.PrintLoggerFactory(file=buf),
        cache_logger_on_first_use=True,
    )
    yield buf
    structlog.reset_defaults()


def test_the_log_level_gate_moves_loggers_already_bound(structlog_to_buffer: io.StringIO) -> None:
    gate = LogLevelGate("warning")
    gate.install()
    log = structlog.get_logger("x").bind(node="n1")  # bound before the reload, as the agent's are
    log.info("hidden.1")
    log.warning("shown.1")
    gate.set("debug")
    log.debug("shown.2")
    gate.set("error")
    log.warning("hidden.2")
    log.error("shown.3")
    events = re.findall(r"event='([\w.]+)'", structlog_to_buffer.getvalue())
    assert events == ["shown.1", "shown.2", "shown.3"]
    with pytest.raises(ConfigError, match="unknown log level"):
        gate.set("loud")


@pytest.mark.e2e
def test_sighup_reloads_the_log_level_and_names_what_needs_a_restart(tmp_path: pathlib.Path) -> None:
    conf = _write(tmp_path, "log_level: info\n")
    agent = DevAgent(tmp_path / "data", mode=("--server",), extra_args=("--config", str(conf), "--driver", "process"))
    try:
        agent.start(timeout=60)

        def logged(event: str) -> bool:
            return f"event={event}" in agent.log() or f'event="{event}"' in agent.log()

        wait_until(lambda: logged("agent.ready"), 10, what="agent.ready in the log")
        # Quieter, plus a change that only a restart can apply (a flag-given value is not
        # one: flags win, so the file's grpc_port does not change the effective setting).
        conf.write_text("log_level: warning\nlabels: {zone: b}\ngrpc_port: 1\n")
        agent.signal(signal.SIGHUP)
        wait_until(lambda: logged("agent.reload_needs_restart"), 10, what="the reload warning")
        assert "changed=['labels']" in agent.log() or 'changed="[\'labels\']"' in agent.log(), agent.log()
        assert not logged("agent.reloaded")  # info: below the new level
        # A broken file changes nothing and says why.
        conf.write_text("log_level: [\n")
        agent.signal(signal.SIGHUP)
        wait_until(lambda: logged("agent.reload_failed"), 10, what="the reload error")
        # Back to info: the confirmation shows again.
        conf.write_text("log_level: info\n")
        agent.signal(signal.SIGHUP)
        wait_until(lambda: logged("agent.reloaded"), 10, what="agent.reloaded at info")
        assert agent.proc is not None and agent.proc.poll() is None  # SIGHUP never stops it
    finally:
        agent.stop()
        agent.cleanup_workloads()
    assert agent.proc is not None and agent.proc.returncode == 0, agent.log()
