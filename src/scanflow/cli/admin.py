"""`scanflow admin ...`: teams, users, their roles and tokens, on the workspace's store (on the
machine that holds it: the first admin and their token are made so), or through the server
with `SCANFLOW_SERVER` (`/api/v1/admin`: an admin for everything; an owner for roles and read
grants in their team; anyone for their own tokens).

A token is printed once, on stdout alone (for `export SCANFLOW_TOKEN=$(scanflow admin
create-token ana)`); the store keeps only its SHA-256. Exit codes: 0 ok, 2 bad input.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from scanflow.cli import remote as via
from scanflow.cli.common import context, err, fail, iso, out, print_json, show, table

admin_app = typer.Typer(no_args_is_help=True, help="Teams, users, roles and API tokens.")


def _identities() -> Any:
    """The identities: the store's, or the server's through the same calls."""
    if (api := via.remote()) is not None:
        return RemoteIdentities(api)
    return context()[1].identities


class RemoteIdentities:
    """`IdentityRepository`'s calls that the commands make, through `/api/v1/admin` (a refused
    or bad request ends the command with the server's message, exit 2, as locally)."""

    def __init__(self, api: Any) -> None:
        self.api = api

    def create_team(self, name: str) -> None:
        self.api.call("POST", "/api/v1/admin/teams", body={"name": name})

    def create_user(self, name: str, *, admin: bool = False, kind: str = "person") -> None:
        self.api.call("POST", "/api/v1/admin/users", body={"name": name, "admin": admin, "kind": kind})

    def set_role(self, user: str, team: str, role: Any) -> None:
        self.api.call("PUT", f"/api/v1/admin/teams/{team}/roles/{user}", body={"role": role.name})

    def grant_read(self, team: str, grantee: str) -> None:
        self.api.call("POST", f"/api/v1/admin/teams/{team}/grants", body={"to": grantee})

    def create_token(self, user: str, *, expires_at: float | None = None,
                     scopes: list[str] | None = None, note: str = "") -> tuple[str, str]:
        made = self.api.call("POST", "/api/v1/admin/tokens", body={
            "user": user, "expires_at": expires_at, "scopes": scopes, "note": note})
        return made["id"], made["token"]

    def revoke_token(self, token_id: str) -> bool:
        return self.api.call("DELETE", f"/api/v1/admin/tokens/{token_id}", missing_ok=True) is not None

    def _all(self) -> dict[str, Any]:
        return dict(self.api.call("GET", "/api/v1/admin"))

    def list_teams(self) -> list[str]:
        return list(self._all()["teams"])

    def list_users(self) -> list[tuple[str, str, bool, dict[str, str]]]:
        return [(u["name"], u["kind"], u["admin"], u["roles"]) for u in self._all()["users"]]

    def list_tokens(self) -> list[Any]:
        return [via.row(t) for t in self._all()["tokens"]]


def _call(action: Any) -> Any:
    from scanflow.store.identity import IdentityError  # lazy: the store (SQLAlchemy)

    try:
        return action()
    except (IdentityError, ValueError) as exc:
        fail(str(exc))


@admin_app.command("create-team")
def create_team(name: str) -> None:
    """A team (owns applications, runs, services, model aliases and agents)."""
    _call(lambda: _identities().create_team(name))
    out.print(f"team {name} created")


@admin_app.command("create-user")
def create_user(
    name: str,
    team: Annotated[list[str] | None, typer.Option(
        help="TEAM:ROLE (viewer, operator, owner); repeat for several teams")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="may do everything, in every team")] = False,
    agent: Annotated[bool, typer.Option("--agent", help="an agent's identity, not a person's")] = False,
) -> None:
    """A user, with a role in each team given."""
    from scanflow.spec.access import Role  # lazy: small, but the CLI starts fast

    roles = []
    for item in team or []:
        name_, sep, role = item.partition(":")
        if not sep:
            fail(f"--team {item!r}: give TEAM:ROLE, e.g. data:operator")
        roles.append((name_, _call(lambda r=role: Role.parse(r))))
    ids = _identities()
    _call(lambda: ids.create_user(name, admin=admin, kind="agent" if agent else "person"))
    for team_name, role in roles:
        _call(lambda t=team_name, r=role: ids.set_role(name, t, r))
    out.print(f"user {name} created" + (" (admin)" if admin else "")
              + "".join(f", {r.name} in {t}" for t, r in roles))


@admin_app.command("set-role")
def set_role(user: str, team: str, role: str) -> None:
    """Give USER ROLE (viewer, operator, owner) in TEAM, replacing the one they had."""
    from scanflow.spec.access import Role  # lazy

    r = _call(lambda: Role.parse(role))
    _call(lambda: _identities().set_role(user, team, r))
    out.print(f"{user} is {r.name} in {team}")


@admin_app.command("grant-read")
def grant_read(team: str, to: Annotated[str, typer.Option(help="the team that may read")]) -> None:
    """Let every member of another team read what TEAM owns (runs, services, events)."""
    _call(lambda: _identities().grant_read(team, to))
    out.print(f"team {to} may read team {team}'s runs, services and events")


@admin_app.command("create-token")
def create_token(
    user: str,
    expires_in: Annotated[float | None, typer.Option(
        min=0.001, help="days until it expires (default: never)")] = None,
    scope: Annotated[list[str] | None, typer.Option(
        help="only this action (e.g. label, or label:SERVICE); repeat for several")] = None,
    note: Annotated[str, typer.Option(help="what it is for")] = "",
) -> None:
    """Make a token for USER; printed once, never shown again."""
    expires = time.time() + expires_in * 86400 if expires_in else None
    token_id, token = _call(lambda: _identities().create_token(
        user, expires_at=expires, scopes=list(scope) if scope else None, note=note))
    print(token)
    err.print(f"token {token_id} for {user}" + (f", expires {iso(expires)}" if expires else "")
              + (f", only {', '.join(scope)}" if scope else "")
              + "; shown once: keep it now", highlight=False)


@admin_app.command("revoke-token")
def revoke_token(token_id: Annotated[str, typer.Argument(help="the token's id (or the token)")]) -> None:
    """Revoke a token at once (its next request is refused)."""
    from scanflow.store.identity import token_id_of  # lazy

    tid = token_id_of(token_id) or token_id
    if not _identities().revoke_token(tid):
        fail(f"no token {tid!r}")
    out.print(f"token {tid} revoked")


@admin_app.command("list")
def list_identities(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Teams, users with their roles, and tokens (ids only)."""
    ids = _identities()
    users = ids.list_users()
    tokens = ids.list_tokens()
    if as_json:
        print_json({
            "teams": list(ids.list_teams()),
            "users": [{"name": n, "kind": k, "admin": a, "roles": r} for n, k, a, r in users],
            "tokens": [{"id": t.id, "user": t.user, "scopes": t.scopes, "note": t.note,
                        "created_at": t.created_at, "expires_at": t.expires_at,
                        "revoked_at": t.revoked_at, "last_used_at": t.last_used_at} for t in tokens]})
        return
    out.print("teams: " + (", ".join(ids.list_teams()) or "none"), highlight=False)
    u = table("user", "kind", "admin", "roles")
    for n, k, a, r in users:
        u.add_row(n, k, "yes" if a else "", ", ".join(f"{t}:{role}" for t, role in sorted(r.items())))
    show(u)
    t = table("token", "user", "scopes", "expires", "revoked", "last used")
    for tok in tokens:
        t.add_row(tok.id, tok.user, ",".join(tok.scopes or []) or "all", iso(tok.expires_at),
                  iso(tok.revoked_at), iso(tok.last_used_at))
    show(t)
