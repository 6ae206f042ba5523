"""The agent's config file, `/etc/shoal/agent.yaml`: loading, checking, and where each
setting came from.

Rules
-----
- Every `shoal agent` flag has a key: the flag's name with `_` for `-`
  (`--bootstrap-expect` is `bootstrap_expect`), except the repeatable ones, whose keys
  are plural: `--label K=V` is the mapping `labels`, `--driver` the list `drivers`.
  `join` takes a list of seeds or one seed. `KEYS` is the table; its defaults are the
  flags' defaults (a test holds the two together).
- Precedence: a flag given on the command line wins over the file, and the file wins
  over the default. A repeatable flag replaces the file's whole list (`--join B` with
  `join: [A]` in the file joins B only): merging would leave no way to drop a seed.
- A key that is not in `KEYS`, a value of the wrong type, a key given twice, a file
  that is not a YAML mapping: each is a `ConfigProblem` with file, line and key, and all
  of them are raised at once as one `ConfigFileError` — the way manifest errors are.
  Types are YAML's: `grpc_port: "7420"` is a string, not a port; `true`/`false` for
  switches. A null value means the key is absent (the default applies).
- `data_dir` in a file must be absolute: the agent's working directory (`/` under
  systemd) is no place to resolve a relative one.
- The default file, `DEFAULT_PATH`, is read only when it exists, and never by `--dev`:
  a dev agent is the embedded one-process cluster, and a host's agent.yaml (its real
  cluster, its data dir) has no business in it. `--config PATH` is always read and must
  exist.
- Cross-field rules (`--bootstrap-expect` needs `--server`, a wildcard `--bind` needs
  `--advertise`) stay in `AgentConfig.validate`; `Settings.explain` adds to its message
  where a file-given value came from.

How it works
------------
`load_file` composes the YAML into nodes with PyYAML's `SafeLoader` (nothing but plain
values is ever constructed), so every key and value keeps its line; each value is
checked by its key's `Kind`. `resolve` layers flags over the file over `KEYS` defaults
into `Settings`: one `Setting(value, source)` per key. `Settings.render` is what
`shoal agent --print-config` prints: a valid agent.yaml, each line commented with its
source, so the output can itself become a config file.

Reloading: the log level is the one setting a running agent changes on SIGHUP (see
`shoal.agent.main.run`), through the gate `shoal.logs.configure` returns.
"""

from __future__ import annotations

import difflib
import enum
import json
import pathlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from shoal.errors import ConfigError
from shoal.logs import LOG_LEVELS

__all__ = [
    "DEFAULT_PATH",
    "KEYS",
    "ConfigFileError",
    "ConfigProblem",
    "Key",
    "Kind",
    "Setting",
    "Settings",
    "Source",
    "config_path",
    "load_file",
    "resolve",
]

DEFAULT_PATH = pathlib.Path("/etc/shoal/agent.yaml")

# An agent.yaml is a screenful; anything near this size is the wrong file.
MAX_FILE_BYTES = 256 * 1024

DRIVERS = ("docker", "process")


class Kind(enum.Enum):
    """What a key's value must be, in YAML terms."""

    BOOL = "true or false"
    INT = "an integer"
    STR = "a string"
    PATH = "an absolute path"
    STRINGS = "a list of strings (or one string)"
    CHOICES = "a list of names (or one name)"
    CHOICE = "one name"
    LABELS = "a mapping of strings to strings"


@dataclass(frozen=True, slots=True, kw_only=True)
class Key:
    """One setting: its key in agent.yaml, the `shoal agent` flag, its type and default."""

    name: str  # the key in agent.yaml
    param: str  # the CLI parameter name (`shoal agent`'s function argument)
    flag: str  # the flag as a user types it
    kind: Kind
    default: Any
    help: str
    low: int = 0  # INT: inclusive bounds
    high: int = 0
    choices: tuple[str, ...] = ()  # CHOICE, CHOICES
    hidden: bool = False  # left out of --print-config unless set (test-only knobs)


