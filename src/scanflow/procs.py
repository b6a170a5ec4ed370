"""Process facts from /proc and process-group signalling, shared by the engine (step
processes), serving (gunicorn masters and workers) and agents (agent processes)."""

from __future__ import annotations

import os
import signal
import time


def _stat_fields(pid: int | str) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:].split()  # after "(comm)": state, ppid, pgrp, ...


def pid_alive(pid: int | None) -> bool:
    """True for a running process; zombies and unknown pids count as dead."""
    if not pid:
        return False
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] not in (b"Z", b"X")  # type: ignore[index]


def start_time(pid: int | str) -> int | None:
    """Clock ticks since boot at which the process started: with the pid, a name no later
    process can reuse (a pid alone is recycled)."""
    fields = _stat_fields(pid)
    if not fields or len(fields) < 20:
        return None
    return int(fields[19])  # field 22 of /proc/<pid>/stat


def _scan(index: int, value: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(entry.name)
            if not fields or len(fields) <= index or fields[0] in (b"Z", b"X"):
                continue
            if int(fields[index]) == value:
                out.append(int(entry.name))
    return sorted(out)


def child_pids(ppid: int) -> list[int]:
    """Live children of a process."""
    return _scan(1, ppid)


def group_pids(pgid: int) -> list[int]:
    """Live members of a process group."""
    return _scan(2, pgid)


def kill_group(pgid: int, grace: float = 5.0) -> None:
    """SIGTERM a process group, SIGKILL what is left after `grace` seconds."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + grace
    while time.time() < deadline:
        if not group_pids(pgid):
            return
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
