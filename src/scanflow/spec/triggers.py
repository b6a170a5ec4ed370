"""The parts of the trigger vocabulary that need no models (this module imports nothing else
from the spec): cron expressions, the one resolution of workflow refs, and the 0.1 spelling of
workflow triggers, converted with a `SpecDeprecationWarning` that shows the new spelling."""

from __future__ import annotations

import json
import re
import warnings
from typing import Any


def cron_trigger(expr: str) -> Any:
    """An APScheduler trigger from 5 crontab fields, or 6 with seconds first."""
    from apscheduler.triggers.cron import CronTrigger  # lazy: APScheduler (~30 ms), spec loads light

    fields = expr.split()
    if len(fields) == 5:
        return CronTrigger.from_crontab(expr, timezone="UTC")
    if len(fields) == 6:
        sec, minute, hour, day, month, dow = fields
        return CronTrigger(second=sec, minute=minute, hour=hour, day=day, month=month,
                           day_of_week=dow, timezone="UTC")
    raise ValueError(f"expected 5 fields (or 6 with seconds first), got {len(fields)}")


def workflow_ref(ref: str, app: str, team: str) -> tuple[str, str, str]:
    """The one resolution of a workflow ref: 'wf' (this app's team), 'team/wf' or 'app/team/wf'."""
    a, t, w = (app, team, *ref.split("/"))[-3:]
    return a, t, w


class SpecDeprecationWarning(DeprecationWarning):
    """A spelling in a spec that still works but goes away (`scanflow validate` shows it)."""


LEGACY_TRIGGER_KEYS = {"after_workflow", "model", "alias"}


def legacy_workflow_trigger(raw: Any) -> Any:
    """A workflow trigger in the 0.1 spelling (`after_workflow:`, `model:` with `event:`
    version_registered|alias_moved, `alias:`) as a `Trigger`, with a DeprecationWarning that
    shows the new spelling. Anything else is returned as it is. Accepted for one release."""
    if not isinstance(raw, dict) or not (LEGACY_TRIGGER_KEYS & raw.keys()
                                         or isinstance(raw.get("event"), str)):
        return raw
    rest = {k: v for k, v in raw.items() if k not in LEGACY_TRIGGER_KEYS | {"event"}}
    if "after_workflow" in raw:
        event: dict[str, Any] = {"workflow_finished": {"workflow": raw["after_workflow"],
                                                       "status": ["succeeded"]}}
        rest.update({k: raw[k] for k in ("model", "alias") if k in raw})  # refused: one kind
    else:
        model = {"name": raw.get("model"), "event": raw.get("event"), "alias": raw.get("alias")}
        if model["event"] == "version_registered":
            model["event"] = None  # the default
        event = {"model": {k: v for k, v in model.items() if v is not None}}
    new = {"event": event, **rest}
    warnings.warn(
        f"workflow trigger {_flow(raw)} uses the 0.1 spelling, accepted for one more release: "
        f"write {_flow(new)}", SpecDeprecationWarning, stacklevel=2)
    return new


def _flow(value: Any) -> str:
    """A value in YAML flow style, as a user would write it in a spec."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, str) and not re.match(r"^[\w./@-]+$", value):
        return json.dumps(value)
    return str(value)
