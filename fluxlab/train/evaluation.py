"""The trainer's looks at its model: validation loss, sample grids, TensorBoard extras.

Sharded weights exist whole nowhere, and a full copy gathered onto rank 0 would not fit beside the
training state of a model that needed sharding. So under FSDP/HSDP every rank runs the sharded model
in lockstep (each block all-gathered as in training) and rank 0 alone writes; otherwise rank 0 works
alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from fluxlab.config.schema import Config
from fluxlab.data import make_grid
from fluxlab.eval.validation import ValidationLoss, validation_loss
from fluxlab.parallel import distributed, parallelize
from fluxlab.train.master_weights import MasterWeightAdamW
from fluxlab.train.monitoring import add_histograms, add_model_graph, capture_forward
from fluxlab.train.run_folder import RunFolder
from fluxlab.train.run_log import RunLog


class Evaluator:
    """Validation, sample grids and TensorBoard extras of a training run, at the step given."""

    def __init__(
        self,
        cfg: Config,
        task: Any,
        model: nn.Module,
        ema: nn.Module,
        optimizer: torch.optim.Optimizer,
        val_dataset: Dataset | None,
        world: distributed.DistInfo,
        sharded: bool,
        device: torch.device,
        log: RunLog,
        folder: RunFolder,
    ):
        self.cfg, self.task, self.model, self.ema = cfg, task, model, ema
        self.optimizer, self.val_dataset = optimizer, val_dataset
        self.world, self.sharded, self.device = world, sharded, device
        self.log, self.folder = log, folder
        self._graph_written = False

    @property
    def runs_here(self) -> bool:
        """Whether this rank takes part in validation, sampling and TensorBoard extras."""
        return self.sharded or self.world.is_main

    def validate(self, step: int, model: nn.Module | None = None) -> ValidationLoss:
        """Validation loss of the trained (not EMA) weights at 8 fixed timesteps, comparable to the
        training loss."""
        result = validation_loss(
            self.task,
            model or self.model,
            self.val_dataset,
            seed=self.cfg.train.seed,
            batch_size=self.cfg.optim.batch_size,
        )
        self.model.train()
        scalars = {"loss/val": result.loss}
        scalars.update({f"loss_val_t/{t:.3f}": v for t, v in zip(result.timesteps, result.per_t)})
        self.log.scalars(scalars, step)
        return result

    def sample_grid(self, name: str, step: int, ema: nn.Module | None = None) -> Path | None:
        """Samples of the EMA weights, written as ``samples/<name>.png`` by rank 0 (else None)."""
        images, captions = self.task.sample_images(ema if ema is not None else self.ema)
        if not self.world.is_main:
            return None
        nrow = getattr(self.task, "grid_nrow", min(8, len(images)))
        grid = make_grid(images, nrow=nrow, captions=captions)
        out = self.folder.sample_file(name)
        grid.save(out)
        self.log.image("samples", grid, step)
        return out

    def inspect(self, batch: dict[str, Any] | None, step: int) -> None:
        """Histograms of weights and predictions, and the graph once: one more forward on ``batch``.

        Under FSDP every rank takes part (the forward and each weight's gather are collectives)."""
        missing = torch.tensor(batch is None, device=self.device)
        if (distributed.any_rank(missing, self.world) if self.sharded else missing).item():
            return  # an unreadable batch on any rank: all skip, or the collectives would not pair
        assert batch is not None
        captured = capture_forward(self.task, self.model, batch, seed=step)
        if self.sharded:  # every parameter a shard again, to be gathered below one by one
            parallelize.reshard(self.model)
        masters = self.optimizer if isinstance(self.optimizer, MasterWeightAdamW) else None
        weights = (
            zip(masters.names, masters.masters)
            if masters is not None
            else parallelize.full_parameters(self.model)
        )
        writer = self.log.writer
        if writer is None:
            for _ in weights:  # the other ranks' half of each gather
                pass
            return
        add_histograms(writer, weights, captured.output, step)
        # Neither a compiled forward nor FSDP's hooks trace; the graph is the same at any size.
        if not self._graph_written and not (self.cfg.parallel.compile or self.sharded):
            self._graph_written = True
            # With master weights the model's matmuls are bf16 and expect autocast, which tracing
            # does not record; the EMA has the same graph in fp32.
            add_model_graph(writer, self.ema if masters is not None else self.model, captured)
