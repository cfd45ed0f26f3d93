"""The numbers: cosine-similarity scores (DINO, CLIP-I, CLIP-T) and the Fréchet distance (FID).

Pure functions over feature arrays, so they are tested on known inputs without any model.
"""

from __future__ import annotations

import numpy as np
import torch


def normalise(features: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, D] rows scaled to unit L2 norm (float32; zero rows stay zero)."""
    features = features.float()
    return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, D], [N, D] -> [N]: cosine of row i of `a` with row i of `b`."""
    if a.shape != b.shape:
        raise ValueError(f"paired features must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (normalise(a) * normalise(b)).sum(-1)


def all_pairs_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, D], [M, D] -> [N, M]: cosine of every row of `a` with every row of `b`."""
    return normalise(a) @ normalise(b).T


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, D] features -> (mean [D], covariance [D, D]) in float64 (unbiased covariance, as FID uses)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 feature vectors [N, D], got shape {features.shape}; "
                         "give folders with at least 2 images (thousands for a meaningful FID).")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):

        |mu1 - mu2|^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2))

    The last trace is taken through symmetric eigen-decompositions instead of scipy's general
    `sqrtm(sigma1 @ sigma2)`: sigma1 sigma2 is similar to S sigma2 S with S = sigma1^(1/2), a
    symmetric PSD matrix, so the trace is the sum of the square roots of its eigenvalues. Same value,
    but real by construction, exact for singular covariances (fewer images than feature
    dimensions; no eps offset needed) and about 4x faster at 2048 dimensions.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched Gaussian statistics: means {mu1.shape} / {mu2.shape}, "
                         f"covariances {sigma1.shape} / {sigma2.shape}")
    if not (np.isfinite(sigma1).all() and np.isfinite(sigma2).all() and np.isfinite(mu1).all()
            and np.isfinite(mu2).all()):
        raise ValueError("FID: the feature statistics contain NaN or inf; check the feature network and images.")
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    eigenvalues, eigenvectors = np.linalg.eigh(sigma1)
    root1 = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T  # sigma1^(1/2)
    middle = root1 @ sigma2 @ root1
    trace_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean)
