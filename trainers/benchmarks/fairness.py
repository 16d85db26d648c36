"""``python -m trainers bench fairness``: does a weighting serve the worst-served region better,
once step size is taken out?

The regime (``fairness_scenes``, ``fairness_training``): a tiny denoiser on synthetic scenes
whose "face" and "hand" are small patches of fine texture the global loss barely rewards,
trained with the pack's three objectives, combiner and weightings; measured on held-out scenes
as each region's relative reduction of its denoising error (area-normalized, so regions
compare). It must be able to tell weightings apart: a deliberately unfair weighting (the global
objective only, weights [1, 0, 0]) has to starve a region by more than the interval, and the
bench prints whether it does (``discriminates: yes/no``).

Two controls in one run, per "Judging a weighting" (docs/fairness.md):
(a) every weighting at its own best AdamW learning rate from one grid (best: the highest mean
    worst-of-three reduction over the seeds);
(b) every weighting's combined update rescaled to the norm of the plain summed update (the
    combiner's ``match_norm``) under plain SGD, all at the learning rate best for ``ls`` on the
    SGD grid: equal step sizes, so only the direction differs.
Each table: every objective's change, the worst of the three, the worse of face and hand, each
objective's mean share of the update; mean ± 95 % Student-t half-width over the seeds, and a
line naming the differences from LS (of the same normalization) whose Welch 95 % interval
excludes 0. ``--plot PATH`` draws region gain against global change per weighting.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from .fairness_training import REGIONS, RunSettings, held_out, train_and_measure
from .intervals import mean_interval, significant, welch

VARIANTS = {  # label -> the training overrides (TrainConfig's names)
    "ls": {"weighting": "ls"},
    "global-only": {"weighting": "ls", "weighting_options": {"weights": [1.0, 0.0, 0.0]}},  # unfair on purpose
    "mpd": {"weighting": "mpd"},
    "ls-area": {"weighting": "ls", "normalization": "area"},
    "mpd-area": {"weighting": "mpd", "normalization": "area"},
    "mpd-closed-form": {"weighting": "mpd-closed-form"},
    "nash-mtl": {"weighting": "nash-mtl"},
    "dwa": {"weighting": "dwa"},
    "uw": {"weighting": "uw"},
    "rlw": {"weighting": "rlw"},
    "si": {"weighting": "si"},
    "ls-local-scale-1": {"weighting": "ls", "local_scale": 1.0},  # the paper's Eq. 2 masked loss
    "mpd-local-scale-1": {"weighting": "mpd", "local_scale": 1.0},
}
DEFAULT_VARIANTS = ("ls", "global-only", "mpd", "ls-area", "mpd-area")
UNFAIR = "global-only"
COLUMNS = ("global", "face", "hand", "worst of three", "worse of face/hand")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=250, help="optimizer steps per run (default 250)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per weighting and learning rate (default 3)")
    parser.add_argument("--adamw-lrs", default="1e-3,3e-3,1e-2",
                        help="control (a)'s AdamW learning-rate grid (default 1e-3,3e-3,1e-2)")
    parser.add_argument("--sgd-lrs", default="0.1,0.2,0.4",
                        help="control (b)'s SGD grid, swept for ls (default 0.1,0.2,0.4)")
    parser.add_argument("--batch", type=int, default=8, help="scenes per step (default 8)")
    parser.add_argument("--held-out", type=int, default=32, help="held-out scenes (default 32)")
    parser.add_argument("--probes", type=int, default=6, help="probe timesteps per held-out scene (default 6)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="comma-separated subset of: " + ", ".join(VARIANTS) + " (ls and global-only always run)")
    parser.add_argument("--controls", default="a,b", help="which controls to run: a, b or a,b (default both)")
    parser.add_argument("--plot", default=None, help="write the scatter of region gain vs global change (PNG) here")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def baseline_of(label: str) -> str:
    """The plain sum (LS) with the same masked-loss normalization as ``label``'s."""
    o = VARIANTS[label]
    same = {k: o[k] for k in ("normalization", "local_scale") if k in o}
    return next(name for name, v in VARIANTS.items() if v == {"weighting": "ls", **same})


