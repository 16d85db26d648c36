"""``python -m trainers build-pairs``: HG-DPO preference pairs from AI feedback.

For each prompt: N images from the target model (batched, seeds recorded), scored; the best and
the worst become a pair. Output: ``pairs.jsonl`` (one line per prompt: prompt, seeds, scores,
winner, loser, every image, status) and the images. Resumable per prompt; an image the scorer
fails on is recorded with the reason and left out of the choice, not fatal; a prompt whose images
all score the same is recorded as ``tied`` (there is no preference in it) and not trained on.
The winner's and the loser's face and hand masks are stored beside the images (``masks/``, as
``annotate`` makes them) and named in the record's ``masks`` (fair-dpo trains on them; both DPO
methods measure per-region margins with them); ``annotate_pairs`` adds them to an older folder.
Under torchrun / accelerate launch and with ``--shard I/N`` (then ``--merge``) the items are split
over processes and shards (``trainers/shards.py``, docs/scale-out.md); the merged output is the
one-process output.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch

from core.fileio import atomic_path, write_jsonl_atomic

from . import base_files, shards
from .methods.hg_dpo import PAIRS, read_pair_records
from .presets import preset_names, preset_problem, preset_values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="tiny-sd15",
                        help="a tiny base (tiny-sd15, tiny-sdxl, tiny-flux, tiny-zimage, tiny-sd3), an SD1.5/SDXL "
                             "single-file checkpoint, a Flux.1/SD3.5/Z-Image diffusion model file (with "
                             "--text-encoders, --vae) or a diffusers folder")
    parser.add_argument("--prompts", type=Path, required=True, help="text file, one prompt per line")
    parser.add_argument("--preset", default="", choices=["", *preset_names()],
                        help="paper: HG-DPO's settings (PickScore, N 20, DPM-Solver++ 50 steps, CFG 5; README, "
                             "Paper fidelity); flags still override it")
    parser.add_argument("--images-per-prompt", "--n", dest="n", type=int, default=None,
                        help=f"images per prompt (default {DEFAULTS['n']}; paper: 20); --n is short for it outside "
                             "torchrun and accelerate launch, which take it for an abbreviation of their own options")
    parser.add_argument("--scorer", default=None, help="anatomy (the default), pickscore (--preset paper), hps, "
                                                       "imagereward, or a weighted composite such as anatomy:1,hps:5")
    parser.add_argument("--scorer-model", action="append", default=[], metavar="[NAME=]FOLDER",
                        help="local weights folder of a model-based scorer (pickscore, hps, imagereward); repeat as "
                             "NAME=FOLDER for each one in a composite")
    parser.add_argument("--output", type=Path, required=True, help="pairs folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; each image gets its own")
    parser.add_argument("--sampler", default=None, choices=SAMPLERS,
                        help="default: the base model's own scheduler; dpmsolver++: diffusers' DPMSolverMultistep "
                             "built from that scheduler's config (the paper's)")
    parser.add_argument("--steps", type=int, default=None, help=f"sampler steps (default {DEFAULTS['steps']}; paper: 50)")
    parser.add_argument("--cfg", type=float, default=None,
                        help=f"classifier-free guidance scale (default {DEFAULTS['cfg']}; paper: 5; Flux.1-dev: "
                             "unused without a negative prompt, its distilled guidance is 3.5; Z-Image-Turbo: 1, "
                             "none)")
    parser.add_argument("--size", type=image_size, default=None,
                        help="image size, SIDE or WIDTHxHEIGHT (default: the model's; the paper's SD1.5: 704x1024)")
    parser.add_argument("--batch", type=int, default=4, help="images generated at once")
    parser.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder for single-file checkpoints")
    base_files.add_arguments(parser)
    parser.add_argument("--mask-confidence", type=float, default=0.5,
                        help="minimum face/hand detection confidence of the winner's and loser's masks (default "
                             "0.5, as annotate; a young model whose samples hold no confident face needs less)")
    shards.add_arguments(parser)


DEFAULTS = {"scorer": "anatomy", "n": 20, "sampler": "default", "steps": 30, "cfg": 7.5}
SAMPLERS = ("default", "dpmsolver++")


def image_size(text: str) -> tuple[int, int]:
    """``--size``: SIDE or WIDTHxHEIGHT, as (width, height), sides positive multiples of 8."""
    parts = str(text).lower().split("x")
    try:
        width, height = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"expected SIDE or WIDTHxHEIGHT, got {text!r}") from None
    if len(parts) > 2 or min(width, height) <= 0 or width % 8 or height % 8:
        raise argparse.ArgumentTypeError(f"{text!r}: sides must be positive multiples of 8")
    return width, height


def resolve_options(args: argparse.Namespace) -> argparse.Namespace:
    """Each option left unset takes the preset's value, else its default (a flag wins)."""
    problem = preset_problem(args.preset, "build-pairs")
    if problem:
        raise SystemExit(f"error: {problem}")
    for name, value in {**DEFAULTS, **preset_values(args.preset, "build-pairs")}.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return args


