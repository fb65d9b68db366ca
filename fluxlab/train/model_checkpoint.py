"""How a diffusion run's weights, EMA and optimizer state go into a checkpoint and come back.

Three layouts, one per way of training: whole tensors (one process or DDP: rank 0 holds everything),
the fp32 master weights of ``MasterWeightAdamW`` in place of the model's bf16 copies, or DCP shards
that every rank writes (FSDP/HSDP: no rank ever holds the model whole). Each is read back at any
world size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from fluxlab.adapters import lora
from fluxlab.parallel import distributed, parallelize
from fluxlab.train.checkpoint import SHARDED_WEIGHTS
from fluxlab.train.master_weights import MasterWeightAdamW
from fluxlab.train.run_folder import RunFolder

Weights = dict[str, torch.Tensor]


class ModelCheckpointer:
    """Writes and reads the model, its EMA and the optimizer state in the layout of the run."""

    def __init__(
        self,
        model: nn.Module,
        ema: nn.Module,
        optimizer: torch.optim.Optimizer,
        world: distributed.DistInfo,
        sharded: bool,
        device: torch.device,
    ):
        self.model, self.ema, self.optimizer = model, ema, optimizer
        self.world, self.sharded, self.device = world, sharded, device

    def optimizer_state(self) -> dict[str, Any] | str:
        """For ``train_state.pt``: the state keyed by parameter name, or under FSDP a marker for the
        DCP shards that ``write`` puts beside it."""
        if self.sharded:
            return parallelize.SHARDED_OPTIMIZER
        return parallelize.optimizer_state(self.model, self.optimizer)

    def write(
        self, folder: RunFolder, step: int
    ) -> tuple[Weights | None, Weights | None, dict[str, Path] | None]:
        """(weights, EMA, staged folders) for ``RunFolder.save``; every rank calls it.

        Sharded, every rank writes its shards of the weights and the optimizer state into staging
        folders (a collective); otherwise rank 0 gets the tensors whole."""
        if self.sharded:
            pids = (
                distributed.gather(os.getpid(), self.world) if self.world.enabled else [os.getpid()]
            )
            staged = {
                name: folder.staging(step, name, pids[0])
                for name in (SHARDED_WEIGHTS, parallelize.SHARDED_OPTIMIZER)
            }
            parallelize.save_sharded_weights(self.model, self.ema, staged[SHARDED_WEIGHTS])
            parallelize.save_sharded_optimizer(
                self.model, self.optimizer, staged[parallelize.SHARDED_OPTIMIZER]
            )
            distributed.barrier(self.world)
            return None, None, staged
        if lora.has_adapters(self.model):  # the base is model.init_from's: adapters are weights
            return lora.adapter_state_dict(self.model), lora.adapter_state_dict(self.ema), None
        if isinstance(self.optimizer, MasterWeightAdamW):  # the fp32 masters are the weights
            masters = self.optimizer.master_state_dict()
            weights = {k: v.detach().cpu() for k, v in masters.items()}
            return weights, parallelize.model_state(self.ema), None
        return parallelize.model_state(self.model), parallelize.model_state(self.ema), None

    def read(self, path: Path, optimizer_state: dict[str, Any] | str) -> None:
        """Loads checkpoint ``path``'s weights, EMA and optimizer state, whatever world size or
        layout wrote them; each rank keeps its own shards."""
        if (path / SHARDED_WEIGHTS).is_dir():
            parallelize.load_sharded_weights(self.model, self.ema, path / SHARDED_WEIGHTS)
        else:
            weights = load_file(path / "model.safetensors", device=str(self.device))
            ema = load_file(path / "ema.safetensors", device=str(self.device))
            if lora.has_adapters(self.model):
                lora.load_adapter_state_dict(self.model, weights)
                lora.load_adapter_state_dict(self.ema, ema)
            elif isinstance(self.optimizer, MasterWeightAdamW):
                # Into the fp32 masters, and rounded into the model's bf16 copies.
                self.optimizer.load_master_state_dict(weights)
            else:
                parallelize.load_model_state(self.model, weights)
            if not lora.has_adapters(self.model):
                parallelize.load_model_state(self.ema, ema)
        if optimizer_state == parallelize.SHARDED_OPTIMIZER:  # resharded to this world size
            parallelize.load_sharded_optimizer(
                self.model, self.optimizer, path / parallelize.SHARDED_OPTIMIZER
            )
        else:
            assert isinstance(optimizer_state, dict)
            parallelize.load_optimizer_state(self.model, self.optimizer, optimizer_state)
