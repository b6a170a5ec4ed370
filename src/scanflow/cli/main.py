"""`scanflow` CLI: validate, run, inspect runs, deploy/scale/roll out services, run agents.

Exit codes: 0 ok, 1 the thing ran and failed (e.g. a workflow step), 2 bad input (spec,
arguments, unknown names) — in which case nothing was started.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from scanflow.cli.agents import agents_app
from scanflow.cli.db import db_app
from scanflow.spec.errors import SpecError

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
runs_app = typer.Typer(no_args_is_help=True, help="Inspect workflow runs.")
app.add_typer(runs_app, name="runs")
app.add_typer(agents_app, name="agents")
app.add_typer(db_app, name="db")
out = Console()
err = Console(stderr=True)

AppPath = Annotated[Path, typer.Argument(help="spec file or folder with scanflow.yaml")]
Reason = Annotated[str, typer.Option(help="recorded in the audit trail")]


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def iso(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else "-"


@app.callback()
def _global(
    workspace: Annotated[
        Path | None, typer.Option("--workspace", "-w", help="state folder (default ./.scanflow)")
    ] = None,
) -> None:
    if workspace is not None:
        os.environ["SCANFLOW_WORKSPACE"] = str(workspace)
    from scanflow.settings import get_settings

    get_settings.cache_clear()
    _quiet_logs()


def _quiet_logs() -> None:
    import logging

    for name in ("mlflow", "alembic", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _ctx() -> tuple[Any, Any]:
    from scanflow.control import backends
    from scanflow.settings import get_settings

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


def _load(path: Path, with_registry: bool = False) -> Any:
    """The spec with every issue, the agents' parts included (`validate` and every command)."""
    from scanflow.spec import load_application

    known = None
    if with_registry:
        from scanflow.control import backends
        from scanflow.settings import get_settings

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


@app.command()
def validate(
    path: AppPath = Path("."),
    registry: Annotated[bool, typer.Option(help="check that services' models exist")] = False,
) -> None:
    """Check a spec without running anything."""
    spec = _load_noting(path, with_registry=registry)
    out.print(f"[green]ok[/] {spec.source}: app {spec.app!r}, team {spec.team!r}, "
              f"{len(spec.workflows)} workflow(s), {len(spec.services)} service(s), "
              f"{len(spec.agents)} agent(s)")


@app.command()
def run(
    path: AppPath,
    workflow: Annotated[str, typer.Argument(help="workflow name")],
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="name=value or step.name=value")
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="re-execute every step")] = False,
) -> None:
    """Run a workflow in the foreground, with progress."""
    from scanflow.control import backends
    from scanflow.engine import ParamError
    from scanflow.engine.params import parse_assignments, resolve_params

    spec = _load(path)
    if workflow not in spec.workflows:
        fail(f"no workflow {workflow!r} in {spec.source} (known: {', '.join(sorted(spec.workflows))})")
    try:
        params = parse_assignments(param or [])
        resolve_params(spec.workflows[workflow], params)
    except ParamError as exc:
        fail(str(exc))
    settings, store = _ctx()
    engine = backends.engine(settings, store)
    try:
        run_id = engine.submit(spec, workflow, params, cache=not no_cache, status="running")
    except ParamError as exc:
        fail(str(exc))
    _follow_run(engine, run_id, spec, workflow, lambda progress: engine.execute(run_id, spec, progress))


