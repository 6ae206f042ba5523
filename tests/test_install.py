"""deploy/: the install script, the systemd unit and the Vagrantfile, checked as an
operator would meet them.

The install runs for real into a `--prefix` directory: a virtualenv made with
`python -m venv`, shoal installed into it with pip, every file laid down. To stay fast
and offline it installs a wheel of this checkout built once per module, with pip's
`--no-deps --no-index` (shoal's dependencies are the one thing the venv lacks; the
smoke test lends it the test environment's through PYTHONPATH). A second run must
change nothing at all: same files, modes, sizes, mtimes.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator
from typing import Any

import pytest

from shoal import config

REPO = pathlib.Path(__file__).resolve().parents[1]
INSTALL = REPO / "deploy" / "install.sh"
UNIT = REPO / "deploy" / "systemd" / "shoal-agent.service"
VAGRANT_DIR = REPO / "deploy" / "vagrant"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]

# A client host as the netns test cluster lays it out (h2 joining the server h1).
FLAGS = ["--client", "--join", "198.18.0.1", "--join", "198.18.0.3:7421", "--advertise", "198.18.0.2",
         "--node-name", "h2", "--label", "zone=eu-1", "--label", "disk=ssd", "--driver", "process"]


def _run(*args: str | os.PathLike[str], env: dict[str, str] | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, **kw)


def _install(prefix: pathlib.Path, *args: str | os.PathLike[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return _run("bash", INSTALL, "--prefix", prefix, *args, **kw)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A wheel of this checkout, built from a copy (the tree stays clean). Offline with
    the test environment's setuptools when it can build wheels by itself (>= 70.1);
    otherwise in pip's isolated build environment, as `pip install .` does."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("shoal", "agent", "leader", "cli"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q", "-w", out, src]
    try:
        major, minor = (int(x) for x in importlib.metadata.version("setuptools").split(".")[:2])
        offline = (major, minor) >= (70, 1)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        offline = False
    result = _run(*build, "--no-build-isolation") if offline else _run(*build)
    assert result.returncode == 0, result.stderr
    (built,) = out.glob("shoal-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One install into a fresh prefix, and what a second run with the same flags did."""
    prefix = tmp_path_factory.mktemp("prefix")
    args = [*FLAGS, "--from", wheel, "--python", _base_python(), "--pip-option=--no-deps", "--pip-option=--no-index"]
    first = _install(prefix, *args)
    assert first.returncode == 0, first.stdout + first.stderr
    before = _snapshot(prefix)
    second = _install(prefix, *args)
    assert second.returncode == 0, second.stdout + second.stderr
    yield {"prefix": prefix, "first": first, "second": second, "before": before, "after": _snapshot(prefix)}


def _base_python() -> str:
    """The interpreter behind the test venv (what `python3` is on a host)."""
    base = pathlib.Path(sys._base_executable)  # noqa: SLF001 - the documented way to reach it
    return str(base if base.exists() else sys.executable)


def _snapshot(root: pathlib.Path) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = pathlib.Path(dirpath) / name
            st = p.lstat()
            link = os.readlink(p) if p.is_symlink() else None
            size = st.st_size if stat.S_ISREG(st.st_mode) else 0
            mtime = st.st_mtime_ns if not stat.S_ISDIR(st.st_mode) else 0
            out[str(p.relative_to(root))] = (stat.filemode(st.st_mode), size, mtime, link)
    return out


# --------------------------------------------------------------------------- the files


def test_every_file_it_lays_down(installed: dict[str, Any]) -> None:
    prefix: pathlib.Path = installed["prefix"]
    venv = prefix / "opt/shoal/venv"
    # Nothing but these outside the virtualenv.
    outside = sorted(k for k in installed["before"] if not k.startswith("opt/shoal/venv/"))
    assert outside == sorted([
        "etc", "etc/shoal", "etc/shoal/agent.yaml", "etc/systemd", "etc/systemd/system",
        "etc/systemd/system/shoal-agent.service", "opt", "opt/shoal", "opt/shoal/venv",
        "usr", "usr/local", "usr/local/bin", "usr/local/bin/shoal", "var", "var/lib", "var/lib/shoal",
    ])

    # The virtualenv, with this version of shoal in it.
    assert os.access(venv / "bin/python", os.X_OK) and os.access(venv / "bin/shoal", os.X_OK)
    assert (venv / "pyvenv.cfg").is_file()
    got = _run(venv / "bin/python", "-I", "-c", "import importlib.metadata as m; print(m.version('shoal'))")
    assert got.stdout.strip() == VERSION, got.stderr
    # `shoal` on the PATH.
    link = prefix / "usr/local/bin/shoal"
    assert link.is_symlink() and os.readlink(link) == str(venv / "bin/shoal")
    # State: private to the agent.
    data = prefix / "var/lib/shoal"
    assert data.is_dir() and stat.S_IMODE(data.stat().st_mode) == 0o750 and not any(data.iterdir())

    # The unit, pointing into the prefix.
    unit = prefix / "etc/systemd/system/shoal-agent.service"
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    expected = UNIT.read_text().replace("/opt/shoal/", f"{prefix}/opt/shoal/")
    expected = expected.replace("/etc/shoal/", f"{prefix}/etc/shoal/").replace("/var/lib/shoal", f"{prefix}/var/lib/shoal")
    assert unit.read_text() == expected
    assert f"ExecStart={venv}/bin/shoal agent --config {prefix}/etc/shoal/agent.yaml" in expected

    # The settings, from the flags.
    conf = prefix / "etc/shoal/agent.yaml"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o640
    values = {k: v for k, (v, _line) in config.load_file(conf).items()}
    assert values == {
        "server": False, "join": ("198.18.0.1", "198.18.0.3:7421"), "bind": "0.0.0.0", "advertise": "198.18.0.2",
        "node_name": "h2", "labels": (("disk", "ssd"), ("zone", "eu-1")), "drivers": ("process",), "data_dir": data,
    }


