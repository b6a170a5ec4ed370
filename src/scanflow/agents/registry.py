"""Named sensors, rules and actuators: `@sensor`, `@rule`, `@actuator` register a function
under a name a spec can use (`func: windows`) instead of a 'module:function' path.

A YAML agent lists the modules that define them in `imports:` (looked up in the app folder
first); a Python-declared agent may pass the functions themselves or their names. The built-in
parts register when `scanflow.agents` is imported (its `__init__` imports `builtin`), so this
module imports nothing of the agents: `builtin` depends on it, not the other way round.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

from scanflow.spec.errors import SpecIssue
from scanflow.spec.loader import import_from_app, resolve_callable
from scanflow.spec.models import AgentSpec, Application

Kind = Literal["sensor", "rule", "actuator"]
F = TypeVar("F", bound=Callable[..., Any])

_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {"sensor": {}, "rule": {}, "actuator": {}}
_LOCK = threading.Lock()


def _origin(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def register(kind: Kind, name: str, fn: Callable[..., Any]) -> None:
    """Register `fn` as `name`; another function under a taken name is refused (re-importing
    the same module replaces its own entries)."""
    if not callable(fn):
        raise TypeError(f"@{kind} needs a function, got {fn!r}")
    with _LOCK:
        old = _REGISTRY[kind].get(name)
        if old is not None and old is not fn and _origin(old) != _origin(fn):
            raise ValueError(f"{kind} {name!r} is already registered by {_origin(old)}; "
                             f"cannot register {_origin(fn)} under the same name")
        _REGISTRY[kind][name] = fn
    fn.__dict__.setdefault("__scanflow_names__", {})[kind] = name


def _decorator(kind: Kind) -> Any:
    @overload
    def deco(fn: F, /) -> F: ...
    @overload
    def deco(name: str | None = None, /) -> Callable[[F], F]: ...

    def deco(arg: Any = None, /) -> Any:
        if callable(arg):
            register(kind, arg.__name__, arg)
            return arg

        def wrap(fn: F) -> F:
            register(kind, arg or fn.__name__, fn)
            return fn

        return wrap

    deco.__name__ = deco.__qualname__ = kind
    deco.__doc__ = (f"Register a {kind} by name: `@{kind}` (the function's name) or "
                    f"`@{kind}('name')`; the function itself is returned unchanged.")
    return deco


sensor = _decorator("sensor")
rule = _decorator("rule")
actuator = _decorator("actuator")


def registered(kind: Kind) -> dict[str, Callable[..., Any]]:
    with _LOCK:
        return dict(_REGISTRY[kind])


def name_of(fn: str | Callable[..., Any], kind: Kind) -> str:
    """How decisions and action keys name a part: its spec string, registered name or qualname."""
    if isinstance(fn, str):
        return fn
    names = getattr(fn, "__dict__", {}).get("__scanflow_names__", {})
    return names.get(kind) or getattr(fn, "__qualname__", repr(fn))


def import_modules(modules: Iterable[str], base_dir: Path | None) -> None:
    for m in modules:
        import_from_app(m, base_dir)


def resolve(
    kind: Kind, ref: str | Callable[..., Any], base_dir: Path | None = None,
    imports: Iterable[str] = (),
) -> Callable[..., Any]:
    """A callable from a function, 'module:function', or a registered name."""
    if callable(ref) or ":" in ref:
        return resolve_callable(ref, base_dir)
    import_modules(imports, base_dir)
    found = registered(kind).get(ref)
    if found is None:
        known = ", ".join(sorted(registered(kind))) or "none"
        hint = "" if imports else " (list the module that defines it in the agent's `imports:`)"
        raise LookupError(f"no {kind} registered as {ref!r}{hint}; registered: {known}")
    return found


def spec_issues(agent: AgentSpec, base_dir: Path | None) -> list[tuple[str, str]]:
    """(path under the agent, problem) for every part of an AgentSpec that does not resolve."""
    out: list[tuple[str, str]] = []
    try:
        import_modules(agent.imports, base_dir)
    except Exception as exc:  # noqa: BLE001 - any import failure is a spec issue
        return [("imports", f"cannot import: {type(exc).__name__}: {exc}")]
    for i, s in enumerate(agent.sensors):
        where = f"sensors[{i}]"
        parts: list[tuple[str, Kind, Any]] = []
        if s.func is not None:
            parts.append((f"{where}.func", "sensor", s.func))
        if s.rule is not None:
            parts.append((f"{where}.rule.func", "rule", s.rule.func))
        parts += [(f"{where}.actuators[{k}].func", "actuator", a.func) for k, a in enumerate(s.actuators)]
        for path, kind, ref in parts:
            try:
                resolve(kind, ref, base_dir, agent.imports)
            except LookupError as exc:
                out.append((path, str(exc)))
            except Exception as exc:  # noqa: BLE001
                out.append((path, f"cannot import {ref!r}: {exc}"))
    return out


def agent_issues(app: Application) -> list[SpecIssue]:
    """Every agent part of `app` that does not resolve, as spec issues (`agents.<name>...`).

    The spec cannot check these names itself (they live in this registry); pass this to
    `load_application(..., checks=[agent_issues])` to get them in the same report."""
    return [SpecIssue(f"agents.{name}.{path}", msg, app.source)
            for name, ag in app.agents.items() for path, msg in spec_issues(ag, app.base_dir)]
