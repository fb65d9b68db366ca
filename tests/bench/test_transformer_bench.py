"""The benchmark compares like with like: same function, same FLOP count as the anchor script."""

import pytest
import torch

from fluxlab.bench import transformer as B
from fluxlab.bench.gemms import sampling_gemms
from fluxlab.bench.impls import DiffusersImpl, Impl
from fluxlab.cli import main
from fluxlab.models.flux.model import FluxParams


def anchor_flops_fwd(bs, s_img, s_txt, n_layers, d, ctx_dim=4096):
    # The workplace anchor's count (shared/anchors/bench_diffusers_flux.py), written independently.
    s = s_img + s_txt
    return bs * (
        n_layers * (s * 24 * d * d + 4 * s * s * d)
        + s_txt * 2 * ctx_dim * d
        + s_img * 2 * 2 * 64 * d
    )


def test_flop_count_matches_anchor():
    assert B.flops_forward(B.bench_params("train"), 8, 1024, 256) == anchor_flops_fwd(
        8, 1024, 256, 12, 3072
    )
    assert B.flops_forward(B.bench_params("infer"), 1, 4096, 512) == anchor_flops_fwd(
        1, 4096, 512, 57, 3072
    )
    # The anchor's diffusers training step: 0.317 s ↔ 282 TFLOP/s.
    assert 3 * B.flops_forward(
        B.bench_params("train"), 8, 1024, 256
    ) / 0.31696875 / 1e12 == pytest.approx(282.26, abs=0.01)


def test_sampling_gemms_cover_the_token_wise_count():
    # The blocks' GEMMs of one sampling step are the count's 24·d² per token per block (modulation
    # aside).
    params = B.bench_params("infer")
    gemms = sampling_gemms(params, 4096, 512)
    flops = sum(
        2 * m * k * n * count for name, m, k, n, count in gemms if not name.startswith("modulation")
    )
    assert flops == 57 * 4608 * 24 * 3072**2
    assert sum(count for name, *_, count in gemms if name.startswith("modulation")) == 2 * 19 + 38


def test_fluxlab_and_diffusers_impls_compute_the_same_function():
    pytest.importorskip(
        "diffusers",
        reason="diffusers (the reference implementation) is not installed: pip install -e .[test]",
    )
    params = FluxParams(
        in_channels=16,
        vec_in_dim=8,
        context_in_dim=12,
        hidden_size=32,
        num_heads=2,
        depth=1,
        depth_single_blocks=1,
        axes_dim=[4, 6, 6],
        guidance_embed=True,
    )
    cpu = torch.device("cpu")
    x = B.make_inputs(params, 2, 64, 48, 5, cpu, seed=1)
    ours, theirs = Impl(), DiffusersImpl()
    out = ours.forward(ours.build(params, cpu, torch.float32, seed=3), x)
    ref = theirs.forward(theirs.build(params, cpu, torch.float32, seed=3), x)
    assert out.shape == (2, 4 * 3, 16)
    assert out.abs().mean() > 1e-3  # default init, not adaLN-Zero: the blocks do something
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bench_refuses_without_cuda():
    if torch.cuda.is_available():
        pytest.skip(
            "a CUDA GPU is present; this test checks the error shown on machines without one"
        )
    assert main(["bench", "--what", "train"]) == 2


@pytest.mark.parametrize(
    "case, named",
    [
        ("fluxlab:master", "IMPL:MODE:COMPILE"),
        ("fluxlab:fp8:block", "'fp8'"),
        ("fluxlab:master:block:fa3+flash", "'fa3'"),
        ("flux:master:block", "'flux'"),
        ("fluxlab:master:block:cudnn-forward", "flash or efficient"),
        ("diffusers-fp8:autocast:block", "sampling recipe only"),
    ],
)
def test_bench_names_a_bad_training_case_before_building_anything(
    case: str, named: str, capsys
) -> None:
    assert main(["bench", "--what", "train", "--train-cases", case]) == 2
    err = capsys.readouterr().err
    assert case in err and named in err


def test_bench_fp8_cases_parse_and_say_why_they_cannot_run_here() -> None:
    from fluxlab.bench.impls import IMPLS
    from fluxlab.commands.bench import _train_case

    assert _train_case("fluxlab-fp8:master:block", "flash") == (
        "fluxlab-fp8",
        "master",
        "block",
        "flash",
    )
    cpu = torch.device("cpu")
    for name in ("fluxlab-fp8", "fluxlab-fp8-rowwise", "diffusers-fp8"):
        reason = IMPLS[name]().unsupported(cpu)  # no torchao, or the CPU
        assert reason is not None and ("torchao" in reason or "cpu" in reason)
    assert IMPLS["fluxlab"]().unsupported(cpu) is None