def _follow_run(engine: Any, run_id: str, spec: Any, workflow: str, go: Any) -> None:
    from rich.live import Live

    states = {s.name: "pending" for s in spec.workflows[workflow].steps}
    for row in engine.store.list_steps(run_id):
        states[row.step] = row.status
    started = time.time()

    def table() -> Table:
        t = Table(title=f"{spec.app}/{workflow} {run_id[:12]}  {time.time() - started:5.1f}s",
                  expand=False)
        t.add_column("step")
        t.add_column("status")
        colours = {"succeeded": "green", "failed": "red", "running": "yellow", "skipped": "dim",
                   "cached": "cyan", "cancelled": "magenta"}
        for k, v in states.items():
            t.add_row(k, f"[{colours.get(v, 'white')}]{v}[/]")
        return t

    with Live(table(), console=out, refresh_per_second=4, transient=False) as live:
        def progress(step: str, status: str) -> None:
            states[step] = status
            live.update(table())

        try:
            result = go(progress)
        except KeyboardInterrupt:
            err.print(f"interrupted; `scanflow resume {run_id[:12]}` continues it")
            raise typer.Exit(130) from None
        live.update(table())
    out.print(f"run [bold]{result.run_id}[/] {result.status}")
    if not result.ok:
        err.print(result.error or "", highlight=False, markup=False)
        raise typer.Exit(1)


@runs_app.command("list")
def runs_list(
    workflow: Annotated[str | None, typer.Option(help="only this workflow")] = None,
    limit: int = 20,
) -> None:
    _, store = _ctx()
    t = Table("run", "app/team", "workflow", "status", "started", "by")
    for r in store.list_runs(workflow, limit):
        t.add_row(r.id[:12], f"{r.app}/{r.team}", r.workflow, r.status, iso(r.started_at),
                  str(r.trigger.get("by", "")))
    out.print(t)


@runs_app.command("show")
def runs_show(run_id: str) -> None:
    _, store = _ctx()
    r = store.get_run(run_id)
    if r is None:
        fail(f"no run {run_id!r}")
    out.print(f"run {r.id}  {r.app}/{r.team}  workflow {r.workflow}  [bold]{r.status}[/]")
    out.print(f"started {iso(r.started_at)}  ended {iso(r.ended_at)}  mlflow {r.mlflow_run_id}")
    out.print(f"params {json.dumps(r.params)}  trigger {json.dumps(r.trigger)}")
    t = Table("step", "status", "exit", "tries", "secs", "cache key", "cached from")
    steps = store.list_steps(r.id)
    for s in steps:
        secs = f"{s.ended_at - s.started_at:.2f}" if s.ended_at and s.started_at else "-"
        src = s.cached_from.split("/") if s.cached_from else None
        t.add_row(s.step, s.status, str(s.exit_code if s.exit_code is not None else "-"),
                  str(s.attempts or 0), secs, (s.cache_key or "-")[:12],
                  f"{src[0][:12]}/{src[1]}" if src else "-")
    out.print(t)
    for s in steps:
        out.print(f"  {s.step}: log {s.log_path or '-'}  mlflow run {s.mlflow_run_id or '-'}",
                  highlight=False, soft_wrap=True)
    if r.error:
        err.print(r.error, markup=False, highlight=False)


@app.command()
def logs(
    run_id: str,
    step: Annotated[str | None, typer.Argument()] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing until the run ends")]
    = False,
) -> None:
    """Print a run's step logs."""
    from scanflow.store.store import TERMINAL

    _, store = _ctx()
    r = store.get_run(run_id)
    if r is None:
        fail(f"no run {run_id!r}")
    steps = store.list_steps(r.id)
    if step is not None and step not in {s.step for s in steps}:
        fail(f"run {r.id[:12]} has no step {step!r} (steps: {', '.join(s.step for s in steps)})")
    if not follow:
        for s in steps:
            if step and s.step != step:
                continue
            out.rule(s.step)
            if s.log_path and Path(s.log_path).exists():
                sys.stdout.write(Path(s.log_path).read_text(errors="replace"))
                sys.stdout.flush()
        return
    from scanflow.settings import get_settings

    run_dir = get_settings().runs_dir / r.id
    offsets: dict[str, int] = {}
    while True:
        names = [step] if step else [s.step for s in store.list_steps(r.id)]
        for name in names:
            path = run_dir / f"{name}.log"
            if not path.exists():
                continue
            with open(path, "rb") as f:
                f.seek(offsets.get(name, 0))
                chunk = f.read()
                offsets[name] = f.tell()
            if chunk:
                for line in chunk.decode("utf-8", "replace").splitlines():
                    sys.stdout.write(f"[{name}] {line}\n" if not step else line + "\n")
                sys.stdout.flush()
        cur = store.get_run(r.id)
        if cur is None or cur.status in TERMINAL:
            break
        time.sleep(0.3)


