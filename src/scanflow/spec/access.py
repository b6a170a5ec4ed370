"""Who may do what: the roles a user holds in a team and the least role each action needs.

One table, read by every place that checks (the control-plane server, a model server's
`/labels`, the agents' API), so the README's permission table and the checks cannot disagree.
Least privilege by default: an action missing from `ACTIONS` is refused to everyone but an admin.
"""

from __future__ import annotations

from enum import IntEnum


class Role(IntEnum):
    """A user's role in one team; a higher role may do everything a lower one may."""

    viewer = 1  # read the team's runs, services, agents, events, decisions
    operator = 2  # run workflows, deploy, scale, roll out, canary, shadow, label
    owner = 3  # promote, force, roll back, stop, manage agents and triggers, register apps

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text]
        except KeyError:
            raise ValueError(f"unknown role {text!r} (known: {', '.join(r.name for r in cls)})") from None


#: The least role in the owning team that each action needs.
ACTIONS: dict[str, Role] = {
    "read": Role.viewer,
    "run": Role.operator,  # submit a workflow run, cancel it, resume it
    "deploy": Role.operator,
    "scale": Role.operator,
    "resize": Role.operator,
    "rollout": Role.operator,
    "canary": Role.operator,
    "shadow": Role.operator,
    "label": Role.operator,  # POST /labels on a model server: labels become training data
    "promote": Role.owner,
    "force": Role.owner,  # promote past a failed gate
    "rollback": Role.owner,
    "stop": Role.owner,
    "agents": Role.owner,  # start, stop, pause, resume, fire, triggers, requeue
    "register": Role.owner,  # register an application under the team
    "members": Role.owner,  # give the team's roles, grant other teams read of it
}


def needs(action: str) -> Role | None:
    """The least role for `action`; None for an action only an admin may take."""
    return ACTIONS.get(action)


def scope_allows(scopes: list[str] | None, action: str, resource: str | None) -> bool:
    """Whether a token narrowed to `scopes` may take `action` on `resource`: no scopes means the
    user's roles decide alone; `label` allows that action anywhere; `label:svc` only on `svc`."""
    if not scopes:
        return True
    for scope in scopes:
        name, _, target = scope.partition(":")
        if name == action and (not target or target == resource):
            return True
    return False


class NotAllowed(PermissionError):
    """An identity tried an action its roles (or its token) do not allow: nothing was done."""
