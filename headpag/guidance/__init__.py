"""Head-level perturbation maths: head sets, the SoftPAG targets, the attention processors and guidance."""

from .combine import fold_into_conditional, perturbation_guidance
from .heads import HeadSet
from .models import FAMILIES, TransformerLayout, describe_transformer
from .plan import PerturbationPlan, PerturbationState
from .processors import HeadPAGFluxAttnProcessor, HeadPAGJointAttnProcessor
from .session import PerturbedTransformer
from .softpag import SCOPES, TARGETS, Perturbation, softpag


__all__ = [
    "FAMILIES",
    "SCOPES",
    "TARGETS",
    "HeadPAGFluxAttnProcessor",
    "HeadPAGJointAttnProcessor",
    "HeadSet",
    "Perturbation",
    "PerturbationPlan",
    "PerturbationState",
    "PerturbedTransformer",
    "TransformerLayout",
    "describe_transformer",
    "fold_into_conditional",
    "perturbation_guidance",
    "softpag",
]
