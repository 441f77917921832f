"""Metrics: CLIP score, PickScore, LAION aesthetic, HPSv2 (also HeadHunter's objectives), FID and KID, and the
comparison report."""

from .clip_score import ClipScore, load_open_clip, load_state_dict
from .distribution import FID, KID, SetMetric, frechet_distance, image_files, kernel_distance, load_images
from .features import ClipFeatures, FeatureExtractor, InceptionFeatures, MissingWeightsError, inception_weights_path
from .pickscore import PickScore
from .preference import AestheticScore, HPSv2Score, ImageRewardScore


__all__ = [
    "AestheticScore",
    "HPSv2Score",
    "ImageRewardScore",
    "FID",
    "KID",
    "ClipFeatures",
    "ClipScore",
    "FeatureExtractor",
    "InceptionFeatures",
    "MissingWeightsError",
    "PickScore",
    "SetMetric",
    "frechet_distance",
    "image_files",
    "inception_weights_path",
    "kernel_distance",
    "load_images",
    "load_open_clip",
    "load_state_dict",
]
