import dataclasses
from collections.abc import Iterator

import pytest
import torch

from fluxlab.diffusion.ddpm import DDPMObjective, DDPMSchedule, ddim_sample
from fluxlab.diffusion.guidance import classifier_free_guidance
from fluxlab.models.dit import DIT_PRESETS, DiT, DiTParams, TimestepEmbedder, sincos_2d

diffusers = pytest.importorskip("diffusers")
from diffusers.models.embeddings import (  # noqa: E402
    get_2d_sincos_pos_embed,
    get_timestep_embedding,
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny models on a shared 2-core box: thread hand-offs cost ~15x the arithmetic.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides: object) -> DiTParams:
    return dataclasses.replace(DIT_PRESETS["dit-debug"], **overrides)


def _randomize(model: DiT, seed: int = 0) -> None:
    # A fresh DiT is the zero function; perturb every weight so shapes and wiring are exercised.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad:  # the fixed sin-cos table stays what it is
                continue
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def test_fresh_dit_outputs_exact_zeros() -> None:
    torch.manual_seed(0)
    model = DiT(tiny())
    x = torch.randn(3, 3, 8, 8)
    out = model(x, torch.rand(3), torch.tensor([0, 5, 10]))
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))


def test_dit_xl2_parameter_count() -> None:
    with torch.device("meta"):
        model = DiT(DIT_PRESETS["DiT-XL/2"])
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 675e6) / 675e6 < 0.01, n


def test_all_presets_build() -> None:
    expected = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    for size, (depth, hidden, heads) in expected.items():
        for patch in (2, 4, 8):
            params = DIT_PRESETS[f"DiT-{size}/{patch}"]
            got = (params.depth, params.hidden_size, params.num_heads, params.patch_size)
            assert got == (depth, hidden, heads, patch)
            assert (params.input_size, params.in_channels, params.num_classes) == (32, 4, 1000)
    for params in DIT_PRESETS.values():
        with torch.device("meta"):
            DiT(params)
    seed = DIT_PRESETS["dit-seed"]
    assert (seed.input_size, seed.patch_size, seed.in_channels, seed.depth, seed.num_heads) == (
        256,
        4,
        3,
        3,
        6,
    )
    assert seed.hidden_size % seed.num_heads == 0


@pytest.mark.parametrize("patch", [2, 4, 8])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_forward_shapes(patch: int, learn_sigma: bool) -> None:
    model = DiT(tiny(input_size=16, patch_size=patch, in_channels=4, learn_sigma=learn_sigma))
    _randomize(model)
    out = model(torch.randn(2, 4, 16, 16), torch.rand(2), torch.tensor([1, 2]))
    assert out.shape == (2, 8 if learn_sigma else 4, 16, 16)
    assert out.abs().sum() > 0


def test_learned_pos_embed_trains_and_sincos_is_fixed() -> None:
    learned = DiT(tiny(pos_embed="learned"))
    fixed = DiT(tiny())
    assert learned.pos_embed.requires_grad and not fixed.pos_embed.requires_grad
    torch.testing.assert_close(fixed.pos_embed[0], sincos_2d(32, 4))


def test_sincos_and_timestep_embeddings_match_diffusers() -> None:
    ref = get_2d_sincos_pos_embed(48, 6, base_size=6, output_type="pt")
    torch.testing.assert_close(sincos_2d(48, 6), ref.float(), atol=1e-6, rtol=0)
    t = torch.tensor([0.0, 1.0, 17.0, 999.0])
    ref_t = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(TimestepEmbedder.timestep_embedding(t, 256), ref_t)


