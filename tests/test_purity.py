"""The sans-I/O cores stay pure: no asyncio, grpc, docker, socket, time, threading, and no
module-level `random` functions (an injected `random.Random` is the only chance allowed).

The check reads source, it imports nothing: every `import` and `from ... import` of a core
is inspected, and shoal-internal imports are followed (with the packages they live in,
whose `__init__` runs on import), so a core cannot reach the network through a helper.

Add a new core by adding its path or a glob to `PURE_CORES`; globs may match nothing yet.
"""

from __future__ import annotations

import ast
import functools
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Paths relative to the repository root. Plain paths must exist; globs may match nothing.
PURE_CORES: list[str] = [
    "leader/scheduler.py",
    "leader/balancer.py",
    "shoal/balancing.py",
    "shoal/call_balancer.py",
    "agent/probe_state.py",
    "agent/swim/**/*.py",
    "leader/raft/**/*.py",
    "leader/replicated_state.py",
    "leader/scheduler/**/*.py",
    "leader/balancer/**/*.py",
]

FORBIDDEN_MODULES = frozenset({"asyncio", "grpc", "docker", "socket", "time", "threading"})
# The one name of the `random` module a core may use: the class, to annotate or build
# its own seeded generator.
RANDOM_ALLOWED = frozenset({"Random"})


