"""`/api/v1/admin`: teams, users, roles, read grants and tokens through the server, so that
`scanflow admin ...` works from any machine once the first admin's token exists (that one is
made with `scanflow admin` on the store's machine).

An admin may do all of it. Without being one: an owner of a team gives roles in it and grants
other teams read of it (`members`); anyone makes and revokes their own tokens. Every change is
an `identity_changed` event naming who made it; a token is in its answer once, never in an
event or a log.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends

from scanflow.server.auth import Caller, authorize
from scanflow.server.errors import ERROR_RESPONSES, ApiError
from scanflow.server.models import (
    GrantIn,
    Identities,
    RoleIn,
    TeamIn,
    TokenIn,
    TokenMade,
    TokenOut,
    UserIn,
    UserOut,
)
from scanflow.server.platform import Platform, platform
from scanflow.spec.access import Role
from scanflow.store.identity import Identity, IdentityError

router = APIRouter(prefix="/api/v1/admin", tags=["admin"], responses=ERROR_RESPONSES)
Plat = Annotated[Platform, Depends(platform)]


def _admin(who: Identity) -> None:
    if not who.admin:
        raise ApiError(403, "forbidden", f"{who.user} is not an admin")


def _change(plat: Plat, who: Identity, what: str, act: Callable[[], Any], **details: Any) -> Any:
    """Make the change (an IdentityError is the caller's: 404, 409 or 422) and record it."""
    try:
        out = act()
    except IdentityError as exc:
        text = str(exc)
        status, code = ((409, "conflict") if "exists already" in text else
                        (404, "not_found") if text.startswith("no ") else (422, "invalid_request"))
        raise ApiError(status, code, text) from None
    plat.store.add_event("server", "identity_changed", None, change=what, by=who.who, **details)
    return out


@router.post("/teams", status_code=201, response_model=TeamIn)
def create_team(body: TeamIn, who: Caller, plat: Plat) -> TeamIn:
    """A team (admin)."""
    _admin(who)
    _change(plat, who, "team_created", lambda: plat.store.identities.create_team(body.name),
            team=body.name)
    return body


@router.post("/users", status_code=201, response_model=UserIn)
def create_user(body: UserIn, who: Caller, plat: Plat) -> UserIn:
    """A user, person or agent (admin)."""
    _admin(who)
    _change(plat, who, "user_created", lambda: plat.store.identities.create_user(
        body.name, admin=body.admin, kind=body.kind), user=body.name, admin=body.admin, user_kind=body.kind)
    return body


@router.put("/teams/{team}/roles/{user}", response_model=RoleIn)
def set_role(team: str, user: str, body: RoleIn, who: Caller, plat: Plat) -> RoleIn:
    """Give `user` a role in `team`, replacing theirs (an owner of the team, or an admin)."""
    authorize(who, "members", team)
    _change(plat, who, "role_set", lambda: plat.store.identities.set_role(user, team, Role.parse(body.role)),
            user=user, team=team, role=body.role)
    return body


@router.post("/teams/{team}/grants", status_code=201, response_model=GrantIn)
def grant_read(team: str, body: GrantIn, who: Caller, plat: Plat) -> GrantIn:
    """Let every member of team `to` read what `team` owns (an owner of `team`, or an admin)."""
    authorize(who, "members", team)
    _change(plat, who, "read_granted", lambda: plat.store.identities.grant_read(team, body.to),
            team=team, to=body.to)
    return body


@router.post("/tokens", status_code=201, response_model=TokenMade)
def create_token(body: TokenIn, who: Caller, plat: Plat) -> TokenMade:
    """A token for `user` (yourself, or anyone for an admin), shown once in this answer."""
    if body.user != who.user:
        _admin(who)
    token_id, token = _change(plat, who, "token_created", lambda: plat.store.identities.create_token(
        body.user, expires_at=body.expires_at, scopes=body.scopes, note=body.note), user=body.user)
    return TokenMade(id=token_id, user=body.user, token=token)


@router.delete("/tokens/{token_id}", response_model=TokenOut)
def revoke_token(token_id: str, who: Caller, plat: Plat) -> TokenOut:
    """Revoke a token at once (yours, or anyone's for an admin)."""
    row = next((t for t in plat.store.identities.list_tokens() if t.id == token_id), None)
    if row is None:
        raise ApiError(404, "not_found", f"no token {token_id!r}")
    if row.user != who.user and not who.admin:
        raise ApiError(403, "forbidden", f"token {token_id} is not {who.user}'s (an admin revokes "
                       "anyone's)")
    _change(plat, who, "token_revoked", lambda: plat.store.identities.revoke_token(token_id),
            token_id=token_id, user=row.user)
    return _token(next(t for t in plat.store.identities.list_tokens() if t.id == token_id))


def _token(t: Any) -> TokenOut:
    return TokenOut(id=t.id, user=t.user, scopes=t.scopes, note=t.note, created_at=t.created_at,
                    expires_at=t.expires_at, revoked_at=t.revoked_at, last_used_at=t.last_used_at)


@router.get("", response_model=Identities)
def list_identities(who: Caller, plat: Plat) -> Identities:
    """Teams, users with their roles, and tokens (ids only): all of them for an admin; else the
    teams you are in, their members, and your own tokens."""
    ids = plat.store.identities
    users = [UserOut(name=n, kind=k, admin=a, roles=r) for n, k, a, r in ids.list_users()]
    tokens = [_token(t) for t in ids.list_tokens()]
    teams = list(ids.list_teams())
    if not who.admin:
        mine = set(who.roles)
        teams = [t for t in teams if t in mine]
        users = [u for u in users if mine & set(u.roles)]
        users = [u.model_copy(update={"roles": {t: r for t, r in u.roles.items() if t in mine}})
                 for u in users]
        tokens = [t for t in tokens if t.user == who.user]
    return Identities(teams=teams, users=users, tokens=tokens)
