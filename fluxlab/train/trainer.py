"""The training loop of a diffusion run: batch → loss → step → EMA → log → sample/checkpoint, the
same on one CPU as under torchrun on many GPUs."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor

from fluxlab.adapters import lora
from fluxlab.config.schema import Config
from fluxlab.data.samplers import InfiniteBatchSampler
from fluxlab.data.training import (
    UnreadableBatch,
    next_readable_batch,
    train_batches,
    train_dataset,
    unreadable_limit,
    val_dataset,
)
from fluxlab.eval.validation import ValidationLoss
from fluxlab.parallel import attention_kernels, distributed, parallelize
from fluxlab.pipelines.build import resolve_device
from fluxlab.tasks import build_task
from fluxlab.train.evaluation import Evaluator
from fluxlab.train.model_checkpoint import ModelCheckpointer
from fluxlab.train.monitoring import PeakMemory
from fluxlab.train.optimizers import (
    build_optimizer,
    build_scheduler,
    clip_gradients,
    ema_decay,
    use_master_weights,
)
from fluxlab.train.progress import LossWindow, TimeBudget, skip_summary, t_bin_name
from fluxlab.train.rng import (
    SampleGenerators,
    process_rng_state,
    restore_process_rng_state,
    seed_everything,
)
from fluxlab.train.run_folder import RunFolder
from fluxlab.train.run_log import RunLog
from fluxlab.train.stop_signals import StopSignals, TrainingInterrupted

# InfiniteBatchSampler lives in fluxlab.data.samplers; it is re-exported for older imports.
__all__ = ["InfiniteBatchSampler", "NonFiniteLossError", "StepResult", "Trainer"]


class NonFiniteLossError(RuntimeError):
    """train.max_nonfinite_steps steps in a row had a NaN/inf loss or gradient: the run stops."""


@dataclass
class StepResult:
    """What one optimizer step leaves for the log and the periodic work."""

    loss: Tensor  # 0-d: the mean loss of the global batch
    grad_norm: Tensor  # before clipping
    samples: list[tuple[Tensor, Tensor]]  # (t, per-sample loss) of each micro-batch
    batch: dict[str, Any] | None  # the last micro-batch (TensorBoard's extra forward reads it)
    applied: bool  # False: a loss or gradient was not finite on some rank, the update was skipped


class Trainer:
    """Trains the task of a config (Flux, Kontext, DiT) in one process or under torchrun.

    ``train()`` runs ``train_step`` to the end, with the periodic work between steps."""

    def __init__(
        self,
        cfg: Config,
        resume: bool = False,
        quiet: bool = False,
        simulated: distributed.DistInfo | None = None,
        overwrite: bool = False,
    ):
        """``resume``: continue the run in ``train.output_dir``; ``overwrite``: start over in a
        folder that holds a run, removing it once the data and model load (without either, such
        a folder is refused). ``simulated``: this process is that rank of a simulated world
        (``distributed.simulate``), run only to measure its memory: it trains and samples but
        writes no checkpoint."""
        cfg.validate()
        self.cfg = cfg
        # Under torchrun rank 0 speaks, samples and checkpoints; a restarted worker resumes.
        self.simulated = simulated is not None
        self.dist = simulated or distributed.from_env()
        cfg.parallel.validate(self.dist.world)
        # A process group that a caller made outlives this trainer.
        self._owns_group = self.dist.enabled and not dist.is_initialized()
        if distributed.restarted():  # the first attempt already cleared the folder
            resume, overwrite = True, False
        self.run_dir = Path(cfg.train.output_dir)
        self.log = RunLog(
            self.run_dir, writes=self.dist.is_main, quiet=quiet or not self.dist.is_main
        )
        self.folder = RunFolder(self.run_dir, keep_last=cfg.train.keep_last, log=self.log)
        if self.dist.is_main:  # before any work: the folder is writable, ours, and new or resumed
            self.folder.claim(resume=resume, overwrite=overwrite)
        try:
            self._build(resume)
        except BaseException:
            self.folder.release()
            raise

    def _build(self, resume: bool) -> None:
        """Data, task, model, optimizer and, with ``resume``, the state of the last checkpoint."""
        cfg = self.cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = distributed.init(self.dist, resolve_device(cfg.train.device))
        seed_everything(cfg.train.seed)

        self.dataset = train_dataset(cfg, self.device)
        self.log.info(f"dataset: {len(self.dataset)} training examples from {cfg.data.dataset}")
        self.val_dataset, val_captions = (
            val_dataset(cfg, self.device, self.log.info) if cfg.train.eval_every else (None, [])
        )
        self.task = build_task(cfg, self.dataset, self.device, extra_captions=val_captions)
        self.model = self.task.model
        self._build_parallel_model()
        self.optimizer = build_optimizer(self.model, cfg, self.master_weights, self.device)
        if self.master_weights:
            self.log.info(
                "optimizer: AdamW on fp32 master weights, bf16 matmul weights "
                "(optim.master_weights)"
            )
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.checkpointer = ModelCheckpointer(
            self.model, self.ema, self.optimizer, self.dist, self._sharded, self.device
        )
        self.evaluator = Evaluator(
            cfg,
            self.task,
            self.model,
            self.ema,
            self.optimizer,
            self.val_dataset,
            self.dist,
            self._sharded,
            self.device,
            self.log,
            self.folder,
        )

        self.memory = PeakMemory(self.device)
        self.step = 0
        self.batches_seen = 0
        self.skipped_images = 0
        self.nonfinite_steps = 0
        self.nonfinite_in_a_row = 0
        self.last_checkpoint: Path | None = None  # the last one this process saved
        if resume:
            self.folder.resume(self._restore)
        if self.dist.is_main:  # only now: the data and model are known to load
            self.folder.create(cfg)

    def _build_parallel_model(self) -> None:
        """Wraps the model for ``parallel.mode`` (``self.net``) and allocates the EMA alike."""
        cfg = self.cfg
        n_params = sum(p.numel() for p in self.model.parameters())
        n_frozen = sum(p.numel() for p in self.model.parameters() if not p.requires_grad)
        if self.device.type == "cuda":
            gpu_bytes = torch.cuda.get_device_properties(self.device).total_memory
            parallelize.check_training_memory(
                n_params - n_frozen, cfg.parallel, self.dist.world, gpu_bytes, n_frozen
            )
        self.mode = parallelize.resolve_mode(cfg.parallel, self.dist.world)
        self._sharded = self.mode in parallelize.SHARDED_MODES
        # Before parallelize, which rebinds the blocks' forwards. A LoRA run's EMA shares the frozen
        # base and follows the adapters (sharded, each rank keeps only its shards of both).
        shared_ema = lora.has_adapters(self.model) and not self._sharded
        ema_template = (
            lora.shared_base_copy(self.model) if shared_ema else parallelize.meta_copy(self.model)
        )
        self.log.info(
            f"model: {cfg.model.preset} with {n_params / 1e6:.2f}M parameters on {self.device}, "
            f"parallel.mode={self.mode} over {self.dist.world} process(es)"
        )
        mp = cfg.train.mixed_precision
        bf16 = mp == "bf16" or (mp == "auto" and self.device.type == "cuda")
        self.master_weights = use_master_weights(cfg, bf16, self.device, self.mode)
        # DDP, the FSDP-sharded model, or the model itself.
        self.net = parallelize.parallelize(
            self.model, cfg.parallel, self.device, self.dist, mixed_precision=bf16
        )
        self.ema = (
            ema_template
            if shared_ema
            else parallelize.materialize_like(
                ema_template, self.model, cfg.parallel, self.device, self.dist
            )
        )

    def _loader(self) -> Iterator[dict[str, Any] | UnreadableBatch]:
        return train_batches(
            self.dataset, self.cfg, self.batches_seen, self.dist.rank, self.dist.world, self.device
        )

    # ------------------------------------------------------------------------------- the step
    def train_step(self, batches: Iterator[dict[str, Any] | UnreadableBatch]) -> StepResult:
        """One optimizer step: forward and backward over ``optim.grad_accum`` micro-batches,
        gradient clipping, AdamW, the LR schedule and the EMA. A step whose loss or gradient is not
        finite on any rank changes no weight (``applied`` is False) and counts towards
        ``train.max_nonfinite_steps``."""
        accum = self.cfg.optim.grad_accum
        loss = torch.zeros((), device=self.device)
        samples: list[tuple[Tensor, Tensor]] = []
        batch = None
        steps_per_epoch = len(self.dataset) // (self.cfg.optim.batch_size * self.dist.world)
        limit = unreadable_limit(steps_per_epoch)
        for micro in range(accum):
            # A batch without one readable image is no micro-batch: its images count as skipped.
            batch, drawn, unreadable = next_readable_batch(batches, limit, self.cfg.data.dataset)
            index = self.batches_seen + drawn - 1
            self.batches_seen += drawn
            self.skipped_images += unreadable + int(batch.get("skipped", 0))
            # DDP/FSDP communicate once per optimizer step.
            micro_loss, t, per_sample = self._forward_backward(batch, index, micro == accum - 1)
            loss += micro_loss / accum
            samples.append((t, per_sample))
        if self.dist.enabled:  # the logged loss is the global batch's, as in a single process
            dist.all_reduce(loss)
            loss /= self.dist.world
        grad_norm = self.clip_gradients()
        nonfinite = ~(torch.isfinite(grad_norm) & torch.isfinite(loss))
        if self.simulated:  # meaningless numbers; the optimizer must still allocate its state
            nonfinite.zero_()
        if distributed.any_rank(nonfinite, self.dist):  # all ranks skip together
            self._skip_nonfinite_step()
            return StepResult(loss, grad_norm, samples, batch, applied=False)
        self.nonfinite_in_a_row = 0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.update_ema()
        self.step += 1
        return StepResult(loss, grad_norm, samples, batch, applied=True)

    def _forward_backward(
        self, batch: dict[str, Any], index: int, sync: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Loss and backward pass of global micro-batch ``index``; returns its mean loss, t and
        per-sample loss, detached. ``sync``: reduce the gradients across ranks now."""
        # The latent cache has no images.
        n = len(batch["image"] if "image" in batch else batch["caption"])
        # Sample j of micro-batch ``index`` draws the same dropout, t and noise at any world size.
        gens = SampleGenerators.for_batch(
            self.cfg.train.seed, index, n, self.dist.rank, self.dist.world, self.device
        )
        with parallelize.grad_sync(self.net, sync), attention_kernels.for_training(self.device):
            per_sample, t = self.task.loss(self.net, batch, gens)
            loss = per_sample.mean()
            (loss / self.cfg.optim.grad_accum).backward()
        return loss.detach(), t.detach(), per_sample.detach()

    def clip_gradients(self) -> Tensor:
        """Clips the gradients to ``optim.grad_clip`` by their global norm; returns the norm."""
        return clip_gradients(self.model, self.optimizer, self.cfg.optim.grad_clip)

    @torch.no_grad()
    def update_ema(self) -> None:
        """Moves the EMA towards the weights (the fp32 masters if any); shard-local under FSDP."""
        masters = self.optimizer.masters if self.master_weights else None
        decay = ema_decay(self.step, self.cfg.optim.ema_decay)
        parallelize.ema_update(self.ema, self.model, 1.0 - decay, masters)

    def _skip_nonfinite_step(self) -> None:
        """Drops the step's gradients and counts it; too many in a row stop the run."""
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        warnings.warn(f"step {self.step}: non-finite loss or gradient, step skipped", stacklevel=3)
        limit = self.cfg.train.max_nonfinite_steps
        if self.nonfinite_in_a_row < limit:
            return
        self.log.end_progress()  # so the error starts on a line of its own
        good = self.last_checkpoint or self.folder.latest()
        raise NonFiniteLossError(
            f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient "
            f"(train.max_nonfinite_steps={limit}); stopped before step {self.step + 1} without "
            f"saving. The last good checkpoint is {good or 'not written yet'}: resume from it with "
            "a lower optim.lr or a stricter optim.grad_clip, or check the data"
        )

    # ------------------------------------------------------------------------------- the loop
    def train(self) -> Path | None:
        """Trains to ``optim.steps`` or ``train.max_minutes``, validating, logging, checkpointing
        and sampling on the way; returns the last checkpoint (None in a simulated run).

        SIGINT/SIGTERM end the step in flight, save a checkpoint at it and raise
        ``TrainingInterrupted``."""
        cfg = self.cfg
        self.log.start(
            desc="train",
            total=cfg.optim.steps,
            initial=self.step,
            tensorboard=cfg.train.tensorboard,
        )
        batches = self._loader()
        steps_per_epoch = len(self.dataset) // (cfg.optim.batch_size * self.dist.world)
        window = LossWindow(self.device, self.dist, steps_per_epoch)
        budget = TimeBudget(cfg.train.max_minutes, self.dist, self.device)
        self.model.train()
        try:
            with StopSignals() as signals:
                while self.step < cfg.optim.steps:
                    result = self.train_step(batches)
                    stop_signal = signals.agreed(self.dist, self.device)
                    if stop_signal is not None:
                        self._stop(result, window, budget, stop_signal)
                    if result.applied and self._periodic_work(result, window, budget):
                        break  # out of time
            self.log.end_progress()
            if self.last_checkpoint is None and not self.simulated:
                self.save()  # resumed at or past the last step: still leave a checkpoint
            self._summarize(getattr(batches, "broken_shards", 0))
        finally:
            self.log.close()
            self.folder.release()
        if self._owns_group:
            distributed.shutdown(self.dist)
        return self.last_checkpoint

    def _periodic_work(self, result: StepResult, window: LossWindow, budget: TimeBudget) -> bool:
        """What follows an applied step: progress, validation, log line, checkpoint, then the
        sample grid (a sampling failure cannot lose the step's checkpoint). True when
        ``train.max_minutes`` has run out."""
        cfg = self.cfg
        self.log.advance()
        window.add(result.loss.item(), result.samples)
        eval_now = self._every(cfg.train.eval_every)
        val = self._validate_all_ranks() if eval_now else None
        if eval_now or self._every(cfg.train.log_every):
            self._log_step(window, result, val, budget)
        if epoch := window.end_of_epoch(self.step):
            self.log.scalars({"loss/epoch": epoch[1]}, epoch[0])
        out_of_time = budget.exhausted()
        if out_of_time:
            self.log.info(f"train.max_minutes={cfg.train.max_minutes} reached at step {self.step}")
        if (self._every(cfg.train.checkpoint_every) or out_of_time) and not self.simulated:
            self.save()
        if (self._every(cfg.train.sample_every) or out_of_time) and self.evaluator.runs_here:
            self._sample_and_inspect(result.batch)
        return out_of_time

    def _stop(
        self, result: StepResult, window: LossWindow, budget: TimeBudget, signal_number: int
    ) -> NoReturn:
        """Logs the finished step if due, saves a checkpoint at it (unless there is nothing to
        save) and raises ``TrainingInterrupted``."""
        if result.applied:
            self.log.advance()
            window.add(result.loss.item(), result.samples)
            if self._every(self.cfg.train.log_every):
                self._log_step(window, result, None, budget)
        self.log.end_progress()
        saved = self.last_checkpoint
        if self.simulated or self.step == 0:
            saved = None
        elif saved != self.folder.checkpoint_path(self.step):
            saved = self.save()
        if self._owns_group:
            distributed.shutdown(self.dist)
        raise TrainingInterrupted(signal_number, self.step, saved)

    def _every(self, interval: int) -> bool:
        """Whether this step is a multiple of ``interval`` (0: never) or the last one."""
        return bool(interval) and (self.step % interval == 0 or self.step == self.cfg.optim.steps)

    def _log_step(
        self,
        window: LossWindow,
        result: StepResult,
        val: ValidationLoss | None,
        budget: TimeBudget,
    ) -> None:
        """A log.jsonl line, TensorBoard scalars and the bar's loss; a collective under torchrun."""
        loss, t_curve = window.flush()
        lr = self.scheduler.get_last_lr()[0]
        grad_norm = result.grad_norm.item()
        self.log.show(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        record = {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "loss_per_t_bin": t_curve,
            "seconds": round(budget.elapsed(), 2),
        }
        if val is not None:
            record.update(val_loss=val.loss, val_loss_per_t=val.per_t)
        self.log.record(record)
        scalars = {"loss/step": loss, "lr": lr, "grad_norm": grad_norm}
        scalars.update({t_bin_name(i): v for i, v in enumerate(t_curve) if v is not None})
        self.log.scalars(scalars, self.step)

    def _summarize(self, broken_shards: int) -> None:
        """The closing lines: peak memory, what was skipped (over all ranks), broken shards."""
        self.memory.mark("train")
        if self.memory.peaks:
            self.log.info("peak GPU memory per process: " + self.memory.summary())
        counts = torch.tensor([self.skipped_images, broken_shards], device=self.device)
        if self.dist.enabled:  # each rank read other images and shards
            dist.all_reduce(counts)
        for line in skip_summary(*counts.tolist(), nonfinite_steps=self.nonfinite_steps):
            self.log.info(line)

    # ------------------------------------------------------------------------------- periodic work
    def _validate_all_ranks(self) -> ValidationLoss | None:
        """The validation loss on the ranks that evaluate (None elsewhere), resharding after."""
        if not self.evaluator.runs_here:
            return None
        result = self.evaluator.validate(self.step)
        if self._sharded:
            parallelize.reshard(self.model)
        return result

    def _sample_and_inspect(self, batch: dict[str, Any] | None) -> None:
        """The sample grid of this step and, with TensorBoard, the histograms and graph."""
        self.memory.mark("train")
        self.evaluator.sample_grid(f"step_{self.step:07d}", self.step)
        self.memory.mark("sample")
        if self.cfg.train.tensorboard:
            self.evaluator.inspect(batch, self.step)
        if self._sharded:
            parallelize.reshard(self.model)
            parallelize.reshard(self.ema)
        self.model.train()

    # ------------------------------------------------------------------------------- checkpoints
    def _description(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "format": "fluxlab-v1", **self.task.description()}

    def _train_state(self) -> dict[str, Any]:
        rng = process_rng_state()
        per_rank = distributed.gather(rng, self.dist) if self.dist.enabled else None  # collective
        return {
            "step": self.step,
            "batches_seen": self.batches_seen,
            "optimizer": self.checkpointer.optimizer_state(),
            "scheduler": self.scheduler.state_dict(),
            **rng,
            "rank_rng": per_rank,
            "skipped_images": self.skipped_images,
            "nonfinite_steps": self.nonfinite_steps,
        }

    def save(self) -> Path:
        """Writes checkpoint ``self.step``. Every rank calls it (RNG states are gathered), rank 0
        writes, and all leave once the checkpoint exists."""
        state = self._train_state()
        weights, ema, staged = self.checkpointer.write(self.folder, self.step)
        path = self.folder.checkpoint_path(self.step)
        if self.dist.is_main:
            path = self.folder.save(self.step, weights, ema, self._description(), state, staged)
        distributed.barrier(self.dist)
        self.last_checkpoint = path
        return path

    def _restore(self, path: Path, state: dict[str, Any]) -> int:
        """Loads checkpoint ``path``, written at any world size, into this run; returns its step."""
        self.checkpointer.read(path, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restore_process_rng_state(state, self.dist.rank, self.dist.world, path)
        self.step = state["step"]
        self.batches_seen = state["batches_seen"]
        self.skipped_images = state["skipped_images"]
        self.nonfinite_steps = state["nonfinite_steps"]
        return self.step
