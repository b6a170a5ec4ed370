"""Service commands: `deploy`, `scale`, `rollout`, `rollback`, `promote`, `canary`, `shadow`,
`stop`, `status`. Every change goes through the control layer's model operations (under the
service's lease, recorded as done by the person at the CLI)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from scanflow.cli import remote as via
from scanflow.cli.common import (
    AppPath,
    Reason,
    context,
    deployer_and_store,
    err,
    fail,
    iso,
    load,
    operate,
    out,
    print_json,
    service_call,
    show,
    table,
    timed,
)
from scanflow.spec.policy import Policy


def _post(service: str, op: str, body: dict[str, Any] | None = None) -> Any:
    """An operation through the server (`SCANFLOW_SERVER`); None in the local mode."""
    api = via.remote()
    return None if api is None else api.call("POST", f"/api/v1/services/{service}/{op}", body=body or {})


def deploy(
    path: AppPath,
    service: Annotated[str | None, typer.Argument(help="one service (default: all)")] = None,
) -> None:
    """Start the model server(s) of an application on 127.0.0.1."""
    api = via.remote()
    spec = load(path, with_registry=api is None)
    names = [service] if service else list(spec.services)
    if service and service not in spec.services:
        fail(f"no service {service!r} in {spec.source} (known: {', '.join(spec.services)})")
    if api is not None:
        api.ensure_app(spec.app, spec.team, path)
        for name in names:
            d = api.call("POST", f"/api/v1/services/{name}/deploy", body={"app": spec.app, "team": spec.team})
            out.print(f"[green]deployed[/] {name}: models:/{d['model_name']}@{d['alias']} "
                      f"(version {d['model_version']}) x{d['replicas']} at {d['url']}")
        return
    deployer, _ = deployer_and_store()
    for name in names:
        svc = spec.services[name]
        try:
            dep = deployer.deploy(name, app=spec.app, team=spec.team, model=svc.model,
                                  alias=svc.alias, replicas=svc.replicas, port=svc.port,
                                  batching=svc.batching, resources=svc.resources,
                                  policy=svc.policy)
        except (ValueError, KeyError) as exc:
            fail(str(exc))
        out.print(f"[green]deployed[/] {name}: models:/{dep.model_name}@{dep.alias} "
                  f"(version {dep.model_version}) x{dep.replicas} at {deployer.url(name)}")
        warning = (deployer.status(name).get("resources") or {}).get("warning")
        if warning:
            err.print(f"[yellow]warning[/] {name}: {warning}; serving anyway", highlight=False)


def scale(service: str, replicas: Annotated[int, typer.Argument(min=1, max=64)]) -> None:
    """Change the number of replicas of a running service."""
    if (done := _post(service, "scale", {"replicas": replicas})) is not None:
        out.print(f"{service}: {done['replicas']} replica(s)")
        return
    done = operate(lambda ops, me: ops.scale(service, replicas, actor=me))
    out.print(f"{service}: {done.deployment.replicas} replica(s)")


def resize(
    service: str,
    cpus: Annotated[float, typer.Option(min=0.01, max=64.0, help="CPU quota per replica")],
    reason: Annotated[str, typer.Option(help="recorded in the audit trail")] = "",
) -> None:
    """Change the CPU quota of a running service's replicas, in place (no restart)."""
    if (res := _post(service, "resize", {"cpus": cpus, "reason": reason})) is not None:
        out.print(f"{service}: {res['detail']['cpus']:g} CPU per replica"
                  + ("" if res["detail"]["changed"] else " (unchanged)"))
        return
    done = operate(lambda ops, me: ops.resize(service, cpus, actor=me, reason=reason))
    out.print(f"{service}: {done.after:g} CPU per replica"
              + ("" if done.changed else " (unchanged)"))


def rollout(
    service: str,
    version: Annotated[str | None, typer.Option(help="this version (default: what the alias says)")] = None,
    reason: Annotated[str, typer.Option(help="recorded in the audit trail")] = "",
) -> None:
    """Rolling update of a service's replicas (0 failed requests)."""
    if (res := _post(service, "rollout", {"version": version, "reason": reason})) is not None:
        out.print(f"{service}: serving version {res['model_version']}")
        return
    done = operate(lambda ops, me: ops.rollout(service, version, actor=me, reason=reason))
    out.print(f"{service}: serving version {done.deployment.model_version}")


