"""BlockwiseAdamW: the block-by-block update during backward equals one AdamW step over all."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fluxlab.conditioning.tokens import image_ids, text_ids
from fluxlab.models.flux.model import Flux
from fluxlab.models.flux.presets import flux_params
from fluxlab.train.overlap import BlockwiseAdamW, block_groups


def _inputs(params, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(
        img=torch.randn(batch, 16, params.in_channels, generator=g),
        img_ids=image_ids(batch, 4, 4),
        txt=torch.randn(batch, 5, params.context_in_dim, generator=g),
        txt_ids=text_ids(batch, 5),
        timesteps=torch.rand(batch, generator=g),
        y=torch.randn(batch, params.vec_in_dim, generator=g),
        guidance=torch.full((batch,), 3.5),
    )


def test_blockwise_adamw_equals_adamw_over_several_steps() -> None:
    params = flux_params(
        "flux-debug",
        in_channels=8,
        out_channels=8,
        context_in_dim=12,
        vec_in_dim=6,
        guidance_embed=True,
    )
    torch.manual_seed(0)
    ref = Flux(params)
    ours = copy.deepcopy(ref)
    x = _inputs(params)
    target = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(1))
    adamw = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    blockwise = BlockwiseAdamW(
        block_groups([*ours.double_blocks, *ours.single_blocks], ours), lr=1e-2, weight_decay=0.1
    )
    assert len(blockwise.optimizers) == params.depth + params.depth_single_blocks + 1
    for _ in range(3):
        F.mse_loss(ref(**x), target).backward()
        adamw.step()
        adamw.zero_grad()
        F.mse_loss(ours(**x), target).backward()
        blockwise.finish()
        assert all(p.grad is None for p in ours.parameters())  # freed as each block was stepped
    for (name, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_blockwise_adamw_refuses_a_parameter_without_gradient() -> None:
    lin, unused = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    opt = BlockwiseAdamW([list(lin.parameters()), list(unused.parameters())], lr=1e-3)
    lin(torch.randn(2, 3)).sum().backward()
    with pytest.raises(RuntimeError, match="got no gradient"):
        opt.finish()
