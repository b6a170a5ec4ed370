"""`scanflow` CLI: validate, run, inspect runs, deploy/scale/roll out services, run agents.

Exit codes: 0 ok, 1 the thing ran and failed (e.g. a workflow step), 2 bad input (spec,
arguments, unknown names) — in which case nothing was started.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from scanflow.cli import history, init, server, services, workflows
from scanflow.cli import remote as via
from scanflow.cli.admin import admin_app
from scanflow.cli.agents import agents_app
from scanflow.cli.common import AppPath, err, fail, iso, load_noting, out
from scanflow.cli.db import db_app
from scanflow.spec.errors import SpecError

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)

__all__ = ["app", "err", "fail", "iso", "main", "out"]


@app.callback()
def _global(
    workspace: Annotated[
        Path | None, typer.Option("--workspace", "-w", help="state folder (default ./.scanflow)")
    ] = None,
) -> None:
    if workspace is not None:
        os.environ["SCANFLOW_WORKSPACE"] = str(workspace)
    from scanflow.settings import get_settings  # lazy: pydantic-settings (~90 ms)

    get_settings.cache_clear()
    _quiet_logs()


def _quiet_logs() -> None:
    for name in ("mlflow", "alembic", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)


def validate(
    path: AppPath = Path("."),
    registry: Annotated[bool, typer.Option(help="check that services' models exist")] = False,
) -> None:
    """Check a spec without running anything."""
    if (api := via.remote()) is not None:  # the server reads it (the path as its machine sees it)
        v = api.call("POST", "/api/v1/apps/validate", body={"path": str(path.resolve()),
                                                            "registry": registry})
        if not v["ok"]:
            for problem in v["problems"]:
                err.print(problem, style="red", markup=False, highlight=False, soft_wrap=True)
            fail(f"{len(v['problems'])} problem(s) in the spec; nothing was started")
        _validated(v["source"], v["app"], v["team"], v["workflows"], v["services"], v["agents"])
        return
    spec = load_noting(path, with_registry=registry)
    _validated(spec.source, spec.app, spec.team, len(spec.workflows), len(spec.services),
               len(spec.agents))


def _validated(source: object, app: str, team: str, workflows: int, services: int, agents: int) -> None:
    out.print(f"[green]ok[/] {source}: app {app!r}, team {team!r}, {workflows} workflow(s), "
              f"{services} service(s), {agents} agent(s)")


# The commands in the order `scanflow --help` lists them, then the groups.
for command in (
    validate, workflows.run, workflows.logs, workflows.cancel, workflows.resume,
    services.deploy, services.scale, services.resize, services.rollout, services.rollback, services.promote,
    services.canary, services.shadow, services.stop, services.status,
    history.events, history.decisions, history.why,
):
    app.command()(command)
app.command(name="init")(init.init)
app.command(name="server")(server.server)
app.add_typer(workflows.runs_app, name="runs")
app.add_typer(agents_app, name="agents")
app.add_typer(db_app, name="db")
app.add_typer(admin_app, name="admin")
app.add_typer(workflows.engine_app, name="engine")


def main() -> None:
    try:
        app()
    except SpecError as exc:
        err.print(str(exc), markup=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
