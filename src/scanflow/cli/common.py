"""What every `scanflow` command shares: the consoles, failing with an exit code, the
workspace's store, loading a spec with all its issues, and running a service operation.

The CLI starts fast (`scanflow --help` loads neither SQLAlchemy nor MLflow): the store, the
backends and the agents are imported inside the function that needs them.
"""

from __future__ import annotations

import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from scanflow.spec import load_application
from scanflow.spec.errors import SpecError
from scanflow.spec.triggers import SpecDeprecationWarning

out = Console()
err = Console(stderr=True)

AppPath = Annotated[Path, typer.Argument(help="spec file or folder with scanflow.yaml")]
Reason = Annotated[str, typer.Option(help="recorded in the audit trail")]


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def iso(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else "-"


def context() -> tuple[Any, Any]:
    """The settings and the workspace's store (exit 2 for a backend this release lacks)."""
    from scanflow.control import backends  # lazy: the store (SQLAlchemy, ~0.5 s)
    from scanflow.settings import get_settings  # lazy: pydantic-settings (~90 ms)

    settings = get_settings().ensure()
    try:
        return settings, backends.store(settings)
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
            err.print(f"[red]{issue}[/]", highlight=False)
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
