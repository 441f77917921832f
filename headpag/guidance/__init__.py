"""Head-level perturbation maths: head sets, the SoftPAG targets, row-wise plans. No diffusers here."""

from .heads import HeadSet
from .plan import PerturbationPlan
from .softpag import SCOPES, TARGETS, Perturbation, softpag


__all__ = [
    "SCOPES",
    "TARGETS",
    "HeadSet",
    "Perturbation",
    "PerturbationPlan",
    "softpag",
]