def _package_dirs() -> dict[str, Path]:
    """Import prefix -> folder, from pyproject's package-dir (the one source of truth)."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    mapping = data["tool"]["setuptools"]["package-dir"]
    return {name: REPO / folder for name, folder in mapping.items()}


PACKAGE_DIRS = _package_dirs()


def core_files() -> list[Path]:
    found: list[Path] = []
    for pattern in PURE_CORES:
        if any(ch in pattern for ch in "*?["):
            found.extend(sorted(REPO.glob(pattern)))
        else:
            found.append(REPO / pattern)
    return sorted(set(found))


def module_file(module: str) -> Path | None:
    """The file a shoal module lives in, or None if it is not a shoal module or is absent."""
    best = max((p for p in PACKAGE_DIRS if module == p or module.startswith(p + ".")),
               key=len, default=None)
    if best is None:
        return None
    rest = module[len(best) :].lstrip(".").split(".") if module != best else []
    base = PACKAGE_DIRS[best].joinpath(*rest)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if rest and candidate.is_file():
            return candidate
    init = base / "__init__.py"
    return init if init.is_file() else None


def module_name(path: Path) -> str:
    """The dotted name of a file under one of the package folders."""
    for name, folder in sorted(PACKAGE_DIRS.items(), key=lambda kv: -len(str(kv[1]))):
        try:
            rel = path.resolve().relative_to(folder.resolve())
        except ValueError:
            continue
        parts = list(rel.with_suffix("").parts)
        if parts and parts[-1] == "__init__":
            parts.pop()
        return ".".join([name, *parts])
    raise AssertionError(f"{path} is not inside a shoal package folder")


def parents_of(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def _parse(source: str, filename: str) -> ast.Module:
    # CPython 3.11 before 3.11.8 can raise a spurious "AST constructor recursion depth
    # mismatch" SystemError (gh-106905) depending on the caller's stack depth; parsing
    # the same source again succeeds.
    try:
        return ast.parse(source, filename)
    except SystemError:
        return ast.parse(source, filename)


def check_source(source: str, filename: str, package: str) -> tuple[list[str], list[str]]:
    """(violations, shoal modules imported) for one file's source.

    `package` is the dotted package the file belongs to, for relative imports.
    """
    tree = _parse(source, filename)
    problems: list[str] = []
    internal: list[str] = []
    random_aliases: set[str] = set()

    def where(node: ast.AST) -> str:
        return f"{filename}:{getattr(node, 'lineno', '?')}"

    def note(module: str, node: ast.AST) -> None:
        top = module.split(".")[0]
        if top in FORBIDDEN_MODULES:
            problems.append(f"{where(node)} imports {module}")
        if top == "importlib":
            problems.append(f"{where(node)} imports importlib (dynamic imports hide I/O)")
        if top == "shoal":
            internal.append(module)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                note(alias.name, node)
                if alias.name == "random":
                    random_aliases.add(alias.asname or "random")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            note(module, node)
            for alias in node.names:
                if module.split(".")[0] == "shoal":
                    internal.append(f"{module}.{alias.name}")
                if module == "random" and alias.name not in RANDOM_ALLOWED:
                    problems.append(f"{where(node)} imports random.{alias.name}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "__import__":
                problems.append(f"{where(node)} calls __import__")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in random_aliases
            and node.attr not in RANDOM_ALLOWED
        ):
            problems.append(
                f"{where(node)} uses {node.value.id}.{node.attr} (the global random); "
                "use the injected rng: random.Random"
            )
    return problems, internal


@functools.cache
def check_file(path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`check_source` for a file of the repository, parsed once per test run."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found, internal = check_source(path.read_text(), str(path.relative_to(REPO)), package)
    return tuple(found), tuple(internal)


def check_closure(start: Path) -> list[str]:
    """Violations in `start` and every shoal module it reaches, with the import chain."""
    problems: list[str] = []
    seen: set[Path] = set()
    todo: list[tuple[Path, str]] = [(start, str(start.relative_to(REPO)))]
    name = module_name(start)
    for parent in parents_of(name):
        f = module_file(parent)
        if f is not None:
            todo.append((f, f"{start.relative_to(REPO)} (package {parent})"))
    while todo:
        path, chain = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        found, internal = check_file(path)
        problems.extend(f"{p}  [via {chain}]" for p in found)
        for imported in internal:
            for m in [*parents_of(imported), imported]:
                f = module_file(m)
                if f is not None and f not in seen:
                    todo.append((f, f"{chain} -> {m}"))
    return problems


def test_listed_cores_exist() -> None:
    for pattern in PURE_CORES:
        if not any(ch in pattern for ch in "*?["):
            assert (REPO / pattern).is_file(), f"PURE_CORES lists {pattern}, which is missing"


@pytest.mark.parametrize("path", core_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_core_is_pure(path: Path) -> None:
    problems = check_closure(path)
    assert not problems, "a sans-I/O core reaches I/O or global state:\n" + "\n".join(problems)


# --------------------------------------------------------------------------- the checker


@pytest.mark.parametrize(
    "source",
    [
        "import asyncio",
        "import grpc.aio",
        "from docker import from_env",
        "import socket as s",
        "from time import monotonic",
        "import time",
        "import threading",
        "import random\nx = random.random()",
        "import random as r\nr.choice([1])",
        "from random import choice",
        "import random\nrandom.seed(1)",
        "import importlib",
        "__import__('socket')",
    ],
)
def test_checker_catches(source: str) -> None:
    problems, _ = check_source(source, "x.py", "shoal.leader")
    assert problems


@pytest.mark.parametrize(
    "source",
    [
        "import random\nrng = random.Random(3)",
        "import random\ndef f(rng: random.Random) -> None: ...",
        "from random import Random",
        "import math, enum, dataclasses",
        "from collections.abc import Sequence",
        "timeout = 3  # the word time is fine",
    ],
)
def test_checker_allows(source: str) -> None:
    problems, _ = check_source(source, "x.py", "shoal.leader")
    assert problems == []


def test_checker_follows_relative_and_internal_imports() -> None:
    _, internal = check_source(
        "from . import quorum\nfrom .log import Log\nfrom shoal.model import Resources",
        "leader/raft/node.py",
        "shoal.leader.raft",
    )
    assert "shoal.leader.raft" in internal
    assert "shoal.leader.raft.quorum" in internal
    assert "shoal.leader.raft.log" in internal
    assert "shoal.model" in internal
    assert module_file("shoal.model") == REPO / "shoal" / "model.py"
    assert module_file("shoal.leader.scheduler") == REPO / "leader" / "scheduler.py"
    assert module_file("shoal.model.Resources") is None
    assert module_name(REPO / "leader" / "scheduler.py") == "shoal.leader.scheduler"
