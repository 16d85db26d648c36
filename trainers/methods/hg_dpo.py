"""HG-DPO: Diffusion-DPO on preference pairs plus the statistic-matching loss.

Winner and loser share the noise and the timestep and go through the tuned UNet in one
concatenated forward; the reference is the same UNet with its LoRA switched off, run first and
without gradients, so no second copy of the model is held and its activations are freed before
the tuned forward saves its own.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.fileio import read_jsonl
from core.dpo import ddpm_posterior_mean, diffusion_dpo_loss, per_sample_error, stat_matching_loss

from ..data import StepBatches, buckets, collate, nearest_bucket, refuse_unreadable
from .base import Method, StepLosses

PAIRS = "pairs.jsonl"


def read_pair_records(path: Path) -> dict[str, dict]:
    """The latest record of each prompt of a ``pairs.jsonl`` (build-pairs appends a retried
    prompt again, so the last one wins); a torn last line is ignored."""
    return {row["prompt"]: row for row in read_jsonl(path) if "prompt" in row}


def read_pairs(folder) -> list[dict]:
    folder = Path(folder)
    path = folder / PAIRS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build pairs first with `python -m trainers build-pairs`")
    rows = list(read_pair_records(path).values())
    usable = [r for r in rows if r.get("status") == "ok"]
    if not usable:
        statuses = {}
        for r in rows:
            statuses[r.get("status")] = statuses.get(r.get("status"), 0) + 1
        raise ValueError(f"{path} lists no usable pair (status ok) among {len(rows)} prompts: {statuses}; "
                         "'tied' means every image of a prompt scored the same — use more images per prompt "
                         "(--n) or another scorer")
    return usable


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header."""
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def training_size(width: int, height: int, resolution: int, multiple: int = 8) -> tuple[int, int]:
    """(width, height) a pair trains at: its own size, sides rounded down to the latent grid
    (``multiple`` pixels), up to about ``resolution``² pixels; a larger pair goes to the nearest
    aspect bucket of that area, as the FairHuman data path does. ``--resolution`` only caps."""
    if width * height <= resolution * resolution:
        return max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple)
    return nearest_bucket(width, height, buckets(resolution))


def _pixels(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) in [-1, 1] at ``size`` (H, W); no resampling when the image already has it."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.array(im.convert("RGB"))
    x = torch.from_numpy(arr).permute(2, 0, 1).float()[None] / 127.5 - 1.0
    if tuple(x.shape[-2:]) == tuple(size):
        return x[0]
    return F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)[0]


def dpo_objectives(model, noisy, t, target, cond, time_ids, n: int, beta: float,
                   stat_reduction: str = "channel-mean"):
    """(DPO loss, statistic-matching loss, metrics) for 2n noisy latents: winners then losers,
    sharing noise and timesteps; ``stat_reduction`` as ``core.dpo.stat_matching_loss``'s."""
    with torch.no_grad(), model.reference():  # first: its activations are gone before ours
        ref_pred = model.predict(noisy, t, cond, time_ids)
    pred = model.predict(noisy, t, cond, time_ids)
    err, ref_err = per_sample_error(pred, target), per_sample_error(ref_pred, target)
    dpo, metrics = diffusion_dpo_loss(err[:n], err[n:], ref_err[:n], ref_err[n:], beta)
    # one DDPM step from the winners' x_t with each model: compare channel means of x_{t-1}
    ac = model.noise_scheduler.alphas_cumprod.to(pred.device)
    x0, _ = model.predicted_x0_and_eps(noisy[:n], t[:n], pred[:n])
    x0_ref, _ = model.predicted_x0_and_eps(noisy[:n], t[:n], ref_pred[:n])
    stat = stat_matching_loss(ddpm_posterior_mean(noisy[:n], x0, t[:n], ac),
                              ddpm_posterior_mean(noisy[:n], x0_ref, t[:n], ac), stat_reduction)
    return dpo, stat, metrics


