"""LoRA files: fused ⇄ split conversion is exact, every layout round-trips, merging equals the
adapter's forward."""

from __future__ import annotations

import torch
from lora_helpers import fluxlab_twin, inputs, randomize_adapters, run_fluxlab, tiny_diffusers

from fluxlab.adapters import formats
from fluxlab.adapters.formats import LoraPair, from_state_dict, to_state_dict
from fluxlab.adapters.lora import adapter_state_dict, add_lora, base_state_dict, lora_weights
from fluxlab.config.adapters import DEFAULT_TARGETS, OPTIONAL_TARGETS, LoraConfig
from fluxlab.models.flux.model import Flux


def _lora_model(cfg: LoraConfig) -> tuple[Flux, Flux]:
    """(base, base with a random LoRA) over the tiny diffusers twin's weights."""
    base = fluxlab_twin(tiny_diffusers())
    adapted = add_lora(fluxlab_twin(tiny_diffusers()), cfg)
    randomize_adapters(adapted)
    return base, adapted.eval()


def _deltas(lora: formats.LoraWeights) -> dict[str, torch.Tensor]:
    return {name: pair.delta() for name, pair in lora.items()}


def test_every_layout_round_trips_to_the_same_update() -> None:
    cfg = LoraConfig(enabled=True, rank=4, alpha=8.0, targets=DEFAULT_TARGETS + OPTIONAL_TARGETS)
    _, adapted = _lora_model(cfg)
    lora = lora_weights(adapter_state_dict(adapted), cfg)
    assert {"single_blocks.1.linear1", "final_layer.adaLN_modulation.1"} <= lora.keys()
    for layout in formats.LAYOUTS:
        sd = to_state_dict(lora, layout)
        back = from_state_dict(sd)
        assert back.keys() == lora.keys(), layout
        for name, delta in _deltas(lora).items():
            torch.testing.assert_close(back[name].delta(), delta, atol=1e-6, rtol=1e-6)
            assert back[name].rank == lora[name].rank, (layout, name)  # shared A: same rank back


def test_diffusers_names_split_the_fused_projections() -> None:
    cfg = LoraConfig(enabled=True, rank=4, targets=["linear1", "img_attn.qkv"])
    _, adapted = _lora_model(cfg)
    sd = to_state_dict(lora_weights(adapter_state_dict(adapted), cfg), "diffusers")
    parts = ["to_q", "to_k", "to_v", "proj_mlp"]
    single = [
        f"transformer.single_transformer_blocks.0.{'attn.' if p != 'proj_mlp' else ''}{p}"
        for p in parts
    ]
    for name in single:
        assert sd[f"{name}.lora_A.weight"].shape == (4, 32)
    assert sd[f"{single[3]}.lora_B.weight"].shape == (128, 4)  # the MLP's 4 × 32 rows
    assert "transformer.transformer_blocks.1.attn.to_v.lora_B.weight" in sd


def test_separate_parts_fuse_block_diagonally() -> None:
    """diffusers LoRAs with their own A per part (and a missing MLP part) fuse exactly."""
    g = torch.Generator().manual_seed(0)
    hidden, rank = 32, 2
    sd = {}
    for i, part in enumerate(["attn.to_q", "attn.to_k", "attn.to_v"]):
        key = f"transformer.single_transformer_blocks.0.{part}"
        sd[f"{key}.lora_A.weight"] = torch.randn(rank + i, hidden, generator=g)
        sd[f"{key}.lora_B.weight"] = torch.randn(hidden, rank + i, generator=g)
        sd[f"{key}.alpha"] = torch.tensor(float(i + 1))
    fused = from_state_dict(sd)["single_blocks.0.linear1"]
    expected = [
        (i + 1)
        / (rank + i)
        * sd[f"transformer.single_transformer_blocks.0.{p}.lora_B.weight"]
        @ sd[f"transformer.single_transformer_blocks.0.{p}.lora_A.weight"]
        for i, p in enumerate(["attn.to_q", "attn.to_k", "attn.to_v"])
    ]
    expected.append(torch.zeros(4 * hidden, hidden))  # no LoRA on the MLP part
    torch.testing.assert_close(fused.delta(), torch.cat(expected), atol=1e-5, rtol=1e-5)
    assert fused.rank == 3 * rank + 3


def test_bfl_file_round_trips(tmp_path) -> None:
    cfg = LoraConfig(enabled=True, rank=3, alpha=1.5)
    _, adapted = _lora_model(cfg)
    lora = lora_weights(adapter_state_dict(adapted), cfg)
    for layout in ("bfl", "kohya"):
        path = formats.write_lora(lora, tmp_path / f"{layout}.safetensors", layout)
        back = formats.read_lora(path)
        assert back.keys() == lora.keys()
        for name, pair in lora.items():  # the same tensors, not only the same product
            assert torch.equal(back[name].down, pair.down) and torch.equal(back[name].up, pair.up)
            assert back[name].alpha == pair.alpha
    keys = formats.to_state_dict(lora, "bfl")
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight" in keys
    assert "diffusion_model.single_blocks.1.linear2.alpha" in keys


def test_merged_model_equals_base_plus_adapter() -> None:
    cfg = LoraConfig(enabled=True, rank=4, alpha=2.0, targets=DEFAULT_TARGETS + ["img_mod.lin"])
    base, adapted = _lora_model(cfg)
    x = inputs()
    lora = lora_weights(adapter_state_dict(adapted), cfg)
    formats.merge_into_model(base, lora)
    merged, expected = run_fluxlab(base, x), run_fluxlab(adapted, x)
    assert (merged - run_fluxlab(fluxlab_twin(tiny_diffusers()), x)).abs().mean() > 1e-2
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    # the base under peft's names is the untouched original
    plain = fluxlab_twin(tiny_diffusers()).state_dict()
    assert all(torch.equal(v, plain[k]) for k, v in base_state_dict(adapted).items())


def test_a_lora_of_another_size_is_refused() -> None:
    base = fluxlab_twin(tiny_diffusers())
    wrong = {"double_blocks.0.img_attn.proj": LoraPair(torch.ones(2, 8), torch.ones(8, 2), 2.0)}
    try:
        formats.merge_into_model(base, wrong)
    except ValueError as err:
        assert "another model size" in str(err)
    else:
        raise AssertionError("a LoRA of the wrong shape merged")