def rollback(service: str, reason: Reason = "") -> None:
    """Serve the previous version again, in one step (the alias follows)."""
    if (res := _post(service, "rollback", {"reason": reason})) is not None:
        out.print(f"{service}: rolled back to version {res['model_version']} "
                  f"(was {res['previous_version']})")
        return
    dep = operate(lambda ops, me: ops.rollback(service, actor=me, reason=reason)).deployment
    out.print(f"{service}: rolled back to version {dep.model_version} (was {dep.previous_version})")


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
    from scanflow.agents.promotion import offer  # lazy: the agents' gate (MLflow, numpy)

    if via.remote() is not None:
        if holdout is not None:
            fail("--holdout is a file of this machine: through a server, the service's registered "
                 "application's policy judges on the service's labelled requests alone")
        r = _post(service, "promote", {"version": version, "force": force, "reason": reason})
        _print_offer(service, version, as_json, r["passed"], r["forced"], r["promoted"],
                     r["champion_version"], r["served_version"], r["reasons"], r)
        return
    policy = Policy()
    deployer, store = deployer_and_store()
    if spec is not None:
        app_spec = load(spec)
        if service not in app_spec.services:
            fail(f"no service {service!r} in {app_spec.source} (known: {', '.join(app_spec.services)})")
        dep = store.get_deployment(service)
        if dep is not None and dep.app and dep.app != app_spec.app:
            fail(f"{app_spec.source} is app {app_spec.app!r}, but {service} was deployed from "
                 f"app {dep.app!r}")
        policy = app_spec.services[service].policy or Policy()
    elif not as_json:
        err.print("no --spec: judging with the default policy, not the service's own", highlight=False)
    res = service_call(lambda: offer(deployer.settings, store, deployer, service, version,
                                      policy=policy, holdout=holdout, force=force, reason=reason))
    _print_offer(service, version, as_json, res.gate.passed, res.forced, res.promoted,
                 res.champion_version, res.served_version, [*res.gate.reasons, *res.notes],
                 res.to_dict())


def _print_offer(service: str, version: str, as_json: bool, passed: bool, forced: bool,
                 promoted: bool, champion: Any, served: Any, reasons: list[str],
                 whole: dict[str, Any]) -> None:
    """The gate's verdict, its reasons and what is served now; exit 1 when not promoted."""
    if as_json:
        print(json.dumps(whole, default=str))
    else:
        verdict = ("[green]passed[/]" if passed else
                   "[yellow]failed, forced[/]" if forced else "[red]rejected[/]")
        out.print(f"{service}: promotion gate {verdict} for version {version} "
                  f"(champion {champion})")
        for line in reasons:
            out.print(f"  - {line}", highlight=False)
        out.print(f"{service}: serving version {served}")
    if not promoted:
        raise typer.Exit(1)


def canary(
    service: str,
    version: Annotated[str | None, typer.Argument(help="the challenger; omit with --off")] = None,
    share: Annotated[float, typer.Option(min=0.001, max=1.0, help="fraction of requests")] = 0.1,
    off: Annotated[bool, typer.Option("--off", help="stop the canary")] = False,
) -> None:
    """Send a share of live traffic to a challenger version (answers returned and logged)."""
    if (version is None) == (not off):
        fail("give a VERSION, or --off to stop the canary")
    if _post(service, "canary", {"version": None if off else version, "share": share}) is None:
        operate(lambda ops, me: ops.canary(service, None if off else version, share, actor=me))
    out.print(f"{service}: canary stopped" if off else
              f"{service}: version {version} answers {share:.1%} of requests")


def shadow(
    service: str,
    version: Annotated[str | None, typer.Argument(help="the challenger; omit with --off")] = None,
    off: Annotated[bool, typer.Option("--off", help="stop shadowing")] = False,
) -> None:
    """Let a version score a copy of live traffic: logged, never returned."""
    if (version is None) == (not off):
        fail("give a VERSION, or --off to stop the shadow")
    if _post(service, "shadow", {"version": None if off else version}) is None:
        operate(lambda ops, me: ops.shadow(service, None if off else version, actor=me))
    out.print(f"{service}: shadow stopped" if off else f"{service}: version {version} shadows live traffic")


def stop(service: str) -> None:
    """Stop a service."""
    if _post(service, "stop") is None:
        deployer, _ = deployer_and_store()
        service_call(lambda: deployer.stop(service))
    out.print(f"{service}: stopped")


def _service_row(d: Any, live: dict[str, Any] | None, url: str) -> dict[str, str]:
    """What the tables show of one service (`live`: its deployer's status, if running), every
    value whole."""
    by_version: dict[str, int] = {}
    for w in (live or {}).get("workers", []):
        if not w["draining"] and w["model_version"]:
            by_version[w["model_version"]] = by_version.get(w["model_version"], 0) + 1
    canary = (live or {}).get("canary")
    per_version = ", ".join(f"v{v}: {n}" for v, n in sorted(by_version.items())) or 0
    return {
        "service": d.service, "model": f"{d.model_name}@{d.alias}", "champion": str(d.model_version),
        "canary": f"v{canary['version']} {canary['share']:.0%}" if canary else "-",
        "shadow": (live or {}).get("shadow_version") or "-", "previous": str(d.previous_version or "-"),
        "replicas (live)": f"{d.replicas} ({per_version})",
        "url": url, "status": live["status"] if live else d.status,
    }


def _print_services(rows: list[dict[str, str]]) -> None:
    t = table(*rows[0])
    for row in rows:
        t.add_row(*row.values())
    show(t)


