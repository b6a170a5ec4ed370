"""CPU and memory admission for steps, shared by every run in a process, fair across teams:
when several steps wait, the team using the least CPU right now goes first (FIFO within a
team), so one team's fifty runs do not starve another team's one."""

from __future__ import annotations

import itertools
import os
import threading
from collections import defaultdict
from dataclasses import dataclass, field


def machine_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


@dataclass(order=True)
class _Ticket:
    seq: int
    team: str = field(compare=False)
    cpus: float = field(compare=False)
    memory: int = field(compare=False)


class ResourcePool:
    def __init__(self, cpus: float | None = None, memory: int | None = None) -> None:
        self.cpus = float(cpus or os.cpu_count() or 1)
        self.memory = int(memory or machine_memory())
        self.used_cpus = 0.0
        self.used_memory = 0
        self.by_team: dict[str, float] = defaultdict(float)
        self._waiting: list[_Ticket] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()

    def check(self, cpus: float, memory: int) -> str | None:
        """Why a request can never be granted here, or None."""
        if cpus > self.cpus:
            return f"asks for {cpus:g} CPUs; this pool has {self.cpus:g}"
        if memory > self.memory:
            return f"asks for {memory / 2**20:.0f} MiB; this pool has {self.memory / 2**20:.0f} MiB"
        return None

    def _next(self) -> _Ticket | None:
        if not self._waiting:
            return None
        return min(self._waiting, key=lambda t: (self.by_team[t.team], t.seq))

    def _fits(self, t: _Ticket) -> bool:
        return self.used_cpus + t.cpus <= self.cpus + 1e-9 and self.used_memory + t.memory <= self.memory

    def acquire(self, team: str, cpus: float, memory: int, cancelled: threading.Event | None = None) -> bool:
        """Block until granted (True) or `cancelled` is set (False)."""
        t = _Ticket(next(self._seq), team, cpus, memory)
        with self._cv:
            self._waiting.append(t)
            try:
                while not (self._next() is t and self._fits(t)):
                    if cancelled is not None and cancelled.is_set():
                        return False
                    self._cv.wait(0.1)
                self.used_cpus += cpus
                self.used_memory += memory
                self.by_team[team] += cpus
                return True
            finally:
                self._waiting.remove(t)
                self._cv.notify_all()

    def release(self, team: str, cpus: float, memory: int) -> None:
        with self._cv:
            self.used_cpus -= cpus
            self.used_memory -= memory
            self.by_team[team] -= cpus
            self._cv.notify_all()


_default: ResourcePool | None = None
_default_lock = threading.Lock()


def default_pool(cpus: float | None = None, memory: int | None = None) -> ResourcePool:
    """One pool per process (per limits), so concurrent runs share the machine."""
    global _default
    with _default_lock:
        if _default is None or (cpus and _default.cpus != cpus) or (memory and _default.memory != memory):
            _default = ResourcePool(cpus, memory)
        return _default
