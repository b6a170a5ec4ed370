"""Scheduling over a validated workflow (the spec already refused cycles): which steps may start
now, and what a finished step releases or dooms. No threads, no I/O: the run loop
(`engine.loop`) asks and dispatches, so every backend schedules the same way."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from scanflow.spec.models import Step, Workflow

DONE = frozenset({"succeeded", "cached"})  # a step whose outputs its dependants may read


def children_of(workflow: Workflow) -> dict[str, list[str]]:
    """Each step's direct dependants, in workflow order."""
    children: dict[str, list[str]] = {s.name: [] for s in workflow.steps}
    for s in workflow.steps:
        for d in s.deps():
            children[d].append(s.name)
    return children


def downstream_of(workflow: Workflow, name: str,
                  children: dict[str, list[str]] | None = None) -> set[str]:
    """Every step that (transitively) depends on `name`."""
    children = children if children is not None else children_of(workflow)
    seen: set[str] = set()
    todo = list(children[name])
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(children[n])
    return seen


class Scheduler:
    """In-degree scheduling: a step becomes ready when its last dependency is done.

    `status` holds every step's state: pending, running, then what `settle` was told, or
    skipped/cancelled for the dependants of a step that did not succeed.
    """

    def __init__(self, workflow: Workflow, done: Iterable[str] = ()) -> None:
        self.workflow = workflow
        self.steps = {s.name: s for s in workflow.steps}
        self.children = children_of(workflow)
        self.status: dict[str, str] = {n: "pending" for n in self.steps}
        for name in done:  # finished in an earlier attempt of the run (resume)
            self.status[name] = "succeeded"
        self._waiting = {s.name: sum(1 for d in s.deps() if self.status[d] not in DONE)
                         for s in workflow.steps}
        self._ready: deque[Step] = deque(
            s for s in workflow.steps if self.status[s.name] == "pending" and self._waiting[s.name] == 0
        )

    def has_ready(self) -> bool:
        return bool(self._ready)

    def take(self) -> Step | None:
        """The next ready step, now `running`; None when none is ready."""
        while self._ready:
            step = self._ready.popleft()
            if self.status[step.name] == "pending":
                self.status[step.name] = "running"
                return step
        return None

    def settle(self, name: str, status: str) -> list[str]:
        """Record how `name` ended. Done: its dependants whose last dependency it was become
        ready. Otherwise every pending step downstream is marked skipped (cancelled if `name`
        was cancelled); those names are returned, in no particular order."""
        self.status[name] = status
        if status in DONE:
            for c in self.children[name]:
                self._waiting[c] -= 1
                if self._waiting[c] == 0 and self.status[c] == "pending":
                    self._ready.append(self.steps[c])
            return []
        mark = "cancelled" if status == "cancelled" else "skipped"
        doomed = [d for d in downstream_of(self.workflow, name, self.children)
                  if self.status[d] == "pending"]
        for d in doomed:
            self.status[d] = mark
        return doomed

    def cancel_rest(self) -> list[str]:
        """Mark every step not finished (pending or running) cancelled; their names."""
        rest = [n for n, s in self.status.items() if s in ("pending", "running")]
        for n in rest:
            self.status[n] = "cancelled"
        return rest

    def outcome(self) -> str:
        """`succeeded` when every step is done, else `failed`."""
        return "succeeded" if all(s in DONE for s in self.status.values()) else "failed"
