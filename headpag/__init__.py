"""headpag: head-level perturbed-attention guidance (PAG, SoftPAG) and HeadHunter for SD3, SD3.5 and FLUX.1."""

from .guidance import HeadSet, Perturbation


__version__ = "0.1.0"
__all__ = ["HeadSet", "Perturbation", "__version__"]
