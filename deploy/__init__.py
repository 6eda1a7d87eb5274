"""deploy: serve every trained subject over HTTP from one shared quantized base.

A Ray Serve application (docs/design.md §3): a thin FastAPI ingress in front of model
replicas that each load the quantized base ONCE and keep a fixed-capacity bank of
subjects' scale sets. Because TuneQDM's scales are diagonal they act on activations
(docs/design.md §2), so switching subject is choosing scale rows, and one UNet batch
mixes subjects.

    errors.py        exceptions that carry their HTTP status
    params.py        request parameters, their bounds, prompt placeholders
    settings.py      ServeSettings: everything `serve` configures, and its defaults
    store.py         the served base and the subjects in storage (pipeline.store)
    bank.py          ScaleBank: the LRU cache policy over tuneqdm's scale table
    batcher.py       the replica's cross-subject request batching (asyncio)
    engine.py        base + bank + generation, no Ray (also behind `generate`)
    http.py          the FastAPI app (routes, error mapping, playground)
    app.py           the Serve deployments and the typed app builder
    serve_runner.py  starting and stopping the app, and `generate` without Serve

The click commands `serve` and `generate` are in tuneqdm_cli/serve.py; connecting to
Ray is pipeline.ray_session's (deploy/ never calls ray.init). From pipeline/, deploy/
imports only the Ray-free artefact store, pipeline.store.
"""
