"""Kontext editing: token layout and ids against diffusers' FluxKontextPipeline, the OpenMoji edit
pairs, user edit folders, and a tiny edit model trained and used through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluxlab.cli import main
from fluxlab.conditioning.kontext import ConditionTokens, encode_condition, prepare_edit_inputs
from fluxlab.conditioning.tokens import image_ids, pack
from fluxlab.data.edit_folder import EditFolder
from fluxlab.data.edit_pairs import OpenMojiEditPairs, find_edit_pairs, split_pairs
from fluxlab.data.openmoji import load_rendered, openmoji_codes
from fluxlab.data.transforms import uint8_to_tensor
from fluxlab.models.flux.model import Flux
from fluxlab.models.weights.autoencoder_diffusers import load_autoencoder_weights
from fluxlab.models.weights.flux_diffusers import (
    diffusers_to_bfl,
    flux_params_from_diffusers_config,
)
from fluxlab.models.weights.pretrained import load_flux
from fluxlab.pipelines.text_to_image import FluxTextToImage, LatentCodec, PixelCodec, TextEmbedding

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is the numerical oracle (test dependency)"
)

torch.set_num_threads(1)
VAE = dict(
    block_out_channels=[32, 32, 32, 32],  # four levels: 8× down, as FLUX's
    layers_per_block=1,
    latent_channels=16,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=0.3611,
    shift_factor=0.1159,
)


def _randomised(model: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(
                torch.randn(p.shape, generator=gen) * scale
            )  # zero-initialised layers too: no term hides
    return model.eval()


def _tiny_transformer(
    context_dim: int = 24, pooled_dim: int = 12
) -> diffusers.FluxTransformer2DModel:
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=context_dim,
        pooled_projection_dim=pooled_dim,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    return _randomised(model, seed=1)


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FLUX.1 Kontext-dev-shaped folder (diffusers layout) with tiny random transformer and VAE;
    MiniLM's 384-wide text features stand in for T5/CLIP so the CLI can run it offline."""
    root = tmp_path_factory.mktemp("kontext")
    torch.manual_seed(0)
    diffusers.AutoencoderKL(**VAE).eval().save_pretrained(root / "vae")
    _tiny_transformer(context_dim=384, pooled_dim=384).save_pretrained(root / "transformer")
    return root


def _oracle_pipeline(vae_dir: Path) -> diffusers.FluxKontextPipeline:
    vae = diffusers.AutoencoderKL.from_pretrained(vae_dir).eval()
    return diffusers.FluxKontextPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=None,
    )


# (target height, width), (condition height, width) in pixels; conditions of other sizes and shapes
# too.
SIZES = [((64, 64), (64, 64)), ((64, 64), (48, 96)), ((32, 80), (96, 32))]


@pytest.mark.parametrize("target, cond", SIZES)
def test_tokens_and_ids_match_diffusers_prepare_latents(
    kontext_dir: Path, target: tuple, cond: tuple
) -> None:
    oracle = _oracle_pipeline(kontext_dir / "vae")
    codec = LatentCodec(load_autoencoder_weights(kontext_dir))
    b = 2
    image = torch.rand(b, 3, *cond, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        latents, image_latents, latent_ids, cond_ids = oracle.prepare_latents(
            image,
            b,
            16,
            target[0],
            target[1],
            torch.float32,
            torch.device("cpu"),
            torch.Generator().manual_seed(4),
        )
    condition = encode_condition(codec, image, patch_size=2)
    torch.testing.assert_close(condition.tokens, image_latents, atol=1e-5, rtol=1e-5)
    assert torch.equal(condition.ids, cond_ids.expand(b, -1, -1))  # (1, row, col), restarting at 0
    assert condition.ids[0, 0].tolist() == [1, 0, 0]
    # The noisy target: same packing (diffusers' latents re-packed by us from their unpacked form)
    # and ids.
    grid_h, grid_w = target[0] // 16, target[1] // 16
    unpacked = oracle._unpack_latents(latents, target[0], target[1], 8)
    assert torch.equal(pack(unpacked, 2), latents)
    noisy_ids = image_ids(b, grid_h, grid_w)
    assert torch.equal(noisy_ids, latent_ids.expand(b, -1, -1))
    # The sequence the transformer sees: [noisy; condition], as diffusers concatenates it.
    img, ids = prepare_edit_inputs(latents, noisy_ids, condition)
    torch.testing.assert_close(
        img, torch.cat([latents, image_latents], dim=1), atol=1e-5, rtol=1e-5
    )
    assert torch.equal(img[:, : latents.shape[1]], latents)
    assert torch.equal(ids[0], torch.cat([latent_ids, cond_ids], dim=0))


class Identity16(PixelCodec):
    channels = 16  # stands for 16-channel latents, so that tokens have FLUX's 64 features


def test_velocity_matches_diffusers_transformer_and_keeps_target_shape() -> None:
    ref = _tiny_transformer()
    model = Flux(flux_params_from_diffusers_config(dict(ref.config))).eval()
    model.load_state_dict(diffusers_to_bfl(ref.state_dict()), strict=True)
    pipe = FluxTextToImage(
        model, Identity16(), resolution=4, patch_size=2
    )  # a 2×2 grid of 64 features
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, pipe.image_seq_len, pipe.token_dim, generator=gen)
    condition = encode_condition(
        pipe.codec, torch.randn(2, 16, 6, 10, generator=gen), 2
    )  # another size: 3×5
    text = TextEmbedding(torch.randn(2, 5, 24, generator=gen), torch.randn(2, 12, generator=gen))
    t, g = torch.tensor([0.3, 0.8]), torch.tensor([2.5, 2.5])
    ours = pipe.velocity(model, x_t, t, text, g, condition=condition)
    assert ours.shape == x_t.shape
    with torch.no_grad():
        theirs = ref(
            hidden_states=torch.cat([x_t, condition.tokens], dim=1),
            timestep=t,
            guidance=g,
            pooled_projections=text.vec,
            encoder_hidden_states=text.txt,
            txt_ids=torch.zeros(5, 3),
            img_ids=torch.cat([image_ids(1, 2, 2)[0], condition.ids[0]]),
            return_dict=False,
        )[0][:, : x_t.shape[1]]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # The condition matters, and a mismatched one is refused with a message.
    other = ConditionTokens(condition.tokens.flip(0), condition.ids)
    assert not torch.allclose(ours, pipe.velocity(model, x_t, t, text, g, condition=other))
    with pytest.raises(ValueError, match="condition images for a batch"):
        pipe.velocity(model, x_t, t, text, g, condition=condition[:1])