@app.command()
def cancel(run_id: str) -> None:
    """Stop a running (or queued) run: running steps are killed, pending ones never start."""
    from scanflow.control import backends

    settings, store = _ctx()
    try:
        state = backends.engine(settings, store).cancel(run_id)
    except (KeyError, ValueError) as exc:
        fail(str(exc).strip("'\""))
    out.print(f"run {run_id}: {state}")


@app.command()
def resume(run_id: str) -> None:
    """Re-run only the failed, cancelled, interrupted or never-started steps of a run."""
    from scanflow.control import backends

    settings, store = _ctx()
    engine = backends.engine(settings, store)  # recovers runs of dead engines first
    r = store.get_run(run_id)
    if r is None:
        fail(f"no run {run_id!r}")
    if r.status not in {"failed", "cancelled", "interrupted"}:
        fail(f"run {r.id[:12]} is {r.status}; only failed, cancelled or interrupted runs resume")
    if not r.spec_path:
        fail(f"run {r.id[:12]} was built in Python: resume it with LocalEngine.resume(run, app)")
    spec = _load(Path(r.spec_path))
    _follow_run(engine, r.id, spec, r.workflow, lambda progress: engine.resume(r.id, spec, progress))


engine_app = typer.Typer(no_args_is_help=True, help="Run queued and triggered workflows.")
app.add_typer(engine_app, name="engine")


def _load_noting(path: Path, with_registry: bool = False) -> Any:
    """`_load`, printing the spec's deprecated spellings (Python hides DeprecationWarning)."""
    import warnings

    from scanflow.spec.triggers import SpecDeprecationWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SpecDeprecationWarning)
        spec = _load(path, with_registry=with_registry)
    for w in caught:
        if issubclass(w.category, SpecDeprecationWarning):
            err.print(f"[yellow]deprecated[/] {spec.source}: {w.message}", highlight=False)
    return spec


@engine_app.command("serve")
def engine_serve(
    paths: Annotated[list[Path], typer.Argument(help="specs whose workflow triggers to watch")],
    max_runs: Annotated[int, typer.Option(min=1, help="runs at once")] = 2,
) -> None:
    """Fire the specs' workflow triggers (interval, cron, date; a workflow run finished, a model
    version registered or an alias moved, a prediction window full) and run queued runs fairly
    across teams, until Ctrl-C. What happened while it was down fires when it starts."""
    import signal as _signal

    from scanflow.control import backends
    from scanflow.control.workflow_triggers import WorkflowTriggers

    specs = [_load_noting(p) for p in paths]
    settings, store = _ctx()
    engine = backends.engine(settings, store)
    triggers = WorkflowTriggers(engine, specs)
    stopping = {"flag": False}
    _signal.signal(_signal.SIGTERM, lambda *_: stopping.update(flag=True))
    caught_up = triggers.start()
    out.print(f"watching {triggers.triggers} trigger(s) in {len(specs)} spec(s); caught up: "
              f"{len(caught_up)} run(s) queued for what happened while down; running queued runs "
              "(Ctrl-C stops)")
    try:
        engine.serve(lambda: stopping["flag"], max_runs=max_runs)
    except KeyboardInterrupt:
        pass
    finally:
        triggers.stop()


def _deployer() -> tuple[Any, Any]:
    from scanflow.control import backends

    settings, store = _ctx()
    return backends.deployer(settings, store), store


