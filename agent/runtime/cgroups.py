"""A replica's CPU time and memory from its cgroup: what the kernel already counts.

Why: Docker's stats API takes one to two seconds per container per call (it samples CPU
twice); the same figures are plain files in the container's cgroup, read in
microseconds. Used by the docker driver at scrape time (`/metrics`).

Rules:
- The cgroup is found from a process in it: `/proc/PID/cgroup` names its path in each
  hierarchy, `/proc/self/mountinfo` where each hierarchy is mounted (and from which root,
  so a cgroup namespace or a bind-mounted subtree still resolves).
- cgroup v1 controllers win over the unified hierarchy when both carry a path (a hybrid
  host mounts v2 without controllers): CPU from `cpuacct.usage` (nanoseconds), memory
  from `memory.usage_in_bytes`. On v2, `cpu.stat`'s `usage_usec` and `memory.current`.
- Memory is the working set, as `docker stats` reports it: usage less the inactive page
  cache (`total_inactive_file` on v1, `inactive_file` on v2), which the kernel reclaims
  first.
- A cgroup whose path does not contain `expect` (the container id) is not the
  container's: the pid was reused, or the engine runs elsewhere (a remote DOCKER_HOST),
  and the caller falls back to the stats API.

The parsing is pure (`parse_mounts`, `parse_proc_cgroup`, `resolve`), tested with tables;
`locate` and `read` do the file I/O.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

__all__ = ["CgroupFiles", "Mount", "locate", "parse_mounts", "parse_proc_cgroup", "read", "resolve"]


@dataclass(frozen=True, slots=True)
class Mount:
    """One cgroup hierarchy's mount: v2 (`controllers` empty) or v1."""

    root: str  # the hierarchy's path that is mounted at `point` ("/" usually)
    point: pathlib.Path
    controllers: frozenset[str]
    v2: bool


@dataclass(frozen=True, slots=True)
class CgroupFiles:
    """Where a cgroup's CPU and memory figures are, and in which format."""

    cpu: pathlib.Path  # cpuacct.usage (v1) or cpu.stat (v2)
    memory: pathlib.Path  # memory.usage_in_bytes (v1) or memory.current (v2)
    memory_stat: pathlib.Path
    v2: bool


def parse_mounts(mountinfo: str) -> list[Mount]:
    """The cgroup mounts in a `/proc/PID/mountinfo` text."""
    mounts = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        options = set(tail[2].split(","))
        v2 = tail[0] == "cgroup2"
        controllers = frozenset() if v2 else frozenset(
            o for o in options if o not in ("rw", "ro") and "=" not in o and not o.startswith("no"))
        point = pathlib.Path(fields[4].replace("\\040", " "))
        mounts.append(Mount(root=fields[3], point=point, controllers=controllers, v2=v2))
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """A process's cgroup path per controller from `/proc/PID/cgroup`; the unified
    hierarchy's (v2) under the key ""."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            paths[""] = path
        for c in controllers.split(","):
            if c:
                paths[c] = path
    return paths


def _under(mount: Mount, path: str) -> pathlib.Path | None:
    root = mount.root.rstrip("/")
    if root and not (path == root or path.startswith(root + "/")):
        return None  # that part of the hierarchy is not mounted here
    return mount.point / path[len(root):].lstrip("/")


def resolve(mounts: list[Mount], paths: dict[str, str], *, expect: str = "") -> CgroupFiles | None:
    """The files for a process with cgroup `paths` (parse_proc_cgroup) on a host with
    `mounts`; None when they are not all mounted, or a path lacks `expect`."""
    if any(expect not in p for p in paths.values()):
        return None
    v1 = {c: m for m in mounts if not m.v2 for c in m.controllers}
    cpu_mount, mem_mount = v1.get("cpuacct"), v1.get("memory")
    if cpu_mount is not None and mem_mount is not None and "cpuacct" in paths and "memory" in paths:
        cpu_dir, mem_dir = _under(cpu_mount, paths["cpuacct"]), _under(mem_mount, paths["memory"])
        if cpu_dir is None or mem_dir is None:
            return None
        return CgroupFiles(cpu=cpu_dir / "cpuacct.usage", memory=mem_dir / "memory.usage_in_bytes",
                           memory_stat=mem_dir / "memory.stat", v2=False)
    unified = next((m for m in mounts if m.v2), None)
    if unified is None or "" not in paths:
        return None
    directory = _under(unified, paths[""])
    if directory is None:
        return None
    return CgroupFiles(cpu=directory / "cpu.stat", memory=directory / "memory.current",
                       memory_stat=directory / "memory.stat", v2=True)


def locate(pid: int, *, expect: str = "") -> CgroupFiles | None:
    """The cgroup files of process `pid`, if they exist and are readable here."""
    try:
        paths = parse_proc_cgroup(pathlib.Path(f"/proc/{pid}/cgroup").read_text())
        mounts = parse_mounts(pathlib.Path("/proc/self/mountinfo").read_text())
    except OSError:
        return None
    files = resolve(mounts, paths, expect=expect)
    if files is None or not (files.cpu.is_file() and files.memory.is_file()):
        return None
    return files


def _stat_value(text: str, key: str) -> int:
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def read(files: CgroupFiles) -> tuple[float, int] | None:
    """CPU seconds used so far and the working-set bytes now; None once the cgroup is
    gone (the container stopped)."""
    try:
        cpu_text = files.cpu.read_text()
        usage = int(files.memory.read_text())
        stat = files.memory_stat.read_text()
    except (OSError, ValueError):
        return None
    if files.v2:
        cpu = _stat_value(cpu_text, "usage_usec") / 1e6
        inactive = _stat_value(stat, "inactive_file")
    else:
        cpu = int(cpu_text) / 1e9
        inactive = _stat_value(stat, "total_inactive_file")
    return cpu, max(0, usage - inactive)
