"""Graph helpers over a validated workflow (the spec already refused cycles)."""

from __future__ import annotations

from scanflow.spec.models import Workflow


def dependants(workflow: Workflow) -> dict[str, set[str]]:
    """step -> every step that (transitively) depends on it."""
    direct: dict[str, set[str]] = {s.name: set() for s in workflow.steps}
    for s in workflow.steps:
        for d in s.deps():
            direct[d].add(s.name)
    out: dict[str, set[str]] = {}
    for name in direct:
        seen: set[str] = set()
        todo = list(direct[name])
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(direct[n])
        out[name] = seen
    return out


def topological_order(workflow: Workflow) -> list[str]:
    """Kahn's order, stable in declaration order."""
    indeg = {s.name: len(s.deps()) for s in workflow.steps}
    order: list[str] = []
    ready = [s.name for s in workflow.steps if indeg[s.name] == 0]
    children = {s.name: [c.name for c in workflow.steps if s.name in c.deps()] for s in workflow.steps}
    while ready:
        n = ready.pop(0)
        order.append(n)
        for c in children[n]:
            indeg[c] -= 1
            if indeg[c] == 0:
                ready.append(c)
    return order


def downstream_of(workflow: Workflow, name: str) -> set[str]:
    """Every step that (transitively) depends on `name`; computed only when a step fails."""
    children: dict[str, list[str]] = {s.name: [] for s in workflow.steps}
    for s in workflow.steps:
        for d in s.deps():
            children[d].append(s.name)
    seen: set[str] = set()
    todo = list(children[name])
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(children[n])
    return seen
