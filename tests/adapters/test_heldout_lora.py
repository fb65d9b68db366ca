"""The held-out LoRA experiment at toy size: the openmoji-gpu-heldout base never sees the held-out
emoji, the openmoji-gpu-lora50 LoRA trains on them alone, and `fluxlab sample --before-after`
draws both at the same seeds side by side."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluxlab.cli import main
from fluxlab.config.loading import config_from_dict, load_config
from fluxlab.data.openmoji_select import HELDOUT_50, tone_free
from fluxlab.data.training import train_dataset, val_dataset

pytest.importorskip("peft", reason="LoRA training needs peft (the lora extra)")

# The presets at the debug preset's size: seconds on a CPU.
SHRINK = [
    "--model.preset=flux-debug",
    "--data.resolution=16",
    "--encoding.text_max_length=8",
    "--data.num_workers=0",
    "--optim.batch_size=4",
    "--optim.steps=2",
    "--optim.warmup_steps=0",
    "--train.max_minutes=null",
    "--train.eval_every=0",
    "--train.tensorboard=false",
    "--train.checkpoint_every=2",
    "--sample.steps=2",
    "--sample.prompts=fox,penguin",
]
# A small base set: 8 ordinary emoji and 3 of the held-out ones, which the preset's exclude drops.
HELD = ["1F98A", "1F427", "1F1EF-1F1F5"]
BASE_SET = ["1F600", "1F34E", "2B50", "1F697", "1F436", "2764", "1F31E", "1F438", *HELD]


def test_presets_validate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the presets' run folders are relative: none exists here
    base = load_config("openmoji-gpu-heldout")
    gpu = load_config("openmoji-gpu")
    assert base.data.exclude == list(HELDOUT_50) and base.data.include is None
    assert base.model == gpu.model and base.optim == gpu.optim  # openmoji-gpu minus the 50
    with pytest.raises(ValueError, match="model.init_from='runs/openmoji-gpu-heldout': no such"):
        load_config("openmoji-gpu-lora50")  # the base run does not exist yet
    (tmp_path / "runs" / "openmoji-gpu-heldout").mkdir(parents=True)
    lora = load_config("openmoji-gpu-lora50")
    assert lora.data.include == list(HELDOUT_50) and lora.data.val_fraction == 0
    assert lora.lora.enabled and lora.lora.rank == 32 and lora.model.preset == base.model.preset
    # both trainings within 12 of the 20 minutes: start-up, sampling and plots take the rest
    assert base.train.max_minutes + lora.train.max_minutes <= 12


def test_heldout_base_lora_and_before_after_grid(tmp_path: Path) -> None:
    base_run, lora_run = tmp_path / "base", tmp_path / "lora"
    argv = [
        "train",
        "--config",
        "openmoji-gpu-heldout",
        *SHRINK,
        f"--data.include={','.join(BASE_SET)}",
    ]
    argv += ["--optim.lr=1e-2", "--data.val_fraction=0.5"]  # a base that draws something
    assert main([*argv, f"--train.output_dir={base_run}"]) == 0
    # what the base run trained and validated on, rebuilt from its recorded config
    cfg = config_from_dict(json.loads((base_run / "config.json").read_text()))
    seen = {*train_dataset(cfg, torch.device("cpu")).codes}
    val, _ = val_dataset(cfg, torch.device("cpu"), print)
    assert len(val) and len(seen)  # both splits hold some of the eight
    seen |= {*val.codes}
    assert {tone_free(c) for c in seen} == set(BASE_SET) - set(HELD)

    argv = ["train", "--config", "openmoji-gpu-lora50", *SHRINK, f"--model.init_from={base_run}"]
    # ema_decay 0: two steps of EMA would leave the adapter too close to zero to see in pixels
    argv += ["--optim.lr=3e-2", "--optim.ema_decay=0"]
    assert main([*argv, f"--train.output_dir={lora_run}"]) == 0
    lora_cfg = load_config("openmoji-gpu-lora50", [f"--model.init_from={base_run}", *SHRINK])
    lora_data = train_dataset(lora_cfg, torch.device("cpu"))
    assert sorted(lora_data.codes) == sorted(HELDOUT_50)  # all 50, nothing else

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("fox\n\npenguin\nflag: Japan\n")
    grid = tmp_path / "before_after.png"
    sample = ["sample", "--steps", "2", "--seed", "3", "--batch-size", "2"]
    assert (
        main(
            [*sample, "--checkpoint", str(lora_run), "--before-after", str(base_run)]
            + ["--prompts-file", str(prompts), "--out", str(grid)]
        )
        == 0
    )
    # 3 prompts → 3 pairs in one row: 16² tiles shown at 96² (make_grid's minimum) with 4 px
    # padding, captions below
    image = np.asarray(Image.open(grid).convert("RGB"))
    assert image.shape[1] == 6 * (96 + 4) + 4 and image.shape[0] > 96 + 8
    # each side equals sampling that model alone at the same seed and batches
    alone = {}
    for name, run in (("before", base_run), ("after", lora_run)):
        out = tmp_path / f"{name}.png"
        argv = [*sample, "--checkpoint", str(run), "--prompts-file", str(prompts)]
        assert main([*argv, "--nrow", "3", "--out", str(out)]) == 0
        alone[name] = np.asarray(Image.open(out).convert("RGB"))
    for i in range(3):
        for side, name in enumerate(("before", "after")):
            x = 4 + (2 * i + side) * 100
            tile = image[4 : 4 + 96, x : x + 96]
            np.testing.assert_array_equal(
                tile, alone[name][4 : 4 + 96, 4 + i * 100 : 100 + i * 100]
            )
    assert np.abs(alone["before"].astype(int) - alone["after"].astype(int)).max() > 0
    # an odd --nrow would split a pair over two rows
    bad = [*sample, "--checkpoint", str(lora_run), "--before-after", str(base_run)]
    assert main([*bad, "--prompt", "fox", "--nrow", "3", "--out", str(grid)]) == 2
