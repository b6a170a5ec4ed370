"""`scanflow db ...`: the store's schema. `upgrade` brings it to this release's head (what every
process also does when it opens the store); `current` shows its revision and whether it is at
head; `revision` drafts a new migration from the models (for developers). Exit codes: 0 ok, 1 the
schema could not be upgraded (or, with --check, is behind), 2 a bad or unreachable store URL.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

db_app = typer.Typer(no_args_is_help=True, help="Upgrade the store's schema, show its revision.")
out = Console()
err = Console(stderr=True)

UrlOption = Annotated[
    str | None,
    typer.Option("--url", help="SQLAlchemy URL of the store (default: the workspace's store, "
                 "or SCANFLOW_STORE_URL)"),
]


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _engine(url: str | None, *, create: bool) -> tuple[Engine, str]:
    """A connected engine and the URL to print; exit 2 on a bad URL, a missing SQLite file
    (unless `create`) or a server that does not answer."""
    # The store pulls in SQLAlchemy and numpy (~0.3 s): imported for db commands only.
    from scanflow.settings import get_settings  # lazy: pydantic-settings (~90 ms)
    from scanflow.store.db import StoreUrlError, connect_engine  # lazy: SQLAlchemy, see above

    if url is None:
        settings = get_settings()
        if create:
            settings.ensure()
        url = settings.store
    try:
        return connect_engine(url, must_exist=not create)
    except StoreUrlError as e:
        fail(str(e))


def _servers() -> tuple[str, dict[str, Any]] | None:
    """(how to name it, its schema) of the server's store, with `SCANFLOW_SERVER`; else None."""
    from scanflow.cli import remote as via  # lazy: httpx, only through a server

    if (api := via.remote()) is None:
        return None
    schema = api.call("GET", "/api/v1/store")
    return f"the {schema['backend']} store of the server at {api.url}", schema


@db_app.command("upgrade")
def upgrade(url: UrlOption = None) -> None:
    """Bring the store's schema to this release's head (a no-op when it is there)."""
    from scanflow.store.migrate import SchemaError  # lazy: SQLAlchemy, see _engine
    from scanflow.store.migrate import upgrade as do_upgrade  # lazy: SQLAlchemy, see _engine

    if url is None and (remote := _servers()) is not None:  # the server upgrades its own, at start
        shown, schema = remote
        if not schema["at_head"]:
            fail(f"{shown}: {schema['revision']}, behind head {schema['head']}: restart the server "
                 "(it upgrades its store when it starts) or run `scanflow db upgrade` on its machine",
                 code=1)
        out.print(f"{shown}: already at head ({schema['head']})", highlight=False, soft_wrap=True)
        return
    engine, shown = _engine(url, create=True)
    try:
        before = do_upgrade(engine)
    except SchemaError as e:
        fail(str(e), code=1)
    finally:
        engine.dispose()
    if before.at_head:
        out.print(f"{shown}: already at head ({before.head})", highlight=False, soft_wrap=True)
    elif before.revision is None and not before.legacy:
        out.print(f"{shown}: new store created at {before.head}", highlight=False, soft_wrap=True)
    else:
        was = "a store made before migrations" if before.legacy else before.revision
        out.print(f"{shown}: upgraded from {was} to {before.head}", highlight=False, soft_wrap=True)


@db_app.command("current")
def current(
    url: UrlOption = None,
    check: Annotated[bool, typer.Option("--check", help="exit 1 when not at head")] = False,
) -> None:
    """Show the store's schema revision and whether it is at head (changes nothing)."""
    from scanflow.store.migrate import status  # lazy: SQLAlchemy, see _engine

    if url is None and (remote := _servers()) is not None:
        shown, schema = remote
        if schema["at_head"]:
            out.print(f"{shown}: {schema['revision']} (head)", highlight=False, soft_wrap=True)
            return
        out.print(f"{shown}: {schema['revision']}, behind head {schema['head']}; restart the server "
                  "to upgrade it", highlight=False, soft_wrap=True)
        if check:
            raise typer.Exit(1)
        return
    engine, shown = _engine(url, create=False)
    try:
        st = status(engine)
    finally:
        engine.dispose()
    if st.at_head:
        out.print(f"{shown}: {st.revision} (head)", highlight=False, soft_wrap=True)
        return
    if st.legacy:
        where = "made before migrations (no revision)"
    elif st.revision is None:
        where = "empty (no schema yet)"
    else:
        where = f"{st.revision}, behind head {st.head}"
    out.print(f"{shown}: {where}; run `scanflow db upgrade` (or open the store) to upgrade",
              highlight=False, soft_wrap=True)
    if check:
        raise typer.Exit(1)


@db_app.command("revision")
def revision(
    message: Annotated[str, typer.Option("--message", "-m", help="what the revision changes")],
) -> None:
    """Draft a new revision from the models (`store/schema.py`), for developers: review it."""
    from scanflow.store.migrate import draft_revision  # lazy: SQLAlchemy, see _engine

    path = Path(draft_revision(message))
    out.print(f"wrote {path}: review it, then set HEAD = {path.stem!r} in scanflow/store/migrate.py",
              highlight=False, soft_wrap=True)
