"""fp8 without torchao: one clear error naming the setting, never an ImportError from deep inside
(this file needs no torchao, unlike test_float8.py)."""

from __future__ import annotations

import sys

import pytest
import torch

from fluxlab.models.flux.model import Flux
from fluxlab.models.flux.presets import flux_params
from fluxlab.parallel import float8 as f8


def test_float8_training_without_torchao_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules: find_spec answers "not installed" and any import of it fails.
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    model = Flux(flux_params("flux-debug", in_channels=48, context_in_dim=32, vec_in_dim=32))
    with pytest.raises(ValueError, match=r"parallel\.float8=tensorwise.*torchao is not installed"):
        f8.convert_to_float8_training(model, "tensorwise", torch.device("cpu"))