def test_pretrained_folder_loads_as_plain_flux(kontext_dir: Path) -> None:
    ref = diffusers.FluxTransformer2DModel.from_pretrained(kontext_dir / "transformer")
    model = load_flux(kontext_dir, dtype=torch.float32)
    assert model.params.guidance_embed and model.params.in_channels == 64
    assert torch.equal(model.img_in.weight, ref.x_embedder.weight)


# ------------------------------------------------------------------------------- OpenMoji pairs


def test_openmoji_pairs_tone_gender_hair_color_both_directions() -> None:
    tones = ["1F44B"] + [f"1F44B-1F3F{c}" for c in "BCDEF"]
    police = ["1F46E", "1F46E-200D-2642-FE0F", "1F46E-200D-2640-FE0F"]
    health = ["1F9D1-200D-2695-FE0F", "1F468-200D-2695-FE0F", "1F469-200D-2695-FE0F"]
    hair = ["1F9D1", "1F9D1-200D-1F9B0", "1F9D1-200D-1F9B2"]
    families = [
        "1F468-200D-1F469-200D-1F466",
        "1F469-200D-1F469-200D-1F466",
    ]  # not variants of one another
    codes = tones + police + health + hair + families
    names = [f"n{i}" for i in range(len(codes))] + ["red heart", "blue heart"]
    pairs = {(p.condition, p.target): p for p in find_edit_pairs(codes + ["2764", "1F499"], names)}
    assert pairs[("1F44B", "1F44B-1F3FF")].instruction == "give it a dark skin tone"
    assert pairs[("1F44B-1F3FF", "1F44B")].instruction == "remove the skin tone"
    assert pairs[("1F44B-1F3FB", "1F44B-1F3FE")].instruction == "give it a medium-dark skin tone"
    assert sum(p.family == "skin_tone" for p in pairs.values()) == 6 * 5
    assert pairs[("1F46E", "1F46E-200D-2640-FE0F")].instruction == "make it a woman"
    assert pairs[("1F46E-200D-2642-FE0F", "1F46E")].instruction == "make it gender-neutral"
    assert pairs[("1F9D1-200D-2695-FE0F", "1F468-200D-2695-FE0F")].instruction == "make it a man"
    assert pairs[("1F9D1", "1F9D1-200D-1F9B0")].instruction == "give it red hair"
    assert pairs[("1F9D1-200D-1F9B0", "1F9D1-200D-1F9B2")].instruction == "make it bald"
    assert pairs[("2764", "1F499")].instruction == "make it blue"
    assert not any(c in families for pair in pairs for c in pair)
    assert {p.root for p in pairs.values() if p.condition in health} == {"1F9D1-200D-2695-FE0F"}


def test_held_out_split_is_disjoint_by_base_emoji() -> None:
    pairs = find_edit_pairs(openmoji_codes())
    train, val = split_pairs(pairs, "train", 0.05, 0), split_pairs(pairs, "val", 0.05, 0)
    assert len(train) + len(val) == len(pairs) and val and train
    assert not {p.root for p in train} & {p.root for p in val}
    codes = lambda ps: {c for p in ps for c in (p.condition, p.target)}  # noqa: E731
    assert not codes(train) & codes(val)
    assert any(p.family == "skin_tone" for p in val)
    # a base emoji and all of its tones are on one side
    waving = {p.root for p in pairs if p.condition.startswith("1F44B")}
    assert waving == {"1F44B"}