@app.command()
def deploy(
    path: AppPath,
    service: Annotated[str | None, typer.Argument(help="one service (default: all)")] = None,
) -> None:
    """Start the model server(s) of an application on 127.0.0.1."""
    spec = _load(path, with_registry=True)
    names = [service] if service else list(spec.services)
    if service and service not in spec.services:
        fail(f"no service {service!r} in {spec.source} (known: {', '.join(spec.services)})")
    deployer, _ = _deployer()
    for name in names:
        svc = spec.services[name]
        try:
            dep = deployer.deploy(name, app=spec.app, team=spec.team, model=svc.model,
                                  alias=svc.alias, replicas=svc.replicas, port=svc.port,
                                  batching=svc.batching)
        except (ValueError, KeyError) as exc:
            fail(str(exc))
        out.print(f"[green]deployed[/] {name}: models:/{dep.model_name}@{dep.alias} "
                  f"(version {dep.model_version}) x{dep.replicas} at http://{dep.host}:{dep.port}")


def _service_call(action: Any) -> Any:
    """Run a service action; bad input is exit 2 with its message, a held service lease exit 1."""
    from scanflow.control.leases import LeaseBusy  # the CLI starts fast: imports on use

    try:
        return action()
    except (ValueError, KeyError) as exc:
        fail(str(exc).strip("'\""))
    except LeaseBusy as exc:
        fail(f"{exc}; try again later", code=1)


def _operate(action: Any) -> Any:
    """Run a control operation (under the service's lease, recorded) as the person at the CLI."""
    from scanflow.control.operations import Actor, ModelOps  # the CLI starts fast: imports on use

    deployer, store = _deployer()
    return _service_call(lambda: action(ModelOps(deployer, store), Actor.person(deployer.actor)))


@app.command()
def scale(service: str, replicas: Annotated[int, typer.Argument(min=1, max=64)]) -> None:
    """Change the number of replicas of a running service."""
    done = _operate(lambda ops, me: ops.scale(service, replicas, actor=me))
    out.print(f"{service}: {done.deployment.replicas} replica(s)")


@app.command()
def rollout(
    service: str,
    version: Annotated[str | None, typer.Option(help="this version (default: what the alias says)")] = None,
    reason: Annotated[str, typer.Option(help="recorded in the audit trail")] = "",
) -> None:
    """Rolling update of a service's replicas (0 failed requests)."""
    done = _operate(lambda ops, me: ops.rollout(service, version, actor=me, reason=reason))
    out.print(f"{service}: serving version {done.deployment.model_version}")


@app.command()
def rollback(service: str, reason: Reason = "") -> None:
    """Serve the previous version again, in one step (the alias follows)."""
    dep = _operate(lambda ops, me: ops.rollback(service, actor=me, reason=reason)).deployment
    out.print(f"{service}: rolled back to version {dep.model_version} (was {dep.previous_version})")


