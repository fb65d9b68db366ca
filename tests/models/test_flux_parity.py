"""fluxlab's Flux against diffusers' FluxTransformer2DModel at a tiny config with random weights."""

import pytest
import torch
import torch.nn.functional as F

from fluxlab.conditioning.tokens import image_ids, text_ids
from fluxlab.models.flux.model import Flux
from fluxlab.models.flux.presets import flux_params
from fluxlab.models.weights.flux_diffusers import (
    bfl_to_diffusers,
    diffusers_to_bfl,
    flux_params_from_diffusers_config,
)
from fluxlab.parallel import epilogues
from fluxlab.parallel.epilogues import use_inference_epilogues

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is the numerical oracle (test dependency)"
)


def _tiny_diffusers(guidance: bool) -> "diffusers.FluxTransformer2DModel":
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=12,
        guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),
    )
    # Random everything, including the norms and zero-initialised layers, so no term hides.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.mark.parametrize("guidance", [False, True])
def test_matches_diffusers(guidance: bool) -> None:
    ref = _tiny_diffusers(guidance)
    params = flux_params_from_diffusers_config(dict(ref.config))
    ours = Flux(params).eval()
    ours.load_state_dict(diffusers_to_bfl(ref.state_dict()), strict=True)

    g = torch.Generator().manual_seed(1)
    b, h, w, l_txt = 2, 4, 6, 5
    img = torch.randn(b, h * w, 16, generator=g)
    txt = torch.randn(b, l_txt, 24, generator=g)
    y = torch.randn(b, 12, generator=g)
    t = torch.rand(b, generator=g)
    gd = torch.full((b,), 3.5) if guidance else None
    # Non-zero ids on every axis (axis 0 = 1 as for a Kontext condition) so RoPE is exercised fully.
    ids = image_ids(b, h, w, index=1)
    tids = text_ids(b, l_txt)
    with torch.no_grad():
        expected = ref(
            hidden_states=img,
            encoder_hidden_states=txt,
            pooled_projections=y,
            timestep=t,
            img_ids=ids[0],
            txt_ids=tids[0],
            guidance=gd,
            return_dict=False,
        )[0]
        got = ours(img=img, img_ids=ids, txt=txt, txt_ids=tids, timesteps=t, y=y, guidance=gd)
    assert got.shape == expected.shape
    assert expected.abs().mean() > 1e-2  # a real signal, not zeros
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_round_trip_conversion() -> None:
    ref = _tiny_diffusers(True)
    params = flux_params_from_diffusers_config(dict(ref.config))
    sd = ref.state_dict()
    back = bfl_to_diffusers(diffusers_to_bfl(sd), params)
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_bfl_names_and_shapes() -> None:
    with torch.device("meta"):
        model = Flux(flux_params("flux-dev"))
    sd = model.state_dict()
    expected = {
        "img_in.weight": (3072, 64),
        "txt_in.weight": (3072, 4096),
        "time_in.in_layer.weight": (3072, 256),
        "vector_in.in_layer.weight": (3072, 768),
        "guidance_in.out_layer.weight": (3072, 3072),
        "double_blocks.0.img_attn.qkv.weight": (9216, 3072),
        "double_blocks.18.txt_attn.norm.key_norm.scale": (128,),
        "double_blocks.0.img_mod.lin.weight": (18432, 3072),
        "double_blocks.0.img_mlp.2.weight": (3072, 12288),
        "single_blocks.3.linear1.weight": (21504, 3072),
        "single_blocks.37.linear2.weight": (3072, 15360),
        "single_blocks.0.modulation.lin.weight": (9216, 3072),
        "final_layer.adaLN_modulation.1.weight": (6144, 3072),
        "final_layer.linear.weight": (64, 3072),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert len([k for k in sd if k.startswith("double_blocks.")]) == 19 * 24  # 12 per stream
    assert sum(p.numel() for p in model.parameters()) == 11_901_408_320


def test_fresh_model_predicts_zero() -> None:
    model = Flux(flux_params("flux-debug", in_channels=12, context_in_dim=8, vec_in_dim=8))
    model.initialize_weights()
    out = model(
        img=torch.randn(1, 4, 12),
        img_ids=image_ids(1, 2, 2),
        txt=torch.randn(1, 3, 8),
        txt_ids=text_ids(1, 3),
        timesteps=torch.rand(1),
        y=torch.randn(1, 8),
    )
    assert torch.count_nonzero(out) == 0


def test_bad_params_are_named() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        flux_params("flux-debug", num_heads=3)
    with pytest.raises(ValueError, match="axes_dim"):
        flux_params("flux-debug", axes_dim=[4, 12, 12])


def test_inference_epilogue_path_matches_the_plain_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA inference path (GELU in the matmul epilogue, linear2 split at the concatenation)
    computes the same function. Run on CPU with a tanh-GELU stand-in for cuBLASLt's epilogue,
    which CPU lacks."""

    ref = _tiny_diffusers(True)
    ours = Flux(flux_params_from_diffusers_config(dict(ref.config))).eval()
    ours.load_state_dict(diffusers_to_bfl(ref.state_dict()), strict=True)
    g = torch.Generator().manual_seed(2)
    inputs = dict(
        img=torch.randn(2, 12, 16, generator=g),
        img_ids=image_ids(2, 3, 4),
        txt=torch.randn(2, 5, 24, generator=g),
        txt_ids=text_ids(2, 5),
        timesteps=torch.rand(2, generator=g),
        y=torch.randn(2, 12, generator=g),
        guidance=torch.full((2,), 3.5),
    )
    with torch.no_grad():
        plain = ours(**inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain_bf16 = ours(**inputs)
    calls = []

    def addmm_gelu(bias, mat1, mat2, beta=1, alpha=1, use_gelu=False):
        calls.append(mat1.shape)
        # As cuBLAS requires (autocast skips this op).
        assert use_gelu and mat1.dtype == mat2.dtype == bias.dtype
        return F.gelu(torch.addmm(bias, mat1, mat2), approximate="tanh")

    use_inference_epilogues(ours)
    monkeypatch.setattr(epilogues, "epilogues_apply", lambda x: not torch.is_grad_enabled())
    monkeypatch.setattr(torch, "_addmm_activation", addmm_gelu)
    with torch.no_grad():
        fused = ours(**inputs)
    assert len(calls) == 2 * 2 + 2  # two MLPs per double block, one per single block
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    # fluxlab samples under bf16 autocast with fp32 weights: the epilogue's operands are cast too.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused_bf16 = ours(**inputs)
    assert len(calls) == 2 * (2 * 2 + 2)
    # bf16 rounding: 1 ulp at 4–8 is 0.031.
    torch.testing.assert_close(fused_bf16, plain_bf16, atol=0.05, rtol=0.02)
