"""MasterWeightAdamW: bf16 matmul weights and fp32 masters train as autocast + AdamW, no casts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from fluxlab.conditioning.tokens import image_ids, text_ids
from fluxlab.models.flux.model import Flux
from fluxlab.models.flux.presets import flux_params
from fluxlab.parallel import parallelize
from fluxlab.train.master_weights import MasterWeightAdamW, _adamw_tensor_


def _setup():
    params = flux_params(
        "flux-debug",
        in_channels=8,
        out_channels=8,
        context_in_dim=12,
        vec_in_dim=6,
        guidance_embed=True,
    )
    g = torch.Generator().manual_seed(0)
    x = dict(
        img=torch.randn(2, 16, 8, generator=g),
        img_ids=image_ids(2, 4, 4),
        txt=torch.randn(2, 5, 12, generator=g),
        txt_ids=text_ids(2, 5),
        timesteps=torch.rand(2, generator=g),
        y=torch.randn(2, 6, generator=g),
        guidance=torch.full((2,), 3.5),
    )
    target = torch.randn(2, 16, 8, generator=g)
    torch.manual_seed(0)
    return Flux(params), x, target


def _step(model, opt, x, target, clip: float | None = None) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**x)
    loss = F.mse_loss(out.float(), target)
    loss.backward()
    if clip is not None:
        norm = (
            opt.clip_grad_norm_(clip)
            if isinstance(opt, MasterWeightAdamW)
            else torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        )
        _step.norms.append(norm.item())
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


_step.norms = []


@pytest.mark.parametrize("clip", [None, 0.05])
def test_master_weights_train_like_autocast_and_adamw(clip) -> None:
    ref, x, target = _setup()
    model = copy.deepcopy(ref)
    adamw = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1, foreach=False)
    master = MasterWeightAdamW(model, lr=1e-3, weight_decay=0.1)
    # Every matmul weight is a bf16 parameter now; RMSNorm scales (left by autocast) stay fp32.
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["double_blocks.0.img_attn.qkv.weight"] == torch.bfloat16
    assert dtypes["single_blocks.0.linear2.bias"] == torch.bfloat16
    assert dtypes["single_blocks.0.norm.query_norm.scale"] == torch.float32
    _step.norms.clear()
    ref_losses = [_step(ref, adamw, x, target, clip) for _ in range(4)]
    losses = [_step(model, master, x, target, clip) for _ in range(4)]
    if clip is not None:  # the gradient norms agree too, and were large enough to be clipped
        assert _step.norms[:4] == _step.norms[4:] and min(_step.norms) > clip
    # Same bf16 weights, gradients and AdamW arithmetic: equal to the last bit on the CPU.
    assert losses == ref_losses
    assert losses[-1] < losses[0]
    state = master.master_state_dict()
    assert list(state) == list(ref.state_dict())
    for name, expected in ref.state_dict().items():
        assert state[name].dtype == torch.float32, name
        torch.testing.assert_close(state[name], expected, rtol=0, atol=0, msg=name)
        # The bf16 copy the model computes with is its master rounded to bf16.
        live = dict(model.named_parameters())[name]
        torch.testing.assert_close(
            live.float(), state[name].to(live.dtype).float(), rtol=0, atol=0, msg=name
        )


def test_update_equals_torch_adamw_on_one_tensor() -> None:
    g = torch.Generator().manual_seed(3)
    p = torch.randn(50, generator=g)
    ref = torch.nn.Parameter(p.clone())
    adamw = torch.optim.AdamW(
        [ref], lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.2, foreach=False
    )
    master, m, v, copy_ = (
        p.clone(),
        torch.zeros(50),
        torch.zeros(50),
        torch.zeros(50, dtype=torch.bfloat16),
    )
    for step in range(1, 6):
        grad = torch.randn(50, generator=g)
        ref.grad = grad.clone()
        adamw.step()
        scalars = torch.tensor(
            [1 - 0.05 * 0.2, 0.05 / (1 - 0.8**step), (1 - 0.95**step) ** 0.5, 1.0]
        )
        _adamw_tensor_(master, grad, m, v, copy_, *scalars.unbind(), 0.8, 0.95, 1e-6)
    torch.testing.assert_close(master, ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(copy_, master.to(torch.bfloat16), rtol=0, atol=0)
    state = adamw.state[ref]
    torch.testing.assert_close(m, state["exp_avg"], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(v, state["exp_avg_sq"], rtol=1e-6, atol=1e-10)


def test_state_dict_resumes_the_same_trajectory_in_either_optimizer() -> None:
    a, x, target = _setup()
    fresh = copy.deepcopy(a)
    opt_a = MasterWeightAdamW(a, lr=1e-3)
    for _ in range(2):
        _step(a, opt_a, x, target)
    weights = {k: v.clone() for k, v in opt_a.master_state_dict().items()}
    saved = copy.deepcopy(
        parallelize.optimizer_state(a, opt_a)
    )  # the trainer's name-keyed checkpoint format
    # Restarted from a's fp32 masters and optimizer state, a second model continues exactly as a ...
    b = copy.deepcopy(fresh)
    opt_b = MasterWeightAdamW(b, lr=5.0)
    opt_b.load_master_state_dict(weights)
    parallelize.load_optimizer_state(b, opt_b, saved)
    assert opt_b.param_groups[0]["lr"] == 1e-3 and opt_b.step_count == 2
    # ... and so does an fp32 model under autocast with torch's AdamW, from the same checkpoint.
    c = copy.deepcopy(fresh)
    c.load_state_dict(weights)
    opt_c = torch.optim.AdamW(c.parameters(), lr=5.0, foreach=False)
    parallelize.load_optimizer_state(c, opt_c, saved)
    assert (
        opt_c.param_groups[0]["foreach"] is False
    )  # its own implementation settings survive the load
    expected = _step(a, opt_a, x, target)
    assert _step(b, opt_b, x, target) == expected
    assert _step(c, opt_c, x, target) == expected
    for name, t in opt_a.master_state_dict().items():
        torch.testing.assert_close(opt_b.master_state_dict()[name], t, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(c.state_dict()[name], t, rtol=0, atol=0, msg=name)
    # The other way round: torch AdamW's checkpoint into MasterWeightAdamW.
    d = copy.deepcopy(fresh)
    opt_d = MasterWeightAdamW(d, lr=5.0)
    opt_d.load_master_state_dict(c.state_dict())
    parallelize.load_optimizer_state(d, opt_d, copy.deepcopy(parallelize.optimizer_state(c, opt_c)))
    assert opt_d.step_count == 3
    assert _step(d, opt_d, x, target) == _step(c, opt_c, x, target)


def test_a_non_contiguous_weight_is_updated_in_place_like_adamw() -> None:
    # The update flattens tensors to 1-D views; a transposed weight has none, yet updates in place.
    torch.manual_seed(0)
    ref = torch.nn.Linear(6, 4)
    ref.weight = torch.nn.Parameter(torch.randn(6, 4).t())
    assert not ref.weight.is_contiguous()
    model = copy.deepcopy(ref)
    adamw = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    master = MasterWeightAdamW(model, lr=1e-2)
    x = torch.randn(3, 6)
    for _ in range(2):
        for net, opt in ((ref, adamw), (model, master)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                net(x).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(
        master.master_state_dict()["weight"], ref.weight.detach(), rtol=0, atol=0
    )
    assert torch.equal(model.weight, ref.weight.detach().to(torch.bfloat16))


def test_refuses_non_fp32_parameters() -> None:
    with pytest.raises(ValueError, match="0.weight is torch.bfloat16"):
        MasterWeightAdamW(torch.nn.Sequential(torch.nn.Linear(2, 2).to(torch.bfloat16)), lr=1e-3)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA GPU: the torch.compile'd update runs only on CUDA "
    "(the CPU runs the same function eagerly, tested above)",
)
def test_compiled_update_on_cuda_matches_fused_adamw() -> None:
    torch.manual_seed(0)
    # Linear weights and biases of several sizes (bf16 copies), LayerNorm fp32 parameters (none).
    ref = torch.nn.Sequential(
        torch.nn.Linear(64, 128),
        torch.nn.GELU(),
        torch.nn.LayerNorm(128),
        torch.nn.Linear(128, 96),
        torch.nn.Linear(96, 33),
        torch.nn.LayerNorm(33),
        torch.nn.Linear(33, 64),
    ).cuda()
    model = copy.deepcopy(ref)
    adamw = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    master = MasterWeightAdamW(model, lr=1e-3, weight_decay=0.1)
    x = torch.randn(32, 64, device="cuda")
    graphs_before = counters["stats"]["unique_graphs"]
    for net, opt in ((ref, adamw), (model, master)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = net(x).float().square().mean()
        loss.backward()
        opt.step()
    # One step from the same gradients: only the last bits of the fp32 arithmetic may differ.
    for name, expected in ref.state_dict().items():
        torch.testing.assert_close(
            master.master_state_dict()[name], expected, rtol=1e-5, atol=1e-6, msg=name
        )
        live = dict(model.named_parameters())[name]
        assert torch.equal(live.float(), master.master_state_dict()[name].to(live.dtype).float()), (
            name
        )
    # A few compiled updates serve every tensor length (dynamo guards flat views of 1-D and 2-D
    # tensors apart, and tensors with and without a bf16 copy), not one per tensor (12 here).
    assert counters["stats"]["unique_graphs"] - graphs_before <= 3


def test_a_failed_compilation_falls_back_to_the_uncompiled_update() -> None:
    ref, x, target = _setup()
    model = copy.deepcopy(ref)
    adamw = torch.optim.AdamW(ref.parameters(), lr=1e-3, foreach=False)
    master = MasterWeightAdamW(model, lr=1e-3)

    def broken_compiled_update(*args):
        raise RuntimeError("no Triton for this GPU")

    master._update = (
        broken_compiled_update  # what torch.compile raises when it cannot build its kernels
    )
    with pytest.warns(UserWarning, match="running it uncompiled"):
        got = [_step(model, master, x, target) for _ in range(2)]
    assert got == [_step(ref, adamw, x, target) for _ in range(2)]
