"""One CUDA graph per input shape around a module's whole forward, for sampling.

A sampling loop calls the transformer tens of times with the same shapes. Replaying a captured
graph launches every kernel of the step at once, so the GPU never waits on Python between the
compiled blocks (about 5 ms of a 99 ms fp8 flux-dev step on an H100: docs/performance.md). Unlike
``torch.compile(mode="reduce-overhead")`` this wraps the model from outside, around per-block
compiled code, custom attention ops and quantized weights alike.

A graph replays fixed addresses: the weights must stay the same tensors after the first call
(in-place updates are seen, replaced tensors are not), so apply LoRA merges, fp8 and attention
kernels first, and keep it out of training (it steps aside whenever autograd is on).
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

WARMUP_CALLS = 2  # the first call compiles the blocks; the second runs them as the graph will


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[Any]  # the flattened arguments: static tensors the replay reads, other values
    output: Any


class CUDAGraphed(nn.Module):
    """``module``'s forward, captured as one CUDA graph per distinct input signature (shapes,
    dtypes, non-tensor values, autocast) on first use and replayed after.

    Each call copies its tensors into the graph's inputs and returns a copy of its output, so
    results of earlier calls (a CFG pair's two halves) stay valid. Off CUDA or with autograd on
    it calls ``module`` as it is; so does a signature whose capture failed, after one warning.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self._graphs: dict[tuple, _Captured | None] = {}  # None: capture failed, run as is

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, Tensor)]
        if torch.is_grad_enabled() or not tensors or not all(t.is_cuda for t in tensors):
            return self.module(*args, **kwargs)
        key = (str(spec), *(_signature(x) for x in leaves), *_autocast_state())
        if key not in self._graphs:
            self._graphs[key] = self._try_capture(leaves, spec)
        captured = self._graphs[key]
        if captured is None:
            return self.module(*args, **kwargs)
        for static, x in zip(captured.inputs, leaves, strict=True):
            if isinstance(x, Tensor):
                static.copy_(x)
        captured.graph.replay()
        return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, captured.output)

    @property
    def graph_count(self) -> int:
        """How many input signatures have been captured."""
        return sum(c is not None for c in self._graphs.values())

    def _try_capture(self, leaves: list[Any], spec: Any) -> _Captured | None:
        try:
            return self._capture(leaves, spec)
        except RuntimeError as err:  # an op that cannot be captured (a host sync, a recompile)
            warnings.warn(
                f"CUDA graph capture of {type(self.module).__name__} failed ({err}); these "
                "inputs run step by step (--no-cuda-graphs skips the attempt)",
                stacklevel=3,
            )
            torch.cuda.synchronize()
            return None

    def _capture(self, leaves: list[Any], spec: Any) -> _Captured:
        inputs = [x.clone() if isinstance(x, Tensor) else x for x in leaves]
        args, kwargs = tree_unflatten(inputs, spec)
        # Warm up on a side stream (the capture's own), as torch.cuda.graphs asks: lazy compiles,
        # cuBLAS workspaces and kernel caches are set up before the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), _uncached_autocast():
            for _ in range(WARMUP_CALLS):
                self.module(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), _uncached_autocast():
            output = self.module(*args, **kwargs)
        return _Captured(graph, inputs, output)


def _signature(x: Any) -> Any:
    if isinstance(x, Tensor):
        return (tuple(x.shape), x.dtype, x.device)
    return x


def _autocast_state() -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")


def _uncached_autocast() -> AbstractContextManager:
    """The caller's CUDA autocast with its weight-cast cache off: a cast cached outside the
    capture would be freed when the caller's autocast exits, under the graph's feet. (Nothing
    changes without autocast: the flag is part of what compiled code is guarded on.)"""
    enabled, dtype = _autocast_state()
    if not enabled:
        return nullcontext()
    return torch.autocast("cuda", dtype=dtype, cache_enabled=False)
