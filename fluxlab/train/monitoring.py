"""What a person reads to see inside a run: TensorBoard histograms of predictions and weights, the
model graph, and the peak GPU memory of each phase.

The TensorBoard extras run only on sample steps (or once), never per step, and never touch the
training RNGs: the extra forward pass uses its own generator, so a run with TensorBoard on trains
exactly as one with it off.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn


class PeakMemory:
    """Peak GPU memory per phase (training steps, sample grids), for the summary a run ends with."""

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


class _CapturedCall:
    """Records the keyword arguments and output of one forward call of a module."""

    def __init__(self, module: nn.Module):
        self.kwargs: dict[str, Any] = {}
        self.args: tuple[Any, ...] = ()
        self.output: Tensor | None = None
        self._handles = [
            module.register_forward_pre_hook(self._pre, with_kwargs=True),
            module.register_forward_hook(self._post),
        ]

    def _pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.output is None:
            self.args, self.kwargs = args, dict(kwargs)

    def _post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.output is None and isinstance(output, Tensor):
            self.output = output.detach()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def capture_forward(task: Any, model: nn.Module, batch: dict[str, Any], seed: int) -> _CapturedCall:
    """One loss of ``task`` on ``batch``, recording the call of ``model`` and its output."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    captured = _CapturedCall(model)
    was_training = model.training
    try:
        model.eval()
        task.loss(model, batch, generator)
    finally:
        captured.remove()
        model.train(was_training)
    return captured


def add_histograms(
    writer: Any, weights: Iterable[tuple[str, Tensor]], predictions: Tensor | None, step: int
) -> None:
    """Weight histograms (one per named tensor, e.g. ``model.named_parameters()``) and, when given,
    the distribution of model outputs."""
    if predictions is not None:
        writer.add_histogram("predictions/output", predictions.float().flatten().cpu(), step)
    for name, param in weights:
        writer.add_histogram(f"weights/{name}", param.detach().float().flatten().cpu(), step)


class _Bound(nn.Module):
    """``model`` with its non-tensor keywords fixed, callable on tensors alone (for tracing)."""

    def __init__(self, model: nn.Module, num_args: int, names: list[str], fixed: dict[str, Any]):
        super().__init__()
        self.model, self.num_args, self.names, self.fixed = model, num_args, names, fixed

    def forward(self, *tensors: Tensor) -> Tensor:
        args, kw = tensors[: self.num_args], tensors[self.num_args :]
        return self.model(*args, **dict(zip(self.names, kw)), **self.fixed)


def add_model_graph(writer: Any, model: nn.Module, captured: _CapturedCall) -> bool:
    """The model graph, traced on a recorded call; a model that does not trace costs a warning."""
    try:
        if captured.output is None or not all(isinstance(a, Tensor) for a in captured.args):
            raise ValueError("no forward call with tensor arguments was recorded")
        tensors = {k: v for k, v in captured.kwargs.items() if isinstance(v, Tensor)}
        fixed = {k: v for k, v in captured.kwargs.items() if not isinstance(v, Tensor)}
        bound = _Bound(model, len(captured.args), list(tensors), fixed)
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # tracer chatter about data-dependent shapes is expected here
            writer.add_graph(bound, (*captured.args, *tensors.values()))
        return True
    except Exception as err:  # tracing is best effort: any failure must not stop training
        warnings.warn(
            f"TensorBoard: could not trace the model graph ({type(err).__name__}: {err}); "
            "training goes on without it",
            stacklevel=2,
        )
        return False
