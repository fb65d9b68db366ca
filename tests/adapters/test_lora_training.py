"""A LoRA trained by fluxlab on a released-style FLUX folder (a tiny random diffusers transformer):
only the adapter trains and is checkpointed, it resumes bitwise, and the exported file changes
diffusers' transformer exactly as the run changes fluxlab's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_helpers import run_diffusers, run_fluxlab, save_debug_base
from safetensors.torch import load_file

from fluxlab.adapters.formats import LoraPair, merge_into_model, read_lora, write_lora
from fluxlab.cli import main
from fluxlab.conditioning.tokens import image_ids, text_ids
from fluxlab.models.weights.pretrained import load_flux
from fluxlab.pipelines.build import load_for_sampling

diffusers = pytest.importorskip("diffusers", reason="diffusers is the oracle (test extra)")
pytest.importorskip("peft", reason="LoRA training needs peft (the lora extra)")

# The debug preset's Flux (hidden 64, 2 heads, one block of each kind) on 4×4 RGB patches (48
# features) and MiniLM text (384 wide), with a guidance embedding as FLUX.1-dev has.
TOKEN_DIM, TEXT_DIM = 48, 384


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_debug_base(tmp_path_factory.mktemp("FLUX.1-tiny"), TOKEN_DIM, guidance=True)


def _train(folder: Path, run: Path, *extra: str) -> None:
    args = ["train", "--config", "debug", "--train.tensorboard=false", "--data.limit=24"]
    args += ["--optim.batch_size=4", "--optim.lr=3e-2", "--model.guidance_embed=true"]
    args += [f"--model.init_from={folder}", "--lora.enabled=true", "--lora.rank=4"]
    args += ["--lora.targets=img_attn.qkv,txt_attn.qkv,img_mlp.0,linear1,linear2,img_mod.lin"]
    assert main([*args, "--train.checkpoint_every=2", f"--train.output_dir={run}", *extra]) == 0


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return dict(
        img=torch.randn(2, 16, TOKEN_DIM, generator=g),
        img_ids=image_ids(2, 4, 4),
        txt=torch.randn(2, 8, TEXT_DIM, generator=g),
        txt_ids=text_ids(2, 8),
        timesteps=torch.rand(2, generator=g),
        y=torch.randn(2, TEXT_DIM, generator=g),
        guidance=torch.full((2,), 1.0),
    )


def test_lora_run_trains_resumes_and_exports(flux_folder: Path, tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(flux_folder, straight)
    _train(flux_folder, resumed, "--optim.steps=2")
    _train(flux_folder, resumed, "--resume")
    ckpt = straight / "checkpoints" / "step_0000004"
    weights = load_file(ckpt / "model.safetensors")
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert "single_blocks.0.linear1.lora_B.weight" in weights
    state = torch.load(ckpt / "train_state.pt", weights_only=False)
    moments = {k.replace(".default.", ".") for k in state["optimizer"]["state"]}  # peft's names
    assert moments == set(weights)  # the optimizer holds the adapters' moments only
    again = load_file(resumed / "checkpoints" / "step_0000004" / "model.safetensors")
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    assert any(v.abs().max() > 0 for k, v in weights.items() if ".lora_B." in k)

    # Sampling rebuilds base + adapter; the exported diffusers file does the same in diffusers.
    _, pipe, _ = load_for_sampling(straight, torch.device("cpu"))
    out = tmp_path / "lora"
    assert (
        main(
            [
                "export",
                "lora",
                "--source",
                str(straight),
                "--format",
                "diffusers",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    ref = diffusers.FluxTransformer2DModel.from_pretrained(str(flux_folder / "transformer"))
    x = _inputs()
    before = run_diffusers(ref.eval(), x)
    pipeline = diffusers.FluxPipeline(None, None, None, None, None, None, ref)
    pipeline.load_lora_weights(str(out))
    after, ours = run_diffusers(pipeline.transformer, x), run_fluxlab(pipe.model, x)
    assert (after - before).abs().max() > 1e-3  # the trained adapter moves the output
    torch.testing.assert_close(after, ours, atol=1e-5, rtol=1e-5)

    # The same adapter from the file, merged at a scale, and the merged export.
    base = load_flux(flux_folder, dtype=torch.float32)
    merge_into_model(base, read_lora(out / "pytorch_lora_weights.safetensors"), 0.5)
    half = run_fluxlab(base, x)
    plain = run_fluxlab(load_flux(flux_folder, dtype=torch.float32), x)
    assert (half - plain).abs().max() > 1e-4 and (half - ours).abs().max() > 1e-4
    merged = tmp_path / "merged"
    argv = ["export", "transformer", "--source", str(straight), "--format", "diffusers"]
    assert main([*argv, "--out", str(merged)]) == 0
    exported = diffusers.FluxTransformer2DModel.from_pretrained(str(merged / "transformer"))
    torch.testing.assert_close(run_diffusers(exported.eval(), x), ours, atol=1e-5, rtol=1e-5)


def test_lora_needs_a_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--config", "debug", "--lora.enabled=true", f"--train.output_dir={tmp_path}"]
    assert main(argv) == 2
    assert "model.init_from" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("config", "token_dim", "extra"),
    [
        ("edit-debug", 48, []),  # Kontext editing: the condition's tokens ride along
        (
            "debug",
            16,  # preset:ae-tiny latents: 4 channels in 2×2 patches
            ["--encoding.space=latent", "--encoding.autoencoder=preset:ae-tiny"]
            + ["--encoding.patch_size=2"],
        ),
    ],
)
def test_lora_trains_edits_and_latents(
    tmp_path: Path, config: str, token_dim: int, extra: list[str]
) -> None:
    base = save_debug_base(tmp_path / "base", token_dim)
    run = tmp_path / "run"
    args = ["train", "--config", config, "--train.tensorboard=false", "--optim.steps=2"]
    args += ["--optim.batch_size=4", "--train.sample_every=2", "--train.checkpoint_every=2"]
    args += [f"--model.init_from={base}", "--lora.enabled=true", "--lora.rank=2", *extra]
    assert main([*args, f"--train.output_dir={run}"]) == 0
    weights = load_file(run / "checkpoints" / "step_0000002" / "model.safetensors")
    assert weights and all(".lora_" in k for k in weights)
    assert (run / "samples" / "step_0000002.png").is_file()


def test_bf16_base_trains_under_autocast(tmp_path: Path) -> None:
    """lora.base_dtype=bfloat16 stores the frozen base in bf16; the adapters stay float32."""
    base = save_debug_base(tmp_path / "base", TOKEN_DIM)
    run = tmp_path / "run"
    args = ["train", "--config", "debug", "--train.tensorboard=false", "--optim.steps=2"]
    args += ["--optim.batch_size=4", "--train.sample_every=2", "--train.checkpoint_every=2"]
    args += [f"--model.init_from={base}", "--lora.enabled=true", "--lora.base_dtype=bfloat16"]
    assert main([*args, "--train.mixed_precision=bf16", f"--train.output_dir={run}"]) == 0
    weights = load_file(run / "checkpoints" / "step_0000002" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert any(v.abs().max() > 0 for k, v in weights.items() if ".lora_B." in k)
    # without bf16 autocast the bf16 base is refused up front
    assert main([*args, "--train.mixed_precision=no", f"--train.output_dir={run}2"]) == 2


def test_released_folder_samples_with_a_lora(tmp_path: Path) -> None:
    """`fluxlab sample` on a released-style folder (transformer/ + a FLUX-style vae/, MiniLM in
    place of T5/CLIP) with a LoRA file merged at a scale: scale 0 is the base, bitwise."""
    folder = save_debug_base(tmp_path / "FLUX.1-tiny", 16, guidance=True)  # 4 latents × 2×2
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32),
        latent_channels=4,
        layers_per_block=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1,
        scaling_factor=0.5,
    )
    vae.save_pretrained(str(folder / "vae"))
    model = load_flux(folder, dtype=torch.float32)
    lora = {"double_blocks.0.img_attn.proj": LoraPair(torch.randn(2, 64), torch.randn(64, 2), 2.0)}
    write_lora(lora, tmp_path / "lora", "diffusers")
    assert model.params.guidance_embed

    def sample(name: str, *extra: str) -> bytes:
        out = tmp_path / f"{name}.png"
        argv = ["sample", "--checkpoint", str(folder), "--text-encoder", "minilm", "--size", "32"]
        argv += ["--prompt", "red heart", "--steps", "2", "--device", "cpu", *extra]
        assert main([*argv, "--out", str(out)]) == 0
        return out.read_bytes()

    plain = sample("plain")
    assert sample("zero", "--lora", str(tmp_path / "lora"), "--lora-scale", "0") == plain
    assert sample("full", "--lora", str(tmp_path / "lora")) != plain
