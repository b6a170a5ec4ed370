"""Per-replica CPU and memory limits through Linux cgroups (v2, or v1 when that is what the
machine has writable). The only module that knows cgroup file names.

Layout: one group per replica, `<parent>/<worker pid>`, under a per-service parent
`…/scanflow/<service>`:

- cgroup v2: `<root>/scanflow/<service>/<pid>` (`cpu.max`, `memory.max`, `cpu.stat`
  usage_usec, `memory.current`, `memory.events` oom_kill). Under the root of the hierarchy,
  because only the root may hold processes and delegate controllers at the same time.
- cgroup v1: per controller, `<root>/<controller>/<our own group>/scanflow/<service>/<pid>`
  (`cpu.cfs_quota_us`, `cpuacct.usage`, `memory.limit_in_bytes`, `memory.usage_in_bytes`,
  `memory.oom_control` oom_kill). Nested under the group the deployer runs in, so whatever
  accounts for that group still accounts for the replicas.

The deployer calls `plan` once per deploy (it finds the hierarchy and creates the parent, or
says why limits cannot be enforced); the plan travels in the service config; each worker calls
`join` right after fork; the master's `child_exit` calls `release`; `stop` calls `remove_all`.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, Field

DEFAULT_ROOT = Path("/sys/fs/cgroup")
V1_PERIOD_US = 100_000
_V2_CONTROLLERS = ("cpu", "memory")


class CgroupPlan(BaseModel):
    """What a service's replicas are limited to, and where their groups live."""

    cpus: float | None = Field(default=None, description="CPU quota per replica (None: unlimited)")
    memory: int | None = Field(default=None, description="bytes per replica (None: unlimited)")
    version: int = Field(default=0, description="1 or 2; 0: nothing enforced")
    dirs: dict[str, str] = Field(
        default_factory=dict,
        description="controller -> this service's parent group (v1: cpu, cpuacct, memory; v2: all)",
    )
    unenforced: str | None = Field(default=None, description="why the limits are not enforced")

    @property
    def wanted(self) -> bool:
        """The spec declared at least one limit."""
        return self.cpus is not None or self.memory is not None

    @property
    def enforced(self) -> bool:
        return self.wanted and self.version > 0 and bool(self.dirs)


class CgroupError(RuntimeError):
    """A cgroup file could not be written or read as expected."""


# -- detection ---------------------------------------------------------------------------------
def _own_path(controller: str, proc_cgroup: str = "/proc/self/cgroup") -> str:
    """This process's group in a v1 hierarchy ('' for the root)."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        if controller in ctrls.split(","):
            return path.strip("/")
    return ""


def _writable(d: Path) -> bool:
    return d.is_dir() and os.access(d, os.W_OK)


def plan(service: str, cpus: float | None, memory: int | None,
         root: Path = DEFAULT_ROOT) -> CgroupPlan:
    """Find a writable hierarchy holding the controllers the limits need, create this service's
    parent group in it, and return where; or a plan whose `unenforced` says why not."""
    p = CgroupPlan(cpus=cpus, memory=memory)
    if not p.wanted:
        return p
    try:
        if (root / "cgroup.controllers").is_file():
            p.dirs, p.version = _plan_v2(root, service, p), 2
        elif (root / "cpu").is_dir() or (root / "memory").is_dir():
            p.dirs, p.version = _plan_v1(root, service, p), 1
        else:
            p.unenforced = f"no cgroup hierarchy at {root}"
    except (CgroupError, OSError) as exc:
        p.dirs, p.version = {}, 0
        p.unenforced = str(exc)
    return p


def _plan_v2(root: Path, service: str, p: CgroupPlan) -> dict[str, str]:
    need = [c for c, want in (("cpu", p.cpus), ("memory", p.memory)) if want is not None]
    have = (root / "cgroup.controllers").read_text().split()
    missing = [c for c in need if c not in have]
    if missing:
        raise CgroupError(f"cgroup v2 at {root} has no {', '.join(missing)} controller")
    if not _writable(root):
        raise CgroupError(f"cgroup v2 at {root} is not writable (run as root, or delegate it)")
    parent = root / "scanflow" / service
    level = root
    for part in ("scanflow", service):
        _enable(level, need)
        level = level / part
        level.mkdir(exist_ok=True)
    _enable(parent, need)
    return {"v2": str(parent)}


def _enable(group: Path, controllers: list[str]) -> None:
    """Let the children of `group` use `controllers` (v2 subtree_control)."""
    on = (group / "cgroup.subtree_control").read_text().split()
    for c in controllers:
        if c in on:
            continue
        try:
            (group / "cgroup.subtree_control").write_text(f"+{c}")
        except OSError as exc:
            raise CgroupError(f"cannot enable the {c} controller in {group}: {exc.strerror}") from exc


def _plan_v1(root: Path, service: str, p: CgroupPlan) -> dict[str, str]:
    ctrls = ["cpuacct"]  # usage is shown even when only memory is limited
    if p.cpus is not None:
        ctrls.append("cpu")
    if p.memory is not None:
        ctrls.append("memory")
    dirs: dict[str, str] = {}
    for c in ctrls:
        mount = root / c
        if not mount.is_dir():
            if c == "cpuacct":
                continue  # usage then comes from /proc
            raise CgroupError(f"cgroup v1 at {root} has no {c} hierarchy")
        if not _writable(mount):
            raise CgroupError(f"cgroup v1 {c} hierarchy at {mount} is not writable (run as root)")
        parent = mount / _own_path(c) / "scanflow" / service
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CgroupError(f"cannot create {parent}: {exc.strerror}") from exc
        dirs[c] = str(parent)
    return dirs


# -- per replica -------------------------------------------------------------------------------
def _groups(p: CgroupPlan, pid: int) -> dict[str, Path]:
    return {c: Path(d) / str(pid) for c, d in p.dirs.items()}


def join(p: CgroupPlan, pid: int | None = None) -> None:
    """Create the replica's group, set its limits, then move `pid` (default: this process)
    into it. Limits are written before the move, so the replica never runs unlimited."""
    if not p.enforced:
        return
    pid = pid or os.getpid()
    groups = _groups(p, pid)
    for c, g in groups.items():
        g.mkdir(exist_ok=True)
        _limit(p, c, g)
    for g in groups.values():
        _write(g / "cgroup.procs", str(pid))
    reweigh(p)


def _quota_us(cpus: float) -> int:
    """CPU microseconds per period for `cpus` (the kernel refuses less than 1 ms)."""
    return max(1000, round(cpus * V1_PERIOD_US))


def _limit(p: CgroupPlan, controller: str, g: Path) -> None:
    """Write `p`'s limits into the replica group `g` of `controller`."""
    if p.version == 2:
        if p.cpus is not None:
            _write(g / "cpu.max", f"{_quota_us(p.cpus)} {V1_PERIOD_US}")
        if p.memory is not None:
            _write(g / "memory.max", str(p.memory))
            _write(g / "memory.swap.max", "0", optional=True)  # swap is not a way out
    elif controller == "cpu" and p.cpus is not None:
        _write(g / "cpu.cfs_period_us", str(V1_PERIOD_US))
        _write(g / "cpu.cfs_quota_us", str(_quota_us(p.cpus)))
    elif controller == "memory" and p.memory is not None:
        _write(g / "memory.limit_in_bytes", str(p.memory))
        _write(g / "memory.memsw.limit_in_bytes", str(p.memory), optional=True)


