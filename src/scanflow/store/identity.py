"""Identities: teams, users, their roles per team, read grants between teams, and API tokens.

A token is `sft_<id>_<secret>`: the id finds the row, and only the SHA-256 of the secret is
stored (a 256-bit random secret needs no slow hash; GitHub's tokens are kept the same way), so
neither the store nor a backup of it holds a usable token. `verify` says why a token is refused
(unknown, revoked, expired) for the caller's 401, never echoing the token itself.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from scanflow.spec.access import Role, needs, scope_allows
from scanflow.store.db import Database
from scanflow.store.schema import Membership, Team, TeamGrant, Token, User

PREFIX = "sft_"
_TOKEN = re.compile(r"^sft_([0-9a-f]{16})_([A-Za-z0-9_-]{20,100})$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class IdentityError(ValueError):
    """A bad name, an unknown team or user, or a duplicate: the caller's input is wrong."""


@dataclass(frozen=True)
class Identity:
    """Who a verified token speaks for, and what their roles allow."""

    user: str
    kind: str  # person | agent
    admin: bool
    roles: dict[str, Role]  # team -> role
    readable: frozenset[str]  # teams whose things this user may read through a grant
    token_id: str
    scopes: list[str] | None = field(default=None)

    @property
    def who(self) -> str:
        return f"{self.kind}:{self.user}"

    def role_in(self, team: str) -> Role | None:
        """The user's role in `team`; a grant from `team` counts as viewer."""
        role = self.roles.get(team)
        if role is None and team in self.readable:
            return Role.viewer
        return role

    def may(self, action: str, team: str, resource: str | None = None) -> bool:
        """Whether this identity may take `action` on something team `team` owns (`resource`
        names it, for a token narrowed to one service): its role there is at least the
        action's (`scanflow.spec.access.ACTIONS`), or it is an admin; and its token's scopes,
        if any, allow it."""
        if not scope_allows(self.scopes, action, resource):
            return False
        if self.admin:
            return True
        least, role = needs(action), self.role_in(team)
        return least is not None and role is not None and role >= least

    @property
    def teams(self) -> frozenset[str]:
        """Teams whose things this user may at least read."""
        return frozenset(self.roles) | self.readable


@dataclass(frozen=True)
class Refused:
    """Why a token was not accepted: `unknown`, `revoked`, `expired` or `malformed`."""

    reason: str


def check_name(kind: str, name: str) -> str:
    if not _NAME.match(name):
        raise IdentityError(f"bad {kind} name {name!r}: lowercase letters, digits, '.', '_' or '-', "
                            "at most 64, starting with a letter or digit")
    return name


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def token_id_of(raw: str) -> str | None:
    """The id part of a token (safe to log), None if it is not a scanflow token."""
    m = _TOKEN.match(raw)
    return m.group(1) if m else None


class IdentityRepository(Protocol):
    def create_team(self, name: str) -> None: ...

    def create_user(self, name: str, *, admin: bool = False, kind: str = "person") -> None: ...

    def set_role(self, user: str, team: str, role: Role) -> None: ...

    def grant_read(self, team: str, grantee: str) -> None: ...

    def create_token(self, user: str, *, expires_at: float | None = None,
                     scopes: list[str] | None = None, note: str = "") -> tuple[str, str]: ...

    def revoke_token(self, token_id: str) -> bool: ...

    def verify(self, raw: str) -> Identity | Refused: ...

    def has_identities(self) -> bool: ...

    def list_teams(self) -> Sequence[str]: ...

    def list_users(self) -> Sequence[tuple[str, str, bool, dict[str, str]]]: ...

    def list_tokens(self, user: str | None = None) -> Sequence[Token]: ...


