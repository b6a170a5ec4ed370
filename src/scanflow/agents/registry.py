"""Named sensors, rules and actuators: `@sensor`, `@rule`, `@actuator` register a function
under a name a spec can use (`func: windows`) instead of a 'module:function' path.

A YAML agent lists the modules that define them in `imports:` (looked up in the app folder
first); a Python-declared agent may pass the functions themselves or their names. The built-in
parts register when `scanflow.agents` is imported (its `__init__` imports `builtin`), so this
module imports nothing of the agents: `builtin` depends on it, not the other way round.
"""

from __future__ import annotations

import difflib
import inspect
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


LEADING = {"sensor": ("ctx",), "rule": ("obs", "ctx"), "actuator": ("obs", "ctx")}
"""What the runtime passes a part before its params: a sensor `fn(ctx, **params)`, a rule and
an actuator `fn(obs, ctx, **params)`; these are not the user's params."""

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def param_issues(kind: Kind, fn: Callable[..., Any], params: dict[str, Any]) -> list[tuple[str, str]]:
    """(param or '', problem) for `params` that `fn` would refuse when the runtime calls it:
    an unknown name (unless it takes **kwargs), a required one missing, or too few leading
    parameters for what the runtime passes. A signature Python cannot read is not checked."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    origin = _origin(fn)
    leading = LEADING[kind]
    rest = list(sig.parameters.values())
    takes_args = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in rest)
    n_positional = sum(1 for p in rest if p.kind in _POSITIONAL)
    if n_positional < len(leading) and not takes_args:
        return [("", f"{origin} must take ({', '.join(leading)}, ...) first: the runtime calls "
                     f"{kind}s as {name_of(fn, kind)}({', '.join(leading)}, **params)")]
    rest = rest[len(leading):] if n_positional >= len(leading) else rest[n_positional:]
    accepted = [p for p in rest if p.kind in (*_POSITIONAL, inspect.Parameter.KEYWORD_ONLY)
                and p.kind is not inspect.Parameter.POSITIONAL_ONLY]
    names = [p.name for p in accepted]
    var_kw = [f"**{p.name}" for p in rest if p.kind is inspect.Parameter.VAR_KEYWORD]
    accepts = ", ".join(names + var_kw) or "none"
    out: list[tuple[str, str]] = []
    if not var_kw:
        for key in params:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                out.append((str(key), f"unknown param {key!r} of {origin} "
                                      f"(accepts: {accepts}){hint}"))
    for p in accepted:
        if p.default is inspect.Parameter.empty and p.name not in params:
            out.append((p.name, f"required param {p.name!r} of {origin} is missing "
                                f"(accepts: {accepts})"))
    return out


def spec_issues(agent: AgentSpec, base_dir: Path | None) -> list[tuple[str, str]]:
    """(path under the agent, problem) for every part of an AgentSpec that does not resolve,
    or whose params its function would refuse (see `param_issues`)."""
    out: list[tuple[str, str]] = []
    try:
        import_modules(agent.imports, base_dir)
    except Exception as exc:  # noqa: BLE001 - any import failure is a spec issue
        return [("imports", f"cannot import: {type(exc).__name__}: {exc}")]
    for i, s in enumerate(agent.sensors):
        where = f"sensors[{i}]"
        parts: list[tuple[str, Kind, Any, dict[str, Any]]] = []
        if s.func is not None:
            parts.append((where, "sensor", s.func, s.params))
        if s.rule is not None:
            parts.append((f"{where}.rule", "rule", s.rule.func, s.rule.params))
        parts += [(f"{where}.actuators[{k}]", "actuator", a.func, a.params)
                  for k, a in enumerate(s.actuators)]
        for path, kind, ref, params in parts:
            try:
                fn = resolve(kind, ref, base_dir, agent.imports)
            except LookupError as exc:
                out.append((f"{path}.func", str(exc)))
                continue
            except Exception as exc:  # noqa: BLE001 - any import failure is a spec issue
                out.append((f"{path}.func", f"cannot import {ref!r}: {type(exc).__name__}: {exc}"))
                continue
            out += [(f"{path}.params.{p}" if p else f"{path}.func", msg)
                    for p, msg in param_issues(kind, fn, params)]
    return out


def agent_issues(app: Application) -> list[SpecIssue]:
    """Every agent part of `app` that does not resolve, as spec issues (`agents.<name>...`).

    The spec cannot check these names itself (they live in this registry); pass this to
    `load_application(..., checks=[agent_issues])` to get them in the same report."""
    return [SpecIssue(f"agents.{name}.{path}", msg, app.source)
            for name, ag in app.agents.items() for path, msg in spec_issues(ag, app.base_dir)]
