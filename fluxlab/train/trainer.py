"""The training loop: batch → loss → step → EMA → log → sample/checkpoint, the same on CPU and GPU."""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from fluxlab.config.schema import Config
from fluxlab.data.samplers import InfiniteBatchSampler
from fluxlab.data.training import train_batches, train_dataset, val_dataset
from fluxlab.parallel import attention_kernels, distributed, parallelize
from fluxlab.pipelines.build import resolve_device
from fluxlab.tasks import build_task
from fluxlab.train.checkpoint import (
    SHARDED_WEIGHTS,
    checkpoint_path,
    forget_log_after,
    latest_checkpoint,
    save_checkpoint,
    staging_path,
)
from fluxlab.train.master_weights import MasterWeightAdamW
from fluxlab.train.rng import SampleGenerators, process_rng_state, set_process_rng_state

__all__ = ["InfiniteBatchSampler", "NonFiniteLossError", "Trainer", "lr_factor"]

T_BINS = 10


class NonFiniteLossError(RuntimeError):
    """train.max_nonfinite_steps steps in a row had a NaN/inf loss or gradient: the run cannot go on."""


class PeakMemory:
    """Peak GPU memory per phase of a run (training steps, sample grids), for the summary a run ends with."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peaks: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        """Charges the peak since the last mark to ``phase`` and starts counting afresh."""
        if self.device.type != "cuda":
            return
        gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.peaks[phase] = max(self.peaks.get(phase, 0.0), gib)
        torch.cuda.reset_peak_memory_stats(self.device)

    def summary(self) -> str:
        names = {"train": "training steps", "sample": "sample grids"}
        return ", ".join(f"{names.get(k, k)} {v:.1f} GiB" for k, v in self.peaks.items())


def lr_factor(step: int, cfg: Config) -> float:
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "cosine":
        progress = (step - o.warmup_steps) / max(1, o.steps - o.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


class Trainer:
    def __init__(
        self,
        cfg: Config,
        resume: bool = False,
        quiet: bool = False,
        simulated: distributed.DistInfo | None = None,
    ):
        """``simulated``: this process is that rank of a simulated world (``distributed.simulate``), run only
        to measure its memory: it trains and samples but writes no checkpoint."""
        cfg.validate()
        self.cfg = cfg
        # Under torchrun rank 0 speaks, samples and checkpoints; a restarted worker resumes by itself.
        self.simulated = simulated is not None
        self.dist = simulated or distributed.from_env()
        cfg.parallel.validate(self.dist.world)
        self._owns_group = (
            self.dist.enabled and not dist.is_initialized()
        )  # a caller's process group outlives us
        self.quiet = quiet or not self.dist.is_main
        resume = resume or distributed.restarted()
        self.run_dir = Path(
            cfg.train.output_dir
        )  # created only once the data and model are known to load
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = distributed.init(self.dist, resolve_device(cfg.train.device))
        self._seed_everything(cfg.train.seed)

        self.dataset = train_dataset(cfg, self.device)
        self._log(f"dataset: {len(self.dataset)} training examples from {cfg.data.dataset}")

        self.val_dataset, val_captions = (
            val_dataset(cfg, self.device, self._log) if cfg.train.eval_every else (None, [])
        )
        self.task = build_task(cfg, self.dataset, self.device, extra_captions=val_captions)
        self.model = self.task.model
        n_params = sum(p.numel() for p in self.model.parameters())
        if self.device.type == "cuda":
            gpu_bytes = torch.cuda.get_device_properties(self.device).total_memory
            parallelize.check_training_memory(n_params, cfg.parallel, self.dist.world, gpu_bytes)
        ema_on_meta = parallelize.meta_copy(
            self.model
        )  # before parallelize, which rebinds the blocks' forwards
        self.mode = parallelize.resolve_mode(cfg.parallel, self.dist.world)
        self._sharded = self.mode in parallelize.SHARDED_MODES
        self._log(
            f"model: {cfg.model.preset} with {n_params / 1e6:.2f}M parameters on {self.device}, "
            f"parallel.mode={self.mode} over {self.dist.world} process(es)"
        )
        mp = cfg.train.mixed_precision
        bf16 = mp == "bf16" or (mp == "auto" and self.device.type == "cuda")
        self.master_weights = self._use_master_weights(bf16)
        self.net = parallelize.parallelize(
            self.model, cfg.parallel, self.device, self.dist, mixed_precision=bf16
        )
        self.ema = parallelize.materialize_like(
            ema_on_meta, self.model, cfg.parallel, self.device, self.dist
        )

        o = cfg.optim
        adamw = dict(lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, eps=o.eps)
        self.optimizer: (
            Any  # torch.optim.AdamW or MasterWeightAdamW (an Optimizer too, with masters)
        )
        if (
            self.master_weights
        ):  # swaps bf16 copies into the model's matmuls (its compiled forwards trace lazily)
            self.optimizer = MasterWeightAdamW(
                self.model, **adamw, accumulate_fp32=o.grad_accum > 1
            )
            self._log(
                "optimizer: AdamW on fp32 master weights, bf16 matmul weights (optim.master_weights)"
            )
        else:
            self.optimizer = torch.optim.AdamW(
                self.model.parameters(), **adamw, fused=self.device.type == "cuda"
            )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg)
        )
        # Caption dropout, t and noise come from per-sample generators (fluxlab.train.rng), not a per-process stream.

        self.memory = PeakMemory(self.device)
        self.step = 0
        self.batches_seen = 0
        self.skipped_images = 0
        self.nonfinite_steps = 0
        if resume:
            self._resume()
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.json")

    def _use_master_weights(self, bf16: bool) -> bool:
        """Whether ``optim.master_weights`` applies: bf16 compute and no DDP/FSDP (which reduce and shard the
        model's own parameters, and FSDP has its own mixed precision)."""
        missing = []
        if not bf16:
            missing.append(
                f"bf16 mixed precision (train.mixed_precision={self.cfg.train.mixed_precision} on "
                f"{self.device.type})"
            )
        if self.mode != "none":
            missing.append(
                f"a single process without DDP/FSDP (parallel.mode resolves to {self.mode})"
            )
        choice = self.cfg.optim.master_weights
        if choice == "on" and missing:
            raise ValueError(
                "optim.master_weights=on needs " + "; ".join(missing) + ". Use auto or off"
            )
        return choice == "on" or (choice == "auto" and not missing)

    # ------------------------------------------------------------------------------------------
    def _log(self, msg: str) -> None:
        if not self.quiet:
            tqdm.write(msg)

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _loader(self) -> Iterator[dict[str, Any]]:
        return train_batches(
            self.dataset, self.cfg, self.batches_seen, self.dist.rank, self.dist.world, self.device
        )

    # ------------------------------------------------------------------------------------------
    def _description(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "format": "fluxlab-v1", **self.task.description()}

    def _train_state(self) -> dict[str, Any]:
        rng = process_rng_state()
        per_rank = distributed.gather(rng, self.dist) if self.dist.enabled else None  # a collective
        return {
            "step": self.step,
            "batches_seen": self.batches_seen,
            # keyed by parameter name; under FSDP a marker for the DCP shards save() writes beside it
            "optimizer": parallelize.SHARDED_OPTIMIZER
            if self._sharded
            else parallelize.optimizer_state(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            **rng,
            "rank_rng": per_rank,
            "skipped_images": self.skipped_images,
            "nonfinite_steps": self.nonfinite_steps,
        }

    def save(self) -> Path:
        """Every rank calls it (RNG states are gathered); rank 0 writes; all leave once the checkpoint exists."""
        state = self._train_state()
        path = checkpoint_path(self.run_dir, self.step)
        staged = None
        weights = ema = None
        if self._sharded:
            # Every rank writes its shards of the weights and the optimizer state (no rank ever holds them
            # whole: flux-dev's weights + EMA would be 88 GiB on rank 0); rank 0 moves them into the checkpoint.
            owner = (
                distributed.gather(os.getpid(), self.dist)[0] if self.dist.enabled else os.getpid()
            )
            staged = {
                name: staging_path(self.run_dir, self.step, name, owner)
                for name in (SHARDED_WEIGHTS, parallelize.SHARDED_OPTIMIZER)
            }
            parallelize.save_sharded_weights(self.model, self.ema, staged[SHARDED_WEIGHTS])
            parallelize.save_sharded_optimizer(
                self.model, self.optimizer, staged[parallelize.SHARDED_OPTIMIZER]
            )
            distributed.barrier(self.dist)
        elif self.master_weights:  # one process: the fp32 masters are the weights
            weights = {k: v.detach().cpu() for k, v in self.optimizer.master_state_dict().items()}
            ema = parallelize.model_state(self.ema)
        else:
            weights, ema = parallelize.model_state(self.model), parallelize.model_state(self.ema)
        if self.dist.is_main:
            path = save_checkpoint(
                self.run_dir,
                self.step,
                weights,
                ema,
                self._description(),
                state,
                keep_last=self.cfg.train.keep_last,
                staged=staged,
            )
        distributed.barrier(self.dist)
        return path

    def _resume(self) -> None:
        from safetensors.torch import load_file

        path = latest_checkpoint(self.run_dir, need_train_state=True)
        if path is None:
            self._log(f"--resume: no checkpoint in {self.run_dir}, starting from scratch")
            return
        # Weights and name-keyed optimizer state, whole or as DCP shards: each rank keeps its shard, at any world size.
        if (path / SHARDED_WEIGHTS).is_dir():
            parallelize.load_sharded_weights(self.model, self.ema, path / SHARDED_WEIGHTS)
        else:
            weights = load_file(path / "model.safetensors", device=str(self.device))
            if (
                self.master_weights
            ):  # into the fp32 masters, and rounded into the model's bf16 copies
                self.optimizer.load_master_state_dict(weights)
            else:
                parallelize.load_model_state(self.model, weights)
            parallelize.load_model_state(
                self.ema, load_file(path / "ema.safetensors", device=str(self.device))
            )
        state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=False)
        if (
            state["optimizer"] == parallelize.SHARDED_OPTIMIZER
        ):  # DCP shards, resharded to this world size
            parallelize.load_sharded_optimizer(
                self.model, self.optimizer, path / parallelize.SHARDED_OPTIMIZER
            )
        else:
            parallelize.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        per_rank = state.get("rank_rng") or [state]
        if len(per_rank) == self.dist.world:
            set_process_rng_state(per_rank[self.dist.rank])
        else:
            warnings.warn(
                f"{path} was written by {len(per_rank)} process(es), this run has {self.dist.world}: data order, "
                "dropout, t and noise still replay exactly, random augmentations (per-process RNG) do not",
                stacklevel=2,
            )
        self.step = state["step"]
        self.batches_seen = state["batches_seen"]
        self.skipped_images = state["skipped_images"]
        self.nonfinite_steps = state["nonfinite_steps"]
        if self.dist.is_main:
            forget_log_after(self.run_dir, self.step)
        self._log(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------------------------------
    def clip_gradients(self) -> Tensor:
        """Clips the gradients to ``optim.grad_clip`` by their global norm, and returns that norm (before clipping)."""
        if (
            self.master_weights
        ):  # the norm in fp32; the scaling is folded into the optimizer's update
            return self.optimizer.clip_grad_norm_(self.cfg.optim.grad_clip)
        # Under FSDP the gradients are DTensor shards; clip_grad_norm_ still computes the global norm.
        return parallelize.full_norm(
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        )

    @torch.no_grad()
    def _update_ema(self) -> None:
        # Warm-up of the decay (as in k-diffusion/timm): early weights are forgotten quickly.
        decay = min(self.cfg.optim.ema_decay, (1 + self.step) / (10 + self.step))
        # Shard-local under FSDP: no communication. With master weights, the EMA follows the fp32 masters.
        masters = self.optimizer.masters if self.master_weights else None
        parallelize.ema_update(self.ema, self.model, 1.0 - decay, masters)

    def _write_log(self, record: dict[str, Any]) -> None:
        """One JSON line per log step: the loss curve survives without TensorBoard."""
        if not self.dist.is_main:
            return
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _runs_evaluation(self) -> bool:
        """Whether this rank runs samples, validation and TensorBoard extras.

        Sharded weights exist whole nowhere, and gathering a full copy onto rank 0 would not fit beside the
        training state of a model that needed sharding (flux-dev on two GPUs: ~113 GiB per rank with the EMA,
        plus 44 GiB for an fp32 copy). So under FSDP/HSDP every rank runs the sharded model in lockstep (each
        block is all-gathered as in training) and rank 0 alone writes; otherwise rank 0 works alone.
        """
        return self._sharded or self.dist.is_main

    def sample_grid(self, name: str, ema: nn.Module | None = None) -> Path | None:
        """Samples of the EMA weights written as ``samples/<name>.png`` by rank 0 (None on other ranks)."""
        from fluxlab.data import make_grid

        images, captions = self.task.sample_images(ema if ema is not None else self.ema)
        if not self.dist.is_main:
            return None
        out = self.run_dir / "samples" / f"{name}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        grid = make_grid(
            images, nrow=getattr(self.task, "grid_nrow", min(8, len(images))), captions=captions
        )
        grid.save(out)
        if self.writer is not None:
            self.writer.add_image("samples", np.asarray(grid), self.step, dataformats="HWC")
        return out

    def validate(self, model: nn.Module | None = None) -> Any:
        """Validation loss of the trained (not EMA) weights at 8 fixed timesteps, comparable to the train loss."""
        from fluxlab.eval.validation import validation_loss

        result = validation_loss(
            self.task,
            model or self.model,
            self.val_dataset,
            seed=self.cfg.train.seed,
            batch_size=self.cfg.optim.batch_size,
        )
        self.model.train()
        if self.writer is not None:
            self.writer.add_scalar("loss/val", result.loss, self.step)
            for t, value in zip(result.timesteps, result.per_t):
                self.writer.add_scalar(f"loss_val_t/{t:.3f}", value, self.step)
        return result

    def _tensorboard_extras(self, batch: dict[str, Any] | None) -> None:
        """Histograms of weights and predictions, and the graph once; on sample steps only (one forward).

        Under FSDP every rank takes part (the forward and each weight's gather are collectives)."""
        from fluxlab.train.monitoring import add_histograms, add_model_graph, capture_forward

        missing = torch.tensor(batch is None, device=self.device)
        if (distributed.any_rank(missing, self.dist) if self._sharded else missing).item():
            return  # an unreadable batch on any rank: all skip together, or the collectives would not pair up
        assert batch is not None
        captured = capture_forward(self.task, self.model, batch, seed=self.step)
        if self._sharded:
            parallelize.reshard(
                self.model
            )  # so that every parameter is a shard again, gathered below one by one
        weights = (
            zip(self.optimizer.names, self.optimizer.masters)
            if self.master_weights
            else parallelize.full_parameters(self.model)
        )
        if self.writer is None:
            for _ in weights:  # the other ranks' half of each gather
                pass
            return
        add_histograms(self.writer, weights, captured.output, self.step)
        # Neither a compiled forward nor FSDP's hooks trace; the graph is the same at any world size anyway.
        if not getattr(self, "_graph_written", False) and not (
            self.cfg.parallel.compile or self._sharded
        ):
            self._graph_written = True
            # With master weights the model's matmuls are bf16 and expect autocast, which tracing does not
            # record; the EMA has the same graph in fp32.
            add_model_graph(self.writer, self.ema if self.master_weights else self.model, captured)

    def train(self) -> Path:
        cfg = self.cfg
        o = cfg.optim
        self.writer = None
        if cfg.train.tensorboard and self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))
        batches = self._loader()
        bin_sum = torch.zeros(T_BINS, device=self.device)
        bin_count = torch.zeros(T_BINS, device=self.device)
        loss_sum, loss_n, epoch_sum, epoch_n = 0.0, 0, 0.0, 0
        per_epoch = len(self.dataset) // (o.batch_size * self.dist.world)
        net = self.net  # DDP, the FSDP-sharded model, or the model itself
        nonfinite_in_a_row = 0
        start_time = time.monotonic()
        last_path: Path | None = None
        self.model.train()
        bar = tqdm(
            total=o.steps, initial=self.step, desc="train", dynamic_ncols=True, disable=self.quiet
        )
        while self.step < o.steps:
            step_loss = torch.zeros((), device=self.device)
            step_bins: list[
                tuple[Tensor, Tensor]
            ] = []  # joins the t-bin curve only if the step is kept
            for micro in range(o.grad_accum):
                batch, k = next(batches), self.batches_seen
                self.batches_seen += 1
                if batch is None:  # every image of the batch was unreadable
                    continue
                self.skipped_images += int(batch.get("skipped", 0))
                # Sample j of global micro-batch k draws the same dropout/t/noise at any world size.
                n = len(
                    batch["image"] if "image" in batch else batch["caption"]
                )  # the latent cache has no images
                gens = SampleGenerators.for_batch(
                    cfg.train.seed, k, n, self.dist.rank, self.dist.world, self.device
                )
                sync = micro == o.grad_accum - 1  # DDP/FSDP communicate once per optimizer step
                with parallelize.grad_sync(net, sync), attention_kernels.for_training(self.device):
                    per_sample, t = self.task.loss(net, batch, gens)
                    loss = per_sample.mean()
                    (loss / o.grad_accum).backward()
                step_loss += loss.detach() / o.grad_accum
                step_bins.append(
                    ((t.detach() * T_BINS).long().clamp(0, T_BINS - 1), per_sample.detach().float())
                )
            if self.dist.enabled:  # the logged loss is the global batch's, as in a single process
                dist.all_reduce(step_loss)
                step_loss /= self.dist.world
            grad_norm = self.clip_gradients()
            nonfinite = ~(torch.isfinite(grad_norm) & torch.isfinite(step_loss))
            if (
                self.simulated
            ):  # meaningless numbers by design; the optimizer step must still allocate its state
                nonfinite.zero_()
            if distributed.any_rank(
                nonfinite, self.dist
            ):  # all ranks skip together (a no-op alone)
                self.optimizer.zero_grad(set_to_none=True)
                self.nonfinite_steps += 1
                nonfinite_in_a_row += 1
                warnings.warn(
                    f"step {self.step}: non-finite loss or gradient, step skipped", stacklevel=2
                )
                if nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                    bar.close()  # so the error starts on a line of its own
                    good = last_path or latest_checkpoint(self.run_dir)
                    raise NonFiniteLossError(
                        f"{nonfinite_in_a_row} steps in a row had a non-finite loss or gradient "
                        f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); stopped before step "
                        f"{self.step + 1} without saving. The last good checkpoint is {good or 'not written yet'}: "
                        "resume from it with a lower optim.lr or a stricter optim.grad_clip, or check the data"
                    )
                continue
            nonfinite_in_a_row = 0
            for bins, values in step_bins:
                bin_sum.scatter_add_(0, bins, values)
                bin_count.scatter_add_(0, bins, torch.ones_like(values))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._update_ema()
            self.step += 1
            bar.update(1)

            loss_value = step_loss.item()
            loss_sum, loss_n = loss_sum + loss_value, loss_n + 1
            epoch_sum, epoch_n = epoch_sum + loss_value, epoch_n + 1
            val = None
            eval_now = bool(cfg.train.eval_every) and (
                self.step % cfg.train.eval_every == 0 or self.step == o.steps
            )
            if eval_now and self._runs_evaluation():
                val = self.validate()
                if self._sharded:
                    parallelize.reshard(self.model)
            if self.step % cfg.train.log_every == 0 or self.step == o.steps or eval_now:
                if self.dist.enabled:  # every rank's t-bins join the curve
                    dist.all_reduce(bin_sum)
                    dist.all_reduce(bin_count)
                mean = loss_sum / loss_n
                lr = self.scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
                t_curve = [
                    (bin_sum[i] / bin_count[i]).item() if bin_count[i] > 0 else None
                    for i in range(T_BINS)
                ]
                self._write_log(
                    {
                        "step": self.step,
                        "loss": mean,
                        "lr": lr,
                        "grad_norm": grad_norm.item(),
                        "loss_per_t_bin": t_curve,
                        "seconds": round(time.monotonic() - start_time, 2),
                        **(
                            {"val_loss": val.loss, "val_loss_per_t": val.per_t}
                            if val is not None
                            else {}
                        ),
                    }
                )
                if self.writer is not None:
                    self.writer.add_scalar("loss/step", mean, self.step)
                    self.writer.add_scalar("lr", lr, self.step)
                    self.writer.add_scalar("grad_norm", grad_norm.item(), self.step)
                    for i, value in enumerate(t_curve):
                        if value is not None:
                            self.writer.add_scalar(
                                f"loss_t/{i / T_BINS:.1f}-{(i + 1) / T_BINS:.1f}", value, self.step
                            )
                loss_sum, loss_n = 0.0, 0
                bin_sum.zero_()
                bin_count.zero_()
            if per_epoch and self.step % per_epoch == 0 and epoch_n:
                if self.writer is not None:
                    self.writer.add_scalar(
                        "loss/epoch", epoch_sum / epoch_n, self.step // per_epoch
                    )
                epoch_sum, epoch_n = 0.0, 0

            out_of_time = (
                cfg.train.max_minutes is not None
                and time.monotonic() - start_time > 60 * cfg.train.max_minutes
            )
            if (
                cfg.train.max_minutes is not None and self.dist.enabled
            ):  # ranks' clocks differ: stop together
                out_of_time = bool(
                    distributed.any_rank(torch.tensor(out_of_time, device=self.device), self.dist)
                )
            if out_of_time:
                self._log(f"train.max_minutes={cfg.train.max_minutes} reached at step {self.step}")
            finished = self.step >= o.steps or out_of_time
            if (self.step % cfg.train.sample_every == 0 or finished) and self._runs_evaluation():
                self.memory.mark("train")
                self.sample_grid(f"step_{self.step:07d}")
                self.memory.mark("sample")
                if cfg.train.tensorboard:
                    self._tensorboard_extras(batch)
                if self._sharded:
                    parallelize.reshard(self.model)
                    parallelize.reshard(self.ema)
                self.model.train()
            if (self.step % cfg.train.checkpoint_every == 0 or finished) and not self.simulated:
                last_path = self.save()
            if out_of_time:
                break
        bar.close()
        if (
            last_path is None and not self.simulated
        ):  # resumed at or past the last step: still leave a checkpoint
            last_path = self.save()
        self.memory.mark("train")
        if self.memory.peaks:
            self._log("peak GPU memory per process: " + self.memory.summary())
        if self.skipped_images:
            self._log(
                f"skipped {self.skipped_images} unreadable images (see the warnings above for their names)"
            )
        if self.nonfinite_steps:
            self._log(f"skipped {self.nonfinite_steps} steps with a non-finite loss or gradient")
        if self.writer is not None:
            self.writer.close()
        if self._owns_group:
            distributed.shutdown(self.dist)
        return last_path
