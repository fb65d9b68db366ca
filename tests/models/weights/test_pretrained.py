"""Released-FLUX loading (diffusers sharded folder, BFL single file) with meta init;
model.init_from."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fluxlab.cli import main
from fluxlab.config.loading import load_config
from fluxlab.models.flux.model import Flux, FluxParams
from fluxlab.models.weights.autoencoder_spec import load_autoencoder, save_autoencoder
from fluxlab.models.weights.flux_diffusers import bfl_to_diffusers
from fluxlab.models.weights.pretrained import load_flux, load_pretrained
from fluxlab.train.checkpoint import load_weights, resolve_checkpoint
from fluxlab.train.trainer import Trainer

# head dim 128 as in FLUX.1, so a BFL file's params can be inferred from its shapes alone
TINY = FluxParams(
    in_channels=64,
    out_channels=64,
    vec_in_dim=16,
    context_in_dim=32,
    hidden_size=256,
    num_heads=2,
    depth=2,
    depth_single_blocks=2,
    axes_dim=[16, 56, 56],
    guidance_embed=True,
)


def _reference() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.to(torch.bfloat16) for k, v in Flux(TINY).state_dict().items()}


def _check(model: Flux, ref: dict[str, torch.Tensor]) -> None:
    assert not any(p.is_meta for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    sd = model.state_dict()
    assert sd.keys() == ref.keys()
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k


def test_bfl_single_file_with_ae_beside_it(tmp_path: Path) -> None:
    ref = _reference()
    save_file(ref, tmp_path / "flux1-tiny.safetensors")
    save_autoencoder(load_autoencoder("preset:ae-tiny"), tmp_path)  # ae.safetensors (+ ae.json)
    model = load_flux(tmp_path / "flux1-tiny.safetensors")
    assert model.params.to_dict() == TINY.to_dict()
    _check(model, ref)
    bundle = load_pretrained(tmp_path / "flux1-tiny.safetensors")
    assert bundle.autoencoder.params.z_channels == 4 and bundle.text_encoder is None
    assert next(bundle.autoencoder.parameters()).dtype == torch.bfloat16


def test_diffusers_sharded_folder(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    ref = _reference()
    oracle = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=128,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ).to(torch.bfloat16)
    oracle.load_state_dict(bfl_to_diffusers(dict(ref), TINY), strict=True)
    oracle.save_pretrained(tmp_path / "FLUX.1-tiny" / "transformer", max_shard_size="2MB")
    shards = list((tmp_path / "FLUX.1-tiny" / "transformer").glob("*.safetensors"))
    assert len(shards) > 2 and list((tmp_path / "FLUX.1-tiny" / "transformer").glob("*.index.json"))
    for spec in (tmp_path / "FLUX.1-tiny", tmp_path / "FLUX.1-tiny" / "transformer"):
        model = load_flux(spec)
        assert model.params.to_dict() == TINY.to_dict()
        _check(model, ref)
    # same outputs as diffusers' own model on the same weights
    model = load_flux(tmp_path / "FLUX.1-tiny", dtype=torch.float32)
    oracle = oracle.float()
    torch.manual_seed(1)
    img, txt, vec = torch.randn(1, 4, 64), torch.randn(1, 3, 32), torch.randn(1, 16)
    img_ids = torch.zeros(4, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(4) // 2, torch.arange(4) % 2
    t, g = torch.tensor([0.5]), torch.tensor([3.5])
    with torch.no_grad():
        ours = model(img, img_ids[None], txt, torch.zeros(1, 3, 3), t, vec, g)
        theirs = oracle(
            hidden_states=img,
            encoder_hidden_states=txt,
            pooled_projections=vec,
            timestep=t,
            img_ids=img_ids,
            txt_ids=torch.zeros(3, 3),
            guidance=g,
        ).sample
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_unknown_and_incomplete_checkpoints_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothing"):
        load_flux(tmp_path / "nothing")
    ref = _reference()
    ref.pop("single_blocks.1.linear2.weight")
    save_file(ref, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="broken"):
        load_flux(tmp_path / "broken.safetensors")


FAST = [
    "--train.tensorboard=false",
    "--data.limit=16",
    "--optim.batch_size=4",
    "--optim.steps=2",
    "--train.sample_every=100",
]


def test_init_from_fluxlab_run_and_bfl_file(tmp_path: Path) -> None:
    first = tmp_path / "first"
    assert main(["train", "--config", "debug", f"--train.output_dir={first}", *FAST]) == 0
    ema = load_weights(resolve_checkpoint(first), ema=True)
    params = json.loads((resolve_checkpoint(first) / "config.json").read_text())["model_params"]
    save_file(
        ema, tmp_path / "flux1-debug.safetensors", metadata={"fluxlab_params": json.dumps(params)}
    )
    for spec in (first, tmp_path / "flux1-debug.safetensors"):
        cfg = load_config(
            "debug",
            [f"--train.output_dir={tmp_path / spec.name}-run", *FAST, f"--model.init_from={spec}"],
        )
        trainer = Trainer(cfg, quiet=True)
        sd = trainer.model.state_dict()
        assert all(torch.equal(sd[k], ema[k]) for k in ema), spec
        assert {v.dtype for v in sd.values()} == {torch.float32}
    cfg = load_config(
        "debug",
        [
            f"--train.output_dir={tmp_path / 'x'}",
            *FAST,
            f"--model.init_from={first}",
            "--model.depth=2",
        ],
    )
    with pytest.raises(ValueError, match="init_from"):
        Trainer(cfg, quiet=True)
