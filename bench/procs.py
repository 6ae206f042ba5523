"""Process helpers the benchmarks share: free loopback ports, a process tree, its CPU
time from /proc, and stopping a child politely. Imported by the bench scripts, which
run with this folder first on sys.path."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
from collections.abc import Sequence

__all__ = ["CLK_TCK", "cpu_seconds", "free_port", "process_tree", "stop_process"]

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_tree(pid: int) -> list[int]:
    """`pid` and every descendant (nginx's workers, an agent's replicas), from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = pathlib.Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [c for c, ppid in parents.items() if ppid in frontier]
        tree += frontier
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of the processes (every thread included), in seconds."""
    ticks = 0
    for pid in pids:
        try:
            fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
    return ticks / CLK_TCK


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str] | None, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