def metrics(run: dict) -> dict:
    """The table's columns of one run."""
    r = run["reduction"]
    return {**r, "worst of three": min(r.values()), "worse of face/hand": min(r["face"], r["hand"])}


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.probe = held_out(args.held_out, args.probes)

    def runs(self, label: str, optimizer: str, lr: float, match_norm: bool, tag: str) -> list[dict]:
        out = []
        for seed in range(self.args.seeds):
            begin = time.perf_counter()
            run = train_and_measure(RunSettings(VARIANTS[label], optimizer, lr, match_norm, self.args.steps,
                                                self.args.batch, seed), self.probe)
            out.append(run)
            print(f"  {tag} {label} lr {lr:g} seed {seed}: worst {metrics(run)['worst of three']:+.1f} % "
                  f"({time.perf_counter() - begin:.0f} s)", flush=True)
        return out

    def best(self, label: str, optimizer: str, grid: list[float], match_norm: bool, tag: str):
        """(lr, runs) of the grid's lr with the highest mean worst-of-three reduction."""
        swept = {lr: self.runs(label, optimizer, lr, match_norm, tag) for lr in grid}

        def score(lr: float) -> float:  # a diverged lr (NaN) is never the best
            mean = statistics.fmean(metrics(r)["worst of three"] for r in swept[lr])
            return -math.inf if math.isnan(mean) else mean

        lr = max(grid, key=score)
        return lr, swept[lr]


def _cell(values: list[float]) -> str:
    mean, half = mean_interval(values)
    return f"{mean:+.1f}" if math.isnan(half) else f"{mean:+.1f} ± {half:.1f}"


def column(runs: list[dict], name: str) -> list[float]:
    return [metrics(r)[name] for r in runs]


def print_table(title: str, results: dict[str, tuple[float, list[dict]]], grid: list[float]) -> None:
    """The control's table; an lr at either end of its grid is starred (the best may lie beyond)."""
    print(f"\n{title}\n")
    print("| weighting | lr | " + " | ".join(COLUMNS) + " | update shares global / face / hand |")
    print("|---" * (len(COLUMNS) + 3) + "|")
    for label, (lr, runs) in results.items():
        shares = " / ".join(f"{statistics.fmean(r['shares'][i] for r in runs):.2f}" for i in range(len(REGIONS)))
        edge = "*" if len(grid) > 2 and lr in (min(grid), max(grid)) else ""
        print(f"| {label} | {lr:g}{edge} | " + " | ".join(_cell(column(runs, c)) for c in COLUMNS) + f" | {shares} |")
    if any(lr in (min(grid), max(grid)) for lr, _ in results.values()) and len(grid) > 2:
        print("\n\\* at an end of the grid: a learning rate beyond it may do better")
    print()
    print(discrimination(results))
    print(significance(results))


def discrimination(results: dict[str, tuple[float, list[dict]]]) -> str:
    """Whether global-only starves a region: its reduction below the global objective's in the
    same runs (Student-t interval of the per-seed gap) and below LS's for that region (Welch),
    each by more than its 95 % interval."""
    unfair, plain = results[UNFAIR][1], results["ls"][1]
    region = min(("face", "hand"), key=lambda name: statistics.fmean(column(unfair, name)))
    gap, gap_half = mean_interval([a - b for a, b in zip(column(unfair, "global"), column(unfair, region))])
    margin, margin_half = welch(column(plain, region), column(unfair, region))
    yes = gap - gap_half > 0 and margin - margin_half > 0  # False with NaN half-widths (one seed)
    line = (f"discriminates: {'yes' if yes else 'no'} — {UNFAIR} starves the {region}: its error falls "
            f"{statistics.fmean(column(unfair, region)):+.1f} % against {statistics.fmean(column(unfair, 'global')):+.1f} % "
            f"for the global objective (gap {gap:.1f} ± {gap_half:.1f}) and {statistics.fmean(column(plain, region)):+.1f} % "
            f"under ls (margin {margin:.1f} ± {margin_half:.1f}); 95 % intervals")
    return line if yes else line + ". This run cannot tell weightings apart: raise --steps or --seeds."


