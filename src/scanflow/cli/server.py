"""`scanflow server`: serve the control-plane REST API (uvicorn, one process)."""

from __future__ import annotations

from typing import Annotated

import typer

from scanflow.cli.common import context, err, fail


def server(
    host: Annotated[str, typer.Option(help="address to bind (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8080,
    max_runs: Annotated[int, typer.Option(min=1, help="submitted runs run at once")] = 2,
) -> None:
    """Serve the REST API (OpenAPI at /openapi.json) to every team, with tokens and roles."""
    import uvicorn  # lazy: the server's parts load only for this command

    from scanflow.server.app import create_app  # lazy: FastAPI, the control layer
    from scanflow.serving.label_auth import refuse_open_bind  # lazy: the store

    settings, store = context()
    try:
        refuse_open_bind(host, store, "the scanflow server")
    except ValueError as exc:
        fail(str(exc).replace("set SCANFLOW_HOST=127.0.0.1", "bind --host 127.0.0.1"))
    if not store.identities.has_identities():
        err.print("[yellow]note[/]: no tokens yet, so every request will be refused: make one "
                  "with `scanflow admin create-token USER`", highlight=False)
    app = create_app(settings, max_runs=max_runs)
    err.print(f"scanflow server on http://{host}:{port} (OpenAPI: /openapi.json, docs: /docs)",
              highlight=False)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
