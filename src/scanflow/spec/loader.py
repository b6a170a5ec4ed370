"""Load `scanflow.yaml` and validate it whole before anything runs."""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from scanflow.spec.code import importable
from scanflow.spec.errors import SpecError, SpecIssue, format_path
from scanflow.spec.models import NAME, Application

AppCheck = Callable[[Application], Iterable[SpecIssue]]
"""A further check of a whole application, run by `validate_application` with its own: how a
higher layer (the agents, with their registered sensors, rules and actuators) adds its checks
without the spec importing it."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a spec must refuse them instead."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def _issues_from_pydantic(err: ValidationError, file: str | None) -> list[SpecIssue]:
    out = []
    for e in err.errors():
        loc = [p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        msg = msg.removeprefix("Value error, ")
        out.append(SpecIssue(format_path(loc), msg, file))
    return out


def _find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in graph.get(n, []):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if state.get(m) is None and m in graph:
                found = visit(m)
                if found:
                    return found
        state[n] = 2
        stack.pop()
        return None

    for n in graph:
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def import_from_app(mod_name: str, base_dir: Path | None) -> Any:
    """Import `mod_name`, preferring the app folder's own file: two apps may both have a
    `steps.py`, and the one already in `sys.modules` may belong to the other."""
    if base_dir is None:
        return importlib.import_module(mod_name)
    if str(base_dir) not in sys.path:
        sys.path.insert(0, str(base_dir))
    rel = Path(*mod_name.split("."))
    for candidate in (base_dir / rel.with_suffix(".py"), base_dir / rel / "__init__.py"):
        if candidate.is_file():
            loaded = sys.modules.get(mod_name)
            loaded_file = getattr(loaded, "__file__", None) if loaded is not None else None
            if loaded_file and Path(loaded_file).resolve() == candidate.resolve():
                return loaded
            spec = importlib.util.spec_from_file_location(mod_name, candidate)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:  # a half-run module must not be found next time as if it worked
                if sys.modules.get(mod_name) is module:
                    del sys.modules[mod_name]
                raise
            return module
    return importlib.import_module(mod_name)


def resolve_callable(path: str | Callable[..., Any], base_dir: Path | None = None) -> Callable[..., Any]:
    """'package.module:function' -> the function; the app folder is importable."""
    if callable(path):
        return path
    mod_name, _, attr = path.partition(":")
    mod = import_from_app(mod_name, base_dir)
    obj: Any = mod
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{path} is not callable")
    return obj


def _semantic_issues(
    app: Application, file: str | None, known_models: Iterable[str] | None, check_imports: bool,
    checks: Iterable[AppCheck],
) -> list[SpecIssue]:
    issues: list[SpecIssue] = []

    def add(path: str, msg: str) -> None:
        issues.append(SpecIssue(path, msg, file))

    for i, path in enumerate(app.code_modules().values()):
        if path.suffix == ".py" and not path.is_file():
            add(f"code_paths[{i}]", f"{app.code_paths[i]} is not a file (resolved to {path})")
        elif path.suffix != ".py" and not (path / "__init__.py").is_file():
            add(f"code_paths[{i}]", f"{app.code_paths[i]} is not a package folder with an "
                f"__init__.py (resolved to {path})")
    if check_imports and not issues:
        importable(app)  # the steps' own imports may need them
    for section in ("workflows", "services", "agents"):
        for key in getattr(app, section):
            if not re.match(NAME, str(key)):
                add(f"{section}.{key}", "names start with a letter and use letters, digits, _ . -")

    for wf_name, wf in app.workflows.items():
        base = f"workflows.{wf_name}"
        names: dict[str, int] = {}
        for i, st in enumerate(wf.steps):
            if st.name in names:
                add(f"{base}.steps[{i}].name", f"duplicate step name {st.name!r} "
                    f"(also steps[{names[st.name]}])")
            else:
                names[st.name] = i
        outputs = {st.name: set(st.outputs) for st in wf.steps}
        for i, st in enumerate(wf.steps):
            for j, dep in enumerate(st.after):
                if dep not in names:
                    add(f"{base}.steps[{i}].after[{j}]", f"no step named {dep!r} in this workflow")
                elif dep == st.name:
                    add(f"{base}.steps[{i}].after[{j}]", "a step cannot depend on itself")
            for local, ref in st.inputs.items():
                src, _, out = ref.partition(".")
                where = f"{base}.steps[{i}].inputs.{local}"
                if not out:
                    add(where, f"expected 'step.output', got {ref!r}")
                elif src not in names:
                    add(where, f"no step named {src!r} in this workflow")
                elif out not in outputs[src]:
                    add(where, f"step {src!r} declares no output {out!r}")
            if len(set(st.outputs)) != len(st.outputs):
                add(f"{base}.steps[{i}].outputs", "duplicate output name")
            clash = set(st.params) & set(st.inputs) | set(st.params) & set(st.outputs)
            if clash:
                add(f"{base}.steps[{i}]", f"names used both as param and input/output: {sorted(clash)}")
            if check_imports and st.call is not None:
                try:
                    resolve_callable(st.call, app.base_dir)
                except Exception as exc:  # noqa: BLE001 - report any import failure as a spec issue
                    add(f"{base}.steps[{i}].call", f"cannot import {st.call!r}: {exc}")
        graph = {st.name: [d for d in st.deps() if d in names] for st in wf.steps}
        cycle = _find_cycle(graph)
        if cycle:
            first = cycle[0]
            add(f"{base}.steps[{names[first]}].after",
                "dependency cycle: " + " -> ".join(reversed(cycle)))

    models = set(app.registered_models()) | set(known_models or ())
    for name, svc in app.services.items():
        if known_models is not None and svc.model not in models:
            declared = ", ".join(sorted(app.registered_models())) or "none"
            add(f"services.{name}.model",
                f"unknown model {svc.model!r}: not registered in MLflow and not declared by this "
                f"app (declare it in the top-level `models:`, or in the `registers:` of the step "
                f"that registers it; declared here: {declared})")

    for name, ag in app.agents.items():
        if ag.service is not None and ag.service not in app.services:
            add(f"agents.{name}.service", f"no service named {ag.service!r} in this application")
    if check_imports:
        for check in checks:
            issues.extend(check(app))
    return issues


def validate_application(
    app: Application,
    *,
    known_models: Iterable[str] | None = None,
    check_imports: bool = True,
    checks: Iterable[AppCheck] = (),
) -> Application:
    """Raise SpecError with every semantic problem; `known_models` are the registry's names.

    `checks` (run only with `check_imports`, since they import the app's code) add a higher
    layer's issues to the same report, e.g. `scanflow.agents.registry.agent_issues`."""
    issues = _semantic_issues(app, app.source, known_models, check_imports, checks)
    if issues:
        raise SpecError(issues)
    return app


def _yaml_kind(data: Any) -> str:
    kinds = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}
    return kinds.get(type(data), type(data).__name__)


