"""LoKr adapters (``lora.kind=lokr``): they train with only the factors changing, checkpoint and
resume like LoRA, and every way of using a run (sampling, merged export, LyCORIS files) gives the
adapted model's output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_helpers import (
    dequantized_twin,
    fluxlab_twin,
    inputs,
    loss_and_grads,
    run_fluxlab,
    save_debug_base,
    tiny_diffusers,
)
from safetensors.torch import load_file

from fluxlab.adapters import formats
from fluxlab.adapters.formats import read_lora
from fluxlab.adapters.lokr import LokrFactors
from fluxlab.adapters.lora import (
    adapter_state_dict,
    add_lora,
    base_state_dict,
    load_adapter_state_dict,
    lora_weights,
)
from fluxlab.cli import main
from fluxlab.config.adapters import DEFAULT_TARGETS, LoraConfig
from fluxlab.models.weights.pretrained import load_flux
from fluxlab.pipelines.build import load_for_sampling

pytest.importorskip("peft", reason="LoKr training needs peft (the lora extra)")

TARGETS = DEFAULT_TARGETS + ["img_mod.lin"]


def _randomize(model: torch.nn.Module, seed: int = 3) -> None:
    """Random factors (peft starts w1 at zero), large enough to move the output clearly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lokr_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("both", [False, True])
def test_merged_lokr_equals_the_adapted_model(both: bool) -> None:
    """Full and low-rank factors on both sides; the LyCORIS files give the same ΔW back."""
    cfg = LoraConfig(
        enabled=True, kind="lokr", rank=2, alpha=3.0, targets=TARGETS, lokr_decompose_both=both
    )
    adapted = add_lora(fluxlab_twin(tiny_diffusers()), cfg)
    _randomize(adapted)
    names = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert names and all(".lokr_w" in n for n in names)
    assert any(".lokr_w1_a." in n for n in names) == both
    lokr = lora_weights(adapter_state_dict(adapted), cfg)
    assert all(isinstance(f, LokrFactors) and f.scale == 1.5 for f in lokr.values())
    x = inputs()
    base = fluxlab_twin(tiny_diffusers())
    plain = run_fluxlab(base, x)
    formats.merge_into_model(base, lokr)
    merged, expected = run_fluxlab(base, x), run_fluxlab(adapted.eval(), x)
    assert (merged - plain).abs().mean() > 1e-2
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    for layout in ("bfl", "kohya"):
        back = formats.from_state_dict(formats.to_state_dict(lokr, layout))
        assert back.keys() == lokr.keys()
        for name, factors in lokr.items():
            torch.testing.assert_close(back[name].delta(), factors.delta(), atol=1e-6, rtol=1e-6)
    keys = formats.to_state_dict(lokr, "kohya")
    assert "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2_b" in keys
    assert keys["lora_unet_single_blocks_1_linear2.alpha"] == 2.0  # rank: the scale is in w1


def test_lokr_trains_on_a_fixed_batch_and_leaves_the_base() -> None:
    cfg = LoraConfig(enabled=True, kind="lokr", rank=4, targets=TARGETS, lokr_factor=4)
    model = add_lora(fluxlab_twin(tiny_diffusers()), cfg).train()
    base = {k: v.clone() for k, v in base_state_dict(model).items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=1e-2)
    x, target = inputs(), torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(5))
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.mse_loss(model(**x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0]
    assert all(torch.equal(v, base[k]) for k, v in base_state_dict(model).items())


def test_lokr_on_a_quantized_base_computes_with_its_dequantized_weights() -> None:
    pytest.importorskip("torchao", reason="the int8 base needs torchao (the quant extra)")
    cfg = LoraConfig(
        enabled=True, kind="lokr", rank=4, targets=TARGETS, lokr_factor=4, base_quant="int8"
    )
    cfg.validate("base", "no", "flux")  # accepted
    model = add_lora(fluxlab_twin(tiny_diffusers()), cfg)
    with torch.no_grad():  # every factor nonzero, so each delta acts
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    x = inputs()
    out, dx, grads = loss_and_grads(model, x)
    ref_out, ref_dx, ref_grads = loss_and_grads(dequantized_twin(model), x)
    # peft's LoKr adds its delta beside base_layer(x): the int8 layer and its backward are exact
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dx, ref_dx, atol=1e-5, rtol=1e-4)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4)
    assert all(g.abs().sum() > 0 for g in grads.values())