def use_sampler(pipe, name: str) -> None:
    """Swap in the sampler ``name``, built offline from the pipeline's own scheduler config (its
    schedule: betas, prediction type, timestep spacing)."""
    if name == "dpmsolver++":
        from diffusers import DPMSolverMultistepScheduler

        if "beta_schedule" not in pipe.scheduler.config:  # a flow-matching schedule (Flux) has no betas
            raise SystemExit(f"--sampler dpmsolver++ is built from a DDPM schedule; this base samples with "
                             f"{type(pipe.scheduler).__name__}: use --sampler default")

        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")


def scorer_folders(spec: str, values: list[str]) -> dict[str, str]:
    """``--scorer-model`` values as {scorer name: folder}; a bare folder belongs to the one
    scorer named by ``--scorer``."""
    folders = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep:
            if "," in spec or ":" in spec:
                raise SystemExit(f"--scorer {spec} is a composite: give each folder as NAME=FOLDER")
            name, folder = spec, value
        folders[name.strip()] = folder
    return folders


def kept_masks(folder: Path, names: list[str], min_confidence: float = 0.5) -> dict:
    """``{image: {"mask_face", "mask_hand", "faces", "hands"}}`` for the kept images: detected and
    drawn with ``annotate``'s defaults (at 0.5 the anatomy scorer's detector and settings, so its
    detections), written as ``masks/<stem>_<region>.png``; an image without a face or a hand
    gets an empty mask."""
    from core.masks import boxes_mask, detect, load_rgb

    from .annotate import write_mask

    entries = {}
    for name in names:
        rgb = load_rgb(folder / name)
        faces, hands = detect(rgb, min_confidence=min_confidence)
        entry = {"faces": [f.to_json() for f in faces], "hands": [h.to_json() for h in hands],
                 "min_confidence": min_confidence}
        for region, found in (("face", faces), ("hand", hands)):
            path = f"masks/{Path(name).stem}_{region}.png"
            write_mask(folder / path, boxes_mask([d.box for d in found], rgb.shape[:2]))
            entry[f"mask_{region}"] = path
        entries[name] = entry
    return entries


def annotate_pairs(folder: Path) -> int:
    """Add the kept images' masks to every usable pair of ``folder`` that has none (a folder
    built before build-pairs stored them) or whose mask files are gone; rewrites ``pairs.jsonl``
    atomically. Returns how many pairs were annotated."""
    folder = Path(folder)
    path = folder / PAIRS
    records = read_pair_records(path)

    def has_masks(record):
        entries = record.get("masks") or {}
        return all(record[k] in entries and all((folder / entries[record[k]][f"mask_{region}"]).is_file()
                                                for region in ("face", "hand")) for k in ("winner", "loser"))

    todo = [r for r in records.values() if r.get("status") == "ok" and not has_masks(r)]
    for record in todo:
        record["masks"] = kept_masks(folder, [record["winner"], record["loser"]])
    if todo:
        write_jsonl_atomic(path, list(records.values()))
    return len(todo)


FINISHED = ("ok", "tied")  # a prompt with status "error" is tried again on the next run


