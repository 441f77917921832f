"""
The model catalogue: pipelines by hub id, local folder or registered name ([`load_pipeline`]), the models and
metrics registered by name ([`~models.catalog`]), and the tiny random-weight models built in memory.
"""

from .catalog import DEFAULT_MODEL, builtin_folder, builtin_models, model_defaults, offline_models
from .loading import PIPELINES, detect_family, load_pipeline
from .tiny import TINY_MODELS


__all__ = [
    "DEFAULT_MODEL",
    "PIPELINES",
    "TINY_MODELS",
    "builtin_folder",
    "builtin_models",
    "detect_family",
    "load_pipeline",
    "model_defaults",
    "offline_models",
]