def _print_agents(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    a = table("agent", "role", "pid", "status", "heartbeat", "restarts")
    for row in rows:
        a.add_row(row["name"], row["role"], str(row["pid"]), row["status"], iso(row["heartbeat"]),
                  str(row.get("restarts", 0)))
    show(a)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def _print_replicas(live: dict[str, Any]) -> None:
    """One row per replica of a service: its state, and its limits and use where it has any."""
    res = live.get("resources") or {}
    if res.get("warning"):
        err.print(f"[yellow]warning[/] {live['service']}: {res['warning']}", highlight=False)
    workers = live.get("workers", [])
    on_nodes = any(w.get("node") for w in workers)  # the ray backend: which node runs each
    t = table("replica pid", "version", "state", *(("node",) if on_nodes else ()), "cpu limit",
              "cpu use", "memory limit", "memory use")
    for w in workers:
        state = "draining" if w["draining"] else "serving" if w["ready"] else "starting"
        cpu_use = w.get("cpu_use")
        t.add_row(str(w["pid"]), str(w["model_version"] or "-"), state,
                  *((str(w.get("node") or "-")[:12],) if on_nodes else ()),
                  f"{w['cpu_limit']:g}" if w.get("cpu_limit") else "-",
                  f"{cpu_use:.2f}" if cpu_use is not None else "-",
                  _mib(w.get("memory_limit")), _mib(w.get("memory_use")))
    if live.get("workers"):
        show(t)
    oom = live.get("last_oom_kill")
    if oom:
        out.print(f"{live['service']}: replica {oom['pid']} was killed by the kernel at "
                  f"{iso(oom['at'])}: over its memory limit of {_mib(oom['memory_limit'])} "
                  "(replaced)", highlight=False)


def status(
    service: Annotated[str | None, typer.Argument(help="only this service (default: all, and the agents)")]
    = None,
    url: Annotated[bool, typer.Option("--url", help="print only SERVICE's URL, for scripts: "
                                      "curl $(scanflow status SERVICE --url)/predict")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Services (URL, champion, canary, shadow, previous version, live replicas per version) and
    agents; with SERVICE, each replica's CPU and memory limit and use (CPU use: CPU-seconds per
    second over the last fraction of a second). A table on a wide terminal, a block per service
    at 80 columns, whole lines in a pipe."""
    from scanflow.agents.process import AgentSupervisor  # lazy: the agent runtime (APScheduler)
    from scanflow.control import backends  # lazy: the store (SQLAlchemy, ~0.5 s)

    if url and service is None:
        fail("--url needs a SERVICE: scanflow status SERVICE --url")
    if (api := via.remote()) is not None:
        _remote_status(api, service, url, as_json)
        return
    settings, store = context()
    deps = list(store.list_deployments())
    if service is not None:
        known = ", ".join(d.service for d in deps) or "none deployed"
        deps = [d for d in deps if d.service == service]
        if not deps:
            fail(f"no service {service!r} in this workspace (known: {known})")
    deployer = backends.deployer(settings, store)
    if url and service is not None:
        state, link = deployer.status(service)["status"], deployer.url(service)
        if state != "running":
            fail(f"{service} is {state}: nothing answers at {link}", code=1)
        print(link)
        return
    agents = [] if service is not None else AgentSupervisor(settings, store).status()
    live = {d.service: deployer.status(d.service) for d in deps if as_json or d.status == "running"}
    _show_status(service, [live[d.service] for d in deps] if as_json else [],
                 [_service_row(d, live.get(d.service), deployer.url(d.service)) for d in deps],
                 live.get(service) if service is not None else None, agents, as_json)


def _show_status(service: str | None, services: list[dict[str, Any]], rows: list[dict[str, str]],
                 replicas: dict[str, Any] | None, agents: list[dict[str, Any]], as_json: bool) -> None:
    """What `status` prints, locally and through the server alike: `services` (each one's
    status, for --json), `rows` (the table's), `replicas` (SERVICE's live status when it runs)."""
    if as_json:
        for s in services:
            if s.get("last_oom_kill"):
                timed(s["last_oom_kill"], "at")
        listed = [timed(dict(a), "heartbeat", "started_at", "next_try") for a in agents]
        print_json(services[0] if service is not None else {"services": services, "agents": listed},
                   indent=2)
        return
    if rows:
        _print_services(rows)
    if replicas is not None:
        _print_replicas(replicas)
    elif not rows:
        out.print("no services deployed here (scanflow deploy APP)", highlight=False)
    _print_agents(agents)


def _remote_status(api: Any, service: str | None, url: bool, as_json: bool) -> None:
    """`status` through the server: the same tables from its answers."""
    services = ([api.call("GET", f"/api/v1/services/{service}")] if service is not None
                else api.call("GET", "/api/v1/services"))
    if url and service is not None:
        if services[0]["status"] != "running":
            fail(f"{service} is {services[0]['status']}: nothing answers at {services[0]['url']}",
                 code=1)
        print(services[0]["url"])
        return
    agents = [] if service is not None else api.call("GET", "/api/v1/agents")
    _show_status(service, services,
                 [_service_row(via.row(s), s if "alive" in s else None, s.get("url") or "-")
                  for s in services],
                 services[0] if service is not None and services[0]["status"] == "running" else None,
                 agents, as_json)
