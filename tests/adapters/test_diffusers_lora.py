"""diffusers is the oracle: a fluxlab LoRA (diffusers or BFL layout) loaded by
``FluxPipeline.load_lora_weights`` changes diffusers' transformer exactly as it changes fluxlab's,
and an exported transformer loads with ``FluxTransformer2DModel.from_pretrained``.

The pipeline is a real ``FluxPipeline`` around a tiny random transformer; its text encoders, VAE
and scheduler are left out (None), as the LoRA loader only touches the transformer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_helpers import (
    fluxlab_twin,
    inputs,
    randomize_adapters,
    run_diffusers,
    run_fluxlab,
    tiny_diffusers,
)

from fluxlab.adapters import formats
from fluxlab.adapters.lora import adapter_state_dict, add_lora, lora_weights
from fluxlab.config.adapters import DEFAULT_TARGETS, LoraConfig
from fluxlab.models.weights.flux_export import save_bfl_transformer, save_diffusers_transformer
from fluxlab.models.weights.pretrained import load_flux

diffusers = pytest.importorskip("diffusers", reason="diffusers is the oracle (test extra)")
pytest.importorskip("peft", reason="LoRA training and diffusers' LoRA loader need peft")


def _pipeline(transformer: torch.nn.Module) -> diffusers.FluxPipeline:
    return diffusers.FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )


def _adapted(cfg: LoraConfig) -> tuple[torch.nn.Module, formats.LoraWeights]:
    model = add_lora(fluxlab_twin(tiny_diffusers()), cfg)
    randomize_adapters(model)
    return model.eval(), lora_weights(adapter_state_dict(model), cfg)


@pytest.mark.parametrize("alpha", [None, 2.0])
def test_diffusers_layout_loads_into_flux_pipeline(tmp_path: Path, alpha: float | None) -> None:
    cfg = LoraConfig(enabled=True, rank=4, alpha=alpha, targets=DEFAULT_TARGETS + ["txt_mod.lin"])
    model, lora = _adapted(cfg)
    path = formats.write_lora(lora, tmp_path, "diffusers")
    assert path.name == "pytorch_lora_weights.safetensors"
    ref = tiny_diffusers()
    x = inputs()
    before = run_diffusers(ref, x)
    pipe = _pipeline(ref)
    pipe.load_lora_weights(str(tmp_path))
    after, ours = run_diffusers(pipe.transformer, x), run_fluxlab(model, x)
    assert (after - before).abs().mean() > 1e-2  # the adapter really moves the output
    torch.testing.assert_close(after, ours, atol=1e-5, rtol=1e-5)


def test_bfl_layout_loads_into_flux_pipeline(tmp_path: Path) -> None:
    """diffusers reads BFL-layout (ComfyUI) files through its kohya converter, which knows the
    single blocks' fused widths only at FLUX.1's size: the tiny model adapts double blocks."""
    targets = ["img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "img_mlp.0", "txt_mod.lin"]
    model, lora = _adapted(LoraConfig(enabled=True, rank=4, alpha=8.0, targets=targets))
    path = formats.write_lora(lora, tmp_path / "lora_bfl.safetensors", "bfl")
    ref = tiny_diffusers()
    x = inputs()
    pipe = _pipeline(ref)
    pipe.load_lora_weights(str(path))
    ours = run_fluxlab(model, x)
    torch.testing.assert_close(run_diffusers(pipe.transformer, x), ours, atol=1e-5, rtol=1e-5)
    assert (ours - run_fluxlab(fluxlab_twin(tiny_diffusers()), x)).abs().mean() > 1e-2


def test_diffusers_lora_reads_back_into_fluxlab(tmp_path: Path) -> None:
    """The other direction: diffusers' own file (saved by its pipeline) merges into fluxlab."""
    cfg = LoraConfig(enabled=True, rank=4)
    model, lora = _adapted(cfg)
    formats.write_lora(lora, tmp_path, "diffusers")
    base = fluxlab_twin(tiny_diffusers())
    formats.merge_into_model(base, formats.read_lora(tmp_path))
    x = inputs()
    torch.testing.assert_close(run_fluxlab(base, x), run_fluxlab(model, x), atol=1e-5, rtol=1e-5)


def test_exported_transformer_loads_in_diffusers(tmp_path: Path) -> None:
    ref = tiny_diffusers()
    ours = fluxlab_twin(ref)
    x = inputs()
    folder = save_diffusers_transformer(ours.state_dict(), ours.params, tmp_path / "transformer")
    loaded = diffusers.FluxTransformer2DModel.from_pretrained(str(folder)).eval()
    expected = run_fluxlab(ours, x)
    torch.testing.assert_close(run_diffusers(loaded, x), expected, atol=1e-5, rtol=1e-5)
    # fluxlab reads both of its own exports back (a folder holding transformer/, a BFL file)
    again = load_flux(tmp_path, dtype=torch.float32)
    torch.testing.assert_close(run_fluxlab(again, x), expected, atol=0, rtol=0)
    single = save_bfl_transformer(ours.state_dict(), ours.params, tmp_path / "flux.safetensors")
    torch.testing.assert_close(
        run_fluxlab(load_flux(single, dtype=torch.float32), x), expected, atol=0, rtol=0
    )


def test_a_model_diffusers_cannot_hold_is_refused(tmp_path: Path) -> None:
    from dataclasses import replace

    params = replace(fluxlab_twin(tiny_diffusers()).params, mlp_ratio=2.0)
    with pytest.raises(ValueError, match="BFL file instead"):
        save_diffusers_transformer({}, params, tmp_path)