class HGDPO(Method):
    name = "hg-dpo"
    objective_names = ("dpo", "stat")
    combine = "sum"
    # Paper: SD1.5, LoRA rank 8 on the attention linears, lr 1e-5, 8-bit Adam, β = 2500,
    # λ_stat = 10000 (the rest of --preset paper: trainers/presets.py). Pairs train at their own
    # size: the resolution is a cap (1024² pixels holds SDXL's 1024² and the paper's 704 × 1024).
    defaults = dict(rank=8, lr=1e-5, resolution=1024, batch_size=1, optimizer="auto")

    @classmethod
    def check_data(cls, cfg) -> None:
        folder = Path(cfg.data)
        pairs = read_pairs(folder)
        refuse_unreadable([folder / p[k] for p in pairs for k in ("winner", "loser")], folder / PAIRS,
                          "restore them, or build the pairs again into a new folder")

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.folder = Path(cfg.data)
        self.pairs = read_pairs(self.folder)
        self.beta = cfg.beta if cfg.beta is not None else (5000.0 if model.arch == "sdxl" else 2500.0)
        # each pair's real (width, height) and the (width, height) it trains at; a batch holds
        # pairs of one training size
        self.sizes = [image_size(self.folder / p["winner"]) for p in self.pairs]
        self.train_sizes = [training_size(w, h, cfg.resolution) for w, h in self.sizes]
        self.order = StepBatches(self.train_sizes, cfg.batch_size, cfg.seed)

    def dataset_size(self) -> int:
        return len(self.pairs)

    def sum_weights(self) -> torch.Tensor:
        return torch.tensor([1.0, float(self.cfg.lambda_stat)])

    def pixel_size(self, i: int) -> tuple[int, int]:
        """(H, W) of pair ``i``'s training pixels."""
        return self.train_sizes[i][::-1]

    def time_ids(self, i: int) -> torch.Tensor:
        """SDXL's size conditioning of pair ``i`` from its real size: original (h, w), crop
        top-left (0, 0: resized whole, never cropped), target (h, w)."""
        (w, h), (tw, th) = self.sizes[i], self.train_sizes[i]
        return torch.tensor([h, w, 0, 0, th, tw], dtype=torch.float32)

    def batch(self, step: int, micro: int) -> dict:
        _, indices = self.order.batch(self.batch_number(step, micro))
        items = [{"winner": _pixels(self.folder / self.pairs[i]["winner"], self.pixel_size(i)),
                  "loser": _pixels(self.folder / self.pairs[i]["loser"], self.pixel_size(i)),
                  "time_ids": self.time_ids(i), "text": self.pairs[i]["prompt"], "index": i} for i in indices]
        return collate(items)

    def losses(self, batch: dict, generator: torch.Generator) -> StepLosses:
        model = self.model
        pixels = torch.cat([batch["winner"], batch["loser"]])
        n = batch["winner"].shape[0]
        latents = torch.cat([model.sample_latents(model.latent_moments(pixels[i: i + 1]), generator)
                             for i in range(2 * n)])
        noise, t = model.sample_noise_and_timesteps(latents[:n], generator)
        noise, t = noise.repeat(2, 1, 1, 1), t.repeat(2)  # winner and loser share noise and timestep
        noisy = model.add_noise(latents, noise, t)
        target = model.target(latents, noise, t)
        cond = model.conditioning(batch["text"]).repeat(2)
        time_ids = batch["time_ids"].repeat(2, 1)  # winners then losers
        dpo, stat, metrics = dpo_objectives(model, noisy, t, target, cond, time_ids, n, self.beta,
                                            self.cfg.stat_reduction)
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics.update(dpo_loss=float(dpo.detach()), stat_loss=float(stat.detach()))
        return StepLosses(torch.stack([dpo, stat]), metrics=metrics)

    @torch.no_grad()
    def evaluate(self, probes: int = 8) -> dict:
        """The implicit reward margin on the first ``eval_pairs`` training pairs under fixed
        probes: the posterior-mean latents, ``probes`` noises seeded by the pair and timesteps
        spread evenly over the schedule. Unlike the per-step margin (one random t per pair) it is
        the same measurement at every call, so its change over a run is the training's. The
        pairs' latents and the reference's errors do not change during a run: they are computed
        at the first call only."""
        pairs = self.pairs[: self.cfg.eval_pairs]
        if not pairs:
            return {}
        model = self.model
        steps = model.noise_scheduler.config.num_train_timesteps
        t = ((torch.arange(probes) + 0.5) * steps / probes).long().to(model.device).repeat(2)
        first = not hasattr(self, "_eval_cache")
        if first:
            self._eval_cache = []
        was_training = model.unet.training
        model.unet.eval()
        margins = []
        for i, pair in enumerate(pairs):
            time_ids = self.time_ids(i)[None].repeat(2 * probes, 1)
            if first:
                pixels = torch.stack([_pixels(self.folder / pair["winner"], self.pixel_size(i)),
                                      _pixels(self.folder / pair["loser"], self.pixel_size(i))])
                means = model.latent_moments(pixels)[:, 0] * model.pipe.vae.config.scaling_factor
            else:
                means = self._eval_cache[i][0]
            latents = means.repeat_interleave(probes, dim=0)  # w, w, ..., l, l, ...
            generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + i)
            noise = torch.randn(latents[:probes].shape, generator=generator).to(latents).repeat(2, 1, 1, 1)
            noisy, target = model.add_noise(latents, noise, t), model.target(latents, noise, t)
            cond = model.conditioning([pair["prompt"]]).repeat(2 * probes)
            if first:
                with model.reference():
                    ref = per_sample_error(model.predict(noisy, t, cond, time_ids), target)
                self._eval_cache.append((means, ref))
            ref = self._eval_cache[i][1]
            err = per_sample_error(model.predict(noisy, t, cond, time_ids), target)
            delta = (err[:probes] - err[probes:]).mean() - (ref[:probes] - ref[probes:]).mean()
            margins.append(float(-0.5 * self.beta * delta))
        model.unet.train(was_training)
        margins = torch.tensor(margins)
        return {"pair_margin": float(margins.mean()), "pair_accuracy": float((margins > 0).float().mean())}

    def summary(self) -> dict:
        return {"beta": self.beta, "lambda_stat": self.cfg.lambda_stat, "stat_reduction": self.cfg.stat_reduction}


METHOD = HGDPO
