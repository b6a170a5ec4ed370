"""Built-in sensors, rules and actuators of the MAPE-K agents, referenced from specs as
`scanflow.agents.builtin:<name>`. Sensors take (ctx, **params); rules and actuators take
(observation, ctx, **params)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from scanflow.agents.runtime import AgentContext, Observation

log = logging.getLogger("scanflow.agents.builtin")


# -- sensors ------------------------------------------------------------------------------
def prediction_window(
    ctx: AgentContext, window_size: int = 500, settle_s: float = 1.0, service: str | None = None
) -> list[Observation]:
    """Cut the prediction log into consecutive windows of `window_size` records.

    A watermark (the last id judged) lives in the store, so data already judged is never
    judged again, across restarts. Records younger than `settle_s` wait, so that batched
    writes of several replicas land before a window is cut.
    """
    svc = service or ctx.service
    if svc is None:
        raise ValueError("prediction_window needs a service (agent `service:` or param)")
    mark = int(ctx.get("watermark", 0))
    rows = ctx.store.prediction_ids(svc, after_id=mark, before_ts=time.time() - settle_s)
    out = []
    for start in range(0, len(rows) - window_size + 1, window_size):
        chunk = rows[start:start + window_size]
        first, last = chunk[0][0], chunk[-1][0]

        def commit(last: int = last) -> None:
            ctx.set("watermark", last)

        out.append(Observation(
            key=f"{svc}:{first}-{last}",
            evidence={"service": svc, "first_id": first, "last_id": last, "n": len(chunk),
                      "t0": chunk[0][1], "t1": chunk[-1][1]},
            commit=commit,
        ))
    return out


def inbox(ctx: AgentContext, kinds: list[str] | None = None, limit: int = 20) -> list[Observation]:
    """Messages for this agent, oldest first; acknowledged only once judged and acted on."""
    return [
        Observation(key=m.key, evidence={"message": m.kind, "from": m.sender, **_scalars(m.payload)},
                    data={"kind": m.kind, **m.payload}, message_id=m.id)
        for m in ctx.store.inbox(ctx.name, kinds, limit)
    ]


def _reference_for(ctx: AgentContext, service: str, artifact: str) -> tuple[str, np.ndarray]:
    """The reference sample logged with the model version the service serves now."""
    dep = ctx.store.get_deployment(service)
    if dep is None or dep.model_version is None:
        raise ValueError(f"service {service!r} is not deployed")
    cache: dict[str, Any] = ctx.__dict__.setdefault("_ref_cache", {})
    version = dep.model_version
    if cache.get("version") != version:
        mv = ctx.tracker.model_version(dep.model_name, version)
        dst = ctx.settings.agents_dir / ctx.name / f"reference-v{version}"
        dst.mkdir(parents=True, exist_ok=True)
        data = np.load(ctx.tracker.download(mv.run_id, artifact, str(dst)))
        cache.update(version=version, data=data.reshape(-1, _width(data)))
        cache.pop("check", None)
    return version, cache["data"]


def _width(a: np.ndarray) -> int:
    return int(np.prod(a.shape[1:])) if a.ndim > 1 else 1


def drift_check(
    ctx: AgentContext,
    reference_artifact: str = "reference/reference.npy",
    ks_alpha: float = 0.05,
    mmd_alpha: float = 0.05,
    n_components: int = 32,
    n_permutations: int = 100,
    limit: int = 5,
) -> list[Observation]:
    """Judge each window the monitor sent: KS (Bonferroni) and MMD against the reference."""
    from scanflow.monitor.drift import DriftCheck, KSDrift, MMDDrift, any_drift

    out = []
    for m in ctx.store.inbox(ctx.name, ["window"], limit):
        w = m.payload
        svc = w["service"]
        version, ref = _reference_for(ctx, svc, reference_artifact)
        cache = ctx.__dict__["_ref_cache"]
        if "check" not in cache:
            cache["check"] = DriftCheck(
                KSDrift(alpha=ks_alpha),
                MMDDrift(alpha=mmd_alpha, n_components=n_components, n_permutations=n_permutations),
            ).fit(ref)
        rows = ctx.store.predictions(svc, after_id=w["first_id"] - 1, upto_id=w["last_id"])
        x = np.asarray([r["inputs"] for r in rows], dtype=np.float64).reshape(len(rows), -1)
        t = time.perf_counter()
        results = cache["check"].test(x)
        seconds = time.perf_counter() - t
        drift = any_drift(results)
        out.append(Observation(
            key=m.key,
            evidence={**w, "drift": drift, "reference_version": version, "check_seconds": seconds,
                      "tests": [r.to_dict() for r in results]},
            data={**w, "drift": drift, "tests": [r.to_dict() for r in results]},
            message_id=m.id,
        ))
    return out


# -- rules --------------------------------------------------------------------------------
def always(obs: Observation, ctx: AgentContext) -> bool:
    return True


def drift_detected(obs: Observation, ctx: AgentContext) -> tuple[bool, str]:
    tests = obs.evidence.get("tests", [])
    flagged = [t["test"] for t in tests if t.get("drift")]
    return bool(flagged), f"drift by {', '.join(flagged)}" if flagged else "no test flagged drift"


def plan_retrain(
    obs: Observation, ctx: AgentContext, consecutive: int = 2, cooldown_s: float = 60.0
) -> tuple[bool, str]:
    """Ask for one retrain per drift episode: drift in `consecutive` windows in a row, none
    in progress, and `cooldown_s` since the last one finished (hysteresis against flapping)."""
    kind = obs.data.get("kind")
    if kind == "retrain_done":
        ctx.set("retraining", False)
        ctx.set("last_retrain_end", time.time())
        ctx.set("streak", 0)
        return False, "retrain finished; cooldown starts"
    drift = bool(obs.data.get("drift"))
    streak = int(ctx.get("streak", 0)) + 1 if drift else 0
    ctx.set("streak", streak)
    if drift and streak == 1:
        ctx.set("episode_start_id", obs.data.get("first_id"))
    if not drift:
        return False, "no drift in this window"
    if ctx.get("retraining", False):
        return False, "a retrain is already in progress"
    since_end = time.time() - float(ctx.get("last_retrain_end", 0.0))
    if since_end < cooldown_s:
        return False, f"cooldown: {cooldown_s - since_end:.0f}s left"
    if streak < consecutive:
        return False, f"drift in {streak} of {consecutive} consecutive windows needed"
    episode = int(ctx.get("episode", 0)) + 1
    ctx.set("episode", episode)
    ctx.set("retraining", True)
    obs.data["episode"] = episode
    obs.data["since_id"] = ctx.get("episode_start_id", obs.data.get("first_id"))
    return True, f"drift held for {streak} windows: retrain (episode {episode})"


# -- actuators ----------------------------------------------------------------------------
def send(obs: Observation, ctx: AgentContext, to: str, kind: str, **extra: Any) -> dict[str, Any]:
    """Forward what was observed to another agent (durable, deduplicated by key)."""
    payload = {**_jsonable(obs.data or obs.evidence), **extra}
    key = f"{ctx.name}:{obs.key}:{kind}"
    new = ctx.send(to, kind, payload, key=key)
    return {"to": to, "kind": kind, "new": new}


def report_drift(obs: Observation, ctx: AgentContext, to: str = "planner") -> dict[str, Any]:
    """Send every judged window on, and raise `drift_detected` when drift starts."""
    drift = bool(obs.evidence.get("drift"))
    was = bool(ctx.get("in_drift", False))
    if drift and not was:
        ctx.event("drift_detected", window=_scalars(obs.evidence),
                  tests=obs.evidence.get("tests", []))
    if was and not drift:
        ctx.event("drift_cleared", window=_scalars(obs.evidence))
    ctx.set("in_drift", drift)
    return send(obs, ctx, to=to, kind="drift_report")


def run_workflow(
    obs: Observation, ctx: AgentContext, app: str, workflow: str, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    from scanflow.spec.loader import load_application

    target = load_application(_relative(ctx, app))
    res = ctx.engine().run(target, workflow, params or {},
                           trigger={"by": "agent", "agent": ctx.name, "observation": obs.key})
    if not res.ok:
        raise RuntimeError(f"workflow {workflow} run {res.run_id} failed: {res.error}")
    return {"run_id": res.run_id, "status": res.status}


def scale(obs: Observation, ctx: AgentContext, replicas: int, service: str | None = None) -> dict[str, Any]:
    svc = service or ctx.service
    dep = ctx.deployer.scale(svc, replicas)
    return {"service": svc, "replicas": dep.replicas}


def rollout(obs: Observation, ctx: AgentContext, service: str | None = None) -> dict[str, Any]:
    svc = service or ctx.service
    dep = ctx.deployer.rollout(svc)
    return {"service": svc, "model_version": dep.model_version}


def retrain_and_promote(
    obs: Observation,
    ctx: AgentContext,
    app: str,
    workflow: str = "retrain",
    min_labels: int = 600,
    label_wait_s: float = 120.0,
    holdout_fraction: float = 0.3,
    margin: float = 0.0,
    max_clean_drop: float = 0.01,
    seed: int = 0,
) -> dict[str, Any]:
    """Retrain on labelled samples of the drifted stream (plus the original data, inside the
    workflow), then promote the candidate only if it beats the champion on held-out data of the
    new distribution by `margin` and loses at most `max_clean_drop` on the clean test set."""
    from scanflow.spec.loader import load_application

    svc = obs.data.get("service") or ctx.service
    dep = ctx.store.get_deployment(svc)
    if dep is None:
        raise ValueError(f"service {svc!r} is not deployed")
    since_id = int(obs.data.get("since_id") or obs.data.get("first_id") or 0)
    episode = obs.data.get("episode", 1)

    deadline = time.time() + label_wait_s
    rows = ctx.store.predictions(svc, after_id=since_id - 1, labelled_only=True)
    while len(rows) < min_labels and time.time() < deadline:
        time.sleep(1.0)
        rows = ctx.store.predictions(svc, after_id=since_id - 1, labelled_only=True)
    if len(rows) < max(20, min_labels // 4):
        raise RuntimeError(f"only {len(rows)} labelled samples since id {since_id}; need {min_labels}")

    x = np.asarray([r["inputs"] for r in rows], dtype=np.float64).reshape(len(rows), -1)
    y = np.asarray([r["label"] for r in rows])
    order = np.random.default_rng(seed).permutation(len(rows))
    n_hold = max(1, int(len(rows) * holdout_fraction))
    hold, train = order[:n_hold], order[n_hold:]
    folder = ctx.settings.agents_dir / ctx.name
    folder.mkdir(parents=True, exist_ok=True)
    data_path = folder / f"retrain-episode{episode}-{int(time.time())}.npz"
    np.savez_compressed(data_path, x_new=x[train], y_new=y[train], x_holdout=x[hold], y_holdout=y[hold])

    target = load_application(_relative(ctx, app))
    ctx.event("retrain_started", episode=episode, labelled=len(rows), since_id=since_id,
              champion_version=dep.model_version, data=str(data_path))
    res = ctx.engine().run(
        target, workflow, {"new_data": str(data_path)},
        trigger={"by": "agent", "agent": ctx.name, "reason": "drift held", "episode": episode,
                 "observation": obs.key},
    )
    if not res.ok:
        ctx.event("retrain_failed", episode=episode, run_id=res.run_id, error=res.error)
        raise RuntimeError(f"retrain run {res.run_id} failed: {res.error}")

    model = dep.model_name
    cand = ctx.tracker.version_by_alias(model, "challenger")
    tags = ctx.tracker.model_version(model, cand).tags
    ev = {k.removeprefix("eval."): float(v) for k, v in tags.items() if k.startswith("eval.")}
    ctx.event("retrain_finished", episode=episode, run_id=res.run_id, candidate_version=cand, **ev)

    better_new = ev["candidate_acc_new"] > ev["champion_acc_new"] + margin
    ok_clean = ev["candidate_acc_clean"] >= ev["champion_acc_clean"] - max_clean_drop
    gate = {"better_on_new": better_new, "clean_within_margin": ok_clean, "margin": margin,
            "max_clean_drop": max_clean_drop, **ev}
    if not (better_new and ok_clean):
        ctx.event("promotion_rejected", candidate_version=cand, **gate)
        return {"promoted": False, "candidate_version": cand, "run_id": res.run_id, **gate}

    old = ctx.tracker.version_by_alias(model, dep.alias)
    ctx.tracker.set_alias(model, dep.alias, cand)
    ctx.event("promoted", model=model, alias=dep.alias, version=cand, previous_version=old,
              approved_by="policy:promotion-gate", run_id=res.run_id, **gate)
    t = time.time()
    ctx.deployer.rollout(svc)  # records `rollout_completed` once every replica serves `cand`
    return {"promoted": True, "candidate_version": cand, "previous_version": old,
            "run_id": res.run_id, "rollout_seconds": time.time() - t, **gate}


# -- helpers ------------------------------------------------------------------------------
def _relative(ctx: AgentContext, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else (ctx.app.base_dir / p).resolve()


def _scalars(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, str | int | float | bool) or v is None}


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    import json

    return json.loads(json.dumps(d, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
