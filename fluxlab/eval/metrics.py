"""Sample-quality metrics: Fréchet distance (FID) and kernel inception distance (KID) over image
features.

The maths runs in float64 numpy on features that any extractor produced; the FID Inception is one
extractor among others (``load_feature_extractor``). Statistics files use pytorch-fid's .npz layout
(keys ``mu`` and ``sigma``), so reference statistics computed by pytorch-fid can be used directly
and vice versa.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fluxlab.models.inception import FIDInceptionV3

WEIGHTS_ENV = "FLUXLAB_FID_WEIGHTS"
PYTORCH_FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_URL = (
    f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{PYTORCH_FID_WEIGHTS}"
)
TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_URL = (
    f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{TORCH_FIDELITY_WEIGHTS}"
)


# --------------------------------------------------------------------------------------- statistics


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], both float64."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2:
        raise ValueError(
            f"features must be a 2-D array [num_samples, dim]; got shape {feats.shape}."
        )
    if feats.shape[0] < 2:
        raise ValueError(
            f"a covariance needs at least 2 samples; got {feats.shape[0]}. Generate more images."
        )
    if not np.isfinite(feats).all():
        raise ValueError("features contain NaN or inf; check the images and the feature extractor.")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _check_gaussian(mu: np.ndarray, sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"{name}: mu must be [D] and sigma [D, D]; got {mu.shape} and {sigma.shape}."
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: mu or sigma contains NaN or inf.")
    return mu, sigma


def save_statistics(path: str | os.PathLike[str], mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write ``mu`` and ``sigma`` to an .npz file at exactly `path` (pytorch-fid's layout),
    atomically."""
    mu, sigma = _check_gaussian(mu, sigma, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # A file object stops np.savez from appending ".npz" to a name that lacks it.
    with open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma)
    os.replace(tmp, path)


def load_statistics(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read (mu, sigma) as float64 from an .npz with keys ``mu`` and ``sigma``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"FID statistics file {path} does not exist; compute it with save_statistics."
        )
    with np.load(path) as data:
        missing = {"mu", "sigma"} - set(data.files)
        if missing:
            raise ValueError(
                f"{path} lacks key(s) {sorted(missing)}; found {data.files}. Expected the "
                "pytorch-fid layout: an .npz with 'mu' [D] and 'sigma' [D, D]."
            )
        return _check_gaussian(data["mu"], data["sigma"], str(path))


