"""`scanflow admin`: teams, users, roles and tokens from the CLI; bad input is exit 2 naming it;
a token is printed once (alone on stdout) and only its hash is stored; `scanflow server` and a
model server refuse a non-loopback address while no token exists. The first two tests run both
ways: on the store, and through a real server as its admin (`/api/v1/admin`)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scanflow.cli.main import app
from scanflow.settings import Settings
from scanflow.spec.access import Role
from scanflow.store import Store
from support.control_server import control_server

_VIA: dict[str, str] = {}  # the environment that sends the CLI through the server, when it does


@pytest.fixture(params=["local", "remote"])
def way(request: pytest.FixtureRequest, settings: Settings) -> Iterator[str]:
    """On the store, then through a server on it as its admin `root` (made on the store)."""
    if request.param == "local":
        yield "local"
        return
    with control_server(settings) as srv:
        _VIA.update(srv.env())
        try:
            yield "remote"
        finally:
            _VIA.clear()


def admin(settings: Settings, *args: str) -> tuple[int, str, str]:
    env = {"SCANFLOW_WORKSPACE": str(settings.root), "SCANFLOW_SERVER": "", "SCANFLOW_TOKEN": "", **_VIA}
    res = CliRunner().invoke(app, ["admin", *args], env=env)
    return res.exit_code, res.stdout, res.stderr


def test_admin_makes_teams_users_roles_and_tokens(settings: Settings, way: str) -> None:
    assert admin(settings, "create-team", "data")[0] == 0
    assert admin(settings, "create-team", "science")[0] == 0
    code, out, _ = admin(settings, "create-user", "ana", "--team", "data:operator",
                         "--team", "science:viewer")
    assert code == 0 and "operator in data" in out
    code, token, err = admin(settings, "create-token", "ana", "--expires-in", "1",
                             "--scope", "label:mnist")
    assert code == 0 and token.strip().startswith("sft_") and "\n" not in token.strip()
    assert "shown once" in err and token.strip() not in err
    store = Store(settings.store)
    who = store.identities.verify(token.strip())
    assert getattr(who, "roles", None) == {"data": 2, "science": 1} and who.scopes == ["label:mnist"]
    listed = json.loads(admin(settings, "list", "--json")[1])
    assert listed["teams"] == ["data", "science"]
    (tok,) = [t for t in listed["tokens"] if t["user"] == "ana"]
    assert tok["user"] == "ana" and tok["expires_at"] > time.time() + 80_000
    db = Path(settings.store.removeprefix("sqlite:///"))
    stored = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))  # with its WAL
    assert token.strip()[21:].encode() not in stored  # its hash is kept, not it
    assert hashlib.sha256(token.strip()[21:].encode()).hexdigest().encode() in stored
    code, out, _ = admin(settings, "revoke-token", tok["id"])
    assert code == 0 and store.identities.verify(token.strip()).reason == "revoked"
    assert admin(settings, "set-role", "ana", "data", "owner")[0] == 0
    assert admin(settings, "grant-read", "data", "--to", "science")[0] == 0
    who = store.identities.verify(admin(settings, "create-token", "ana")[1].strip())
    assert getattr(who, "roles", None) == {"data": 3, "science": 1} and who.readable == frozenset()
    changes = [e.payload for e in store.list_events(kinds=["identity_changed"])]
    if way == "remote":  # each change recorded with who made it, never a token
        assert [c["change"] for c in changes] == [
            "team_created", "team_created", "user_created", "role_set", "role_set", "token_created",
            "token_revoked", "role_set", "read_granted", "token_created"]
        assert all(c["by"] == "person:root" for c in changes)
        assert token.strip()[21:] not in json.dumps(changes)


def test_through_the_server_an_owner_manages_their_team_and_anyone_their_own_tokens(
    settings: Settings,
) -> None:
    with control_server(settings, teams=("data", "science")) as srv:
        ids = Store(settings.store).identities
        for user, team in (("olga", "data"), ("sam", "science")):
            ids.create_user(user)
            ids.set_role(user, team, Role.owner)
        ids.create_user("vera")
        olga = ids.create_token("olga")[1]

        def as_(token: str, *args: str) -> tuple[int, str]:
            res = CliRunner().invoke(app, ["admin", *args], env={
                "SCANFLOW_WORKSPACE": str(settings.root), "SCANFLOW_SERVER": srv.url,
                "SCANFLOW_TOKEN": token})
            return res.exit_code, res.output

        assert as_(olga, "set-role", "vera", "data", "viewer")[0] == 0
        code, text = as_(olga, "set-role", "vera", "science", "viewer")
        assert code == 2 and "needs owner" in text and "not in team 'science'" in text
        assert as_(olga, "create-team", "mine")[0] == 2  # an admin's
        code, text = as_(olga, "create-token", "sam")
        assert code == 2 and "is not an admin" in text
        code, mine = as_(olga, "create-token", "olga", "--note", "laptop")
        assert code == 0 and ids.verify(next(w for w in mine.split() if w.startswith("sft_"))).user == "olga"  # type: ignore[union-attr]
        listed = json.loads(as_(olga, "list", "--json")[1])
        assert listed["teams"] == ["data"]  # hers only
        assert {u["name"] for u in listed["users"]} == {"olga", "vera"}
        assert {t["user"] for t in listed["tokens"]} == {"olga"}
        sams = ids.create_token("sam")[0]
        code, text = as_(olga, "revoke-token", sams)
        assert code == 2 and f"token {sams} is not olga's" in text
        assert as_(olga, "revoke-token", "0123456789abcdef")[0] == 2  # no such token
        assert ids.verify(ids.create_token("sam")[1]).user == "sam"  # type: ignore[union-attr]


def test_bad_admin_input_is_exit_2_naming_the_problem(settings: Settings, way: str) -> None:
    admin(settings, "create-team", "data")
    for args, words in ((["create-team", "data"], "exists already"),
                        (["create-team", "Bad Name"], "bad team name"),
                        (["create-user", "bob", "--team", "data"], "TEAM:ROLE"),
                        (["create-user", "bob", "--team", "data:boss"], "unknown role 'boss'"),
                        (["create-user", "bob", "--team", "nowhere:viewer"], "no team 'nowhere'"),
                        (["create-token", "nobody"], "no user 'nobody'"),
                        (["revoke-token", "0123456789abcdef"], "no token"),
                        (["grant-read", "data", "--to", "nowhere"], "no team 'nowhere'")):
        code, out, err = admin(settings, *args)
        assert code == 2 and words in out + err, (args, out, err)


def test_servers_refuse_other_addresses_until_a_token_exists(settings: Settings) -> None:
    res = CliRunner().invoke(app, ["server", "--host", "0.0.0.0", "--port", "1"],
                             env={"SCANFLOW_WORKSPACE": str(settings.root)})
    assert res.exit_code == 2 and "non-loopback" in res.output and "create-token" in res.output
    from scanflow.serving.label_auth import refuse_open_bind

    store = Store(settings.store)
    try:
        refuse_open_bind("0.0.0.0", store, "service 'x'")
    except ValueError as exc:
        assert "SCANFLOW_HOST=127.0.0.1" in str(exc)
    else:
        raise AssertionError("a model server on 0.0.0.0 without auth was allowed")
    refuse_open_bind("127.0.0.1", store, "service 'x'")  # loopback: always fine
    store.identities.create_user("ana")
    store.identities.create_token("ana")
    refuse_open_bind("0.0.0.0", store, "service 'x'")  # auth configured: allowed
