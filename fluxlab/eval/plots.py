"""Pictures of a run's ``log.jsonl``: loss curve and loss per t-bin (matplotlib, optional)."""

from __future__ import annotations

import json
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


def plot_run(log: str | Path, out: str | Path, title: str | None = None) -> Path:
    """One PNG: training loss against step (left) and the latest loss per t-bin (right)."""
    rows = read_log(log)
    plt = _pyplot()
    fig, (ax_loss, ax_t) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in rows]
    ax_loss.plot(steps, [r["loss"] for r in rows], lw=1.5)
    ax_loss.set(xlabel="step", ylabel="training loss (velocity MSE)", yscale="log", title="loss")
    ax_loss.grid(alpha=0.3)
    if rows[0].get("val_loss") is not None or any("val_loss" in r for r in rows):
        val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        ax_loss.plot(*zip(*val), "o-", label="validation", lw=1.5)
        ax_loss.legend()
    # Average the last few records: one record's bins hold only a few samples each.
    recent = [r["loss_per_t_bin"] for r in rows[-5:] if r.get("loss_per_t_bin")]
    if recent:
        bins = len(recent[0])
        centers = [(i + 0.5) / bins for i in range(bins)]
        means = []
        for i in range(bins):
            vals = [r[i] for r in recent if r[i] is not None]
            means.append(sum(vals) / len(vals) if vals else float("nan"))
        ax_t.plot(centers, means, "o-")
        ax_t.set(
            xlabel="t (0 = data, 1 = noise)",
            ylabel="loss",
            title=f"loss per t-bin at step {steps[-1]}",
        )
        ax_t.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
