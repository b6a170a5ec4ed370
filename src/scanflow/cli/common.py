"""What every `scanflow` command shares: the consoles, failing with an exit code, the
workspace's store, loading a spec with all its issues, and running a service operation.

The CLI starts fast (`scanflow --help` loads neither SQLAlchemy nor MLflow): the store, the
backends and the agents are imported inside the function that needs them.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from scanflow.jsonsafe import json_safe
from scanflow.spec import load_application
from scanflow.spec.errors import SpecError
from scanflow.spec.triggers import SpecDeprecationWarning
from scanflow.times import iso_utc

out = Console()
err = Console(stderr=True)

AppPath = Annotated[Path, typer.Argument(help="spec file or folder with scanflow.yaml")]
Reason = Annotated[str, typer.Option(help="recorded in the audit trail")]


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def when(ts: float | None) -> str | None:
    """A time as every `--json` writes it: ISO 8601 UTC to the millisecond
    ("2026-12-06T06:10:00.123Z"); None stays None."""
    return iso_utc(ts)


def iso(ts: float | None) -> str:
    """A time as the tables show it: the same text as in `--json`, "-" for none."""
    return when(ts) or "-"


def timed(row: dict[str, Any], *fields: str) -> dict[str, Any]:
    """`row` for `--json`: each epoch field becomes its ISO time, its number kept as `<field>_ts`."""
    for f in fields:
        if f in row:
            ts = row[f]
            row[f], row[f"{f}_ts"] = when(ts), ts
    return row


def print_json(value: Any, indent: int | None = None) -> None:
    """Print `value` for scripts: JSON has no NaN or infinity (they become null), numpy
    scalars become numbers, anything else without a JSON form its text."""

    print(json.dumps(json_safe(value), indent=indent, default=str))


def table(*columns: str, title: str | None = None) -> Table:
    """A table whose cells wrap, never cut with "…" (a time column stays whole); print it with
    `show`."""
    t = Table(title=title)
    for c in columns:
        t.add_column(c, overflow="fold", no_wrap=c.startswith("time"))
    return t


def show(t: Table, head: int = 1) -> None:
    """Print a table so that nothing is cut: whole on a terminal wide enough for it; on a
    narrower one (80 columns) one block per row, its first `head` cells then one line per
    column; in a pipe one whole line per row however long (`grep` finds it)."""
    natural = Measurement.get(out, out.options.update_width(100_000), t).maximum
    if not out.is_terminal:
        Console(width=max(natural, out.width)).print(t)  # (`print(width=)` is capped at the console's)
    elif natural <= out.width:
        out.print(t)
    else:
        _stacked(t, head)


def _stacked(t: Table, head: int) -> None:
    if t.title:
        out.print(t.title, style="bold")
    cells = [[str(v) for v in c.cells] for c in t.columns]
    labels = [str(c.header) for c in t.columns]
    pad = max((len(label) for label in labels[head:]), default=0)
    for i in range(t.row_count):
        out.print("  ".join(col[i] for col in cells[:head]), style="bold", highlight=False)
        for label, col in zip(labels[head:], cells[head:], strict=True):
            if col[i] not in ("", "-"):
                out.print(f"  {label:<{pad}}  {col[i]}", highlight=False)


def context() -> tuple[Any, Any]:
    """The settings and the workspace's store (exit 2 for a backend this release lacks)."""
    from scanflow.control import backends  # lazy: the store (SQLAlchemy, ~0.5 s)
    from scanflow.settings import get_settings  # lazy: pydantic-settings (~90 ms)

    settings = get_settings().ensure()
    try:
        return settings, backends.store(settings)
    except backends.UnknownBackend as exc:
        fail(str(exc))


def build_engine(settings: Any, store: Any) -> Any:
    """The settings' workflow engine (exit 2 when it cannot be built, e.g. no Ray cluster)."""
    from scanflow.control import backends  # lazy: the engine's backend (MLflow, ray)

    try:
        return backends.engine(settings, store)
    except backends.UnknownBackend as exc:
        fail(str(exc))


def _agent_issues(app: Any) -> list[Any]:
    """The agents' checks, importing the agent runtime only for an app that has agents."""
    if not app.agents:
        return []
    from scanflow.agents.registry import agent_issues  # lazy: the agent runtime (CLI start-up)

    return agent_issues(app)


def load(path: Path, with_registry: bool = False) -> Any:
    """The spec with every issue, the agents' parts included (`validate` and every command)."""
    known = None
    if with_registry:
        from scanflow.control import backends  # lazy: SQLAlchemy, MLflow (~2 s)
        from scanflow.settings import get_settings  # lazy: pydantic-settings (~90 ms)

        try:
            known = backends.tracker(get_settings().ensure()).registered_models()
        except backends.UnknownBackend as exc:
            fail(str(exc))
    try:
        return load_application(path, known_models=known, checks=[_agent_issues])
    except SpecError as exc:
        for issue in exc.issues:
            err.print(str(issue), style="red", markup=False, highlight=False, soft_wrap=True)
        fail(f"{len(exc.issues)} problem(s) in the spec; nothing was started")


def load_noting(path: Path, with_registry: bool = False) -> Any:
    """`load`, printing the spec's deprecated spellings (Python hides DeprecationWarning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SpecDeprecationWarning)
        spec = load(path, with_registry=with_registry)
    for w in caught:
        if issubclass(w.category, SpecDeprecationWarning):
            err.print(f"[yellow]deprecated[/] {spec.source}: {w.message}", highlight=False)
    return spec


def deployer_and_store() -> tuple[Any, Any]:
    """The deployer the settings choose, acting as the person at the CLI, and its store."""
    from scanflow.control import backends  # lazy: the store (SQLAlchemy, ~0.5 s)

    settings, store = context()
    return backends.deployer(settings, store), store


def service_call(action: Any) -> Any:
    """Run a service action; bad input is exit 2 with its message, a held service lease exit 1."""
    from scanflow.control.leases import LeaseBusy  # the CLI starts fast: imports on use

    try:
        return action()
    except (ValueError, KeyError) as exc:
        fail(str(exc).strip("'\""))
    except LeaseBusy as exc:
        fail(f"{exc}; try again later", code=1)


def operate(action: Any) -> Any:
    """Run a control operation (under the service's lease, recorded) as the person at the CLI."""
    from scanflow.control.operations import Actor, ModelOps  # the CLI starts fast: imports on use

    deployer, store = deployer_and_store()
    return service_call(lambda: action(ModelOps(deployer, store), Actor.person(deployer.actor)))
