"""The control-plane server: a REST API (FastAPI, OpenAPI) over the control layer, with teams,
users, tokens and roles enforced on every action. `create_app` builds it; `scanflow server`
serves it."""
