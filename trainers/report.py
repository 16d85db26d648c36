"""Plots of a run, drawn from its event log: per-objective losses, the fair weights over steps
(when they change), for DPO runs the implicit reward margin and accuracy, and with
``--validate-every`` the validation curve (score against step, the kept best marked).

``python -m trainers report RUN_DIR`` draws them for any run, finished or not."""
from __future__ import annotations

from pathlib import Path

from core.fileio import PROGRESS, VALIDATION, atomic_path, read_events


def save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", type=Path, help="a training run directory (holds events.jsonl)")
    parser.add_argument("--output", type=Path, default=None, help="where the plots go (default: RUN_DIR/plots)")


def run(args) -> int:
    events = args.run_dir / "events.jsonl"
    if not events.is_file():
        raise SystemExit(f"{events} not found: is {args.run_dir} a training run directory?")
    try:
        written = plot_run(events, args.output or args.run_dir / "plots")
    except ValueError as err:
        raise SystemExit(str(err)) from None
    print("\n".join(str(p) for p in written))
    return 0


def plot_run(events_path: str | Path, out_dir: str | Path, names: list[str] | None = None) -> list[Path]:
    """Write ``losses.png``, ``weights.png`` (fair weighting), ``dpo.png`` (DPO runs) and
    ``validation.png`` (``--validate-every``) for a run; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = read_events(events_path)
    progress = [e for e in events if e["event"] == PROGRESS]
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
    save_figure(fig, written[-1])
    plt.close(fig)

    if progress[0].get("weights") and any(e["weights"] != progress[0]["weights"] for e in progress):
        # Left: w_i / Σ w (the raw MPD weights scale with 1/|g|^(4/3) and swing over decades).
        # Right: each objective's share of the update, w_i g_i · d / |d|², from the step's Gramian:
        # MPD gives a large-gradient objective a small weight, so the weights alone mislead.
        solved = [e for e in progress if e.get("shares")]
        panels = 2 if solved else 1
        fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 3.6), squeeze=False)
        totals = [sum(float(w) for w in e["weights"]) or 1.0 for e in progress]
        series = [(axes[0][0], steps, [[float(e["weights"][i]) / t for e, t in zip(progress, totals)]
                                       for i in range(len(names))], "weight shares  w_i / Σ w")]
        if solved:
            series.append((axes[0][1], [e["step"] for e in solved],
                           [[float(e["shares"][i]) for e in solved] for i in range(len(names))],
                           "shares of the update  w_i g_i · d / |d|²"))
        for ax, xs, per_objective, title in series:
            for i, (name, values) in enumerate(zip(names, per_objective)):
                ax.plot(xs, values, color=f"C{i}", lw=0.8, alpha=0.35)
                ax.plot(xs, _smooth(values, max(1, len(xs) // 10)), color=f"C{i}", lw=2, label=name)
            ax.set_title(f"{title}  (thin: per step)", fontsize=10)
            ax.set_xlabel("step")
            if ax is axes[0][0]:
                ax.set_ylim(0, 1)  # update shares may leave [0, 1] where objectives conflict
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        written.append(out_dir / "weights.png")
        save_figure(fig, written[-1])
        plt.close(fig)

    if "reward_margin" in progress[0]:
        written.append(_plot_dpo(plt, progress, [e for e in events if e["event"] == "eval"], window,
                                 out_dir / "dpo.png"))
    validations = [e for e in events if e["event"] == VALIDATION]
    if validations:
        written.append(_plot_validation(plt, validations, out_dir / "validation.png"))
    return written


def _plot_validation(plt, validations: list[dict], path: Path) -> Path:
    """The metric the best LoRA is kept by, and Face/Hand Confi. with a missed region counted 0,
    against the step; the kept best marked. A step validated twice (a run resumed from before
    it) shows its last measurement."""
    by_step = {e["step"]: e for e in validations}
    steps = sorted(by_step)
    last = validations[-1]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.plot(steps, [by_step[s]["score"] for s in steps], "o-", color="C0", lw=2, label=last["metric"])
    for i, name in enumerate(("face", "hand")):
        if name != last["metric"]:
            ax.plot(steps, [by_step[s]["scores"][name] for s in steps], ".--", color=f"C{i + 1}", lw=1,
                    label=name)
    ax.plot([last["best_step"]], [last["best_score"]], "*", color="C3", markersize=16,
            label=f"best: step {last['best_step']} ({last['best_score']:.3f})")
    ax.set_title("validation (higher is better)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def _plot_dpo(plt, progress: list[dict], evals: list[dict], window: int, path: Path) -> Path:
    """Implicit reward margin and accuracy: per step (one random timestep per pair, noisy) and
    under the fixed probes of the eval events (comparable across steps)."""
    steps = [e["step"] for e in progress]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, fixed, title in ((axes[0], "reward_margin", "pair_margin", "implicit reward margin"),
                                  (axes[1], "accuracy", "pair_accuracy", "implicit accuracy")):
        values = [float(e[key]) for e in progress]
        ax.plot(steps, values, color="0.75", lw=1, label="per step")
        ax.plot(steps, _smooth(values, window), color="C0", lw=2, label=f"mean of {window}")
        if evals:
            ax.plot([e["step"] for e in evals], [e[fixed] for e in evals], "o-", color="C3", lw=2,
                    label="training pairs, fixed probes")
        ax.axhline(0.5 if key == "accuracy" else 0.0, color="k", lw=0.6)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path