def run(args: argparse.Namespace) -> int:
    from core.scorers import get_scorer

    args = resolve_options(args)
    # each prompt once, at its first line: its position k fixes its seeds and image names
    prompts = list(dict.fromkeys(p.strip() for p in args.prompts.read_text(encoding="utf-8").splitlines() if p.strip()))
    if not prompts:
        raise SystemExit(f"{args.prompts} has no prompts")
    if args.n < 2:
        raise SystemExit("--images-per-prompt must be at least 2: a pair needs a best and a worst image")
    if not 0 < args.mask_confidence <= 1:
        raise SystemExit(f"--mask-confidence must be in (0, 1], got {args.mask_confidence}")
    scorer = None
    if not args.merge:
        try:  # before any generation: a scorer without its weights folder is named with the flag
            scorer = get_scorer(args.scorer, models=scorer_folders(args.scorer, args.scorer_model))
        except FileNotFoundError as err:
            raise SystemExit(f"error: {err}") from None
    out = args.output
    (out / "images").mkdir(parents=True, exist_ok=True)
    share = shards.Share.of(args.shard)
    store = shards.ShardedRecords(out / PAIRS, share, key=lambda r: r["prompt"],
                                  finished=lambda r: r.get("status") in FINISHED)
    try:
        records = store.load()
        if not args.merge:
            todo = [(k, p) for k, p in enumerate(prompts) if records.get(p, {}).get("status") not in FINISHED]
            if share.reporter:
                retried = sum(1 for _, p in todo if p in records)
                print(f"{len(prompts)} prompts, {len(prompts) - len(todo)} already done"
                      + (f", {retried} failed before and tried again" if retried else "")
                      + (f" ({share.describe()} of the rest)" if share.count > 1 else ""), flush=True)
            generate = PairMaker(args, out, prompts, scorer)
            shards.work_share(store, todo, generate.records, "prompts", "prompt")
            records = store.gathered()
            if records is None:
                return 0
        store.check_complete(records, prompts)
        store.merge([records[p] for p in prompts])
    except shards.ShardError as err:
        raise SystemExit(f"error: {err}") from None
    counts = {status: sum(1 for p in prompts if records[p]["status"] == status) for status in ("ok", "tied", "error")}
    failed = [p for p in prompts if records[p]["status"] == "error"]
    print(f"done: {counts['ok']} pairs, {counts['tied']} prompts whose images all scored the same, "
          f"{counts['error']} prompts failed")
    if failed:
        print(f"error: {len(failed)} of {len(prompts)} prompts failed (e.g. {failed[0]!r}: "
              f"{records[failed[0]]['reason']}); run the same command again to retry them", file=sys.stderr)
        return 1
    return 0


class PairMaker:
    """The records of the prompts at given positions: N images each, scored, best and worst kept.
    The pipeline loads on the first prompt (a process with nothing to do loads nothing)."""

    def __init__(self, args, out: Path, prompts: list[str], scorer):
        self.args, self.out, self.prompts, self.scorer = args, out, prompts, scorer
        self.generation = {"sampler": args.sampler, "steps": args.steps, "cfg": args.cfg, "scorer": args.scorer,
                           "preset": args.preset}
        self.common = dict(num_inference_steps=args.steps, cfg=args.cfg)
        if args.size:
            self.common.update(width=args.size[0], height=args.size[1])

    def records(self, positions: list[int]):
        from core.families import family_of

        if not positions:
            return
        pipe = base_files.load_pipeline_of(self.args).to(shards.Share.device())
        use_sampler(pipe, self.args.sampler)
        family = family_of(pipe, shards.Share.device())
        try:
            family.require_rendering()  # one clear refusal, not an error recorded for every prompt
        except ValueError as err:
            raise SystemExit(str(err)) from None
        for k in positions:
            yield self.record(family, k)

    def record(self, family, k: int) -> dict:
        """Prompt ``k``'s record: its images sampled with the family's own pipeline (on Flux its
        flow-matching Euler sampler with the distilled guidance)."""
        args, out, prompt = self.args, self.out, self.prompts[k]
        seeds = [args.seed + k * args.n + i for i in range(args.n)]
        record = {"prompt": prompt, "seeds": seeds, "images": [], "scores": [], "errors": {},
                  "generation": self.generation}
        try:
            for start in range(0, args.n, args.batch):
                chunk = seeds[start: start + args.batch]
                images = family.render([prompt] * len(chunk), [torch.Generator().manual_seed(s) for s in chunk],
                                       **self.common)
                for seed, image in zip(chunk, images):
                    name = f"images/{k:05d}_{seed}.png"
                    with atomic_path(out / name) as tmp:
                        image.save(tmp, format="PNG")
                    record["images"].append(name)
                    try:
                        record["scores"].append(float(self.scorer.score([image], [prompt])[0]))
                    except Exception as err:  # an unscorable image is recorded, not fatal
                        record["scores"].append(None)
                        record["errors"][name] = f"{type(err).__name__}: {err}"
            scored = [(s, name) for s, name in zip(record["scores"], record["images"]) if s is not None]
            if len(scored) < 2:
                raise ValueError(f"only {len(scored)} of {args.n} images could be scored")
            ranked = sorted(scored, key=lambda x: x[0])  # stable: ties keep generation order
            worst, best = ranked[0], ranked[-1]
            if best[0] == worst[0]:  # no preference to learn from; kept out of training
                record.update(status="tied", reason=f"all {len(scored)} scored images scored {best[0]}")
            else:
                record.update(status="ok", reason=None, winner=best[1], loser=worst[1], winner_score=best[0],
                              loser_score=worst[0], masks=kept_masks(out, [best[1], worst[1]], args.mask_confidence))
        except Exception as err:
            record.update(status="error", reason=f"{type(err).__name__}: {err}", trace=traceback.format_exc()[-1500:])
        return record
