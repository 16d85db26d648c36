"""HG-DPO: Diffusion-DPO on preference pairs plus the statistic-matching loss.

Winner and loser share the noise and the timestep and go through the tuned denoiser in one
concatenated forward; the reference is the same denoiser with its LoRA switched off, run first and
without gradients, so no second copy of the model is held and its activations are freed before
the tuned forward saves its own.

The objective is the model family's (``core.families``): its noise, timesteps, target and denoiser
call. On a UNet the errors are ε- (or v-) prediction errors at a DDPM timestep; on a flow model
(Flux) they are velocity errors at a noise level σ, winner and loser at the same x_t = (1 − σ)·x0 +
σ·noise — Diffusion-DPO's formula is the same on both.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.dpo import diffusion_dpo_loss, masked_per_sample_error, per_sample_error, stat_matching_loss
from core.fileio import read_jsonl
from core.masks import to_latent

from ..data import StepBatches, buckets, collate, nearest_bucket, refuse_unreadable
from .base import Method, StepLosses

PAIRS = "pairs.jsonl"
REGIONS = ("face", "hand")  # the masks build-pairs stores per kept image: record["masks"][image]["mask_<region>"]


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


def pair_masks(folder: Path, pair: dict, size: tuple[int, int]) -> torch.Tensor | None:
    """(2, 2, H, W) in [0, 1]: the winner's then the loser's face and hand masks resized to the
    pixels' ``size`` (H, W) the way ``_pixels`` resizes the images (keep the two alike, or the
    masks drift from their images); None when the record has no masks (made before build-pairs
    stored them: ``annotate_pairs`` adds them)."""
    from PIL import Image

    entries = pair.get("masks") or {}
    if not all(pair[k] in entries for k in ("winner", "loser")):
        return None
    out = []
    for key in ("winner", "loser"):
        for region in REGIONS:
            path = entries[pair[key]].get(f"mask_{region}")
            if not path:
                out.append(torch.zeros(size))
                continue
            with Image.open(folder / path) as im:
                m = torch.from_numpy(np.array(im.convert("L"), dtype=np.float32) / 255.0)[None, None]
            if tuple(m.shape[-2:]) != tuple(size):
                m = F.interpolate(m, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
            out.append(m[0, 0].clamp(0, 1))
    return torch.stack(out).view(2, len(REGIONS), *size)


def region_errors(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
    """(1 + R, B) per-sample errors: over the whole latent, then over each of the R region
    masks (B, R, h, w) on the latent grid; (1, B) without masks."""
    rows = [per_sample_error(pred, target)]
    if masks is not None:
        rows += [masked_per_sample_error(pred, target, masks[:, r])[0] for r in range(masks.shape[1])]
    return torch.stack(rows)


def tuned_and_reference(model, noisy, t, cond, time_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """(tuned prediction, reference prediction); the reference without gradients."""
    with torch.no_grad(), model.reference():  # first: its activations are gone before ours
        ref_pred = model.predict(noisy, t, cond, time_ids)
    return model.predict(noisy, t, cond, time_ids), ref_pred


def dpo_objectives(model, noisy, t, target, cond, time_ids, n: int, beta: float,
                   stat_reduction: str = "channel-mean"):
    """(DPO loss, statistic-matching loss, metrics) for 2n noisy latents: winners then losers,
    sharing noise and timesteps; ``stat_reduction`` as ``core.dpo.stat_matching_loss``'s."""
    pred, ref_pred = tuned_and_reference(model, noisy, t, cond, time_ids)
    err, ref_err = per_sample_error(pred, target), per_sample_error(ref_pred, target)
    dpo, metrics = diffusion_dpo_loss(err[:n], err[n:], ref_err[:n], ref_err[n:], beta)
    return dpo, stat_objective(model, noisy, t, pred, ref_pred, n, stat_reduction), metrics