def _k(name: str, kind: Kind, default: Any, help: str, *, param: str = "", flag: str = "", **kw: Any) -> Key:
    param = param or name
    return Key(name=name, param=param, flag=flag or "--" + param.replace("_", "-"), kind=kind, default=default,
               help=help, **kw)


# Defaults are `shoal agent`'s (the flags'); the reasons live with `AgentConfig`.
KEYS: tuple[Key, ...] = (
    _k("dev", Kind.BOOL, False, "server and client in one process, loopback only"),
    _k("server", Kind.BOOL, False, "hold the cluster state (Raft) and serve the API"),
    _k("bootstrap_expect", Kind.INT, 0, "with server: form a new cluster once this many servers are seen (3 or 5)",
       low=0, high=9),
    _k("join", Kind.STRINGS, (), "agents already in the cluster, HOST[:GOSSIP_PORT]"),
    _k("bind", Kind.STR, "127.0.0.1", "address to listen on (0.0.0.0: every address; then set advertise)"),
    _k("advertise", Kind.STR, "", "address other hosts reach this one at (default: bind)"),
    _k("grpc_port", Kind.INT, 7420, "gRPC API port (servers)", low=1, high=65535),
    _k("gossip_port", Kind.INT, 7421, "gossip port, UDP and TCP", low=0, high=65535),
    _k("metrics_port", Kind.INT, 7422, "Prometheus /metrics port over HTTP; 0 turns it off", low=0, high=65535),
    _k("data_dir", Kind.PATH, None, "where the agent keeps its state (default: per-user)"),
    _k("node_name", Kind.STR, "", "this host's name in the cluster (default: the hostname)"),
    _k("labels", Kind.LABELS, (), "node labels for nodeSelector", param="label", flag="--label"),
    _k("drivers", Kind.CHOICES, DRIVERS, "runtime drivers to enable", param="driver", flag="--driver",
       choices=DRIVERS),
    _k("scheduler_sample_size", Kind.INT, 16,
       "servers: how many feasible nodes the scheduler ranks per replica once a cluster has more "
       "than scheduler_sample_threshold of them", low=1, high=1024),
    _k("scheduler_sample_threshold", Kind.INT, 256,
       "servers: clusters up to this many feasible nodes are ranked in full, larger ones by sample",
       low=0, high=1_000_000),
    _k("scheduler_spread_hosts", Kind.INT, 3,
       "servers: binpack keeps a deployment on at least this many hosts (a host takes up to "
       "1/N of its replicas before the next host is used)", low=1, high=1000),
    _k("log_level", Kind.CHOICE, "info", "debug, info, warning or error (reloaded on SIGHUP)", choices=LOG_LEVELS),
    _k("log_json", Kind.BOOL, False, "logs as JSON lines"),
    _k("seed", Kind.INT, None, "fixes replica names and tie-breaks (tests)", low=0, high=2**63 - 1, hidden=True),
)

_BY_NAME = {k.name: k for k in KEYS}
_BY_PARAM = {k.param: k for k in KEYS}
_BY_FLAG = {k.flag: k for k in KEYS}


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigProblem:
    """One problem in a config file: where it is and what is wrong."""

    source: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigFileError(ConfigError):
    """One or more problems in a config file, reported together."""

    def __init__(self, problems: Iterable[ConfigProblem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.source, p.line or 0))
        super().__init__("\n".join(str(p) for p in self.problems))


# --------------------------------------------------------------------------- sources


class Source(enum.Enum):
    """Where a setting's value came from, highest precedence first."""

    FLAG = "flag"
    FILE = "file"
    DEFAULT = "default"


@dataclass(frozen=True, slots=True, kw_only=True)
class Setting:
    """One effective setting and its origin (`where`: the flag, or file:line)."""

    key: Key
    value: Any
    source: Source
    where: str = ""

    @property
    def origin(self) -> str:
        """`flag --join`, `/etc/shoal/agent.yaml:4` or `default`."""
        if self.source is Source.FLAG:
            return f"flag {self.key.flag}"
        if self.source is Source.FILE:
            return self.where
        return "default"