def resize(p: CgroupPlan, pids: Iterable[int]) -> None:
    """Write `p`'s limits into the groups of the running replicas `pids` (a live change: the
    kernel applies a new quota from the next period); a replica without its group yet is left
    to `join`, which reads the limits afresh."""
    if not p.enforced:
        return
    for pid in pids:
        groups = _groups(p, pid)
        if all(g.is_dir() for g in groups.values()):
            for c, g in groups.items():
                _limit(p, c, g)


def reweigh(p: CgroupPlan) -> None:
    """Give the service's parent group (and `scanflow/` above it) the CPU weight of as many
    plain processes as they hold replicas. A group competes with its siblings as ONE entity:
    without this, all replicas of all services together would get the share of a single
    process on a busy machine, and a second replica would add no capacity there."""
    for c, d in p.dirs.items():
        if c not in ("cpu", "v2"):
            continue
        parent = Path(d)
        name, unit, cap = ("cpu.weight", 100, 10_000) if p.version == 2 else ("cpu.shares", 1024, 262_144)
        try:
            counts = {Path(svc.path): sum(1 for e in os.scandir(svc.path)
                                          if e.is_dir() and e.name.isdigit())
                      for svc in os.scandir(parent.parent) if svc.is_dir()}
        except OSError:
            continue
        _write(parent / name, str(min(max(counts.get(parent, 0), 1) * unit, cap)), optional=True)
        _write(parent.parent / name, str(min(max(sum(counts.values()), 1) * unit, cap)),
               optional=True)


def _write(f: Path, value: str, optional: bool = False) -> None:
    try:
        f.write_text(value)
    except OSError as exc:
        if optional and exc.errno in (errno.ENOENT, errno.EINVAL, errno.EPERM, errno.EACCES):
            return
        raise CgroupError(f"cannot write {value!r} to {f}: {exc.strerror}") from exc


def _read(f: Path) -> str | None:
    try:
        return f.read_text()
    except OSError:
        return None


def _keyed(text: str | None, key: str) -> int | None:
    for line in (text or "").splitlines():
        k, _, v = line.partition(" ")
        if k == key:
            return int(v)
    return None


