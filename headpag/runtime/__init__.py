"""The only code that touches diffusers internals: layouts, hooks, the attention mode, the scheduler combination."""

from .direct import perturbed_forward
from .hooks import ATTENTION_HOOK, PREFIX_HOOK, ROWS_HOOK, ensure_hooks, foreign_stateful_hooks, remove_hooks
from .layout import FAMILIES, TransformerLayout, describe_transformer, unwrap
from .plan import CallPlan, PerturbedCall, activate, activated, active_plan, deactivate
from .scheduler import combining_at_step


__all__ = [
    "ATTENTION_HOOK",
    "FAMILIES",
    "PREFIX_HOOK",
    "ROWS_HOOK",
    "CallPlan",
    "PerturbedCall",
    "TransformerLayout",
    "activate",
    "activated",
    "active_plan",
    "combining_at_step",
    "deactivate",
    "describe_transformer",
    "ensure_hooks",
    "foreign_stateful_hooks",
    "perturbed_forward",
    "remove_hooks",
    "unwrap",
]
