"""Head-level perturbation maths: head sets, the SoftPAG targets, row-wise plans and guidance. No diffusers here."""

from .combine import perturbation_guidance
from .heads import HeadSet
from .plan import PerturbationPlan, PerturbationState
from .softpag import SCOPES, TARGETS, Perturbation, softpag


__all__ = [
    "SCOPES",
    "TARGETS",
    "HeadSet",
    "Perturbation",
    "PerturbationPlan",
    "PerturbationState",
    "perturbation_guidance",
    "softpag",
]
