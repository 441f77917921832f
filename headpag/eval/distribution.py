"""
FID and KID between two image sets (folders or in-memory lists), on FID Inception or open_clip features.

FID is the Frechet distance between Gaussians fitted to the two feature sets. KID is the
unbiased MMD^2 with the cubic polynomial kernel `k(x, y) = (x.y / d + 1)^3`, averaged over random subsets (Binkowski
et al., 2018; torchmetrics' and torch-fidelity's definition), reported as mean and standard deviation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from diffusers.utils import logging
from PIL import Image

from .features import FeatureExtractor, InceptionFeatures


logger = logging.get_logger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def is_image(path: Path) -> bool:
    """Whether `path` is an image file (by suffix)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in `folder`, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"Image folder {folder} does not exist.")
    files = sorted(p for p in folder.iterdir() if is_image(p))
    if not files:
        raise ValueError(f"Image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    return files


def load_images(source: str | os.PathLike | Sequence[Image.Image]) -> list[Image.Image]:
    """A folder's images (sorted by name) or an in-memory list, as RGB PIL images."""
    if isinstance(source, (str, os.PathLike)):
        return [Image.open(p).convert("RGB") for p in image_files(source)]
    return [im.convert("RGB") for im in source]


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    r"""
    FID between two `(N, D)` feature arrays: `|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))`.

    `Tr((S1 S2)^(1/2))` is the sum of the square roots of the eigenvalues of `S1 S2`. With centred features `A`, `B`,
    those are the squared singular values of `A B^T / sqrt((n1 - 1)(n2 - 1))`, so for small sets the trace is that
    matrix's nuclear norm (an `n1 x n2` problem instead of `D x D`); for large sets it comes from the symmetric
    `S1^(1/2) S2 S1^(1/2)`. Both equal pytorch-fid's `scipy.linalg.sqrtm` result on well-conditioned sets and, unlike
    it, stay real and finite when there are fewer images than feature dimensions.
    """
    for name, feats in (("reference", real), ("generated", fake)):
        if len(feats) < 2:
            raise ValueError(f"FID needs at least 2 {name} images, got {len(feats)}.")
    (n1, d), n2 = real.shape, len(fake)
    a, b = real - real.mean(0), fake - fake.mean(0)
    diff = real.mean(0) - fake.mean(0)
    traces = (a * a).sum() / (n1 - 1) + (b * b).sum() / (n2 - 1)
    if n1 * n2 <= d * d:
        tr_covmean = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    else:
        sigma1, sigma2 = a.T @ a / (n1 - 1), b.T @ b / (n2 - 1)
        w, v = np.linalg.eigh(sigma1)
        root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        middle = root1 @ sigma2 @ root1
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(max(diff @ diff + traces - 2 * tr_covmean, 0.0))


def fid_bootstrap_ci(real: np.ndarray, fake: np.ndarray, resamples: int = 100, seed: int = 0) -> tuple[float, float]:
    """
    95% percentile interval of FID over bootstrap resamples of the generated images (the reference set fixed):
    how much the value moves with the sample of images.
    """
    rng = np.random.default_rng(seed)
    values = [frechet_distance(real, fake[rng.integers(0, len(fake), len(fake))]) for _ in range(resamples)]
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """SHA-256 over the names and contents of a folder's images: the key of its cached features."""
    import hashlib

    digest = hashlib.sha256()
    for path in image_files(folder):
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def cached_reference_features(folder: str | os.PathLike, features, cache_dir: str | os.PathLike | None) -> np.ndarray:
    r"""
    The features of a reference folder, cached as safetensors under `cache_dir` keyed by the folder's content hash
    and the feature model (its name and weight SHA-256): a changed image or another model never reuses stale
    features. Without `cache_dir`, computed every time.
    """
    if cache_dir is None:
        return features(load_images(folder))
    import hashlib

    from safetensors.numpy import load_file, save_file

    from .._io import atomic_write_bytes

    model = getattr(features, "provenance", {})
    model_key = f"{getattr(features, 'name', type(features).__name__)}:{model.get('weights_sha256')}"
    key = hashlib.sha256(f"{folder_fingerprint(folder)}:{model_key}".encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"reference-{key}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["features"]
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed, never trusted
            logger.warning(f"Ignoring the unreadable cached reference features {path}.")
    values = features(load_images(folder))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        save_file({"features": np.ascontiguousarray(values)}, f"{tmp}/f.safetensors")
        atomic_write_bytes(path, Path(f"{tmp}/f.safetensors").read_bytes())
    return values


KID_DEFAULT_SUBSET = 1000
FID_MIN_IMAGES = 2048  # below the 2048 feature dimensions the covariance is rank-deficient and FID biased upward


def kid_subset_size(n_real: int, n_fake: int, subset_size: int | None = None) -> int:
    """
    The KID subset size: `subset_size` when given (refused when larger than either set), else
    `min(1000, N_real, N_fake)`.
    """
    if subset_size is not None and subset_size > min(n_real, n_fake):
        raise ValueError(
            f"KID subset size {subset_size} is larger than the sets ({n_real} reference, {n_fake} generated images); "
            f"use --kid-subset-size {min(n_real, n_fake)} or fewer, or leave it out to use min(1000, both sets)."
        )
    return subset_size if subset_size is not None else min(KID_DEFAULT_SUBSET, n_real, n_fake)


def kernel_distance(
    real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int | None = None, seed: int = 0
) -> tuple[float, float]:
    """KID `(mean, std)` over `subsets` random subsets of [`kid_subset_size`] rows (at least 2)."""
    m = kid_subset_size(len(real), len(fake), subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {len(real)} reference and {len(fake)} generated.")
    d = real.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = real[rng.choice(len(real), m, replace=False)]
        y = fake[rng.choice(len(fake), m, replace=False)]
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off = m * (m - 1)
        values.append((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


def precision_recall_density_coverage(real: np.ndarray, fake: np.ndarray, nearest_k: int = 5) -> dict[str, float]:
    """
    Precision, recall (Kynkäänniemi et al., 2019), density and coverage (Naeem et al., 2020) of `fake` against
    `real` on the same features, through the authors' `prdc` package. Needs more than `nearest_k` images per set.
    """
    from prdc import compute_prdc

    if min(len(real), len(fake)) <= nearest_k:
        raise ValueError(
            f"Precision/recall/density/coverage with k={nearest_k} need more than {nearest_k} images per set, got "
            f"{len(real)} reference and {len(fake)} generated."
        )
    return {k: float(v) for k, v in compute_prdc(real, fake, nearest_k).items()}


CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0


def cmmd(real: np.ndarray, fake: np.ndarray, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE) -> float:
    r"""
    CMMD (Jayasumana et al., 2024): the maximum mean discrepancy with a Gaussian RBF kernel
    `k(x, y) = exp(-|x - y|^2 / (2 sigma^2))` between (CLIP) embeddings, times `scale`, as the authors'
    google-research/cmmd computes it (sigma 10, scale 1000, every pair including `i = j`).
    """
    x, y = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    gamma = 1.0 / (2.0 * sigma**2)

    def mean_kernel(a: np.ndarray, b: np.ndarray) -> float:
        squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
        return float(np.exp(-gamma * squared).mean())

    return scale * (mean_kernel(x, x) + mean_kernel(y, y) - 2.0 * mean_kernel(x, y))


class SetMetric:
    r"""
    A metric between a reference set and a generated set: `update(images, real=True|False)` then `compute()`, or
    `metric(reference, generated)` with folders or image lists.

    Args:
        features ([`FeatureExtractor`], *optional*): Defaults to the FID Inception ([`InceptionFeatures`]).
        inception_weights (`str`, *optional*): Passed to [`InceptionFeatures`] when `features` is not given.
        device (`str`, *optional*): Where the default extractor runs.
    """

    def __init__(
        self,
        features: FeatureExtractor | None = None,
        inception_weights: str | os.PathLike | None = None,
        device=None,
    ):
        self.features = features or InceptionFeatures(inception_weights, device=device)
        self.reset()

    def reset(self) -> None:
        self._real: list[np.ndarray] = []
        self._fake: list[np.ndarray] = []

    def update(self, images: str | os.PathLike | Sequence[Image.Image], real: bool) -> None:
        (self._real if real else self._fake).append(self.features(load_images(images)))

    def _stacked(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._real or not self._fake:
            raise ValueError(f"{type(self).__name__}.compute() needs both reference (real=True) and generated images.")
        return np.concatenate(self._real), np.concatenate(self._fake)

    def compute(self):
        raise NotImplementedError

    def __call__(self, reference, generated):
        self.reset()
        self.update(reference, real=True)
        self.update(generated, real=False)
        return self.compute()


class FID(SetMetric):
    """Frechet Inception Distance (lower is better); `compute()` returns a float."""

    def compute(self) -> float:
        return frechet_distance(*self._stacked())


class KID(SetMetric):
    r"""
    Kernel Inception Distance (lower is better); `compute()` returns `(mean, std)`.

    Args:
        subsets (`int`, defaults to 100), subset_size (`int`, *optional*), seed (`int`, defaults to 0): The random
            subsets; `subset_size` defaults to `min(1000, N_real, N_fake)` and is refused when larger than a set.
        features, inception_weights, device: As for [`SetMetric`].
    """

    def __init__(self, *args, subsets: int = 100, subset_size: int | None = None, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.subsets, self.subset_size, self.seed = subsets, subset_size, seed

    def compute(self) -> tuple[float, float]:
        return kernel_distance(*self._stacked(), self.subsets, self.subset_size, self.seed)
