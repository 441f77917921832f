"""The only code that touches diffusers internals: layouts, hooks, the attention mode, the scheduler combination."""

from .direct import perturbed_forward
from .hooks import (
    ATTENTION_HOOK,
    PREFIX_HOOK,
    ensure_hooks,
    foreign_stateful_hooks,
    mark_input,
    qualname,
    remove_hooks,
    transformer_attached,
)
from .layout import FAMILIES, TransformerLayout, describe_transformer, unwrap
from .plan import CallPlan, PerturbedCall, activated, activation_for
from .scheduler import combining_at_step
from .state import CallState


__all__ = [
    "ATTENTION_HOOK",
    "FAMILIES",
    "PREFIX_HOOK",
    "CallPlan",
    "CallState",
    "PerturbedCall",
    "TransformerLayout",
    "activated",
    "activation_for",
    "combining_at_step",
    "describe_transformer",
    "ensure_hooks",
    "foreign_stateful_hooks",
    "mark_input",
    "perturbed_forward",
    "qualname",
    "remove_hooks",
    "transformer_attached",
    "unwrap",
]