def test_the_config_it_writes_documents_every_key(installed: dict[str, Any]) -> None:
    text = (installed["prefix"] / "etc/shoal/agent.yaml").read_text()
    written = set(re.findall(r"^(?:# )?([a-z_]+):", text, flags=re.M))
    assert written >= {k.name for k in config.KEYS if not k.hidden}


def test_it_says_what_it_did_and_what_to_run_next(installed: dict[str, Any]) -> None:
    prefix = installed["prefix"]
    out = installed["first"].stdout
    for line in (f"created    {prefix}/opt/shoal/venv", f"installed  shoal {VERSION}", f"wrote      {prefix}/etc/shoal/agent.yaml",
                 f"created    {prefix}/var/lib/shoal", f"linked     {prefix}/usr/local/bin/shoal",
                 f"installed  {prefix}/etc/systemd/system/shoal-agent.service", "skipped    systemd: --prefix"):
        assert line in out, out
    assert out.rstrip().endswith(f"next:\n  {prefix}/usr/local/bin/shoal agent --config {prefix}/etc/shoal/agent.yaml"), out


def test_a_second_run_changes_nothing(installed: dict[str, Any]) -> None:
    assert installed["after"] == installed["before"]
    lines = [ln.strip() for ln in installed["second"].stdout.splitlines()]
    done = lines[1:lines.index("next:")]
    assert done and all(ln.startswith(("unchanged", "skipped")) for ln in done), installed["second"].stdout


@pytest.fixture
def another_host(installed: dict[str, Any], tmp_path: pathlib.Path) -> pathlib.Path:
    """A copy of the installed prefix without its agent.yaml: the install steps that
    follow reuse the virtualenv (its version is the wanted one) and run in a second."""
    prefix = tmp_path / "p"
    shutil.copytree(installed["prefix"], prefix, symlinks=True)
    (prefix / "etc/shoal/agent.yaml").unlink()
    link = prefix / "usr/local/bin/shoal"
    link.unlink()
    link.symlink_to(prefix / "opt/shoal/venv/bin/shoal")
    unit = prefix / "etc/systemd/system/shoal-agent.service"
    unit.write_text(unit.read_text().replace(str(installed["prefix"]), str(prefix)))
    return prefix


def test_a_server_config_from_the_flags(another_host: pathlib.Path) -> None:
    result = _install(another_host, "--server", "--bootstrap-expect", "3", "--join", "198.18.0.1", "--bind", "198.18.0.2",
                      "--python", _base_python(), "--driver", "process")
    assert result.returncode == 0, result.stderr
    assert "unchanged  shoal" in result.stdout and "wrote      " in result.stdout
    values = {k: v for k, (v, _line) in config.load_file(another_host / "etc/shoal/agent.yaml").items()}
    assert values == {"server": True, "bootstrap_expect": 3, "join": ("198.18.0.1",), "bind": "198.18.0.2",
                      "drivers": ("process",), "data_dir": another_host / "var/lib/shoal"}


def test_an_existing_config_is_never_overwritten(another_host: pathlib.Path) -> None:
    conf = another_host / "etc/shoal/agent.yaml"
    conf.write_text("server: false\njoin: [198.18.0.99]\n")
    result = _install(another_host, "--client", "--join", "198.18.0.1", "--advertise", "198.18.0.2",
                      "--driver", "process", "--python", _base_python())
    assert result.returncode == 0, result.stderr
    assert conf.read_text() == "server: false\njoin: [198.18.0.99]\n"
    assert f"kept       {conf} as it is" in result.stdout


