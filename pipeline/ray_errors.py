"""Reading Ray's failures for the actor pool (pipeline/scheduler.py): which errors mean
the actor died rather than its job, whether an actor has been placed on a node, and one
readable line for an error raised remotely."""

from __future__ import annotations

import re
from typing import Any


def actor_crash_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the actor (not the job) failed."""
    from ray import exceptions as rex

    return (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError,
            rex.OutOfMemoryError, rex.LocalRayletDiedError, rex.ObjectLostError)


def placed(actor: Any) -> bool:
    """Whether Ray has placed `actor` on a node (it has a process there), so it is
    constructing rather than waiting for resources; False if that cannot be told."""
    try:
        from ray.util.state import get_actor

        state = get_actor(actor._actor_id.hex(), timeout=10)
    except Exception:
        return False
    return bool(state is not None and state.pid and state.state != "DEAD")


def short_error(err: BaseException, limit: int = 400) -> str:
    """One readable line for an error: ANSI colours removed; for an error raised in a
    remote constructor or task, the exception line at the end of its traceback."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback" in text or 'File "' in text:
        for line in reversed(lines):
            if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", line):
                return f"{type(err).__name__}: {line[:limit]}"
    return f"{type(err).__name__}: {' '.join(lines)[:limit]}"
