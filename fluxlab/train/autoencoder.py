"""``fluxlab train-ae``: a FLUX-style KL autoencoder trained from scratch, then its latent scale
and shift.

Loss = recon (L1/L2) + kl_weight · KL/(C·H·W) [+ perceptual_weight · Inception-LPIPS]. At the end
the latents' statistics over training images give shift = mean(z) and scale = 1/std(z − shift) (what
BFL and diffusers store as shift_factor/scaling_factor), so a Flux trained on ``scale·(z − shift)``
sees ~unit variance. The run folder gets ``ae/ae.safetensors`` + ``ae/ae.json``
(``load_autoencoder`` reads either the run or ``ae/``), ``metrics.json``, ``log.jsonl``, ``tb/``,
``samples/recon_*.png`` and resumable checkpoints, written and resumed as ``fluxlab train`` writes
and resumes its own.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from fluxlab.config.autoencoder import ae_params_from_config, validate_ae
from fluxlab.config.schema import Config
from fluxlab.data import build_dataset, collate_skip_bad, make_grid
from fluxlab.data.samplers import InfiniteBatchSampler
from fluxlab.data.training import (
    collate_training,
    ignore_stop_signals,
    next_readable_batch,
    unreadable_limit,
)
from fluxlab.eval.perceptual import load_perceptual
from fluxlab.models.autoencoder import AutoEncoder, kl_divergence, sample_posterior
from fluxlab.models.weights.autoencoder_spec import save_autoencoder
from fluxlab.pipelines.build import resolve_device
from fluxlab.pipelines.text_to_image import autocast_for
from fluxlab.train.progress import TimeBudget
from fluxlab.train.run_folder import RunFolder
from fluxlab.train.run_log import RunLog
from fluxlab.train.stop_signals import StopSignals, TrainingInterrupted


def psnr(reconstruction: Tensor, target: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [-1, 1], measured on the [0, 1] scale (peak 1) as usual."""
    mse = ((reconstruction.float().clamp(-1, 1) - target.float()) / 2).square().mean(dim=(1, 2, 3))
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def latent_statistics(latents: Iterator[Tensor]) -> tuple[float, float]:
    """(shift, scale) = (mean, 1/std) over every element of the latents, accumulated in float64."""
    n, total, total_sq = 0, 0.0, 0.0
    for z in latents:
        z = z.double()
        n, total, total_sq = (
            n + z.numel(),
            total + z.sum().item(),
            total_sq + z.square().sum().item(),
        )
    if n < 2:
        raise ValueError("latent statistics need at least one image; raise ae.stats_images")
    mean = total / n
    var = max(total_sq / n - mean * mean, 0.0) * n / (n - 1)
    if not math.isfinite(var) or var <= 0:
        raise ValueError(
            f"the latents have variance {var}; the autoencoder collapsed (lower ae.lr?)"
        )
    return mean, 1.0 / math.sqrt(var)