def test_the_installed_shoal_runs_and_reads_the_file(installed: dict[str, Any]) -> None:
    prefix = installed["prefix"]
    conf = prefix / "etc/shoal/agent.yaml"
    # The venv was installed with --no-deps: lend it the test environment's dependencies.
    deps = sysconfig.get_paths()["purelib"]
    result = _run(prefix / "usr/local/bin/shoal", "agent", "--config", conf, "--print-config", "--grpc-port", "7500",
                  env={"PYTHONPATH": deps})
    assert result.returncode == 0, result.stderr
    lines = {ln.split(":", 1)[0]: ln for ln in result.stdout.splitlines() if not ln.startswith("#")}
    assert re.fullmatch(rf"server: false +# {re.escape(str(conf))}:\d+", lines["server"])
    assert re.fullmatch(r"grpc_port: 7500 +# flag --grpc-port", lines["grpc_port"])
    assert re.fullmatch(r"gossip_port: 7421 +# default", lines["gossip_port"])
    assert re.fullmatch(rf"data_dir: {re.escape(str(prefix))}/var/lib/shoal +# .*agent.yaml:\d+", lines["data_dir"])


# --------------------------------------------------------------------------- a host in a cluster


@pytest.mark.netns
@pytest.mark.e2e
def test_an_installed_host_joins_a_cluster_and_runs_a_replica(installed: dict[str, Any]) -> None:
    """h2 of a netns cluster is the host installed above, started as systemd would
    start it (the unit's ExecStart, no flags); h1 is the harness's server."""
    from tests.netns import NetnsCluster, NetnsError, NetnsUnavailable, require_netns, whoami_binary

    try:
        require_netns()
        whoami = whoami_binary()
    except (NetnsUnavailable, NetnsError) as exc:
        pytest.skip(str(exc))
    prefix = installed["prefix"]
    exec_start = re.search(r"^ExecStart=(.*)$", (prefix / "etc/systemd/system/shoal-agent.service").read_text(),
                           flags=re.M)
    assert exec_start is not None
    cluster = NetnsCluster(2, agents=False)
    try:
        cluster.up()
        cluster.start_agent("h1")
        log = open(prefix / "h2.log", "wb")  # noqa: SIM115 - the agent writes to it until teardown
        cluster.popen("h2", *exec_start.group(1).split(), stdout=log, stderr=subprocess.STDOUT,
                      env={"PYTHONPATH": sysconfig.get_paths()["purelib"]}, cwd=prefix / "var/lib/shoal")
        log.close()
        try:
            cluster.wait_ready(timeout=30)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nh2 (installed):\n{(prefix / 'h2.log').read_text()}") from None
        node = next(n for n in cluster.get_json("nodes") if n["name"] == "h2")
        assert node["address"] == "198.18.0.2" and node["role"] == "client", node
        # Placed on h2 by the label the install wrote into agent.yaml.
        r = cluster.cli("apply", "-f", "-", input=_pinned_deployment(whoami))
        assert r.code == 0, r.err

        def ready_on_h2() -> list[dict[str, Any]]:
            pods = cluster.get_json("pods")
            return pods if len(pods) == 1 and pods[0].get("ready") and pods[0]["node"] == "h2" else []

        (pod,) = wait_until_ready(ready_on_h2)
        assert cluster.http_get("h1", "198.18.0.2", int(pod["host_port"])).strip() == pod["name"]
        assert (prefix / "var/lib/shoal" / "processes").is_dir()  # the replica's state, in the data dir
    finally:
        cluster.close()


def wait_until_ready(fn: Any) -> Any:
    from tests.helpers import wait_until

    return wait_until(fn, 30, interval=0.3, what="the replica ready on h2")


def _pinned_deployment(whoami: pathlib.Path) -> str:
    return f"""\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: pinned
  annotations: {{shoal.io/driver: process}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: pinned}}}}
  template:
    metadata: {{labels: {{app: pinned}}}}
    spec:
      nodeSelector: {{zone: eu-1}}
      containers:
      - name: whoami
        command: ["{whoami}"]
        ports: [{{containerPort: 8080}}]
"""


# --------------------------------------------------------------------------- refusals


def _fake_python(tmp_path: pathlib.Path, version: str) -> pathlib.Path:
    fake = tmp_path / "python3"
    fake.write_text(f"#!/bin/sh\ncase \"$*\" in *platform*) echo {version};; *) exit 1;; esac\n")
    fake.chmod(0o755)
    return fake


