"""
The explicit combination: the PAG term joins the prediction where the pipeline hands it to its scheduler.

The pipeline computes its own guidance from the clean predictions (`v_u + g (v_c - v_u)`, plus skip-layer guidance,
true CFG or any other term it adds); the scheduler step then receives that prediction plus `s (v_c - v_p)`. No term of
the pipeline sees the perturbed branch, so every term keeps its own meaning, in any dtype.

Schedulers are not modules and have no hook registry: for the length of a `with` block (one denoising loop) the
scheduler's `step` is an instance attribute that completes the running call's step (adds its PAG term, or raises when
a step of the PAG interval has none, see [`~runtime.state.CallState.complete_step`]) and is inert for every other
context (thread).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from typing import Any

from .plan import activation_with_scheduler


_LOCK = threading.Lock()
_USERS = "_headpag_step_users"
_PREVIOUS = "_headpag_previous_step"


def _step(scheduler: Any, model_output, *args, **kwargs):
    entry = activation_with_scheduler(scheduler)
    if entry is not None:
        model_output = entry.state.complete_step(model_output)
    previous = scheduler.__dict__[_PREVIOUS]
    if previous is not None:
        return previous(model_output, *args, **kwargs)
    return type(scheduler).step(scheduler, model_output, *args, **kwargs)


@contextlib.contextmanager
def combining_at_step(scheduler: Any) -> Iterator[None]:
    """Route `scheduler.step` through the active plan's PAG term for a `with` block (nests; restored exactly)."""
    if scheduler is None or not hasattr(scheduler, "step"):
        raise ValueError(f"head_pag needs a pipeline with a scheduler that has a `step` method, got {scheduler!r}.")
    with _LOCK:
        users = scheduler.__dict__.get(_USERS, 0)
        if users == 0:
            scheduler.__dict__[_PREVIOUS] = scheduler.__dict__.get("step")
            scheduler.__dict__["step"] = functools.partial(_step, scheduler)
        scheduler.__dict__[_USERS] = users + 1
    try:
        yield
    finally:
        with _LOCK:
            users = scheduler.__dict__[_USERS] - 1
            if users:
                scheduler.__dict__[_USERS] = users
            else:
                previous = scheduler.__dict__.pop(_PREVIOUS)
                del scheduler.__dict__[_USERS]
                if previous is None:
                    del scheduler.__dict__["step"]
                else:
                    scheduler.__dict__["step"] = previous
