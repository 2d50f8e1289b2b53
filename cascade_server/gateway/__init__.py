"""The serving gateway: app factory, routes, the cascade orchestrator and its stages.

Import `cascade_server.gateway.app` for `create_app`; this package's import is light, so
settings and the batching config can be imported without the web stack."""
