"""Pictures of a run's ``log.jsonl``: loss curve and loss per t-bin (matplotlib, optional)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def read_log(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a training run writes log.jsonl in its output_dir"
        )
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(
                    f"{path}:{n} is not a JSON line (a run killed mid-write leaves at most the "
                    "last one)"
                ) from None
    if not rows:
        raise ValueError(f"{path} holds no log records yet")
    return rows


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ValueError("plots need matplotlib: pip install 'fluxlab[plot]'") from e
    return plt


def plot_runs(logs: Sequence[str | Path], out: str | Path, title: str | None = None) -> Path:
    """One PNG for one run or several side by side (bf16 against fp8, say): training loss against
    step (left) and the latest loss per t-bin (right), one colour per run, named by its folder."""
    runs = [(_run_name(log), read_log(log)) for log in logs]  # every path checked before plotting
    plt = _pyplot()
    fig, (ax_loss, ax_t) = plt.subplots(1, 2, figsize=(11, 4))
    several = len(runs) > 1
    for name, rows in runs:
        steps = [r["step"] for r in rows]
        line = ax_loss.plot(
            steps, [r["loss"] for r in rows], lw=1.5, label=name if several else None
        )
        val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        if val:
            label = f"{name} validation" if several else "validation"
            colour = line[0].get_color() if several else None
            ax_loss.plot(*zip(*val), "o--" if several else "o-", color=colour, label=label, lw=1.5)
        means = _recent_t_bins(rows)
        if means:
            centers = [(i + 0.5) / len(means) for i in range(len(means))]
            ax_t.plot(centers, means, "o-", label=f"{name} (step {steps[-1]})" if several else None)
    ax_loss.set(xlabel="step", ylabel="training loss (velocity MSE)", yscale="log", title="loss")
    ax_loss.grid(alpha=0.3)
    if ax_loss.get_legend_handles_labels()[1]:
        ax_loss.legend()
    if ax_t.lines:
        last = runs[0][1][-1]["step"]
        ax_t.set(
            xlabel="t (0 = data, 1 = noise)",
            ylabel="loss",
            title="loss per t-bin, last records" if several else f"loss per t-bin at step {last}",
        )
        ax_t.grid(alpha=0.3)
        if several:
            ax_t.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _run_name(log: str | Path) -> str:
    path = Path(log)
    return (path.parent if path.name == "log.jsonl" else path).name


def _recent_t_bins(rows: list[dict[str, Any]]) -> list[float]:
    """Loss per t-bin averaged over the last few records: one record's bins hold few samples."""
    recent = [r["loss_per_t_bin"] for r in rows[-5:] if r.get("loss_per_t_bin")]
    if not recent:
        return []
    means = []
    for i in range(len(recent[0])):
        vals = [r[i] for r in recent if r[i] is not None]
        means.append(sum(vals) / len(vals) if vals else float("nan"))
    return means