def usage(p: CgroupPlan, pid: int) -> dict[str, int | float | None]:
    """What the replica's group says now: CPU-seconds used (counter), memory in use (bytes),
    limits as set (cpus, memory bytes), times its OOM killer fired, and the quota's counters:
    scheduler periods and those in which the quota ran out (`cpu_periods`,
    `cpu_throttled_periods`; a replica throttled in most periods is held by its quota, one
    that is slow without being throttled is starved by the machine). None: not in a group."""
    out: dict[str, int | float | None] = {"cpu_seconds": None, "cpus": None, "memory_bytes": None,
                                          "memory_limit": None, "oom_kills": None,
                                          "cpu_periods": None, "cpu_throttled_periods": None}
    g = _groups(p, pid)
    if p.version == 2 and "v2" in g:
        d = g["v2"]
        stat = _read(d / "cpu.stat")
        usec = _keyed(stat, "usage_usec")
        out["cpu_seconds"] = usec / 1e6 if usec is not None else None
        out["cpu_periods"] = _keyed(stat, "nr_periods")
        out["cpu_throttled_periods"] = _keyed(stat, "nr_throttled")
        mx = (_read(d / "cpu.max") or "").split()
        if len(mx) == 2 and mx[0] != "max":
            out["cpus"] = int(mx[0]) / int(mx[1])
        cur = _read(d / "memory.current")
        out["memory_bytes"] = int(cur) if cur else None
        lim = (_read(d / "memory.max") or "").strip()
        out["memory_limit"] = int(lim) if lim.isdigit() else None
        out["oom_kills"] = _keyed(_read(d / "memory.events"), "oom_kill")
        return out
    if "cpuacct" in g:
        ns = _read(g["cpuacct"] / "cpuacct.usage")
        out["cpu_seconds"] = int(ns) / 1e9 if ns else None
    if "cpu" in g:
        quota, period = _read(g["cpu"] / "cpu.cfs_quota_us"), _read(g["cpu"] / "cpu.cfs_period_us")
        if quota and period and int(quota) > 0:
            out["cpus"] = int(quota) / int(period)
        stat = _read(g["cpu"] / "cpu.stat")
        out["cpu_periods"] = _keyed(stat, "nr_periods")
        out["cpu_throttled_periods"] = _keyed(stat, "nr_throttled")
    if "memory" in g:
        cur = _read(g["memory"] / "memory.usage_in_bytes")
        out["memory_bytes"] = int(cur) if cur else None
        mlim = _read(g["memory"] / "memory.limit_in_bytes")
        out["memory_limit"] = int(mlim) if mlim and p.memory is not None else None
        out["oom_kills"] = _keyed(_read(g["memory"] / "memory.oom_control"), "oom_kill")
    return out


def member(p: CgroupPlan, pid: int) -> bool:
    """`pid` runs in its own replica group (it joined)."""
    for g in _groups(p, pid).values():
        procs = _read(g / "cgroup.procs")
        return procs is not None and str(pid) in procs.split()
    return False


def release(p: CgroupPlan, pid: int) -> int:
    """Remove the group of a replica that exited; returns how often its OOM killer fired
    (read before removal: the caller reports a replica the kernel killed)."""
    if not p.dirs:
        return 0
    kills = usage(p, pid).get("oom_kills") or 0
    for g in _groups(p, pid).values():
        _evict(g)
        _rmdir(g)
    reweigh(p)
    return int(kills)


def _evict(g: Path) -> None:
    """Move what still runs in a dead replica's group (its prediction-log collector, finishing
    the last records) to the group the service was planned from (v1: the deployer's own group,
    v2: the root), so the group can go and the collector finishes its bounded work."""
    procs = _read(g / "cgroup.procs")
    if not procs:
        return
    home = g.parent.parent.parent / "cgroup.procs"  # <home>/scanflow/<service>/<pid>
    for pid in procs.split():
        try:
            home.write_text(pid)
        except OSError:
            pass  # it exited meanwhile


def _rmdir(g: Path, attempts: int = 20) -> None:
    """rmdir a group; a process that just exited may take a moment to leave it (EBUSY)."""
    for _ in range(attempts):
        try:
            g.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                return
            time.sleep(0.01)


def sweep(p: CgroupPlan, live: set[int]) -> list[int]:
    """Remove the empty groups of replicas that are not in `live` (dead workers of a master
    that was killed, a crash between fork and exit); returns their pids."""
    gone: list[int] = []
    for d in p.dirs.values():
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if e.is_dir() and e.name.isdigit() and int(e.name) not in live:
                _rmdir(Path(e.path), attempts=1)
                if not os.path.exists(e.path):
                    gone.append(int(e.name))
    if gone:
        reweigh(p)
    return sorted(set(gone))


def remove_all(p: CgroupPlan) -> None:
    """Remove the service's groups (its processes are gone) and `scanflow/` if now empty."""
    sweep(p, set())
    for d in p.dirs.values():
        parent = Path(d)
        _rmdir(parent, attempts=5)
        try:
            parent.parent.rmdir()  # scanflow/, when no other service uses it
        except OSError:
            pass


__all__ = ["DEFAULT_ROOT", "CgroupError", "CgroupPlan", "join", "member", "plan", "release",
           "remove_all", "reweigh", "sweep", "usage"]