class SqlIdentityRepository:
    """`IdentityRepository` on SQLAlchemy (SQLite or PostgreSQL)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create_team(self, name: str) -> None:
        check_name("team", name)
        with self.db.session() as s:
            if s.get(Team, name) is not None:
                raise IdentityError(f"team {name!r} exists already")
            s.add(Team(name=name, created_at=time.time()))

    def create_user(self, name: str, *, admin: bool = False, kind: str = "person") -> None:
        check_name("user", name)
        if kind not in ("person", "agent"):
            raise IdentityError(f"unknown user kind {kind!r} (person or agent)")
        with self.db.session() as s:
            if s.get(User, name) is not None:
                raise IdentityError(f"user {name!r} exists already")
            s.add(User(name=name, kind=kind, admin=admin, created_at=time.time()))

    def set_role(self, user: str, team: str, role: Role) -> None:
        with self.db.session() as s:
            self._need(s, user, team)
            row = s.get(Membership, (user, team))
            if row is None:
                s.add(Membership(user=user, team=team, role=role.name))
            else:
                row.role = role.name

    def grant_read(self, team: str, grantee: str) -> None:
        with self.db.session() as s:
            for t in (team, grantee):
                if s.get(Team, t) is None:
                    raise IdentityError(f"no team {t!r}")
            if s.get(TeamGrant, (team, grantee)) is None:
                s.add(TeamGrant(team=team, grantee=grantee))

    def create_token(self, user: str, *, expires_at: float | None = None,
                     scopes: list[str] | None = None, note: str = "") -> tuple[str, str]:
        """A new token for `user`: (its id, the token). The token is returned once, never stored."""
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        with self.db.session() as s:
            if s.get(User, user) is None:
                raise IdentityError(f"no user {user!r}")
            s.add(Token(id=token_id, user=user, secret_sha256=_digest(secret), scopes=scopes,
                        note=note, created_at=time.time(), expires_at=expires_at))
        return token_id, f"{PREFIX}{token_id}_{secret}"

    def revoke_token(self, token_id: str) -> bool:
        """Revoke a token by its id; False if there is no such token (revoking twice is fine)."""
        with self.db.session() as s:
            row = s.get(Token, token_id)
            if row is None:
                return False
            if row.revoked_at is None:
                row.revoked_at = time.time()
            return True

    def verify(self, raw: str) -> Identity | Refused:
        m = _TOKEN.match(raw)
        if m is None:
            return Refused("malformed")
        token_id, secret = m.groups()
        now = time.time()
        with self.db.session() as s:
            row = s.get(Token, token_id)
            if row is None or not hmac.compare_digest(row.secret_sha256, _digest(secret)):
                return Refused("unknown")
            if row.revoked_at is not None:
                return Refused("revoked")
            if row.expires_at is not None and row.expires_at <= now:
                return Refused("expired")
            user = s.get(User, row.user)
            if user is None:
                return Refused("unknown")
            if row.last_used_at is None or now - row.last_used_at > 60:
                row.last_used_at = now  # at most one write a minute per token
            roles = {m.team: Role.parse(m.role) for m in
                     s.scalars(select(Membership).where(Membership.user == user.name))}
            readable = frozenset(s.scalars(
                select(TeamGrant.team).where(TeamGrant.grantee.in_(list(roles)))))
            return Identity(user=user.name, kind=user.kind, admin=user.admin, roles=roles,
                            readable=readable - set(roles), token_id=token_id,
                            scopes=list(row.scopes) if row.scopes else None)

    def has_identities(self) -> bool:
        """Whether auth is configured here: at least one token was ever made."""
        with self.db.session() as s:
            return bool(s.scalar(select(func.count()).select_from(Token)))

    def list_teams(self) -> Sequence[str]:
        with self.db.session() as s:
            return s.scalars(select(Team.name).order_by(Team.name)).all()

    def list_users(self) -> Sequence[tuple[str, str, bool, dict[str, str]]]:
        with self.db.session() as s:
            roles: dict[str, dict[str, str]] = {}
            for m in s.scalars(select(Membership)):
                roles.setdefault(m.user, {})[m.team] = m.role
            return [(u.name, u.kind, u.admin, roles.get(u.name, {}))
                    for u in s.scalars(select(User).order_by(User.name))]

    def list_tokens(self, user: str | None = None) -> Sequence[Token]:
        with self.db.session() as s:
            q = select(Token).order_by(Token.created_at)
            if user is not None:
                q = q.where(Token.user == user)
            return s.scalars(q).all()

    @staticmethod
    def _need(s: Session, user: str, team: str) -> None:
        if s.get(User, user) is None:
            raise IdentityError(f"no user {user!r}")
        if s.get(Team, team) is None:
            raise IdentityError(f"no team {team!r}")
