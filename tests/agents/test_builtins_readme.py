"""The README's section on the built-in agents stays true to the code: every registered built-in
part is listed, and every `param=default` it quotes for a built-in is that function's default."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Any

import scanflow.agents  # noqa: F401 - registers the built-in parts
from scanflow.agents.planner import actuators as planner_actuators
from scanflow.agents.planner import signals as planner_signals
from scanflow.agents.registry import registered

README = Path(__file__).resolve().parents[2] / "README.md"
TITLE = "### The built-in agents: wiring and contracts"


def _section() -> str:
    text = README.read_text()
    start = text.index(TITLE)
    return text[start:text.index("\n### ", start + len(TITLE))]


def _builtins() -> dict[str, Any]:
    parts = {n: f for kind in ("sensor", "rule", "actuator") for n, f in registered(kind).items()
             if f.__module__ == "scanflow.agents.builtin"}
    parts.update({f.__name__: f for f in (planner_signals.service_signals, planner_actuators.decide,
                                          planner_actuators.execute)})
    return parts


def test_every_builtin_part_is_listed() -> None:
    section = _section()
    missing = [name for name in _builtins() if f"`{name}`" not in section]
    assert not missing, f"README {TITLE!r} does not list {missing}"


def test_the_defaults_it_quotes_are_the_functions_defaults() -> None:
    section = _section()
    parts = _builtins()
    names = "|".join(map(re.escape, parts))
    wrong = []
    # what follows a part's name, up to the next part, cell or item, holds its `param=default`s
    part = rf"`(?:scanflow\.agents\.planner:)?({names})`"
    for m in re.finditer(rf"{part}([^|;]*?)(?={part}|[|;]|$)", section, flags=re.S):
        params = inspect.signature(parts[m[1]]).parameters
        for p, raw in re.findall(r"`(\w+)=([^`]+)`", m[2]):
            if p not in params or params[p].default in (None, inspect.Parameter.empty):
                continue  # prose (`new_data=<path>`), or a None default quoted as what it means
            try:
                quoted = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                quoted = raw
            if quoted != params[p].default:
                wrong.append(f"{m[1]}: {p}={raw} but the default is {params[p].default!r}")
    assert not wrong, "README quotes wrong defaults: " + "; ".join(wrong)