def significance(results: dict[str, tuple[float, list[dict]]]) -> str:
    """Each weighting's differences from its normalization's LS whose Welch 95 % interval
    excludes 0."""
    parts = []
    for label, (_, runs) in results.items():
        base = baseline_of(label)
        if base == label or base not in results:
            continue
        found = [f"{name} {d:+.1f} ± {h:.1f}" for name in COLUMNS
                 for d, h in [welch(column(runs, name), column(results[base][1], name))] if significant(d, h)]
        parts.append(f"{label} vs {base}: {', '.join(found) if found else 'none'}")
    return "significant differences (Welch 95 %): " + "; ".join(parts)


def plot(path: str, tables: dict[str, dict[str, tuple[float, list[dict]]]]) -> None:
    """Worse of face/hand against global change, one panel per control, 95 % error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 5), squeeze=False)
    for ax, (title, results) in zip(axes[0], tables.items()):
        for n, (label, (_, runs)) in enumerate(results.items()):  # one colour per weighting in both panels
            (x, xh), (y, yh) = (mean_interval(column(runs, c)) for c in ("global", "worse of face/hand"))
            ax.errorbar(x, y, xerr=0 if math.isnan(xh) else xh, yerr=0 if math.isnan(yh) else yh, fmt="o",
                        capsize=3, color=f"C{n}")
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9, color=f"C{n}")
        ax.axline((0, 0), slope=1, color="k", ls="--", lw=0.8, label="region gain = global change")
        ax.set_xlabel("global objective: error reduction (%)")
        ax.set_ylabel("worse of face / hand: error reduction (%)")
        ax.set_title(title, fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    labels = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in labels if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    labels = ["ls", UNFAIR] + [v for v in labels if v not in ("ls", UNFAIR)]
    labels += [b for b in dict.fromkeys(baseline_of(v) for v in labels) if b not in labels]
    if args.seeds < 2:
        print("bench fairness: one seed gives no interval; the check below will say no", flush=True)
    torch.set_num_threads(1)  # a tiny model: threads cost more than they give, and vary the sums
    bench = Bench(args)
    adamw_grid, sgd_grid = _floats(args.adamw_lrs), _floats(args.sgd_lrs)

    controls = {c.strip() for c in args.controls.split(",")}
    if not controls or controls - {"a", "b"}:
        raise SystemExit(f"--controls: a, b or a,b, got {args.controls!r}")
    tables = []  # (title, results, grid)
    if "a" in controls:
        print("(a) every weighting at its own best AdamW learning rate", flush=True)
        own_best = {label: bench.best(label, "adamw", adamw_grid, False, "(a)") for label in labels}
        tables.append((f"(a) own best AdamW lr from {{{args.adamw_lrs}}} (best: highest mean worst of three)",
                       own_best, adamw_grid))
    if "b" in controls:
        print("(b) every update rescaled to the plain sum's norm, plain SGD", flush=True)
        sgd_lr, ls_runs = bench.best("ls", "sgd", sgd_grid, True, "(b)")
        matched = {label: (sgd_lr, ls_runs if label == "ls" else bench.runs(label, "sgd", sgd_lr, True, "(b)"))
                   for label in labels}
        tables.append((f"(b) matched norm (‖d‖ = ‖Σ g_i‖), plain SGD, lr {sgd_lr:g} (best for ls from "
                       f"{{{args.sgd_lrs}}})", matched, sgd_grid))

    print(f"\nbench fairness: tiny denoiser on synthetic scenes (face 6×6, hand 4×4 px of fine texture in "
          f"24×24), {args.steps} steps, batch {args.batch}, seeds 0-{args.seeds - 1}; held-out {args.held_out} "
          f"scenes × {args.probes} probes; relative reduction of each region's denoising error (%, mean ± 95 % "
          f"Student-t half-width over seeds)")
    for title, results, grid in tables:
        print_table(title, results, grid)
    if args.plot:
        plot(args.plot, {title: results for title, results, _ in tables})
        print(f"\nplot: {args.plot}")
    return 0
