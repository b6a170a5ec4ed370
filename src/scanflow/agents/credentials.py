"""An agent's identity: a token of its own team, made at start, with which it acts.

Once this installation has identities (`scanflow admin`, any token), an agent is a user of kind
`agent` named `<team>.<agent>` (e.g. `dataengineer.executor`). At first start it gets the role
`owner` in its own team and none elsewhere; an admin widens it like anyone's
(`scanflow admin set-role dataengineer.executor datascience operator` lets the executor run the
data science team's retrain). Each start makes a new token (the one before is revoked) that
only the agent's process holds; every service operation, workflow run and message of the
agent is checked against that token's identity at the time of the act - so revoking the token
or changing the role takes effect on the agent's next act - and recorded as it
(`agent:dataengineer.executor` on decisions, events, runs, MLflow tags and messages).

Without identities (the embedded single-user mode), agents act unchecked, as the user who
started them could.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scanflow.spec.access import NotAllowed, Role
from scanflow.store import Store
from scanflow.store.identity import Identity, IdentityError, Refused, check_name

TOKEN_NOTE = "agent process"


class AgentIdentityError(RuntimeError):
    """The agent cannot get an identity here (its team is not a team of this installation)."""


def agent_user(team: str, agent: str) -> str:
    """The user an agent acts as."""
    return check_name("user", f"{team}.{agent}".lower()[:64])


@dataclass
class AgentCredentials:
    """The agent's token (held in memory only) and the user it speaks for."""

    store: Store
    user: str
    token: str = field(repr=False)

    @property
    def who(self) -> str:
        return f"agent:{self.user}"

    def identity(self) -> Identity:
        """The token's identity as the store says now (revoked, expired or unknown: NotAllowed)."""
        who = self.store.identities.verify(self.token)
        if isinstance(who, Refused):
            raise NotAllowed(f"{self.who}: its token was refused ({who.reason}); restart the "
                             "agent to give it a new one")
        return who

    def authorize(self, action: str, team: str, resource: str | None = None) -> None:
        """Raise NotAllowed naming the identity, the action and the team unless it may."""
        if not self.identity().may(action, team, resource):
            raise NotAllowed(f"{self.who} may not {action} {resource or 'things'} of team {team!r} "
                             f"(an admin grants it: scanflow admin set-role {self.user} {team} <role>)")


def issue(store: Store, team: str, agent: str) -> AgentCredentials | None:
    """A new token for `agent` of `team` (its earlier ones revoked); None without identities."""
    ids = store.identities
    if not ids.has_identities():
        return None
    user = agent_user(team, agent)
    try:
        roles = {name: r for name, _kind, _admin, r in ids.list_users()}
        if user not in roles:
            try:
                ids.create_user(user, kind="agent")
            except IdentityError as exc:  # another process of it made it just now
                if "exists already" not in str(exc):
                    raise
        if team not in roles.get(user, {}):
            ids.set_role(user, team, Role.owner)
    except IdentityError as exc:
        raise AgentIdentityError(
            f"agent {agent} of team {team!r} needs an identity, as this installation has tokens: "
            f"{exc} (an admin creates the team: scanflow admin create-team {team})") from None
    for t in ids.list_tokens(user):
        if t.revoked_at is None and t.note == TOKEN_NOTE:
            ids.revoke_token(t.id)
    _id, token = ids.create_token(user, note=TOKEN_NOTE)
    return AgentCredentials(store, user, token)
