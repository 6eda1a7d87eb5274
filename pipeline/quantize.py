"""The quantize Ray task: `pipeline.store.quantize_into_storage` as one remote call.

`submit` runs it once per content address when storage does not hold the base yet
(docs/design.md §3); the work itself (tuneqdm.base quantizes, the store writes the
folder with its marker last) needs no Ray and is tested without it.
"""

from __future__ import annotations

from .store import quantize_into_storage


def quantize_task():
    """The Ray remote function wrapping `quantize_into_storage` (built lazily so that
    importing this module does not import Ray)."""
    import ray

    return ray.remote(num_cpus=1, max_retries=1)(quantize_into_storage)
