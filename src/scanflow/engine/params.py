"""Typed parameters: spec defaults, overridden per run, checked before anything starts."""

from __future__ import annotations

from typing import Any

from scanflow.spec.models import ParamSpec, Workflow, coerce_param


class ParamError(ValueError):
    pass


def parse_assignments(items: list[str]) -> dict[str, str]:
    """['epochs=3', 'train.lr=0.1'] -> dict; refuses anything without '='."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ParamError(f"bad parameter {item!r}: expected name=value")
        out[key.strip()] = value
    return out


def resolve_params(workflow: Workflow, overrides: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """-> {step: {param: value}}. `name=v` sets every step's `name`; `step.name=v` one step's."""
    overrides = dict(overrides or {})
    steps = {s.name: s for s in workflow.steps}
    per_step: dict[str, dict[str, ParamSpec]] = {
        s.name: {**workflow.params, **s.params} for s in workflow.steps
    }
    values: dict[str, dict[str, Any]] = {
        name: {k: p.default for k, p in specs.items()} for name, specs in per_step.items()
    }
    problems: list[str] = []
    for key, raw in overrides.items():
        step_name, dot, pname = key.rpartition(".")
        targets = [step_name] if dot else [n for n in per_step if key in per_step[n]]
        pname = pname if dot else key
        if dot and step_name not in steps:
            problems.append(f"{key}: no step named {step_name!r}")
            continue
        if not targets or any(pname not in per_step[t] for t in targets):
            problems.append(f"{key}: unknown parameter")
            continue
        for t in targets:
            try:
                values[t][pname] = coerce_param(per_step[t][pname].type, raw)
            except ValueError as exc:
                problems.append(f"{key}: {exc}")
                break
    for name, vals in values.items():
        for k, v in vals.items():
            if v is None:
                problems.append(f"{name}.{k}: required parameter has no value")
    if problems:
        raise ParamError("; ".join(sorted(set(problems))))
    return values