@app.command()
def promote(
    service: str,
    version: Annotated[str, typer.Argument(help="the registered version offered")],
    spec: Annotated[Path | None, typer.Option(
        help="the application that declares the service's policy (default: the default policy)")] = None,
    holdout: Annotated[Path | None, typer.Option(
        help="clean labelled holdout .npz (x/y): the candidate may lose at most the policy's margin on it")
    ] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="promote even if the gate says no (recorded)")] = False,
    reason: Annotated[str, typer.Option(help="recorded in the audit trail")] = "",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Offer a version for promotion: the service policy's gate compares it with the champion on
    the same recent labelled requests (and the holdout); promoted and rolled out only if it
    passes. Exit 1 when rejected."""
    from scanflow.agents.promotion import offer
    from scanflow.spec.policy import Policy

    policy = Policy()
    deployer, store = _deployer()
    if spec is not None:
        app_spec = _load(spec)
        if service not in app_spec.services:
            fail(f"no service {service!r} in {app_spec.source} (known: {', '.join(app_spec.services)})")
        dep = store.get_deployment(service)
        if dep is not None and dep.app and dep.app != app_spec.app:
            fail(f"{app_spec.source} is app {app_spec.app!r}, but {service} was deployed from "
                 f"app {dep.app!r}")
        policy = app_spec.services[service].policy or Policy()
    elif not as_json:
        err.print("no --spec: judging with the default policy, not the service's own", highlight=False)
    res = _service_call(lambda: offer(deployer.settings, store, deployer, service, version,
                                      policy=policy, holdout=holdout, force=force, reason=reason))
    if as_json:
        print(json.dumps(res.to_dict(), default=str))
    else:
        verdict = ("[green]passed[/]" if res.gate.passed else
                   "[yellow]failed, forced[/]" if res.forced else "[red]rejected[/]")
        out.print(f"{service}: promotion gate {verdict} for version {version} "
                  f"(champion {res.champion_version})")
        for line in [*res.gate.reasons, *res.notes]:
            out.print(f"  - {line}", highlight=False)
        out.print(f"{service}: serving version {res.served_version}")
    if not res.promoted:
        raise typer.Exit(1)


@app.command()
def canary(
    service: str,
    version: Annotated[str | None, typer.Argument(help="the challenger; omit with --off")] = None,
    share: Annotated[float, typer.Option(min=0.001, max=1.0, help="fraction of requests")] = 0.1,
    off: Annotated[bool, typer.Option("--off", help="stop the canary")] = False,
) -> None:
    """Send a share of live traffic to a challenger version (answers returned and logged)."""
    if (version is None) == (not off):
        fail("give a VERSION, or --off to stop the canary")
    _operate(lambda ops, me: ops.canary(service, None if off else version, share, actor=me))
    out.print(f"{service}: canary stopped" if off else
              f"{service}: version {version} answers {share:.1%} of requests")


@app.command()
def shadow(
    service: str,
    version: Annotated[str | None, typer.Argument(help="the challenger; omit with --off")] = None,
    off: Annotated[bool, typer.Option("--off", help="stop shadowing")] = False,
) -> None:
    """Let a version score a copy of live traffic: logged, never returned."""
    if (version is None) == (not off):
        fail("give a VERSION, or --off to stop the shadow")
    _operate(lambda ops, me: ops.shadow(service, None if off else version, actor=me))
    out.print(f"{service}: shadow stopped" if off else f"{service}: version {version} shadows live traffic")


@app.command()
def stop(service: str) -> None:
    """Stop a service."""
    deployer, _ = _deployer()
    _service_call(lambda: deployer.stop(service))
    out.print(f"{service}: stopped")


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Services (champion, canary, shadow, previous version, live replicas per version) and agents."""
    from scanflow.agents.process import AgentSupervisor

    settings, store = _ctx()
    from scanflow.control import backends

    deployer = backends.deployer(settings, store)
    if as_json:
        print(json.dumps({
            "services": [deployer.status(d.service) for d in store.list_deployments()],
            "agents": AgentSupervisor(settings, store).status(),
        }, indent=2, default=str))
        return
    t = Table("service", "model", "champion", "canary", "shadow", "previous", "replicas (live)",
              "url", "status")
    for d in store.list_deployments():
        live = deployer.status(d.service) if d.status == "running" else None
        by_version: dict[str, int] = {}
        for w in (live or {}).get("workers", []):
            if not w["draining"] and w["model_version"]:
                by_version[w["model_version"]] = by_version.get(w["model_version"], 0) + 1
        canary = (live or {}).get("canary")
        t.add_row(
            d.service, f"{d.model_name}@{d.alias}", str(d.model_version),
            f"v{canary['version']} {canary['share']:.0%}" if canary else "-",
            (live or {}).get("shadow_version") or "-", str(d.previous_version or "-"),
            f"{d.replicas} ({', '.join(f'v{v}: {n}' for v, n in sorted(by_version.items())) or 0})",
            f"http://{d.host}:{d.port}", live["status"] if live else d.status,
        )
    out.print(t)
    a = Table("agent", "role", "pid", "status", "heartbeat")
    for row in AgentSupervisor(settings, store).status():
        a.add_row(row["name"], row["role"], str(row["pid"]), row["status"], iso(row["heartbeat"]))
    out.print(a)