@dataclass(frozen=True, slots=True)
class Settings:
    """The effective settings of one `shoal agent`, every key present, with sources."""

    items: Mapping[str, Setting]
    path: pathlib.Path | None = None  # the config file read, if any

    def __getitem__(self, name: str) -> Any:
        return self.items[name].value

    def replace(self, name: str, value: Any) -> Settings:
        """The same settings with `name`'s value filled in (its source kept): for
        defaults only known once the others are, such as the per-user data dir."""
        items = dict(self.items)
        s = items[name]
        items[name] = Setting(key=s.key, value=value, source=s.source, where=s.where)
        return Settings(items, self.path)

    def explain(self, message: str) -> str:
        """`message` (which names flags) with the origin of each named setting that did
        not come from a flag, so a file-given value can be found and fixed."""
        notes = []
        for flag, key in _BY_FLAG.items():
            s = self.items[key.name]
            if s.source is Source.FILE and _names_flag(message, flag):
                notes.append(f"{key.name} is set in {s.where}")
        return message + (f" ({'; '.join(notes)})" if notes else "")

    def render(self) -> str:
        """The settings as agent.yaml, each line commented with where its value came from."""
        header = "# shoal agent: effective settings; a flag wins over "
        header += f"{self.path}," if self.path else "the config file (none read),"
        lines = [header + " which wins over the default"]
        rows = []
        for key in KEYS:
            s = self.items[key.name]
            if key.hidden and s.source is Source.DEFAULT:
                continue
            rows.append((f"{key.name}: {_yaml_value(key, s.value)}", s.origin))
        width = max(len(r[0]) for r in rows)
        lines += [f"{text.ljust(width)}  # {origin}" for text, origin in rows]
        return "\n".join(lines) + "\n"


def _names_flag(message: str, flag: str) -> bool:
    i = message.find(flag)
    while i >= 0:
        end = i + len(flag)
        if end == len(message) or not (message[end].isalnum() or message[end] == "-"):
            return True
        i = message.find(flag, end)
    return False


def _yaml_value(key: Key, value: Any) -> str:
    if isinstance(value, pathlib.Path):
        value = str(value)
    elif key.kind is Kind.LABELS:
        value = dict(value)
    elif isinstance(value, tuple):
        value = list(value)
    text: str = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True, slots=True)
class _FileValue:
    value: Any
    line: int


def config_path(explicit: pathlib.Path | None, *, dev: bool, default: pathlib.Path = DEFAULT_PATH) -> pathlib.Path | None:
    """The file to read: `--config PATH` if given, else `default` when it exists (never
    for `--dev`); None when there is none."""
    if explicit is not None:
        return explicit
    if dev or not default.is_file():
        return None
    return default