def parse_application(
    data: Any,
    *,
    file: str | None = None,
    base_dir: Path | None = None,
    known_models: Iterable[str] | None = None,
    check_imports: bool = True,
    checks: Iterable[AppCheck] = (),
) -> Application:
    """A spec already read into Python data (`file` and `base_dir` say where it came from)."""
    if not isinstance(data, dict):
        got = "nothing" if data is None else f"a {_yaml_kind(data)}"
        raise SpecError([SpecIssue("", f"a spec is a YAML mapping (app:, team:, ...), got {got}", file)])
    try:
        app = Application.model_validate(data)
    except ValidationError as err:
        raise SpecError(_issues_from_pydantic(err, file)) from None
    app.base_dir = (base_dir or Path(".")).resolve()
    app.source = file
    return validate_application(app, known_models=known_models, check_imports=check_imports,
                                checks=checks)


def _read_yaml(p: Path, file: str) -> Any:
    """The YAML data of a spec file; an unreadable, binary, non-UTF-8 or non-YAML file is a
    SpecError naming the file (never a traceback, whatever the file holds)."""
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise SpecError([SpecIssue("", f"cannot read: {exc.strerror or exc}", file)]) from None
    if b"\x00" in raw:
        raise SpecError([SpecIssue("", "a binary file, not a YAML spec", file)])
    try:
        text = raw.decode("utf-8-sig")  # a BOM is fine
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise SpecError([SpecIssue("", f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}); "
                                   "save the spec as UTF-8", file)]) from None
    if not text.strip():
        raise SpecError([SpecIssue("", "the file is empty; a spec is a YAML mapping (app:, team:, ...)",
                                   file)])
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.reader.ReaderError as exc:  # a control character: say where, not "<unicode string>"
        line = text[:exc.position].count("\n") + 1
        raise SpecError([SpecIssue(f"line {line}", f"invalid YAML: character #x{exc.character:04x} is "
                                   "not allowed", file)]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([SpecIssue(where, f"invalid YAML: {problem}", file)]) from None
    except (ValueError, RecursionError) as exc:  # e.g. a date PyYAML cannot build, absurd nesting
        raise SpecError([SpecIssue("", f"invalid YAML: {exc}", file)]) from None


def load_application(
    path: str | Path,
    *,
    known_models: Iterable[str] | None = None,
    check_imports: bool = True,
    checks: Iterable[AppCheck] = (),
) -> Application:
    """Read a spec file (a folder means its `scanflow.yaml`); see `validate_application`."""
    p = Path(path)
    if p.is_dir():
        p = p / "scanflow.yaml"
    file = str(p)
    data = _read_yaml(p, file)
    return parse_application(
        data, file=file, base_dir=p.parent, known_models=known_models, check_imports=check_imports,
        checks=checks,
    )
