"""`scanflow admin`: teams, users, roles and tokens from the CLI; bad input is exit 2 naming it;
a token is printed once (alone on stdout) and only its hash is stored; `scanflow server` and a
model server refuse a non-loopback address while no token exists."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from typer.testing import CliRunner

from scanflow.cli.main import app
from scanflow.settings import Settings
from scanflow.store import Store


def admin(settings: Settings, *args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(app, ["admin", *args], env={"SCANFLOW_WORKSPACE": str(settings.root)})
    return res.exit_code, res.stdout, res.stderr


def test_admin_makes_teams_users_roles_and_tokens(settings: Settings) -> None:
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
    (tok,) = listed["tokens"]
    assert tok["user"] == "ana" and tok["expires_at"] > time.time() + 80_000
    db = Path(settings.store.removeprefix("sqlite:///"))
    stored = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))  # with its WAL
    assert token.strip()[21:].encode() not in stored  # its hash is kept, not it
    assert hashlib.sha256(token.strip()[21:].encode()).hexdigest().encode() in stored
    code, out, _ = admin(settings, "revoke-token", tok["id"])
    assert code == 0 and store.identities.verify(token.strip()).reason == "revoked"
    assert admin(settings, "set-role", "ana", "data", "owner")[0] == 0
    assert admin(settings, "grant-read", "data", "--to", "science")[0] == 0


def test_bad_admin_input_is_exit_2_naming_the_problem(settings: Settings) -> None:
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