class AETrainer:
    """Trains ``ae`` on ``data``, then measures the latent scale/shift and writes ``ae/``."""

    def __init__(
        self, cfg: Config, resume: bool = False, quiet: bool = False, overwrite: bool = False
    ):
        """``resume`` continues the run in ``train.output_dir``; ``overwrite`` starts over in a
        folder that holds a run (without either, such a folder is refused before any work)."""
        validate_ae(cfg)
        self.cfg = cfg
        self.run_dir = Path(cfg.train.output_dir)
        self.log = RunLog(self.run_dir, quiet=quiet)
        self.folder = RunFolder(self.run_dir, keep_last=cfg.train.keep_last, log=self.log)
        self.folder.claim(resume=resume, overwrite=overwrite)
        try:
            self._build(resume)
        except BaseException:
            self.folder.release()
            raise

    def _build(self, resume: bool) -> None:
        """Data, model, optimizer and, with ``resume``, the state of the last checkpoint."""
        cfg = self.cfg
        a, d = cfg.ae, cfg.data
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = resolve_device(cfg.train.device)
        torch.manual_seed(cfg.train.seed)
        common = dict(
            resolution=d.resolution,
            val_fraction=d.val_fraction,
            seed=cfg.train.seed,
            crop=d.crop,
            limit=d.limit,
            openmoji_subset=d.openmoji_subset,
            include=d.include,
            exclude=d.exclude,
        )
        self.dataset = build_dataset(
            d.dataset, split="train", hflip=d.hflip, color_jitter=d.color_jitter, **common
        )
        self.val_dataset = build_dataset(d.dataset, split="val", **common)
        if len(self.dataset) < a.batch_size or len(self.val_dataset) == 0:
            raise ValueError(
                f"data.dataset={d.dataset!r} has {len(self.dataset)} training and "
                f"{len(self.val_dataset)} held-out images; need ≥ ae.batch_size={a.batch_size} "
                "and ≥ 1"
            )
        self.params = ae_params_from_config(cfg)
        self.model = AutoEncoder(self.params).to(self.device)
        self.perceptual = load_perceptual().to(self.device) if a.perceptual_weight > 0 else None
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=a.lr,
            betas=(a.beta1, a.beta2),
            weight_decay=a.weight_decay,
            fused=self.device.type == "cuda",
        )
        warm = max(1, a.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm)
        )
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.train.seed + 1)
        self.step, self.batches_seen = 0, 0
        n = sum(p.numel() for p in self.model.parameters())
        self.log.info(
            f"autoencoder: {a.preset} {self.params.downsample_factor}× down to "
            f"{self.params.z_channels} channels, {n / 1e6:.2f}M parameters on {self.device}; "
            f"{len(self.dataset)} train / {len(self.val_dataset)} held-out images"
        )
        if resume:
            self.folder.resume(self._restore)
        self.folder.create(cfg)

    # ------------------------------------------------------------------------------- data
    def _batches(self) -> Iterator[Tensor]:
        """Training images batch after batch from ``batches_seen`` on, which counts every batch."""
        sampler = InfiniteBatchSampler(
            len(self.dataset),
            self.cfg.ae.batch_size,
            self.cfg.train.seed,
            start_batch=self.batches_seen,
        )
        workers = self.cfg.data.num_workers
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=workers,
            collate_fn=collate_training,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(self.cfg.train.seed + self.batches_seen),
            worker_init_fn=ignore_stop_signals,
        )
        batches = iter(loader)
        limit = unreadable_limit(len(self.dataset) // self.cfg.ae.batch_size)
        while True:  # batches without one readable image are passed over (counted in batches_seen)
            batch, drawn, _ = next_readable_batch(batches, limit, self.cfg.data.dataset)
            self.batches_seen += drawn
            yield batch["image"].to(self.device, non_blocking=True)

    def _images(self, dataset: Dataset, limit: int) -> Iterator[Tensor]:
        """The first ``limit`` images of ``dataset`` in order, in batches: the same each time."""
        indices = list(range(min(limit, len(dataset))))
        loader = DataLoader(
            Subset(dataset, indices),
            batch_size=self.cfg.ae.batch_size,
            num_workers=self.cfg.data.num_workers,
            collate_fn=collate_skip_bad,
        )
        for batch in loader:
            if batch is not None:
                yield batch["image"].to(self.device)

    # ------------------------------------------------------------------------------- loss
    def loss(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The training loss of ``images`` and its parts, detached for the log."""
        a = self.cfg.ae
        with autocast_for(self.device, self.cfg.train.mixed_precision):
            mean, logvar = self.model.encode_moments(images)
            z = sample_posterior(mean.float(), logvar.float(), self.generator)
            rec = self.model.decoder(z).float()
        err = rec - images
        recon = err.abs().mean() if a.recon_loss == "l1" else err.square().mean()
        kl = kl_divergence(mean.float(), logvar.float()).mean() / images[0].numel()
        loss = recon + a.kl_weight * kl
        parts = {
            "recon": recon.detach(),
            "kl": kl.detach(),
            "psnr": psnr(rec.detach(), images).mean(),
        }
        if self.perceptual is not None:
            with autocast_for(self.device, self.cfg.train.mixed_precision):
                perceptual = self.perceptual(rec, images).float().mean()
            loss = loss + a.perceptual_weight * perceptual
            parts["perceptual"] = perceptual.detach()
        return loss, parts

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """Posterior mean → decoder, as the diffusion pipeline uses it (encode without sampling)."""
        with autocast_for(self.device, self.cfg.train.mixed_precision):
            mean, _ = self.model.encode_moments(images)
            return self.model.decoder(mean).float().clamp(-1, 1)

    @torch.no_grad()
    def evaluate(self, name: str) -> float:
        """Mean held-out PSNR; writes originals over reconstructions to samples/recon_{name}.png."""
        self.model.eval()
        values, shown = [], None
        for images in self._images(self.val_dataset, self.cfg.ae.val_images):
            rec = self.reconstruct(images)
            values.append(psnr(rec, images).cpu())
            if shown is None:
                shown = (images[:8].cpu(), rec[:8].cpu())
        self.model.train()
        value = torch.cat(values).mean().item()
        assert shown is not None
        grid = make_grid(torch.cat(shown), nrow=shown[0].shape[0])
        grid.save(self.folder.sample_file(f"recon_{name}"))
        self.log.scalars({"psnr/val": value}, self.step)
        self.log.image("reconstructions", grid, self.step)
        return value

    # ------------------------------------------------------------------------------- state
    def save(self) -> Path:
        """Writes checkpoint ``self.step``: weights, optimizer, schedule, RNGs, data position."""
        state = {
            "step": self.step,
            "batches_seen": self.batches_seen,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        description = {
            "config": self.cfg.to_dict(),
            "format": "fluxlab-v1",
            "task": "autoencoder",
            "ae_params": asdict(self.params),
        }
        return self.folder.save(self.step, self.model.state_dict(), None, description, state)

    def _restore(self, path: Path, state: dict[str, Any]) -> int:
        """Loads checkpoint ``path`` into this run; returns its step."""
        weights = load_file(path / "model.safetensors", device=str(self.device))
        self.model.load_state_dict(weights, strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.batches_seen = state["step"], state["batches_seen"]
        return self.step

    # ------------------------------------------------------------------------------- loop
    def train_step(self, batches: Iterator[Tensor]) -> tuple[dict[str, Tensor], Tensor] | None:
        """One AdamW step on the next batch: its loss and the loss's parts, and the gradient norm;
        None when the loss or gradient was not finite and the step was skipped."""
        loss, parts = self.loss(next(batches))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.ae.grad_clip)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            warnings.warn(
                f"step {self.step}: non-finite loss or gradient, step skipped", stacklevel=2
            )
            return None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": loss.detach(), **parts}, grad_norm

    def train(self) -> Path:
        """Trains to ae.steps or ae.max_minutes, then measures scale/shift and writes ``ae/``.

        SIGINT/SIGTERM end the step in flight, save a checkpoint at it and raise
        ``TrainingInterrupted``."""
        self.log.start(
            desc="train-ae",
            total=self.cfg.ae.steps,
            initial=self.step,
            tensorboard=self.cfg.train.tensorboard,
        )
        budget = TimeBudget(self.cfg.ae.max_minutes)
        batches = self._batches()
        self.model.train()
        try:
            with StopSignals() as signals:
                self._train_steps(batches, budget, signals)
            self.log.end_progress()
            return self.finish(budget.elapsed())
        finally:
            self.log.close()
            self.folder.release()

    def _train_steps(
        self, batches: Iterator[Tensor], budget: TimeBudget, signals: StopSignals
    ) -> None:
        """Steps with their logging, evaluation and checkpoints, to the end or the time limit."""
        cfg, a = self.cfg, self.cfg.ae
        sums: dict[str, float] = {}
        count = 0
        while self.step < a.steps:
            result = self.train_step(batches)
            if signals.received is not None:
                self._stop(signals.received)
            if result is None:
                continue
            losses, grad_norm = result
            self.log.advance()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            count += 1
            out_of_time = budget.exhausted()
            finished = self.step >= a.steps or out_of_time
            val_psnr = None
            if a.eval_every and self.step % a.eval_every == 0 and not finished:
                val_psnr = self.evaluate(f"step_{self.step:07d}")
            if self.step % cfg.train.log_every == 0 or finished or val_psnr is not None:
                means = {k: v / count for k, v in sums.items()}
                self._log_step(means, grad_norm.item(), val_psnr, budget)
                sums, count = {}, 0
            if self.step % cfg.train.checkpoint_every == 0 or finished:
                self.save()
            if out_of_time:
                self.log.info(f"ae.max_minutes={a.max_minutes} reached at step {self.step}")
                return

    def _stop(self, signal_number: int) -> NoReturn:
        """Saves a checkpoint at this step (unless there is no step yet) and stops on a signal."""
        self.log.end_progress()
        saved = self.save() if self.step > 0 else None
        raise TrainingInterrupted(signal_number, self.step, saved)

    def _log_step(
        self, means: dict[str, float], grad_norm: float, val_psnr: float | None, budget: TimeBudget
    ) -> None:
        """A log.jsonl line, TensorBoard scalars and the bar's loss and PSNR."""
        lr = self.scheduler.get_last_lr()[0]
        self.log.show(loss=f"{means['loss']:.4f}", psnr=f"{means['psnr']:.2f}")
        record = {
            "step": self.step,
            **means,
            "lr": lr,
            "grad_norm": grad_norm,
            "seconds": round(budget.elapsed(), 2),
        }
        if val_psnr is not None:
            record["psnr_val"] = val_psnr
        self.log.record(record)
        self.log.scalars({**{f"{k}/train": v for k, v in means.items()}, "lr": lr}, self.step)

    def finish(self, seconds: float) -> Path:
        """Final held-out PSNR and grid, latent scale/shift, then ``ae/`` and ``metrics.json``."""
        if self.folder.latest() is None:
            self.save()
        psnr_val = self.evaluate("final")
        self.model.eval()
        shift, scale = latent_statistics(self._latents())
        self.params.shift_factor, self.params.scale_factor = shift, scale
        info = {
            "psnr_val": psnr_val,
            "step": self.step,
            "preset": self.cfg.ae.preset,
            "dataset": self.cfg.data.dataset,
            "train_seconds": round(seconds, 1),
        }
        folder = save_autoencoder(self.model, self.run_dir / "ae", extra=info)
        metrics = {
            **info,
            "scale_factor": scale,
            "shift_factor": shift,
            "z_channels": self.params.z_channels,
            "downsample_factor": self.params.downsample_factor,
        }
        (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        self.log.record(
            {"step": self.step, "psnr_val": psnr_val, "scale_factor": scale, "shift_factor": shift}
        )
        self.log.close()
        self.log.info(
            f"held-out PSNR {psnr_val:.2f} dB; latent shift {shift:.4f}, scale {scale:.4f}"
        )
        return folder

    @torch.no_grad()
    def _latents(self) -> Iterator[Tensor]:
        """Posterior means of the first ``ae.stats_images`` training images: what
        ``LatentCodec.encode`` hands to the diffusion model."""
        bar = tqdm(
            total=min(self.cfg.ae.stats_images, len(self.dataset)),
            desc="latent stats",
            disable=self.log.quiet,
            dynamic_ncols=True,
        )
        for images in self._images(self.dataset, self.cfg.ae.stats_images):
            with autocast_for(self.device, self.cfg.train.mixed_precision):
                yield self.model.encode_moments(images)[0].float()
            bar.update(images.shape[0])
        bar.close()