def _path_without(tmp_path: pathlib.Path, *names: str) -> str:
    """A PATH with every command of this one but `names`."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if not d or not os.path.isdir(d) or "pyenv" in d:
            continue
        for entry in os.scandir(d):
            target = bin_ / entry.name
            if entry.name not in names and not target.exists() and os.access(entry.path, os.X_OK):
                target.symlink_to(entry.path)
    return str(bin_)


def test_missing_prerequisites_are_all_named_and_nothing_is_touched(tmp_path: pathlib.Path) -> None:
    prefix = tmp_path / "prefix"
    path = _path_without(tmp_path, "docker", "dockerd")
    result = _install(prefix, "--client", "--join", "198.18.0.1", "--python", _fake_python(tmp_path, "3.9.18"),
                      "--version", "0.0.1", "--from", REPO, env={"PATH": path})
    assert result.returncode == 1
    assert "Python 3.11 or newer" in result.stderr and "is 3.9.18" in result.stderr
    assert "Docker Engine, for the docker driver: apt-get install docker.io" in result.stderr
    assert f"shoal 0.0.1: {REPO} is shoal {VERSION}" in result.stderr
    assert not prefix.exists()


def test_the_process_driver_alone_needs_no_docker(tmp_path: pathlib.Path) -> None:
    path = _path_without(tmp_path, "docker", "dockerd")
    result = _install(tmp_path / "prefix", "--client", "--join", "198.18.0.1", "--driver", "process",
                      "--python", _fake_python(tmp_path, "3.9.18"), env={"PATH": path})
    assert result.returncode == 1 and "Docker" not in result.stderr and "Python 3.11" in result.stderr


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed")
def test_without_prefix_it_needs_root(tmp_path: pathlib.Path) -> None:
    result = _run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", INSTALL,
                  "--client", "--join", "198.18.0.1", "--driver", "process")
    assert result.returncode == 1 and "root: run it as root" in result.stderr, result.stderr


@pytest.mark.parametrize(("args", "message"), [
    ([], "say --server or --client"),
    (["--client"], "a client needs --join HOST"),
    (["--client", "--join", "h", "--bootstrap-expect", "3"], "--bootstrap-expect is for servers"),
    (["--server", "--bootstrap-expect", "three"], "--bootstrap-expect must be a number of servers"),
    (["--server", "--driver", "podman"], "--driver must be docker or process"),
    (["--server", "--label", "zone"], "--label must be KEY=VALUE"),
    (["--server", "--client"], "--server and --client exclude each other"),
    (["--server", "--frobnicate"], "unknown option --frobnicate"),
])
def test_flag_errors(tmp_path: pathlib.Path, args: list[str], message: str) -> None:
    result = _install(tmp_path / "prefix", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "prefix").exists()


# --------------------------------------------------------------------------- the unit


def _unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_the_unit_keeps_workloads_and_restarts_the_agent() -> None:
    s = _unit_settings()
    assert s["KillMode"] == ["process"]  # a stop must not take the replicas with it
    assert s["Restart"] == ["always"] and float(s["RestartSec"][0]) >= 1
    assert s["StartLimitIntervalSec"] == ["0"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert int(s["LimitNOFILE"][0]) >= 65536
    for dep in ("network-online.target", "docker.service"):
        assert dep in s["After"][0].split() and dep in s["Wants"][0].split()
    assert s["ExecStart"] == ["/opt/shoal/venv/bin/shoal agent --config /etc/shoal/agent.yaml"]
    assert s["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing: apt-get install systemd")
def test_systemd_analyze_verify_accepts_the_unit(installed: dict[str, Any]) -> None:
    # The installed copy: its ExecStart exists, which verify checks.
    unit = installed["prefix"] / "etc/systemd/system/shoal-agent.service"
    result = _run("systemd-analyze", "verify", unit)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result.stderr


# --------------------------------------------------------------------------- Vagrant


@pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant missing: apt-get install vagrant")
def test_vagrant_validate_accepts_the_vagrantfile(tmp_path: pathlib.Path) -> None:
    # --ignore-provider: no VirtualBox or libvirt here; the rest of the file is checked.
    result = _run("vagrant", "validate", "--ignore-provider", "--machine-readable", cwd=VAGRANT_DIR,
                  env={"VAGRANT_CHECKPOINT_DISABLE": "1", "VAGRANT_HOME": str(tmp_path / "vagrant.d")})
    assert result.returncode == 0, result.stdout + result.stderr
    machines = re.findall(r"^\d+,([a-z0-9]+),metadata,provider,", result.stdout, flags=re.M)
    assert machines == ["server1", "server2", "server3", "client1", "client2"]
    vagrantfile = (VAGRANT_DIR / "Vagrantfile").read_text()
    assert '"debian/bookworm64"' in vagrantfile and "private_network" in vagrantfile
    assert "--server --bootstrap-expect #{SERVERS.size} --join #{SEED}" in vagrantfile