def load_file(path: pathlib.Path) -> dict[str, tuple[Any, int]]:
    """Read and check one agent.yaml: {key: (value, line)}, values normalized as
    `Settings` holds them. Raise `ConfigFileError` with every problem, or `ConfigError`
    when the file cannot be read."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {source}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigFileError([ConfigProblem(source=source, line=None, key="",
                                             message=f"larger than {MAX_FILE_BYTES // 1024} KiB: not an agent.yaml")])
    return {k: (v.value, v.line) for k, v in _Parser(source).parse(data).items()}


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[ConfigProblem] = []
        self.loader: yaml.SafeLoader | None = None

    def error(self, line: int | None, key: str, message: str) -> None:
        self.problems.append(ConfigProblem(source=self.source, line=line, key=key, message=message))

    def parse(self, data: bytes) -> dict[str, _FileValue]:
        self.loader = loader = yaml.SafeLoader(data)
        try:
            root = loader.get_single_node()
            out = self._root(loader, root)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            what = " ".join(str(t) for t in (exc.context, exc.problem) if t)
            self.error(mark.line + 1 if mark else None, "", f"not valid YAML: {what}")
            out = {}
        except yaml.YAMLError as exc:
            self.error(None, "", f"not valid YAML: {exc}")
            out = {}
        finally:
            loader.dispose()
        if self.problems:
            raise ConfigFileError(self.problems)
        return out

    def _root(self, loader: yaml.SafeLoader, root: Node | None) -> dict[str, _FileValue]:
        if root is None or (isinstance(root, ScalarNode) and root.tag.endswith(":null")):
            return {}  # an empty file: every default
        if not isinstance(root, MappingNode):
            self.error(_line(root), "", "must be a mapping of settings (key: value), one per line")
            return {}
        out: dict[str, _FileValue] = {}
        first: dict[str, int] = {}
        for knode, vnode in root.value:
            kline = _line(knode)
            if not isinstance(knode, ScalarNode) or knode.tag.endswith(":merge") or not isinstance(knode.value, str):
                self.error(kline, "", "keys must be plain names")
                continue
            name = knode.value
            if name in first:
                self.error(kline, name, f"given twice (first on line {first[name]})")
                continue
            first[name] = kline
            key = _BY_NAME.get(name)
            if key is None:
                self.error(kline, name, _unknown(name))
                continue
            try:
                raw = loader.construct_object(vnode, deep=True)
            except yaml.YAMLError as exc:
                self.error(_line(vnode), name, f"cannot be read: {getattr(exc, 'problem', None) or exc}")
                continue
            if raw is None:
                continue  # null: absent, the default applies
            value = self._check(key, vnode, raw)
            if value is not _BAD:
                out[name] = _FileValue(value, kline)
        return out

    def _check(self, key: Key, node: Node, raw: Any) -> Any:
        assert self.loader is not None
        line = _line(node)
        name = key.name
        if key.kind is Kind.BOOL:
            if isinstance(raw, bool):
                return raw
            return self._wrong(key, node, raw)
        if key.kind is Kind.INT:
            if not isinstance(raw, int) or isinstance(raw, bool):
                return self._wrong(key, node, raw)
            if not key.low <= raw <= key.high:
                self.error(line, name, f"must be between {key.low} and {key.high}, got {raw}")
                return _BAD
            return raw
        if key.kind is Kind.STR:
            return raw if isinstance(raw, str) else self._wrong(key, node, raw)
        if key.kind is Kind.PATH:
            if not isinstance(raw, str) or not raw:
                return self._wrong(key, node, raw)
            if not raw.startswith("/"):
                self.error(line, name, f'must be an absolute path, got "{raw}"')
                return _BAD
            return pathlib.Path(raw)
        if key.kind is Kind.CHOICE:
            if not isinstance(raw, str):
                return self._wrong(key, node, raw)
            return raw if self._choice(key, line, raw) else _BAD
        if key.kind in (Kind.STRINGS, Kind.CHOICES):
            items, nodes = ([raw], [node]) if isinstance(raw, str) else (raw, _items(node))
            if not isinstance(items, list):
                return self._wrong(key, node, raw)
            ok = True
            for item, inode in zip(items, nodes, strict=False):
                if not isinstance(item, str) or not item:
                    self.error(_line(inode), name, f"each item must be a non-empty string, got {_show(inode, item)}")
                    ok = False
                elif key.kind is Kind.CHOICES:
                    ok = self._choice(key, _line(inode), item) and ok
            return tuple(items) if ok else _BAD
        if key.kind is Kind.LABELS:
            if not isinstance(raw, dict) or not isinstance(node, MappingNode):
                return self._wrong(key, node, raw)
            ok = True
            pairs: dict[str, str] = {}
            for knode, vnode in node.value:
                k, v = self.loader.construct_object(knode), self.loader.construct_object(vnode)
                if not isinstance(k, str) or not k:
                    self.error(_line(knode), name, f"label names must be strings, got {_show(knode, k)}")
                    ok = False
                elif k in pairs:
                    self.error(_line(knode), f"{name}.{k}", "given twice")
                    ok = False
                elif not isinstance(v, str):
                    self.error(_line(vnode), f"{name}.{k}", f"must be a string, got {_show(vnode, v)}{_hint(key, vnode)}")
                    ok = False
                else:
                    pairs[k] = v
            return tuple(sorted(pairs.items())) if ok else _BAD
        raise AssertionError(f"unhandled kind {key.kind}")

    def _choice(self, key: Key, line: int, value: str) -> bool:
        if value in key.choices:
            return True
        self.error(line, key.name, f'unknown value "{value}"; use {_or(key.choices)}')
        return False

    def _wrong(self, key: Key, node: Node, raw: Any) -> Any:
        self.error(_line(node), key.name, f"must be {key.kind.value}, got {_show(node, raw)}{_hint(key, node)}")
        return _BAD


_BAD = object()


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _items(node: Node) -> list[Node]:
    return list(node.value) if isinstance(node, SequenceNode) else []


def _show(node: Node, value: Any) -> str:
    """The value as the user wrote it, and what YAML made of it."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if isinstance(value, bool):
        what = "a boolean"
    elif isinstance(value, int):
        what = "an integer"
    elif isinstance(value, float):
        what = "a number"
    elif isinstance(value, str):
        what = "a string"
    else:
        what = type(value).__name__
    text = str(node.value) if isinstance(node, ScalarNode) else str(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{json.dumps(text) if isinstance(value, str) else text} ({what})"


def _hint(key: Key, node: Node) -> str:
    """What to do about a scalar of the wrong type, when quoting is the answer."""
    if not isinstance(node, ScalarNode):
        return ""
    quoted = node.style in ("'", '"')
    # A plain scalar YAML read as a number or a boolean, where a name or an address is
    # meant: quoting makes it a string.
    if key.kind in (Kind.STR, Kind.LABELS) and not quoted and not node.tag.endswith(":str"):
        return '; quote it ("...") if a string is meant'
    if key.kind in (Kind.INT, Kind.BOOL) and quoted:
        return "; remove the quotes"
    return ""


def _unknown(name: str) -> str:
    guess = name.replace("-", "_").lower()
    if guess in _BY_NAME:
        return f'unknown key; did you mean "{guess}"?'
    flag_like = _BY_PARAM.get(guess)
    if flag_like is not None:
        return f'unknown key; did you mean "{flag_like.name}"?'
    close = difflib.get_close_matches(name, list(_BY_NAME), n=1, cutoff=0.6)
    if close:
        return f'unknown key; did you mean "{close[0]}"?'
    return f"unknown key; the keys are {', '.join(k.name for k in KEYS if not k.hidden)}"


def _or(choices: Collection[str]) -> str:
    items = list(choices)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


# --------------------------------------------------------------------------- resolving


def _flag_value(key: Key, value: Any) -> Any:
    """A command-line value in the form `Settings` holds."""
    if key.kind is Kind.LABELS:
        pairs = []
        for item in value or ():
            k, sep, v = str(item).partition("=")
            if not sep or not k:
                raise ConfigError(f'{key.flag} must be KEY=VALUE, got "{item}"')
            pairs.append((k, v))
        return tuple(sorted(dict(pairs).items()))
    if key.kind in (Kind.STRINGS, Kind.CHOICES):
        return tuple(value or ())
    if key.kind is Kind.CHOICE and value not in key.choices:
        raise ConfigError(f'{key.flag} must be {_or(key.choices)}, got "{value}"')
    if key.kind is Kind.PATH and value is not None:
        return pathlib.Path(value)
    return value


def resolve(flags: Mapping[str, Any], path: pathlib.Path | None) -> Settings:
    """Layer the flags given on the command line (by CLI parameter name) over the file
    at `path` (None: no file) over the defaults in `KEYS`."""
    unknown = set(flags) - set(_BY_PARAM)
    if unknown:
        raise AssertionError(f"flags without a key: {sorted(unknown)}")  # KEYS is missing a flag: a bug
    file_values = load_file(path) if path is not None else {}
    items: dict[str, Setting] = {}
    for key in KEYS:
        if key.param in flags:
            items[key.name] = Setting(key=key, value=_flag_value(key, flags[key.param]), source=Source.FLAG)
        elif key.name in file_values:
            value, line = file_values[key.name]
            items[key.name] = Setting(key=key, value=value, source=Source.FILE, where=f"{path}:{line}")
        else:
            items[key.name] = Setting(key=key, value=key.default, source=Source.DEFAULT)
    return Settings(items, path)
