"""Plots of a run, drawn from its event log: per-objective losses and the weights over steps."""
from __future__ import annotations

from pathlib import Path

from .jobs import read_events


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_run(events_path: str | Path, out_dir: str | Path, names: list[str] | None = None) -> list[Path]:
    """Write ``losses.png`` and ``weights.png`` for a run; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    progress = [e for e in read_events(events_path) if e["event"] == "progress"]
    if not progress:
        raise ValueError(f"{events_path} has no progress events to plot")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = [e["step"] for e in progress]
    names = names or list(progress[0]["losses"])
    window = max(1, len(steps) // 10)
    written = []

    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        values = [float(e["losses"][name]) for e in progress]
        ax.plot(steps, values, color="0.75", lw=1, label="per step")
        ax.plot(steps, _smooth(values, window), color="C0", lw=2, label=f"mean of {window}")
        ax.set_title(f"{name} loss")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    written.append(out_dir / "losses.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    if progress[0].get("weights"):
        # Shares w_i / Σ w: the raw MPD weights scale with 1/|g|^(4/3) and swing over decades.
        fig, ax = plt.subplots(figsize=(6, 3.6))
        totals = [sum(float(w) for w in e["weights"]) or 1.0 for e in progress]
        for i, name in enumerate(names):
            shares = [float(e["weights"][i]) / t for e, t in zip(progress, totals)]
            ax.plot(steps, shares, color=f"C{i}", lw=0.8, alpha=0.35)
            ax.plot(steps, _smooth(shares, window), color=f"C{i}", lw=2, label=name)
        ax.set_title("objective weight shares  w_i / Σ w  (thin: per step)")
        ax.set_xlabel("step")
        ax.set_ylabel("weight share")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(out_dir / "weights.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