def test_openmoji_edit_items_are_the_rendered_pair() -> None:
    ds = OpenMojiEditPairs(16, include_roots=["1F44B"])
    assert len(ds) == 30
    i = next(
        i for i, p in enumerate(ds.pairs) if (p.condition, p.target) == ("1F44B", "1F44B-1F3FF")
    )
    item = ds[i]
    rendered = load_rendered(16, ["1F44B", "1F44B-1F3FF"])
    assert torch.equal(item["condition"], uint8_to_tensor(rendered["images"][0]))
    assert torch.equal(item["image"], uint8_to_tensor(rendered["images"][1]))
    assert item["caption"] == "give it a dark skin tone"
    assert (item["source_name"], item["target_name"]) == (
        "waving hand",
        "waving hand: dark skin tone",
    )
    small = OpenMojiEditPairs(16, include_roots=["1F44B"], condition_resolution=8)
    assert small[i]["condition"].shape == (3, 8, 8) and small[i]["image"].shape == (3, 16, 16)


def test_edit_folder(tmp_path: Path) -> None:
    for name, color in [("a", "red"), ("b", "blue"), ("c", "green")]:
        Image.new("RGB", (20, 12), color).save(tmp_path / f"{name}.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    rows = [
        {"condition": "a.png", "target": "b.png", "instruction": "make it blue"},
        {"condition": "b.png", "target": "bad.png", "instruction": "break it"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = EditFolder(tmp_path, 8, condition_resolution=4)
    item = ds[0]
    assert item["caption"] == "make it blue" and item["image"].shape == (3, 8, 8)
    assert item["condition"].shape == (3, 4, 4) and item["condition"][0].mean() > 0.9  # red
    assert ds[1] is None  # an unreadable image drops the pair, not the run
    (tmp_path / "metadata.jsonl").write_text('{"condition": "a.png", "instruction": "x"}\n')
    with pytest.raises(ValueError, match="line 1 lacks target"):
        EditFolder(tmp_path, 8)


# --------------------------------------------------------------------------------------- end to end


def test_train_edit_model_then_edit_through_cli(tmp_path: Path, kontext_dir: Path) -> None:
    run = tmp_path / "run"
    fast = [
        "--train.tensorboard=false",
        "--data.limit=16",
        "--optim.batch_size=4",
        "--train.eval_every=2",
    ]
    assert main(["train", "--config", "edit-debug", f"--train.output_dir={run}", *fast]) == 0
    grid = Image.open(run / "samples" / "step_0000004.png")
    assert grid.size[0] > grid.size[1]  # triplets: condition | output | target
    source = tmp_path / "in.png"
    Image.fromarray(load_rendered(16, ["1F44B"])["images"][0]).save(source)
    out = tmp_path / "out.png"
    args = [
        "edit",
        "--checkpoint",
        str(run),
        "--image",
        str(source),
        "--prompt",
        "give it a dark skin tone",
        "--steps",
        "2",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert Image.open(out).size == (16, 16)
    assert np.asarray(Image.open(out)).std() > 0
    # The same command runs a FLUX.1 Kontext-shaped folder (latent space through the autoencoder).
    out2 = tmp_path / "out2.png"
    args = [
        "edit",
        "--checkpoint",
        str(kontext_dir),
        "--image",
        str(source),
        "--prompt",
        "make it blue",
        "--text-encoder",
        "minilm",
        "--size",
        "32",
        "--condition-size",
        "48",
        "--steps",
        "2",
        "--out",
        str(out2),
    ]
    assert main(args) == 0
    assert Image.open(out2).size == (32, 32)


def test_edit_model_trains_in_latent_space(tmp_path: Path) -> None:
    """Kontext editing on autoencoder latents: condition and target both go through the codec."""
    run = tmp_path / "run"
    args = [
        "train",
        "--config",
        "edit-debug",
        f"--train.output_dir={run}",
        "--train.tensorboard=false",
        "--data.limit=16",
        "--optim.batch_size=4",
        "--encoding.space=latent",
        "--encoding.autoencoder=preset:ae-tiny",
        "--encoding.patch_size=2",
    ]
    assert main(args) == 0
    source = tmp_path / "in.png"
    Image.fromarray(load_rendered(16, ["1F44B"])["images"][0]).save(source)
    out = tmp_path / "out.png"
    assert (
        main(
            [
                "edit",
                "--checkpoint",
                str(run),
                "--image",
                str(source),
                "--prompt",
                "give it a dark skin tone",
                "--steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert Image.open(out).size == (16, 16)


def test_edit_config_refuses_augmentation(tmp_path: Path, capsys) -> None:
    assert main(["train", "--config", "edit-debug", "--data.hflip=true"]) == 2
    assert "data.hflip=false" in capsys.readouterr().err
