"""Process facts from /proc and process-group signalling, shared by the engine (step
processes), serving (gunicorn masters and workers) and agents (agent processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
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


# The reaper's program: stdlib only, started with `python -c` (no scanflow import to pay for).
_REAPER = r"""
import os, signal, sys, time
groups = set()
for line in sys.stdin:
    op, _, pgid = line.strip().partition(" ")
    if pgid.isdigit():
        (groups.add if op == "+" else groups.discard)(int(pgid))
def signal_all(sig):
    for g in list(groups):
        try:
            os.killpg(g, sig)
        except OSError:
            groups.discard(g)
signal_all(signal.SIGTERM)
deadline = time.time() + float(sys.argv[1])
while groups and time.time() < deadline:
    time.sleep(0.05)
    signal_all(0)
signal_all(signal.SIGKILL)
"""


class GroupReaper:
    """Kills the process groups registered with it when this process dies, even by SIGKILL.

    Why: a step's process runs in its own session (so that a cancel kills its whole tree), so
    nothing takes it down when the process that started it is killed — a Ray worker killed by
    the OOM killer or by hand would leave its step running beside the retry. The reaper is one
    small helper process per starting process, in its own session, holding the read end of a
    pipe: the kernel closes the write end when this process dies, however it dies, and at
    that EOF the reaper SIGTERMs the groups still registered, then SIGKILLs what is left after
    `grace` seconds. Registering costs one line written to the pipe.
    """

    def __init__(self, grace: float = 2.0) -> None:
        self.grace = grace
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def add(self, pgid: int) -> None:
        self._send(f"+ {pgid}\n")

    def remove(self, pgid: int) -> None:
        self._send(f"- {pgid}\n")

    def _send(self, line: str) -> None:
        with self._lock:
            for _ in range(2):  # a reaper that died (killed by hand) is replaced once
                if self._proc is None or self._proc.poll() is not None:
                    self._proc = subprocess.Popen(
                        [sys.executable, "-c", _REAPER, str(self.grace)], stdin=subprocess.PIPE,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
                assert self._proc.stdin is not None
                try:
                    self._proc.stdin.write(line.encode())
                    self._proc.stdin.flush()
                    return
                except (BrokenPipeError, OSError):
                    self._proc = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None