# ---------------------------------------------------------------------------------------------- FID


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(matrix)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def _symmetric(sigma: np.ndarray, name: str) -> np.ndarray:
    scale = max(float(np.abs(sigma).max()), 1e-300)
    if np.abs(sigma - sigma.T).max() > 1e-6 * scale:
        raise ValueError(f"{name} is not symmetric, so it is not a covariance matrix.")
    return (sigma + sigma.T) / 2


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    d² = |mu1 − mu2|² + tr(sigma1) + tr(sigma2) − 2·tr((sigma1·sigma2)^½).

    The trace of the square root is taken as Σ√λ over the eigenvalues of S·sigma2·S with S =
    sigma1^½. That matrix is similar to sigma1·sigma2 (same eigenvalues) but symmetric positive
    semi-definite, so `eigh` is exact and real: no complex parts to discard, no eps·I retry when the
    covariances are singular (the usual case when there are fewer samples than feature dimensions),
    and no scipy at run time. Rounding can push eigenvalues slightly below zero; they are clipped to
    0.
    """
    mu1, sigma1 = _check_gaussian(mu1, sigma1, "first distribution")
    mu2, sigma2 = _check_gaussian(mu2, sigma2, "second distribution")
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"the two feature sets have different dimensions: {mu1.shape[0]} vs {mu2.shape[0]}."
        )
    sigma1, sigma2 = _symmetric(sigma1, "sigma1"), _symmetric(sigma2, "sigma2")
    root1 = _sqrt_psd(sigma1)
    eigvals = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    tr_covmean = np.sqrt(np.clip(eigvals, 0.0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean
    # The true value is ≥ 0; identical inputs can otherwise come back as −1e-12.
    return max(float(value), 0.0)


# ---------------------------------------------------------------------------------------------- KID


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> float:
    m = x.shape[0]
    k_xx = (x @ x.T * gamma + coef0) ** degree
    k_yy = (y @ y.T * gamma + coef0) ** degree
    k_xy = (x @ y.T * gamma + coef0) ** degree
    # The within-set sums drop the diagonal (k(x, x) terms) to make the estimator unbiased.
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: mean and std over random subsets of the unbiased MMD² with kernel (gamma·x·y +
    coef0)^degree.

    ``gamma`` defaults to 1/D. Subsets are drawn without replacement, first from `features1` then
    from `features2`, by ``np.random.RandomState(seed)``, the same draws as torch-fidelity, so
    results agree with it. ``subset_size`` is reduced (with a warning) to the size of the smaller
    set. Small negative values are valid: the estimator is unbiased, and they mean the two sets are
    very close.
    """
    f1 = np.asarray(features1, dtype=np.float64)
    f2 = np.asarray(features2, dtype=np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(
            f"KID needs two feature arrays [N, D] of equal D; got {f1.shape} and {f2.shape}."
        )
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be at least 1; got {num_subsets}.")
    n1, n2 = f1.shape[0], f2.shape[0]
    size = min(subset_size, n1, n2)
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples in each set; got {n1} and {n2}.")
    if size < subset_size:
        warnings.warn(
            f"KID subset_size reduced from {subset_size} to {size}, the size of the smaller "
            "feature "
            "set; the estimate stays unbiased but its spread grows.",
            stacklevel=2,
        )
    gamma = 1.0 / f1.shape[1] if gamma is None else gamma
    rng = np.random.RandomState(seed)
    mmds = np.empty(num_subsets)
    for i in range(num_subsets):
        x = f1[rng.choice(n1, size, replace=False)]
        y = f2[rng.choice(n2, size, replace=False)]
        mmds[i] = _unbiased_mmd2(x, y, degree, gamma, coef0)
    return float(mmds.mean()), float(mmds.std())


# --------------------------------------------------------------------------------------- extraction


def _as_unit_range(batch: Tensor) -> Tensor:
    if batch.ndim != 4:
        raise ValueError(f"image batches must be [B, C, H, W]; got shape {tuple(batch.shape)}.")
    if batch.dtype == torch.uint8:
        # pytorch-fid's mapping (x/255, then 2x − 1), not torch-fidelity's (x − 128)/128.
        return batch.float() / 127.5 - 1.0
    if not batch.is_floating_point():
        raise ValueError(f"images must be uint8 or floating point in [-1, 1]; got {batch.dtype}.")
    lo, hi = float(batch.min()), float(batch.max())
    if lo < -1.001 or hi > 1.001:
        raise ValueError(
            f"float images must lie in [-1, 1]; got values in [{lo:.3g}, {hi:.3g}]. "
            "Pass uint8 images, or rescale (e.g. x * 2 - 1 for [0, 1])."
        )
    return batch.float()


def _chunks(images: Tensor | Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    batches: Iterable[Tensor] = [images] if isinstance(images, Tensor) else images
    for batch in batches:
        yield from batch.split(batch_size)


@torch.inference_mode()
def extract_features(
    images: Tensor | Iterable[Tensor],
    extractor: nn.Module,
    device: str | torch.device = "cpu",
    batch_size: int = 50,
    *,
    total: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Run `extractor` over image batches ([B, 3, H, W], uint8 or float in [-1, 1]) -> float32
    features [N, D].

    `images` is one tensor or an iterable of batches (e.g. a DataLoader or a sampling generator);
    batches are re-split to at most `batch_size` images. `total` (number of images) gives the
    progress bar its ETA; it is inferred when `images` is a tensor. The extractor is moved to
    `device` and put in eval mode.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
    if total is None and isinstance(images, Tensor):
        total = images.shape[0]
    extractor = extractor.to(device).eval()
    out: list[np.ndarray] = []
    with tqdm(
        total=total, unit="img", desc="features", disable=not progress, dynamic_ncols=True
    ) as bar:
        for chunk in _chunks(images, batch_size):
            feats = extractor(_as_unit_range(chunk.to(device)))
            out.append(feats.reshape(feats.shape[0], -1).float().cpu().numpy())
            bar.update(chunk.shape[0])
    if not out:
        raise ValueError("no images were given to extract_features.")
    return np.concatenate(out, axis=0)


# --------------------------------------------------------------------------------------- extractors


def _missing_weights_message(reason: str) -> str:
    return (
        f"{reason} FID/KID need the TensorFlow-ported Inception-v3 weights: download "
        f"{PYTORCH_FID_WEIGHTS} "
        f"({PYTORCH_FID_URL}) or torch-fidelity's {TORCH_FIDELITY_WEIGHTS} ({TORCH_FIDELITY_URL}), "
        "then pass "
        f"its path as weights_path or set {WEIGHTS_ENV}=/path/to/{PYTORCH_FID_WEIGHTS}."
    )


def load_fid_inception(weights_path: str | os.PathLike[str] | None = None) -> FIDInceptionV3:
    """The FID Inception-v3 with pretrained weights from `weights_path`, or from
    $FLUXLAB_FID_WEIGHTS."""
    source = "weights_path"
    if weights_path is None:
        weights_path, source = os.environ.get(WEIGHTS_ENV) or None, WEIGHTS_ENV
    if weights_path is None:
        raise FileNotFoundError(
            _missing_weights_message(f"No Inception weights given and {WEIGHTS_ENV} is unset.")
        )
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(
            _missing_weights_message(
                f"Inception weights file {path} (from {source}) does not exist."
            )
        )
    model = FIDInceptionV3()
    try:
        # weights_only: both published files are plain state dicts, so nothing needs arbitrary
        # unpickling.
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as err:
        raise ValueError(
            f"{path} is not an FID Inception-v3 state dict (expected {PYTORCH_FID_WEIGHTS} or "
            f"{TORCH_FIDELITY_WEIGHTS}): {err}"
        ) from err
    return model.eval()


def load_feature_extractor(spec: str) -> nn.Module:
    """Feature extractor from a spec: "inception" (see ``load_fid_inception``) or a TorchScript file
    path.

    A TorchScript module must map images [B, 3, H, W] in [-1, 1] to features [B, D]; it is the
    escape hatch for other feature spaces (CLIP, DINOv2 ...) without adding their code here.
    """
    if spec == "inception":
        return load_fid_inception()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"feature extractor '{spec}' is neither 'inception' nor an existing TorchScript "
            "file; pass 'inception' or the path of a torch.jit.save'd module."
        )
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as err:
        raise ValueError(
            f"{path} is not a TorchScript file (torch.jit.load failed). If it holds the FID "
            "Inception "
            f"weights, use spec 'inception' with {WEIGHTS_ENV}={path} instead."
        ) from err
    return module.eval()