def stat_objective(model, noisy, t, pred, ref_pred, n: int, reduction: str = "channel-mean") -> torch.Tensor:
    """The statistic-matching loss of the winners (the first n): the channel means of the
    one-step samples from their x_t with each model (the family's ``stat_latent``: a DDPM step to
    t − 1 on a UNet, the predicted x0 on a flow model), on the (B, C, h, w) latent grid."""
    family = model.family
    return stat_matching_loss(family.stat_latent(noisy[:n], t[:n], pred[:n]),
                              family.stat_latent(noisy[:n], t[:n], ref_pred[:n]), reduction)


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

    @classmethod
    def texts(cls, cfg) -> list[str]:
        return [pair["prompt"] for pair in read_pairs(cfg.data)]

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.folder = Path(cfg.data)
        self.pairs = read_pairs(self.folder)
        self.beta = cfg.beta if cfg.beta is not None else (5000.0 if model.arch == "sdxl" else 2500.0)
        # each pair's real (width, height) and the (width, height) it trains at; a batch holds
        # pairs of one training size
        self.sizes = [image_size(self.folder / p["winner"]) for p in self.pairs]
        self.train_sizes = [training_size(w, h, cfg.resolution, model.family.pixel_multiple) for w, h in self.sizes]
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
        return self.objectives(noisy, t, target, cond, time_ids, n, batch)

    def objectives(self, noisy, t, target, cond, time_ids, n: int, batch: dict) -> StepLosses:
        """The step's objectives from its 2n noisy latents (winners then losers); fair-dpo
        overrides this, not the data path above."""
        dpo, stat, metrics = dpo_objectives(self.model, noisy, t, target, cond, time_ids, n, self.beta,
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
        at the first call only. Where the pairs have masks, the margin is also measured over each
        image's face and hand masks (``face_margin``, ``hand_margin``, over the pairs that have
        the region in the winner or the loser), for hg-dpo and fair-dpo alike."""
        pairs = self.pairs[: self.cfg.eval_pairs]
        if not pairs:
            return {}
        model = self.model
        t = model.family.probe_timesteps(probes).repeat(2)
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
                means = model.family.normalize_latents(model.latent_moments(pixels)[:, 0])
                masks = pair_masks(self.folder, pair, tuple(pixels.shape[-2:]))
                regions = None if masks is None else model.loss_masks(to_latent(masks, tuple(means.shape[-2:])).to(means))
            else:
                means, _, regions = self._eval_cache[i]
            probe_masks = None if regions is None else regions.repeat_interleave(probes, dim=0)
            latents = means.repeat_interleave(probes, dim=0)  # w, w, ..., l, l, ...
            generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + i)
            noise = torch.randn(latents[:probes].shape, generator=generator).to(latents).repeat(2, 1, 1, 1)
            noisy, target = model.add_noise(latents, noise, t), model.target(latents, noise, t)
            cond = model.conditioning([pair["prompt"]]).repeat(2 * probes)
            if first:
                with model.reference():
                    ref = region_errors(model.predict(noisy, t, cond, time_ids), target, probe_masks)
                self._eval_cache.append((means, ref, regions))
            ref = self._eval_cache[i][1]
            err = region_errors(model.predict(noisy, t, cond, time_ids), target, probe_masks)
            delta = (err[:, :probes] - err[:, probes:]).mean(1) - (ref[:, :probes] - ref[:, probes:]).mean(1)
            margin = (-0.5 * self.beta * delta).tolist()
            # a region is measured on a pair when the winner or the loser has it
            present = [True] + ([] if regions is None else regions.flatten(2).amax(2).amax(0).gt(0).tolist())
            margins.append([m if p else None for m, p in zip(margin, present)])
        model.unet.train(was_training)
        out = {}
        names = ("pair", *REGIONS) if any(len(row) > 1 for row in margins) else ("pair",)
        for r, name in enumerate(names):
            values = torch.tensor([row[r] for row in margins if len(row) > r and row[r] is not None])
            if r:
                out[f"{name}_pairs"] = len(values)
            if len(values):
                out[f"{name}_margin"] = float(values.mean())
                out[f"{name}_accuracy"] = float((values > 0).float().mean())
        return out

    def summary(self) -> dict:
        return {"beta": self.beta, "lambda_stat": self.cfg.lambda_stat, "stat_reduction": self.cfg.stat_reduction}


METHOD = HGDPO
