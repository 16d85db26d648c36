"""``python -m trainers bench fairness``: what each weighting does to the regional balance.

The same step budget with every weighting (LS, DWA, UW, RLW, SI, Nash-MTL, MPD, MPD's closed
form; MPD with the paper's Eq. 2 masked loss, ``--local-scale 1``; MPD solved every 8th step
only, ``--fair-every 8``) on the tiny SD1.5-shaped
model, trained on real group photos whose faces and hands are small (the face-api sample photos,
annotated by this pack, at 128 px). Measured on *held-out* photos under fixed probes (posterior
mean latents, seeded noise, timesteps spread over the schedule): each region's denoising error —
the area-normalized masked MSE, so regions and local scales compare — before and after training,
and its relative reduction. A fair weighting should not buy the global loss with the face or
hand: the row's *worst* regional reduction is the number to compare. Seeds ≥ 3, mean ± spread.
This is the mechanism behind FairHuman's Tables 2 and 5, measured at toy scale.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

VARIANTS = {  # label -> training overrides
    "ls": {"weighting": "ls"},
    "dwa": {"weighting": "dwa"},
    "uw": {"weighting": "uw"},
    "rlw": {"weighting": "rlw"},
    "si": {"weighting": "si"},
    "nash-mtl": {"weighting": "nash-mtl"},
    "mpd": {"weighting": "mpd"},
    "mpd-closed-form": {"weighting": "mpd-closed-form"},
    "mpd-local-scale-1": {"weighting": "mpd", "local_scale": 1.0},  # the paper's Eq. 2 masked loss
    "mpd-fair-every-8": {"weighting": "mpd", "fair_every": 8},  # amortized: solve every 8th step
}
HELD_OUT = ("sample2.jpg", "sample4.jpg")
REGIONS = ("global", "face", "hand")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default 40)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per weighting (default 3)")
    parser.add_argument("--lr", type=float, default=5e-3, help="learning rate (default 5e-3: a tiny model, few steps)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--resolution", type=int, default=128, help="training side in pixels (default 128)")
    parser.add_argument("--probes", type=int, default=8, help="fixed timesteps per held-out image (default 8)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--smoke", action="store_true", help="tiny run (2 variants, 1 seed, 2 steps) for tests")


def prepare_data(root: Path) -> tuple[Path, Path]:
    """Annotated training and held-out folders of the sample photos."""
    from trainers import annotate
    from trainers.photos import sample_photos

    train, held = root / "train", root / "held_out"
    for path in sample_photos():
        folder = held if path.name in HELD_OUT else train
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.name)
        (folder / path.with_suffix(".txt").name).write_text("a photo of people", encoding="utf-8")
    parser = argparse.ArgumentParser()
    annotate.add_arguments(parser)
    for folder in (train, held):
        with contextlib.redirect_stdout(io.StringIO()):
            if annotate.run(parser.parse_args([str(folder), "--workers", "1"])) != 0:
                raise RuntimeError(f"annotating {folder} failed")
    return train, held


@torch.no_grad()
def heldout_errors(model, folder: Path, resolution: int, probes: int) -> torch.Tensor:
    """Per region, the area-normalized masked MSE on the held-out images under fixed probes."""
    from core.objectives import regional_losses
    from trainers.data import RegionDataset

    data = RegionDataset(folder, resolution=resolution, seed=0, random_crop=False, flip_p=0.0)
    steps = model.noise_scheduler.config.num_train_timesteps
    t = ((torch.arange(probes) + 0.5) * steps / probes).long().to(model.device)
    total, count = torch.zeros(3), torch.zeros(3)
    model.train(False)
    for index in range(len(data)):
        item = data.item(index, 0)
        moments = model.latent_moments(item["pixels"][None])
        latents = (moments[:, 0] * model.pipe.vae.config.scaling_factor).repeat(probes, 1, 1, 1)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(index)).to(latents)
        pred = model.predict(model.add_noise(latents, noise, t), t, model.conditioning([item["text"]] * probes),
                             item["time_ids"][None].repeat(probes, 1))
        masks = item["latent_masks"][None].repeat(probes, 1, 1, 1).to(pred.device)
        losses, active = regional_losses(pred, model.target(latents, noise, t), masks[:, 0:1], masks[:, 1:2],
                                         normalization="area")
        total += torch.where(active.cpu(), losses.cpu(), 0.0)
        count += active.cpu().float()
    model.train(True)
    return total / count.clamp_min(1)


def one_run(train: Path, held: Path, run_dir: Path, overrides: dict, seed: int, args) -> dict:
    from core.fileio import EventLog, read_events
    from trainers.config import TrainConfig
    from trainers.train_job import run_job

    cfg = TrainConfig(method="fairhuman", base="tiny-sd15", data=str(train), output=str(run_dir), steps=args.steps,
                      resolution=args.resolution, rank=args.rank, lr=args.lr, batch_size=2, seed=seed,
                      checkpoint_every=0, eval_every=0, **overrides)
    with contextlib.redirect_stdout(io.StringIO()):
        result = run_job(cfg, run_dir, EventLog(run_dir / "events.jsonl", echo=False), resume=False,
                         stop_requested=lambda: False, keep_model=True)
    rate = [e["it_per_s"] for e in read_events(run_dir / "events.jsonl") if e["event"] == "progress"][-1]
    model = result["model"]
    after = heldout_errors(model, held, args.resolution, args.probes)
    with model.reference():
        before = heldout_errors(model, held, args.resolution, args.probes)
    reduction = ((before - after) / before * 100).tolist()
    return {"reduction": dict(zip(REGIONS, reduction)), "worst": min(reduction), "seconds_per_step": 1 / rate}


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:+.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:+.1f}"


def run(args: argparse.Namespace) -> int:
    labels = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in labels if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if args.smoke:
        labels, args.seeds, args.steps, args.probes = ["ls", "mpd"], 1, 2, 2
    with tempfile.TemporaryDirectory() as tmp:
        train, held = prepare_data(Path(tmp) / "photos")
        results = {}
        for label in labels:
            for seed in range(args.seeds):
                run_dir = Path(tmp) / "runs" / f"{label}-{seed}"
                results.setdefault(label, []).append(one_run(train, held, run_dir, VARIANTS[label], seed, args))
                print(f"  {label} seed {seed}: worst {results[label][-1]['worst']:+.2f}%", flush=True)
    print(f"\nbench fairness: tiny SD1.5, {args.steps} steps, rank {args.rank}, lr {args.lr:g}, {args.resolution} px, "
          f"{args.seeds} seed(s); held-out {', '.join(HELD_OUT)}; relative reduction of each region's denoising "
          f"error (%, mean ± std over seeds)\n")
    print("| weighting | global | face | hand | worst region | s/step |")
    print("|---|---|---|---|---|---|")
    for label, runs in results.items():
        cells = [_spread([r["reduction"][name] for r in runs]) for name in REGIONS]
        print(f"| {label} | {' | '.join(cells)} | {_spread([r['worst'] for r in runs])} | "
              f"{statistics.fmean(r['seconds_per_step'] for r in runs):.2f} |")
    return 0
