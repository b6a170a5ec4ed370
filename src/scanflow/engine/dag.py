"""Graph helpers over a validated workflow (the spec already refused cycles)."""

from __future__ import annotations

from scanflow.spec.models import Workflow


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
