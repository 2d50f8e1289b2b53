"""The configuration models of the gateway's components, one module per component, pydantic only.

Each component takes its own model (the batcher a `BatchingConfig`, the teacher client a
`TeacherConfig`, ...) and never the whole `Settings`; `cascade_server.settings.Settings` reads
the `CASCADE_*` environment once and composes these models. Nothing here imports the gateway.
"""
