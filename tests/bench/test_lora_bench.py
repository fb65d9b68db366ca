"""``fluxlab bench --what lora --smoke``: every base and diffusers' recipe train one tiny step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fluxlab.cli import main

pytest.importorskip("diffusers", reason="diffusers' recipe is the reference (test extra)")
pytest.importorskip("peft", reason="LoRA needs peft (the lora extra)")
pytest.importorskip("torchao", reason="int8/float8 bases need torchao (the quant extra)")


def test_lora_bench_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lora.json"
    cases = ["bf16", "int8", "float8", "float8:compile", "diffusers"]
    argv = ["bench", "--what", "lora", "--smoke", "--lora-cases", ",".join(cases)]
    assert main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["case"] for r in rows] == cases
    assert all(r["step_s"] > 0 and r["adapter_params_m"] > 0 for r in rows)
    # the same weights and inputs: the first losses agree across implementations and bases
    first = [r["first_losses"][0] for r in rows]
    assert max(first) - min(first) < 0.05 * abs(first[0])
    assert "| diffusers |" in capsys.readouterr().out
    assert main(["bench", "--what", "lora", "--smoke", "--lora-cases", "int4"]) == 2


def test_case_modifiers_compile_and_checkpoint_fewer_blocks(tmp_path: Path) -> None:
    from fluxlab.bench.lora import parse_case

    base, wrap = parse_case("nf4:compile:ac2")
    assert (base, wrap.compile, wrap.activation_checkpointing, wrap.checkpoint_every) == (
        "nf4",
        True,
        True,
        2,
    )
    assert not parse_case("bf16:ac0")[1].activation_checkpointing
    for bad in ("diffusers:compile", "bf16:fast", "bf16:acx"):
        with pytest.raises(ValueError, match="--lora-cases"):
            parse_case(bad)
    out = tmp_path / "lora.json"
    argv = ["bench", "--what", "lora", "--smoke", "--lora-cases", "bf16,bf16:compile:ac2,bf16:ac0"]
    assert main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    # Compiling and checkpointing change how the step runs, not what it computes.
    first = [r["first_losses"] for r in rows]
    assert first[1] == pytest.approx(first[0], rel=1e-3) and first[2] == pytest.approx(first[0])