@app.command()
def events(
    service: Annotated[str | None, typer.Option(help="only this service")] = None,
    kind: Annotated[list[str] | None, typer.Option(help="only these kinds")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The event log (drift detected, retrains, promotions, rollouts...)."""
    _, store = _ctx()
    rows = store.list_events(service, kind)
    if as_json:
        print(json.dumps([{"time": iso(e.ts), "kind": e.kind, "source": e.source,
                           "service": e.service, **e.payload} for e in rows], default=str))
        return
    t = Table("time", "source", "kind", "service", "details")
    for e in rows:
        details = ", ".join(f"{k}={v}" for k, v in e.payload.items() if not isinstance(v, list | dict))
        t.add_row(iso(e.ts), e.source, e.kind, e.service or "-", details[:120])
    out.print(t)


@app.command()
def decisions(
    agent: Annotated[str | None, typer.Option(help="only this agent")] = None,
    fired: Annotated[bool, typer.Option("--fired", help="only decisions that acted")] = False,
) -> None:
    """Every judgement of the agents, with its evidence and actions."""
    _, store = _ctx()
    t = Table("time", "agent", "sensor", "fired", "reason", "actions")
    for d in store.list_decisions(agent, fired=True if fired else None):
        acts = ", ".join(f"{a.get('action', '?').split(':')[-1]}:{a.get('status')}" for a in d.actions)
        t.add_row(iso(d.ts), d.agent, d.sensor, "yes" if d.fired else "no",
                  str(d.evidence.get("reason", ""))[:60], acts)
    out.print(t)


@app.command()
def why(
    service: str,
    as_json: Annotated[bool, typer.Option("--json", help="the whole chain with every evidence")] = False,
    history: Annotated[bool, typer.Option("--history", help="also every version/replica change")] = False,
) -> None:
    """Why the service serves this model version with this many replicas: each decision with
    its evidence, the action, the run and model version it produced, and who approved it."""
    from scanflow.audit import why as audit_why

    _, store = _ctx()
    try:
        res = audit_why(store, service)
    except KeyError as exc:
        fail(str(exc).strip("'\""))
    if as_json:
        print(json.dumps(res, default=str))
        return
    cur = res["current"]
    out.print(f"[bold]{service}[/]: models:/{cur['model']}@{cur['alias']} version "
              f"[bold]{cur['model_version']}[/] x[bold]{cur['replicas']}[/] ({cur['status']})")
    for label, link in (("model", res["model_change"]), ("replicas", res["replica_change"])):
        if link:
            out.print(f"  {label}: {link['event']['kind']} at {link['event']['time']}, "
                      f"approved by [bold]{link['approved_by']}[/]")
    t = Table("time (UTC)", "for", "step", "who", "what")
    for s in res["chain"]:
        t.add_row(iso(s["ts"]).replace("T", " ")[5:19], s["what"], s["step"], s["who"], s["summary"])
    out.print(t)
    if history:
        h = Table("time", "change", "by", "version", "replicas")
        for e in res["history"]:
            ver = f"{e['from_version'] or ''} -> {e['to_version']}" if e["to_version"] is not None else ""
            rep = f"{e['from_replicas'] or ''} -> {e['to_replicas']}" if e["to_replicas"] is not None else ""
            h.add_row(e["time"], e["kind"], e["approved_by"], ver, rep)
        out.print(h)


def main() -> None:
    try:
        app()
    except SpecError as exc:
        err.print(str(exc), markup=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