def _train(folder: Path, run: Path, *extra: str) -> None:
    args = ["train", "--config", "debug", "--train.tensorboard=false", "--data.limit=16"]
    args += ["--optim.batch_size=4", "--optim.lr=3e-2", "--optim.steps=4"]
    args += [f"--model.init_from={folder}", "--lora.enabled=true", "--lora.kind=lokr"]
    args += ["--lora.rank=2", "--lora.targets=img_attn.qkv,txt_mlp.0,linear1,linear2"]
    assert main([*args, "--train.checkpoint_every=2", f"--train.output_dir={run}", *extra]) == 0


def test_lokr_run_resumes_samples_and_exports(tmp_path: Path) -> None:
    folder = save_debug_base(tmp_path / "base", 48)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(folder, straight)
    _train(folder, resumed, "--optim.steps=2")
    _train(folder, resumed, "--optim.steps=4", "--resume")
    ckpt = straight / "checkpoints" / "step_0000004"
    weights = load_file(ckpt / "model.safetensors")
    assert weights and all(".lokr_w" in k and ".default" not in k for k in weights)
    state = torch.load(ckpt / "train_state.pt", weights_only=False)
    moments = {k.removesuffix(".default") for k in state["optimizer"]["state"]}
    assert moments == set(weights)  # the optimizer holds the factors' moments only
    again = load_file(resumed / "checkpoints" / "step_0000004" / "model.safetensors")
    assert all(torch.equal(weights[k], again[k]) for k in weights)

    # The run's weights (base + merged ΔW) compute what peft's adapted model computes.
    g = torch.Generator().manual_seed(1)
    x = dict(inputs(), img=torch.randn(2, 12, 48, generator=g))
    x["txt"], x["y"] = torch.randn(2, 5, 384, generator=g), torch.randn(2, 384, generator=g)
    x["guidance"] = None
    _, pipe, _ = load_for_sampling(straight, torch.device("cpu"))
    ema = load_file(ckpt / "ema.safetensors")
    cfg = LoraConfig(enabled=True, kind="lokr", rank=2)
    cfg.targets = ["img_attn.qkv", "txt_mlp.0", "linear1", "linear2"]
    adapted = add_lora(load_flux(folder, dtype=torch.float32), cfg).eval()
    load_adapter_state_dict(adapted, ema)
    ours = run_fluxlab(pipe.model, x)
    plain = run_fluxlab(load_flux(folder, dtype=torch.float32), x)
    assert (ours - plain).abs().max() > 1e-4  # the trained adapter moves the output
    torch.testing.assert_close(ours, run_fluxlab(adapted, x), atol=1e-5, rtol=1e-5)

    # The LyCORIS file merged into the base; the merged export; diffusers' layout refused.
    lyco = tmp_path / "lokr.safetensors"
    argv = ["export", "lora", "--source", str(straight), "--out"]
    assert main([*argv, str(lyco), "--format", "bfl"]) == 0
    assert "diffusion_model.single_blocks.0.linear1.lokr_w1" in load_file(lyco)
    from_file = formats.merge_into_model(load_flux(folder, dtype=torch.float32), read_lora(lyco))
    torch.testing.assert_close(run_fluxlab(from_file, x), ours, atol=1e-5, rtol=1e-5)
    merged = tmp_path / "merged.safetensors"
    cmd = ["export", "transformer", "--format", "bfl", "--out", str(merged)]
    assert main([*cmd, "--source", str(straight)]) == 0
    exported = load_flux(merged, dtype=torch.float32)
    torch.testing.assert_close(run_fluxlab(exported, x), ours, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="export transformer"):
        formats.write_lora(read_lora(lyco), tmp_path / "d", "diffusers")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "loha"}, "lora.kind='loha'"),
        ({"kind": "lokr", "lokr_factor": 0}, "lora.lokr_factor=0"),
        ({"lokr_factor": 4}, "set lora.kind=lokr"),
        ({"lokr_decompose_both": True}, "set lora.kind=lokr"),
    ],
)
def test_bad_lokr_config_is_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoraConfig(enabled=True, **fields).validate("base", "no", "flux")