def _to_diffusers(model: DiT) -> dict[str, torch.Tensor]:
    sd, out = model.state_dict(), {}
    out["pos_embed.proj.weight"], out["pos_embed.proj.bias"] = (
        sd["x_embedder.weight"],
        sd["x_embedder.bias"],
    )
    for i in range(model.params.depth):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = dst + "norm1.emb."
        # diffusers gives every block its own copy of the shared t / y embedders.
        for a, b in [("mlp.0", "linear_1"), ("mlp.2", "linear_2")]:
            for kind in ("weight", "bias"):
                out[f"{emb}timestep_embedder.{b}.{kind}"] = sd[f"t_embedder.{a}.{kind}"]
        out[emb + "class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
        for kind in ("weight", "bias"):
            out[f"{dst}norm1.linear.{kind}"] = sd[f"{src}adaLN_modulation.1.{kind}"]
            q, k, v = sd[f"{src}attn.qkv.{kind}"].chunk(3)
            (
                out[f"{dst}attn1.to_q.{kind}"],
                out[f"{dst}attn1.to_k.{kind}"],
                out[f"{dst}attn1.to_v.{kind}"],
            ) = q, k, v
            out[f"{dst}attn1.to_out.0.{kind}"] = sd[f"{src}attn.proj.{kind}"]
            out[f"{dst}ff.net.0.proj.{kind}"] = sd[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}ff.net.2.{kind}"] = sd[f"{src}mlp.fc2.{kind}"]
    for kind in ("weight", "bias"):
        out[f"proj_out_1.{kind}"] = sd[f"final_layer.adaLN_modulation.1.{kind}"]
        out[f"proj_out_2.{kind}"] = sd[f"final_layer.linear.{kind}"]
    return out


@pytest.mark.parametrize("patch", [2, 4])
def test_forward_matches_diffusers_dit(patch: int) -> None:
    params = tiny(
        input_size=16, patch_size=patch, hidden_size=32, num_heads=2, depth=2, learn_sigma=True
    )
    model = DiT(params).eval()
    _randomize(model)
    ref = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=3,
        out_channels=6,
        num_layers=2,
        sample_size=16,
        patch_size=patch,
        num_embeds_ada_norm=10,
        norm_eps=1e-6,
    ).eval()
    ref.load_state_dict(_to_diffusers(model))
    for block in ref.transformer_blocks:
        # diffusers' DiT spaces frequencies by half - 1; the paper's code (and ours) by half.
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([0.013, 0.9]), torch.tensor([3, 10])
    with torch.no_grad():
        expected = ref(x, timestep=t * 1000, class_labels=y).sample
        got = model(x, t, y)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_time_is_scaled_by_1000() -> None:
    model = DiT(tiny())
    t = torch.tensor([0.25, 0.999])
    freq = TimestepEmbedder.timestep_embedding(torch.tensor([250.0, 999.0]), 256)
    torch.testing.assert_close(model.t_embedder(t), model.t_embedder.mlp(freq))


def test_label_dropout_uses_null_class() -> None:
    model = DiT(tiny(class_dropout_prob=0.5))
    _randomize(model)
    x, t = torch.randn(64, 3, 8, 8), torch.rand(64)
    y = torch.zeros(64, dtype=torch.long)
    null = torch.full((64,), 10)
    model.eval()
    cond, uncond = model(x, t, y), model(x, t, null)
    model.train()
    torch.manual_seed(0)
    out = model(x, t, y)
    is_null = torch.isclose(out, uncond, atol=1e-5).flatten(1).all(1)
    is_cond = torch.isclose(out, cond, atol=1e-5).flatten(1).all(1)
    assert (is_null ^ is_cond).all()
    assert 10 < is_null.sum() < 54


def test_bad_configs_raise() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        DiT(tiny(hidden_size=30, num_heads=4))
    with pytest.raises(ValueError, match="patch_size"):
        DiT(tiny(input_size=10, patch_size=4))
    with pytest.raises(ValueError, match="sin-cos"):
        DiT(tiny(hidden_size=66, num_heads=6))
    DiT(tiny(hidden_size=66, num_heads=6, pos_embed="learned"))
    with pytest.raises(ValueError, match="input_size"):
        DiT(tiny())(torch.randn(1, 3, 16, 16), torch.rand(1), torch.zeros(1, dtype=torch.long))


def test_tiny_dit_overfits_one_batch_and_samples_with_cfg() -> None:
    torch.manual_seed(0)
    params = tiny(hidden_size=64, num_heads=4, class_dropout_prob=0.1)
    model = DiT(params)
    objective = DDPMObjective(DDPMSchedule("linear"))
    x0 = torch.randn(8, 3, 8, 8).clamp(-1, 1)
    y = torch.arange(8)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            gen = torch.Generator().manual_seed(123)
            losses = [
                objective.loss(lambda x, t: model(x, t, y), x0, gen)[0].mean() for _ in range(8)
            ]
        model.train()
        return torch.stack(losses).mean().item()

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0)
    for _ in range(100):
        loss, _ = objective.loss(lambda x, t: model(x, t, y), x0)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    after = eval_loss()
    assert after < 0.5 * before, (before, after)

    model.eval()
    null = torch.full_like(y, params.num_classes)
    guided = classifier_free_guidance(
        lambda x, t: model(x, t, y), lambda x, t: model(x, t, torch.cat([y, null])), scale=3.0
    )
    calls: list[int] = []
    x_T = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    sample = ddim_sample(
        guided, x_T, 10, eta=0.5, callback=lambda i, x: calls.append(i), generator=torch.Generator()
    )
    assert calls == list(range(10))
    assert sample.shape == x0.shape and torch.isfinite(sample).all()
    assert not torch.allclose(sample, x_T)
