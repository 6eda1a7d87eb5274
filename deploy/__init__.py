"""deploy: serve every trained subject over HTTP from one shared quantized base.

A Ray Serve application (DESIGN section 3): a thin FastAPI ingress in front of model
replicas that each load the quantized base ONCE and keep a fixed-capacity bank of
subjects' scale sets. Because TuneQDM's scales are diagonal they act on activations
(DESIGN section 2), so switching subject is choosing scale rows, and one UNet batch
mixes subjects.

    errors.py      exceptions that carry their HTTP status
    params.py      request parameters, their bounds, prompt placeholders
    store.py       the served base and the subjects in storage (pipeline.store)
    bank.py        ScaleBank: preallocated scale rows, LRU slots, in-place writes
    batcher.py     the replica's cross-subject request batching (asyncio)
    engine.py      base + bank + generation, no Ray (also behind `generate`)
    http.py        the FastAPI app (routes, error mapping, playground)
    app.py         the Serve deployments and the typed app builder
    cli.py         `tuneqdm-pipeline serve` and `tuneqdm-pipeline generate`
"""
