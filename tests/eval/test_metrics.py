"""FID/KID maths against closed forms, high-precision arithmetic and the reference packages; FID
Inception shape.

pytorch-fid and torch-fidelity (test-only, installed with ``pip install --no-deps``) import
torchvision at their package top level. The ``pytorch_fid`` and ``fidelity`` fixtures import only
the submodules we call, with the package ``__init__`` skipped (a bare package module placed in
sys.modules) and torchvision or the heavy sibling modules stubbed; ``_isolated_modules`` then
removes the stubbed packages again, so no stub outlives the import. Tests that need a reference
package skip when it is absent.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fluxlab.eval.metrics import (
    PYTORCH_FID_URL,
    PYTORCH_FID_WEIGHTS,
    TORCH_FIDELITY_WEIGHTS,
    WEIGHTS_ENV,
    extract_features,
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    load_feature_extractor,
    load_fid_inception,
    load_statistics,
    save_statistics,
)
from fluxlab.models.inception import FIDInceptionV3

# Hand-checked against torch-fidelity's FeatureExtractorInceptionV3 (and torchvision's inception_v3
# with aux_logits=False, num_classes=1008): 21,785,568 in the trunk + 2048·1008 + 1008 in fc.
FID_INCEPTION_PARAMS = 23_850_960


def _permissive_stub(name: str) -> types.ModuleType:
    stub = types.ModuleType(name)
    stub.__path__ = []  # type: ignore[attr-defined]  # lets "import name.sub" find stubbed children
    stub.__getattr__ = lambda attr: type(attr, (), {})  # type: ignore[method-assign]
    return stub


def _bare_package(name: str) -> types.ModuleType:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip(f"reference package {name} is not installed (pip install --no-deps {name})")
    package = types.ModuleType(name)
    package.__path__ = list(spec.submodule_search_locations)  # type: ignore[attr-defined]
    return package


@contextmanager
def _isolated_modules(stubs: dict[str, types.ModuleType]) -> Iterator[None]:
    saved = dict(sys.modules)
    sys.modules.update(stubs)
    try:
        yield
    finally:
        # Drop the stubbed packages and everything imported under them; keep other new imports
        # (scipy and the like hold C extensions that cannot be loaded twice in one process, so
        # forgetting them breaks later tests).
        roots = {name.split(".")[0] for name in stubs}
        for name in set(sys.modules) - set(saved):
            if name.split(".")[0] in roots:
                del sys.modules[name]
        sys.modules.update(saved)


def _torchvision_stubs() -> dict[str, types.ModuleType]:
    if importlib.util.find_spec("torchvision") is not None:
        return {}
    return {n: _permissive_stub(n) for n in ("torchvision", "torchvision.transforms")}


@pytest.fixture(scope="module")
def pytorch_fid() -> types.ModuleType:
    # fid_score reads InceptionV3.BLOCK_INDEX_BY_DIM at import time (for its argparse choices),
    # nothing more.
    inception_stub = types.ModuleType("pytorch_fid.inception")
    inception_stub.InceptionV3 = type("InceptionV3", (), {"BLOCK_INDEX_BY_DIM": {2048: 3}})  # type: ignore[attr-defined]
    stubs = {"pytorch_fid": _bare_package("pytorch_fid"), "pytorch_fid.inception": inception_stub}
    with _isolated_modules(stubs | _torchvision_stubs()):
        return importlib.import_module("pytorch_fid.fid_score")


@pytest.fixture(scope="module")
def fidelity() -> dict[str, types.ModuleType]:
    # torch_fidelity.utils pulls in datasets, registry and torchvision; the metric functions we call
    # never use it.
    stubs = {
        "torch_fidelity": _bare_package("torch_fidelity"),
        "torch_fidelity.utils": _permissive_stub("torch_fidelity.utils"),
    }
    with _isolated_modules(stubs):
        names = ("metric_fid", "metric_kid", "feature_extractor_inceptionv3")
        return {n: importlib.import_module(f"torch_fidelity.{n}") for n in names}


def _random_spd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d + (0 if rank else 0.1 * np.eye(d))


# --------------------------------------------------------------------------------- Fréchet distance


def test_frechet_commuting_covariances_match_closed_form() -> None:
    rng = np.random.default_rng(0)
    d = 12
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-6)
    # Same eigenbasis, rotated: the matrices commute but are no longer diagonal.
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    rotated = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("rank", [None, 3])
def test_frechet_non_commuting_matches_high_precision(rank: int | None) -> None:
    mpmath = pytest.importorskip(
        "mpmath",
        reason="mpmath (the high-precision reference) is not installed: pip install mpmath",
    )
    rng = np.random.default_rng(1)
    d = 7
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_spd(rng, d, rank), _random_spd(rng, d)
    a, b = mpmath.matrix(s1.tolist()), mpmath.matrix(s2.tolist())
    with mpmath.workdps(40):
        if rank is None:
            # A route independent of ours: Denman-Beavers square root of the (non-symmetric)
            # product.
            tr_covmean = mpmath.re(sum(mpmath.sqrtm(a * b)[i, i] for i in range(d)))
        else:
            # Singular products defeat the iteration (pytorch-fid's eps retry exists for this
            # reason), so take the eigen route, in 40 digits: eigenvalues of s1^1/2 s2 s1^1/2.
            vals, vecs = mpmath.eigsy(a)
            root = vecs * mpmath.diag([mpmath.sqrt(max(v, 0)) for v in vals]) * vecs.T
            tr_covmean = sum(mpmath.sqrt(max(v, 0)) for v in mpmath.eigsy(root * b * root)[0])
        expected = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-6)


def test_frechet_of_identical_statistics_is_zero_and_shapes_are_checked() -> None:
    rng = np.random.default_rng(2)
    mu, sigma = feature_statistics(
        rng.standard_normal((5, 16))
    )  # rank-deficient: 5 samples, 16 dims
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(mu, sigma, mu[:8], sigma[:8, :8])
    with pytest.raises(ValueError, match="not symmetric"):
        frechet_distance(mu, sigma + np.triu(np.ones((16, 16)), 1), mu, sigma)


@pytest.mark.filterwarnings(
    "ignore:The `disp` argument:DeprecationWarning"
)  # pytorch-fid's own sqrtm call
def test_fid_matches_pytorch_fid_and_torch_fidelity(
    pytorch_fid: types.ModuleType, fidelity: dict[str, types.ModuleType]
) -> None:
    rng = np.random.default_rng(3)
    f1 = rng.standard_normal((400, 32))
    f2 = 0.8 * rng.standard_normal((300, 32)) @ rng.standard_normal((32, 32)) / 6 + 0.3
    mu1, s1 = feature_statistics(f1)
    mu2, s2 = feature_statistics(f2)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert (
        ours > 1.0
    )  # the two sets differ; a near-zero value would make the comparison below vacuous

    assert ours == pytest.approx(
        float(pytorch_fid.calculate_frechet_distance(mu1, s1, mu2, s2)), abs=1e-4
    )
    ref_fid = fidelity["metric_fid"]
    ref1 = ref_fid.fid_features_to_statistics(torch.from_numpy(f1))
    ref2 = ref_fid.fid_features_to_statistics(torch.from_numpy(f2))
    np.testing.assert_allclose(mu1, ref1["mu"], atol=1e-12)
    np.testing.assert_allclose(s1, ref1["sigma"], atol=1e-12)
    ref = ref_fid.fid_statistics_to_metric(ref1, ref2, verbose=False)["frechet_inception_distance"]
    assert ours == pytest.approx(ref, abs=1e-4)


# ------------------------------------------------------------------------------------------ KID


def _kid_by_loops(x: np.ndarray, y: np.ndarray) -> float:
    m, d = x.shape
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return float(xx + yy - 2 * xy)


def test_kid_matches_explicit_double_loops() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((9, 5)), rng.standard_normal((9, 5)) + 0.7
    # Subsets of the full size are permutations, and MMD² does not depend on the order.
    mean, std = kernel_inception_distance(x, y, num_subsets=4, subset_size=9)
    assert mean == pytest.approx(_kid_by_loops(x, y), abs=1e-10)
    assert std == pytest.approx(0.0, abs=1e-10)


def test_kid_matches_torch_fidelity(fidelity: dict[str, types.ModuleType]) -> None:
    rng = np.random.default_rng(5)
    f1 = np.abs(rng.standard_normal((120, 64)))
    f2 = np.abs(rng.standard_normal((150, 64)) * 1.2)
    mean, std = kernel_inception_distance(f1, f2, num_subsets=20, subset_size=50, seed=7)
    ref = fidelity["metric_kid"].kid_features_to_metric(
        torch.from_numpy(f1),
        torch.from_numpy(f2),
        kid_subsets=20,
        kid_subset_size=50,
        rng_seed=7,
        verbose=False,
    )
    assert mean > 1e-3 and std > 0  # a genuine difference, spread over subsets
    # Same subsets, both in float64 (torch-fidelity keeps the tensors' dtype): far inside the 1e-4
    # we need.
    assert mean == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-8, abs=1e-12)
    assert std == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-8, abs=1e-12)


def test_kid_clips_subset_size_and_rejects_tiny_sets() -> None:
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((12, 4)), rng.standard_normal((10, 4))
    with pytest.warns(UserWarning, match="reduced from 1000 to 10"):
        clipped = kernel_inception_distance(x, y, num_subsets=3)
    assert clipped == kernel_inception_distance(x, y, num_subsets=3, subset_size=10)
    with pytest.raises(ValueError, match="at least 2 samples"):
        kernel_inception_distance(x, y[:1])


# --------------------------------------------------------------------------------- statistics files


def test_statistics_round_trip_through_npz(tmp_path: Path) -> None:
    mu, sigma = feature_statistics(
        np.random.default_rng(7).standard_normal((20, 6)).astype(np.float32)
    )
    assert mu.dtype == sigma.dtype == np.float64
    path = tmp_path / "ref" / "stats"  # no suffix: must be written under exactly this name
    save_statistics(path, mu, sigma)
    with np.load(path) as raw:
        assert sorted(raw.files) == ["mu", "sigma"]  # pytorch-fid's layout
    mu2, sigma2 = load_statistics(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)

    np.savez(tmp_path / "bad.npz", mean=mu, cov=sigma)
    with pytest.raises(ValueError, match="lacks key"):
        load_statistics(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_statistics(tmp_path / "missing.npz")


# ------------------------------------------------------------------------------------ FID Inception


@pytest.fixture(scope="module")
def inception() -> FIDInceptionV3:
    torch.manual_seed(0)
    model = FIDInceptionV3()
    # Variance-preserving weights and non-trivial BatchNorm statistics keep pool3 features O(1) (the
    # default init shrinks them to ~1e-8), so that a wrong branch order or pool kind shows in the
    # comparison below.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model


def test_inception_gives_pool3_features_in_eval_mode(inception: FIDInceptionV3) -> None:
    assert not inception.training and not any(p.requires_grad for p in inception.parameters())
    assert sum(p.numel() for p in inception.parameters()) == FID_INCEPTION_PARAMS
    with torch.inference_mode():
        feats = inception(torch.rand(2, 3, 40, 56) * 2 - 1)  # resized to 299x299 inside
    assert feats.shape == (2, 2048)
    assert torch.isfinite(feats).all() and (feats[0] - feats[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        inception(torch.zeros(1, 1, 299, 299))


def test_inception_zero_one_flag_maps_to_minus_one_one(inception: FIDInceptionV3) -> None:
    x = torch.rand(
        2, 3, 80, 80
    )  # 75x75 is the smallest input the trunk takes, so no resize is needed
    try:
        inception.resize_input = False
        with torch.inference_mode():
            signed = inception(2 * x - 1)
            wrong = inception(x)
            inception.zero_one_input = True
            unit = inception(x)
    finally:
        inception.resize_input, inception.zero_one_input = True, False
    torch.testing.assert_close(unit, signed)
    assert (unit - wrong).abs().max() > 1e-3


@pytest.fixture(scope="module")
def weights_file(inception: FIDInceptionV3, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / PYTORCH_FID_WEIGHTS
    torch.save(inception.state_dict(), path)
    return path


def test_inception_matches_torch_fidelity_architecture(
    inception: FIDInceptionV3, fidelity: dict[str, types.ModuleType], weights_file: Path
) -> None:
    reference = fidelity["feature_extractor_inceptionv3"].FeatureExtractorInceptionV3(
        "inception-v3-compat",
        ["2048"],
        feature_extractor_weights_path=str(weights_file),  # loads strictly
    )
    ours = {k: tuple(v.shape) for k, v in inception.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours == theirs
    assert sum(p.numel() for p in reference.parameters()) == FID_INCEPTION_PARAMS
    # At 299x299 nothing is resized; torch-fidelity maps uint8 by (x - 128)/128, so give ours the
    # same floats.
    images = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8)
    with torch.inference_mode():
        (expected,) = reference(images)
        got = inception((images.float() - 128) / 128)
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------- loading extractors


def test_missing_weights_error_names_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as info:
        load_fid_inception()
    message = str(info.value)
    for needed in (PYTORCH_FID_WEIGHTS, PYTORCH_FID_URL, TORCH_FIDELITY_WEIGHTS, WEIGHTS_ENV):
        assert needed in message
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "nowhere.pth"))
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth.*FLUXLAB_FID_WEIGHTS"):
        load_feature_extractor("inception")


def test_weights_load_from_env_and_wrong_files_are_rejected(
    inception: FIDInceptionV3, weights_file: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(WEIGHTS_ENV, str(weights_file))
    loaded = load_feature_extractor("inception")
    assert isinstance(loaded, FIDInceptionV3) and not loaded.training
    loaded_state = loaded.state_dict()
    for key, value in inception.state_dict().items():
        assert torch.equal(loaded_state[key], value), key

    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ValueError, match="wrong.pth is not an FID Inception"):
        load_fid_inception(wrong)


class _ChannelMeans(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_extractor_and_extract_features(tmp_path: Path) -> None:
    path = tmp_path / "means.pt"
    torch.jit.save(torch.jit.script(_ChannelMeans()), str(path))
    extractor = load_feature_extractor(str(path))
    images = torch.randint(0, 256, (7, 3, 4, 4), dtype=torch.uint8)
    batches = [images[:5], images[5:]]  # re-split to batch_size 2: 2 + 2 + 1 + 2
    feats = extract_features(batches, extractor, batch_size=2, total=7, progress=False)
    assert feats.shape == (7, 3) and feats.dtype == np.float32
    expected = (images.double() / 127.5 - 1).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(feats, expected, atol=1e-6)
    floats = extract_features(images.float() / 127.5 - 1, extractor, progress=False)
    np.testing.assert_allclose(floats, expected, atol=1e-6)

    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        extract_features(images.float(), extractor, progress=False)
    with pytest.raises(FileNotFoundError, match="neither 'inception'"):
        load_feature_extractor(str(tmp_path / "absent.pt"))
    not_script = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(1)}, not_script)
    with pytest.raises(ValueError, match="not a TorchScript file"):
        load_feature_extractor(str(not_script))
